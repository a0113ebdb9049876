"""Per-namespace limits on one node: parse them, check a reservation, export usage as metrics.

ResourceQuota only counts PVCs, so inline CSI volumes escape it: without a limit here one
namespace's pods can take a whole node. Every namespace gets a default share (bytes and volume
count; 0 = no limit) and an admin may override it per namespace. Bytes are a volume's charge,
the unit of the node's budget. A volume whose record names no namespace (a PVC created without
``--extra-create-metadata``, a PVC reserved again after a reboot) is charged to none.

Metrics carry a ``namespace`` label, whose values are bounded: at most MAX_NAMESPACE_SERIES
namespaces are labelled (first the overrides and the namespaces refused since start-up, which
keep their series, then the largest current users); everything else is summed as ``_other``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from csi.errors import InvalidArgument, NamespaceLimitExceeded
from csi.params import format_bytes, parse_quantity

if TYPE_CHECKING:  # capacity.py imports this module
    from csi.capacity import Capacity
    from csi.journal import Record

log = logging.getLogger(__name__)

MAX_OVERRIDES_LENGTH = 64 * 1024  # bytes of JSON read before parsing: a typo, not a DoS
MAX_NAMESPACE_SERIES = 20  # namespaces with their own series, beside "_other"
OTHER = "_other"  # sum of every namespace without its own series
DEFAULT = "_default"  # the default share's limit series
LIMIT_KINDS = ("bytes", "volumes")
OVERRIDE_KEYS = frozenset(LIMIT_KINDS)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HOW_TO_RAISE = ("a cluster admin can raise this namespace's limit with --namespace-limits "
                "(env NAMESPACE_LIMITS; chart: node.namespaceLimits.overrides)")  # fmt: skip


@dataclass(frozen=True)
class Limit:
    """One namespace's share of this node; 0 means no limit."""

    max_bytes: int = 0
    max_volumes: int = 0


@dataclass(frozen=True)
class NamespaceLimits:
    """The default share and the per-namespace overrides (sorted by name; a tuple keeps the
    frozen Config hashable)."""

    default: Limit = Limit()
    overrides: tuple[tuple[str, Limit], ...] = ()

    def of(self, namespace: str) -> Limit:
        return dict(self.overrides).get(namespace, self.default)

    def is_override(self, namespace: str) -> bool:
        return any(name == namespace for name, _ in self.overrides)

    @property
    def enabled(self) -> bool:
        limits = [self.default, *(limit for _, limit in self.overrides)]
        return any(limit.max_bytes or limit.max_volumes for limit in limits)


@dataclass(frozen=True)
class Used:
    bytes: int = 0
    volumes: int = 0


# parsing -----------------------------------------------------------------------------------
def check_namespace(name: object) -> str:
    """A namespace name is a DNS-1123 label; anything else cannot name a namespace."""
    if not isinstance(name, str) or len(name) > 63 or not _DNS1123_LABEL.match(name):
        raise InvalidArgument(
            f"--namespace-limits: {json.dumps(name)[:80]} is not a namespace name (a DNS-1123 "
            "label: at most 63 lower-case letters, digits and '-', starting and ending with a "
            "letter or digit)"
        )
    return name


def parse_overrides(text: str, default: Limit) -> tuple[tuple[str, Limit], ...]:
    """``{"team-a": {"bytes": "10Gi", "volumes": 4}, ...}`` -> sorted (namespace, Limit) pairs.

    A kind left out of an override keeps the default share's value; 0 lifts that limit for
    the namespace. The length is bounded before the JSON parser sees the text."""
    text = text.strip()
    if not text:
        return ()
    if len(text.encode()) > MAX_OVERRIDES_LENGTH:
        raise InvalidArgument(
            f"--namespace-limits is {len(text.encode())} bytes long, more than the "
            f"{MAX_OVERRIDES_LENGTH} accepted: override fewer namespaces and let the others "
            "use the default share (--namespace-max-bytes, --namespace-max-volumes)"
        )
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise InvalidArgument(
            f"--namespace-limits is not valid JSON ({exc}); expected an object such as "
            '{"team-a": {"bytes": "10Gi", "volumes": 4}}'
        ) from None
    if not isinstance(data, dict):
        raise InvalidArgument(
            "--namespace-limits must be a JSON object of namespace -> limits, such as "
            '{"team-a": {"bytes": "10Gi", "volumes": 4}}'
        )
    return tuple(sorted((check_namespace(ns), _override(ns, v, default)) for ns, v in data.items()))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice is a mistake to name, not a value to pick silently."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise InvalidArgument(f"--namespace-limits names {json.dumps(key)[:80]} twice; "
                                  "give each namespace (and each of its keys) once")  # fmt: skip
        seen[key] = value
    return seen


def _override(namespace: str, value: Any, default: Limit) -> Limit:
    where = f"--namespace-limits: namespace {namespace}"
    if not isinstance(value, dict):
        raise InvalidArgument(f'{where} must map to an object such as {{"bytes": "10Gi", '
                              '"volumes": 4}')  # fmt: skip
    unknown = sorted(set(value) - OVERRIDE_KEYS)
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown key {json.dumps(unknown[0])[:40]}; the keys are bytes (a "
            "quantity such as 10Gi) and volumes (a count)"
        )
    max_bytes, max_volumes = default.max_bytes, default.max_volumes
    if "bytes" in value:
        max_bytes = _bytes(where, value["bytes"])
    if "volumes" in value:
        count = value["volumes"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InvalidArgument(f"{where}: volumes must be a whole number of volumes, 0 or "
                                  f"more (0 = no limit), not {json.dumps(count)[:40]}")  # fmt: skip
        max_volumes = count
    return Limit(max_bytes, max_volumes)


def _bytes(where: str, raw: Any) -> int:
    wrong_type = isinstance(raw, bool) or not isinstance(raw, (int, str))
    if wrong_type or (isinstance(raw, int) and raw < 0):
        raise InvalidArgument(
            f"{where}: bytes must be a quantity such as 10Gi or a number of bytes, 0 or more "
            f"(0 = no limit), not {json.dumps(raw)[:40]}"
        )
    if isinstance(raw, int):
        return raw
    try:
        return parse_quantity(raw)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: bytes: {exc}") from None


# enforcement -------------------------------------------------------------------------------
def namespace_of(record: Record) -> str:
    """The namespace a volume is charged to: the inline volume's pod, or the PVC's claim
    (``namespace/name``); "" when the record does not say."""
    if record.provisioned:
        namespace, slash, _ = record.claim.partition("/")
        return namespace if slash else ""
    return record.pod.get("namespace", "")


def usage(records: Iterable[Record]) -> dict[str, Used]:
    """Bytes (charges) and volume count per namespace; volumes of no namespace are left out."""
    used: dict[str, Used] = {}
    for r in records:
        namespace = namespace_of(r)
        if namespace:
            u = used.get(namespace, Used())
            used[namespace] = Used(u.bytes + r.charge, u.volumes + 1)
    return used


def check(limits: NamespaceLimits, record: Record, others: Iterable[Record], *,
          new_volume: bool) -> None:  # fmt: skip
    """Raise NamespaceLimitExceeded if ``record`` does not fit in its namespace's share, counted
    against ``others`` (every other record on the node). Growth checks bytes only."""
    namespace = namespace_of(record)
    if not namespace or not limits.enabled:
        return
    limit = limits.of(namespace)
    mine = [r for r in others if namespace_of(r) == namespace]
    source = "override" if limits.is_override(namespace) else "default share"
    if new_volume and limit.max_volumes and len(mine) >= limit.max_volumes:
        flag = "" if limits.is_override(namespace) else ", --namespace-max-volumes"
        raise NamespaceLimitExceeded(
            f"namespace {namespace} already has {len(mine)} volumes on this node, its limit of "
            f"volumes is {limit.max_volumes} ({source}{flag}): delete one of its volumes on "
            f"this node or let the pod run on another node; {HOW_TO_RAISE}",
            namespace=namespace, limit="volumes",
        )  # fmt: skip
    used = sum(r.charge for r in mine)
    need = record.charge
    if limit.max_bytes and used + need > limit.max_bytes:
        flag = "" if limits.is_override(namespace) else ", --namespace-max-bytes"
        what = "this volume" if new_volume else f"volume {record.volume_id} grown"
        left = max(0, limit.max_bytes - used)
        raise NamespaceLimitExceeded(
            f"namespace {namespace} would use {human(used + need)} on this node with {what} "
            f"({human(need)}), over its limit of bytes, {human(limit.max_bytes)} ({source}"
            f"{flag}): {human(used)} is used by its {len(mine)} other volumes, {human(left)} "
            f"left; ask for a smaller size, delete one of its volumes on this node or let the "
            f"pod run on another node; {HOW_TO_RAISE}",
            namespace=namespace, limit="bytes",
        )  # fmt: skip


def human(n: int) -> str:
    """Exact where it can be (``10Gi``), else to a tenth of the largest unit that fits."""
    exact = format_bytes(n)
    if not exact.isdigit():
        return exact
    for unit, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n} bytes"


# metrics -----------------------------------------------------------------------------------
class NamespaceCollector(Collector):
    """Per-namespace usage read from the journal at scrape time, limits, and refusals.

    The labelled namespaces: the overrides, then each namespace refused since start-up (both
    kept, so a counter's series never vanishes), up to ``max_series``; the slots left go to
    the largest current users. The rest is summed under ``_other``."""

    def __init__(self, limits: NamespaceLimits, used: Callable[[], dict[str, Used]],
                 max_series: int = MAX_NAMESPACE_SERIES) -> None:  # fmt: skip
        self.limits = limits
        self.used = used
        self.max_series = max_series
        self._lock = threading.Lock()
        self._kept = [name for name, _ in limits.overrides][:max_series]
        self._refusals: dict[tuple[str, str], int] = {}

    def refused(self, error: NamespaceLimitExceeded) -> None:
        """Count a refusal (called by Capacity under its lock: cheap, and never raises)."""
        with self._lock:
            namespace = error.namespace
            if namespace not in self._kept and len(self._kept) < self.max_series:
                self._kept.append(namespace)
            label = namespace if namespace in self._kept else OTHER
            key = (label, error.limit)
            self._refusals[key] = self._refusals.get(key, 0) + 1

    def labelled(self, used: dict[str, Used]) -> list[str]:
        """The namespaces with their own series now (at most ``max_series``)."""
        with self._lock:
            kept = list(self._kept)
        rest = sorted((n for n in used if n not in kept),
                      key=lambda n: (-used[n].bytes, -used[n].volumes, n))  # fmt: skip
        return kept + rest[: max(0, self.max_series - len(kept))]

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Names only, so registering does not read the journal and clashes are caught."""
        for name in ("bytes", "volumes", "limit_bytes", "limit_volumes"):
            yield GaugeMetricFamily(f"luks_ephemeral_namespace_{name}", "", labels=["namespace"])
        yield CounterMetricFamily("luks_ephemeral_namespace_refusals", "",
                                  labels=["namespace", "limit"])  # fmt: skip

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            used = self.used()
        except Exception:  # an unreadable record must not take the other metrics down
            log.exception("cannot compute namespace usage for metrics; left out of scrape")
            return
        labelled = self.labelled(used)
        other = Used(sum(u.bytes for n, u in used.items() if n not in labelled),
                     sum(u.volumes for n, u in used.items() if n not in labelled))  # fmt: skip
        byte_family = GaugeMetricFamily(
            "luks_ephemeral_namespace_bytes",
            f"Bytes reserved on this node by the namespace's volumes ({OTHER}: every namespace "
            "without its own series)", labels=["namespace"])  # fmt: skip
        count_family = GaugeMetricFamily(
            "luks_ephemeral_namespace_volumes",
            f"Volumes of the namespace on this node ({OTHER}: every namespace without its own "
            "series)", labels=["namespace"])  # fmt: skip
        limit_bytes = GaugeMetricFamily(
            "luks_ephemeral_namespace_limit_bytes",
            f"The namespace's byte limit on this node, 0 = none ({DEFAULT}: the default share)",
            labels=["namespace"])  # fmt: skip
        limit_volumes = GaugeMetricFamily(
            "luks_ephemeral_namespace_limit_volumes",
            f"The namespace's volume limit on this node, 0 = none ({DEFAULT}: the default "
            "share)", labels=["namespace"])  # fmt: skip
        for namespace in labelled:
            u = used.get(namespace, Used())
            limit = self.limits.of(namespace)
            byte_family.add_metric([namespace], u.bytes)
            count_family.add_metric([namespace], u.volumes)
            limit_bytes.add_metric([namespace], limit.max_bytes)
            limit_volumes.add_metric([namespace], limit.max_volumes)
        byte_family.add_metric([OTHER], other.bytes)
        count_family.add_metric([OTHER], other.volumes)
        limit_bytes.add_metric([DEFAULT], self.limits.default.max_bytes)
        limit_volumes.add_metric([DEFAULT], self.limits.default.max_volumes)
        yield from (byte_family, count_family, limit_bytes, limit_volumes)
        refusals = CounterMetricFamily(
            "luks_ephemeral_namespace_refusals",
            f"Volumes refused because their namespace's limit was reached ({OTHER}: namespaces "
            "without their own series)", labels=["namespace", "limit"])  # fmt: skip
        with self._lock:
            counts = dict(self._refusals)
        for kind in LIMIT_KINDS:  # exported at 0, so rate() works from the first scrape
            counts.setdefault((OTHER, kind), 0)
        for (namespace, kind), value in sorted(counts.items()):
            refusals.add_metric([namespace, kind], value)
        yield refusals


def register_namespace_metrics(registry: CollectorRegistry, capacity: Capacity,
                               max_series: int = MAX_NAMESPACE_SERIES) -> NamespaceCollector:
    """Export ``capacity``'s per-namespace usage on ``registry`` and count its refusals."""
    collector = NamespaceCollector(capacity.config.namespace_limits, capacity.namespace_usage,
                                   max_series)  # fmt: skip
    registry.register(collector)
    capacity.on_namespace_refusal = collector.refused
    return collector
