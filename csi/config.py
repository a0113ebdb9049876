"""Driver configuration: one frozen dataclass built from flags, each flag also readable from env."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

from csi.errors import InvalidArgument
from csi.params import parse_quantity

DEFAULT_DRIVER_NAME = "luks-ephemeral.csi.io"
MODES = ("node", "controller", "all")


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
    log_format: str = "json"
    log_level: str = "INFO"

    @property
    def socket_path(self) -> str:
        return endpoint_path(self.endpoint)

    @property
    def serves_node(self) -> bool:
        return self.mode in ("node", "all")

    @property
    def serves_controller(self) -> bool:
        return self.mode in ("controller", "all")


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
    "log-format": ("LOG_FORMAT", "json or text"),
    "log-level": ("LOG_LEVEL", "DEBUG, INFO, WARNING, ERROR"),
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    for flag, (env, help_text) in _FLAGS.items():
        parser.add_argument(f"--{flag}", default=None, help=f"{help_text} [env {env}]")


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

    log_format = get("log-format", base.log_format)
    if log_format not in ("json", "text"):
        raise InvalidArgument(f"--log-format must be json or text, not {log_format!r}")
    try:
        max_volumes = int(get("max-volumes", str(base.max_volumes)))
    except ValueError:
        raise InvalidArgument("--max-volumes must be an integer") from None
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
        log_format=log_format,
        log_level=get("log-level", base.log_level).upper(),
    )
    endpoint_path(config.endpoint)
    if config.min_size > config.max_size:
        raise InvalidArgument("--min-size is larger than --max-size")
    return config
