"""Driver configuration: one frozen dataclass built from flags, each flag also readable from env."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from csi.errors import InvalidArgument
from csi.limits import Limit, NamespaceLimits, parse_overrides
from csi.params import parse_quantity

DEFAULT_DRIVER_NAME = "luks-ephemeral.csi.io"
MODES = ("node", "controller", "all")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Config:
    mode: str = "node"
    endpoint: str = "unix:///run/luks-ephemeral-csi/csi.sock"
    node_id: str = "localhost"
    driver_name: str = DEFAULT_DRIVER_NAME
    state_dir: str = "/run/luks-ephemeral-csi"
    data_dir: str = "/var/lib/luks-ephemeral-csi"
    kubelet_root: str = "/var/lib/kubelet"
    capacity: int = 0  # bytes the admin lets volumes use on this node; 0 = only free space counts
    min_size: int = 32 * 1024**2
    max_size: int = 1024**4
    max_volumes: int = 128
    # each namespace's share of this node (bytes, volume count) and per-namespace overrides;
    # 0 = no limit, the default, so an install that sets nothing behaves as before
    namespace_limits: NamespaceLimits = field(default_factory=NamespaceLimits)
    log_format: str = "json"
    log_level: str = "INFO"
    metrics_address: str = ":9810"  # empty: no metrics endpoint
    reaper_grace: float = 300.0  # seconds a volume's pod must be gone before the volume is reaped
    reaper_interval: float = 60.0  # seconds between the orphan reaper's rounds
    kube_api_url: str = ""  # dev/test: an API server URL used without credentials
    qsd_socket: str = ""  # qemu-storage-daemon's QMP socket; empty: backing=qcow2 is refused
    # seconds to wait at start-up for another driver on the same state dir to exit: long enough
    # for a pod that is still shutting down (terminationGracePeriodSeconds, 30 s by default),
    # shorter than the liveness probe's patience (60 s in the chart)
    state_lock_wait: float = 30.0
    # where Kata Containers' runtime looks for direct-assigned volumes (kata=guest|host)
    kata_direct_volume_root: str = "/run/kata-containers/shared/direct-volumes"

    @property
    def socket_path(self) -> str:
        return endpoint_path(self.endpoint)

    @property
    def serves_node(self) -> bool:
        return self.mode in ("node", "all")

    @property
    def serves_controller(self) -> bool:
        return self.mode in ("controller", "all")


def _absolute(flag: str, path: str) -> str:
    if path and not path.startswith("/"):
        raise InvalidArgument(f"--{flag} {path!r} must be an absolute path")
    return path


def endpoint_path(endpoint: str) -> str:
    """The filesystem path of a ``unix://`` endpoint (absolute path after the scheme)."""
    if not endpoint.startswith("unix://"):
        raise InvalidArgument(f"endpoint {endpoint!r} must be unix:///absolute/path")
    path = endpoint[len("unix://") :]
    if not path.startswith("/"):
        raise InvalidArgument(f"endpoint {endpoint!r} must be unix:///absolute/path")
    return path


# flag -> (env var, help)
_FLAGS: dict[str, tuple[str, str]] = {
    "endpoint": ("CSI_ENDPOINT", "gRPC endpoint, unix:///path/to/csi.sock"),
    "node-id": ("NODE_ID", "this node's id (default: host name)"),
    "driver-name": ("DRIVER_NAME", "CSI driver name"),
    "state-dir": ("STATE_DIR", "journal and detached headers; must be tmpfs (e.g. under /run)"),
    "data-dir": ("DATA_DIR", "where backing files live (the node's disk)"),
    "kubelet-root": ("KUBELET_ROOT", "kubelet root dir; every target path must lie under it"),
    "capacity": ("CAPACITY", "budget for all volumes on this node (quantity); 0 = free space only"),
    "min-size": ("MIN_SIZE", "smallest volume size accepted (quantity)"),
    "max-size": ("MAX_SIZE", "largest volume size accepted (quantity)"),
    "max-volumes": ("MAX_VOLUMES", "most volumes published on this node at once"),
    "namespace-max-bytes": ("NAMESPACE_MAX_BYTES", "default share of this node for every "
                            "namespace: bytes its volumes may reserve (quantity); 0 = no limit"),
    "namespace-max-volumes": ("NAMESPACE_MAX_VOLUMES", "default share of this node for every "
                              "namespace: most volumes at once; 0 = no limit"),
    "namespace-limits": ("NAMESPACE_LIMITS", "per-namespace overrides of the default share, "
                         'JSON: {"team-a": {"bytes": "10Gi", "volumes": 4}}; a key left out '
                         "keeps the default, 0 lifts that limit"),
    "log-format": ("LOG_FORMAT", "json or text"),
    "log-level": ("LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR"),
    "metrics-address": ("METRICS_ADDRESS", "host:port for Prometheus metrics; empty disables"),
    "reaper-grace": ("REAPER_GRACE", "how long (seconds, or 30s/5m/1h) a volume's pod must be "
                     "gone from the node before the orphan reaper tears the volume down"),
    "reaper-interval": ("REAPER_INTERVAL", "how often (seconds, or 30s/5m/1h) the orphan reaper "
                        "lists this node's pods"),
    "qsd-socket": ("QSD_SOCKET", "QMP socket of the qemu-storage-daemon that serves qcow2 "
                   "volumes (it must outlive the driver: run it as a sidecar); empty refuses "
                   "backing=qcow2"),
    "state-lock-wait": ("STATE_LOCK_WAIT", "how long (seconds, or 30s/1m) a starting driver "
                        "waits for another driver on the same state dir to exit before it gives "
                        "up; 0 gives up at once"),
    "kata-direct-volume-root": ("KATA_DIRECT_VOLUME_ROOT", "where the Kata Containers runtime "
                                "reads direct-assigned volumes (kata=guest|host)"),
    "kube-api-url": ("KUBE_API_URL", ""),  # hidden: development and tests only
}
HIDDEN_FLAGS = {"kube-api-url"}
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def add_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (env, help_text) in _FLAGS.items():
        hidden = flag in HIDDEN_FLAGS
        parser.add_argument(
            f"--{flag}", default=None,
            help=argparse.SUPPRESS if hidden else f"{help_text} [env {env}]",
        )  # fmt: skip


def from_args(mode: str, args: argparse.Namespace, environ: dict[str, str] | None = None) -> Config:
    """Flags win over env vars, env vars over defaults; bad values raise InvalidArgument."""
    env = dict(os.environ if environ is None else environ)
    base = Config()

    def get(flag: str, default: str) -> str:
        value = getattr(args, flag.replace("-", "_"), None)
        if value is None:
            value = env.get(_FLAGS[flag][0])
        return default if value in (None, "") else str(value)

    def quantity(flag: str, default: int) -> int:
        raw = get(flag, str(default))
        try:
            return parse_quantity(raw)
        except InvalidArgument as exc:
            raise InvalidArgument(f"--{flag}: {exc}") from None

    def duration(flag: str, default: float, minimum: float) -> float:
        raw = get(flag, str(default))
        try:
            seconds = parse_duration(raw)
        except ValueError:
            raise InvalidArgument(
                f"--{flag} {raw!r} must be a number of seconds or end in s, m or h (e.g. 5m)"
            ) from None
        if seconds < minimum:
            raise InvalidArgument(f"--{flag} must be at least {minimum:g} seconds")
        return seconds

    log_format = get("log-format", base.log_format)
    if log_format not in ("json", "text"):
        raise InvalidArgument(f"--log-format must be json or text, not {log_format!r}")
    try:
        max_volumes = int(get("max-volumes", str(base.max_volumes)))
    except ValueError:
        raise InvalidArgument("--max-volumes must be an integer") from None
    if max_volumes < 1:
        raise InvalidArgument("--max-volumes must be at least 1")
    namespace_limits = _namespace_limits(get, quantity)
    log_level = get("log-level", base.log_level).upper()
    if log_level not in LOG_LEVELS:
        raise InvalidArgument(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    if mode not in MODES:
        raise InvalidArgument(f"mode must be one of {', '.join(MODES)}")
    config = Config(
        mode=mode,
        endpoint=get("endpoint", base.endpoint),
        node_id=get("node-id", socket.gethostname()),
        driver_name=get("driver-name", base.driver_name),
        state_dir=os.path.abspath(get("state-dir", base.state_dir)),
        data_dir=os.path.abspath(get("data-dir", base.data_dir)),
        kubelet_root=os.path.abspath(get("kubelet-root", base.kubelet_root)),
        capacity=quantity("capacity", base.capacity),
        min_size=quantity("min-size", base.min_size),
        max_size=quantity("max-size", base.max_size),
        max_volumes=max_volumes,
        namespace_limits=namespace_limits,
        log_format=log_format,
        log_level=log_level,
        metrics_address=_metrics_address(args, env, base.metrics_address),
        reaper_grace=duration("reaper-grace", base.reaper_grace, 0),
        reaper_interval=duration("reaper-interval", base.reaper_interval, 1),
        kube_api_url=_kube_api_url(get("kube-api-url", base.kube_api_url)),
        qsd_socket=_absolute("qsd-socket", get("qsd-socket", base.qsd_socket)),
        state_lock_wait=duration("state-lock-wait", base.state_lock_wait, 0),
        kata_direct_volume_root=_absolute(
            "kata-direct-volume-root",
            get("kata-direct-volume-root", base.kata_direct_volume_root)),
    )
    endpoint_path(config.endpoint)
    if config.min_size > config.max_size:
        raise InvalidArgument("--min-size is larger than --max-size")
    return config


def _namespace_limits(
    get: Callable[[str, str], str], quantity: Callable[[str, int], int]
) -> NamespaceLimits:
    """The default share from its two flags, then the overrides (which fall back to it)."""
    raw = get("namespace-max-volumes", "0")
    try:
        volumes = int(raw)
    except ValueError:
        raise InvalidArgument(f"--namespace-max-volumes {raw!r} must be a whole number "
                              "(0 = no limit)") from None  # fmt: skip
    if volumes < 0:
        raise InvalidArgument("--namespace-max-volumes must be 0 (no limit) or more")
    default = Limit(max_bytes=quantity("namespace-max-bytes", 0), max_volumes=volumes)
    return NamespaceLimits(default, parse_overrides(get("namespace-limits", ""), default))


def _metrics_address(args: argparse.Namespace, env: dict[str, str], default: str) -> str:
    """Unlike other flags an empty value is meaningful here: it turns metrics off."""
    value = args.metrics_address if getattr(args, "metrics_address", None) is not None else None
    if value is None:
        value = env.get("METRICS_ADDRESS", default)
    if value:
        _, _, port = value.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"--metrics-address {value!r} must be [host]:port, e.g. :9810")
    return str(value)


def parse_duration(text: str) -> float:
    """``300``, ``300s``, ``5m``, ``1.5h`` -> seconds; anything else raises ValueError."""
    text = text.strip()
    factor = DURATION_UNITS.get(text[-1:], None)
    number = text[:-1] if factor is not None else text
    value = float(number) * (factor or 1)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(text)
    return value


def _kube_api_url(value: str) -> str:
    if value and not value.startswith(("http://", "https://")):
        raise InvalidArgument(f"--kube-api-url {value!r} must start with http:// or https://")
    return value.rstrip("/")
