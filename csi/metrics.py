"""Prometheus metrics on an injected registry: RPCs, lifecycle steps, capacity, shredding.

``csi_plugin_operations_seconds`` labels an RPC the way the driver's log lines name it:
``method_name="NodePublishVolume"``, ``grpc_status_code="INVALID_ARGUMENT"`` (``"OK"`` on success),
so a log line and its sample are found with the same words.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from csi import backings
from csi.backings.base import COMPLETE_OUTCOMES, FAILED, INCOMPLETE
from csi.capacity import Usage
from csi.shred import ShredEvents, ShredReport
from csi.steps import ALL_STEPS
from csi.volumes import Events

log = logging.getLogger(__name__)

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ORPHAN_REASONS = (
    "backing_without_record", "mapping_without_record", "header_without_record", "pod_gone",
    "export_without_record", "loop_without_record", "directory_without_record",
    "handoff_without_record",
)  # fmt: skip
BACKINGS = backings.names()
SHRED_OUTCOMES = (*COMPLETE_OUTCOMES, INCOMPLETE, FAILED)
ACCESS_TYPES = ("mount", "block")

class Metrics(Events, ShredEvents):
    """Counts what the driver does; gauges about volumes are read from the lifecycle at scrape."""

    def __init__(self, registry: CollectorRegistry, driver_name: str) -> None:
        self.registry = registry
        self.driver_name = driver_name
        self.operations = Histogram(
            "csi_plugin_operations_seconds", "Duration of CSI operations",
            ["driver_name", "method_name", "grpc_status_code"], buckets=BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.step_seconds = Histogram(
            "luks_ephemeral_step_seconds", "Duration of each volume lifecycle step",
            ["step"], buckets=BUCKETS, registry=registry,
        )  # fmt: skip
        self.step_failures = Counter(
            "luks_ephemeral_step_failures", "Lifecycle steps that raised", ["step"],
            registry=registry,
        )  # fmt: skip
        self.shredded_total = Counter(
            "luks_ephemeral_shredded", "Volumes whose backing file and header were deleted",
            registry=registry,
        )  # fmt: skip
        self.orphans = Counter(
            "luks_ephemeral_orphans_removed",
            "Volumes or objects removed because nothing accounted for them any more",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.set_aside_total = Counter(
            "luks_ephemeral_journal_records_set_aside",
            "Unreadable journal records moved to <state>/volumes/unreadable (kept, never deleted)",
            registry=registry,
        )  # fmt: skip
        # export known series at 0, so rate() and absent-series alerts work from the first scrape
        for step in ALL_STEPS:
            self.step_failures.labels(step=step)
        for reason in ORPHAN_REASONS:
            self.orphans.labels(reason=reason)
        self.shred_seconds = Histogram(
            "luks_ephemeral_shred_seconds",
            "Emergency shreds: from the trigger to the last key gone", buckets=BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.shred_volumes = Counter(
            "luks_ephemeral_shred_volumes",
            "Volumes an emergency shred reached, by what it achieved (wiped, no_key, in_guest, "
            "incomplete, failed)", ["outcome"], registry=registry,
        )  # fmt: skip
        self.shred_incomplete = Gauge(
            "luks_ephemeral_shred_incomplete_keys",
            "Keys the last emergency shred could not fully remove (fscrypt files still open)",
            registry=registry,
        )  # fmt: skip
        for outcome in SHRED_OUTCOMES:
            self.shred_volumes.labels(outcome=outcome)
        self.sealed = Gauge(
            "luks_ephemeral_sealed",
            "1 while the node is sealed by an emergency shred (publish and stage refused)",
            registry=registry,
        )  # fmt: skip
        self._usage: UsageCollector | None = None

    def watch_seal(self, is_sealed: Callable[[], bool]) -> None:
        """Read the seal at scrape time: it can be set and lifted by any trigger."""
        self.sealed.set_function(lambda: float(is_sealed()))

    def shred_done(self, report: ShredReport) -> None:
        self.shred_seconds.observe(report.seconds)
        for result in report.results:
            self.shred_volumes.labels(outcome=result.outcome).inc()
        self.shred_incomplete.set(report.count(INCOMPLETE))

    # Events ------------------------------------------------------------------------------
    def step(self, name: str, seconds: float, ok: bool) -> None:
        self.step_seconds.labels(step=name).observe(seconds)
        if not ok:
            self.step_failures.labels(step=name).inc()

    def shredded(self) -> None:
        self.shredded_total.inc()

    def orphan_removed(self, reason: str) -> None:
        self.orphans.labels(reason=reason).inc()

    def record_set_aside(self, path: str) -> None:
        self.set_aside_total.inc()  # no path label: one series, whatever the volume

    # RPCs --------------------------------------------------------------------------------
    def rpc(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC: ``NodePublishVolume``, ``OK`` or a grpc.StatusCode name."""
        self.operations.labels(self.driver_name, method, code).observe(seconds)

    def watch_usage(self, usage: Callable[[], Usage]) -> None:
        """Read volume gauges from ``usage`` at scrape time; a second call replaces the source."""
        if self._usage is not None:
            self._usage.usage = usage
            return
        self._usage = UsageCollector(usage)
        self.registry.register(self._usage)


class UsageCollector(Collector):
    """Volume counts and bytes, computed from the journal and the disk at scrape time."""

    def __init__(self, usage: Callable[[], Usage]) -> None:
        self.usage = usage

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Names only, so registering does not read the journal and clashes are caught."""
        yield GaugeMetricFamily("luks_ephemeral_volumes", "", labels=["backing", "mode"])
        yield GaugeMetricFamily("luks_ephemeral_provisioned_bytes", "")
        yield GaugeMetricFamily("luks_ephemeral_allocated_bytes", "")
        yield GaugeMetricFamily("luks_ephemeral_capacity_bytes", "", labels=["kind"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            u = self.usage()
        except Exception:
            # one unreadable record must not take the RPC and step metrics down with it
            log.exception("cannot compute volume usage for metrics; gauges left out of scrape")
            return
        volumes = GaugeMetricFamily("luks_ephemeral_volumes", "Volumes on this node",
                                    labels=["backing", "mode"])  # fmt: skip
        keys = {(b, m) for b in BACKINGS for m in ACCESS_TYPES} | set(u.volumes)
        for backing, mode in sorted(keys):
            volumes.add_metric([backing, mode], u.volumes.get((backing, mode), 0))
        yield volumes
        yield GaugeMetricFamily("luks_ephemeral_provisioned_bytes",
                                "Sum of the sizes of this node's volumes", value=u.provisioned)
        yield GaugeMetricFamily("luks_ephemeral_allocated_bytes",
                                "Blocks really used by backing files on the node's disk",
                                value=u.allocated)  # fmt: skip
        capacity = GaugeMetricFamily(
            "luks_ephemeral_capacity_bytes",
            "Admin budget (0 = none, free space only), bytes reserved by volumes, and free space "
            "of the data dir",
            labels=["kind"],
        )
        capacity.add_metric(["budget"], u.budget)
        capacity.add_metric(["reserved"], u.reserved)
        capacity.add_metric(["data_dir_free"], u.data_dir_free)
        yield capacity


def parse_address(address: str) -> tuple[str, int]:
    """``:9810``, ``127.0.0.1:9810`` or ``[::]:9810`` -> (host, port); no host = every IPv4."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return host or "0.0.0.0", int(port)


class MetricsServer:
    """The running HTTP endpoint (``/metrics``); ``port`` is the bound one (useful with 0)."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self.httpd = httpd
        self.thread = thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def serve(registry: CollectorRegistry, address: str) -> MetricsServer:
    """Serve ``registry`` over HTTP on ``address`` in a daemon thread."""
    host, port = parse_address(address)
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd, thread)
