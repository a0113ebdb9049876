"""Command line: ``luks-ephemeral-csi node|controller|all`` serves; ``volumes`` lists volumes;
``shred --all|--volume ID`` wipes keys now and ``unseal`` lets volumes be made again."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from csi import __version__, hardening, logs, operator
from csi.admin import AdminServer
from csi.config import MODES, Config, add_flags, from_args
from csi.controller import ControllerServicer
from csi.errors import DriverError
from csi.host import NodeHost
from csi.host.linux import LinuxHost
from csi.host.nbd import Qcow2Nbd
from csi.identity import IdentityServicer
from csi.journal import Record
from csi.kube import KubeApi, PodEvents
from csi.limits import register_namespace_metrics
from csi.metrics import Metrics, MetricsServer
from csi.metrics import serve as serve_metrics
from csi.node import NodeServicer, topology_key
from csi.params import format_bytes
from csi.pods import Notify, no_notify
from csi.proto import csi_pb2_grpc
from csi.provision import Provisioner
from csi.reaper import OrphanReaper
from csi.server import LoggingInterceptor, Server
from csi.shred import Shredder
from csi.shredwatch import ANNOTATION, NodeShredWatch
from csi.statelock import LockHeld, state_dir_lock
from csi.volumes import Volumes

log = logging.getLogger("csi")

# Test-only fault hook: SIGKILL this very process right after the named lifecycle step, so the
# real-kernel tests can prove crash recovery. It never touches any other process.
CRASH_ENV = "LUKS_EPHEMERAL_TEST_CRASH_AFTER"
EXIT_LOCK_HELD = 3  # another driver runs on this state dir


def crash_hook(environ: dict[str, str]) -> Callable[[str], None] | None:
    step = environ.get(CRASH_ENV, "")
    if not step:
        return None

    def hook(done: str) -> None:
        if done == step:
            log.warning("test hook: killing myself after step %s", done)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def build_server(
    config: Config,
    volumes: Volumes | None,
    metrics: Metrics | None = None,
    notify: Notify = no_notify,
) -> Server:
    # only a node plugin needs the node's kernel and tools; a controller-only pod (the chart's
    # csi-resizer Deployment) has neither and is still ready
    host = volumes.host if volumes is not None and config.serves_node else None
    register: list[Callable[[grpc.Server], None]] = [
        lambda s: csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(config, host), s)
    ]
    if config.serves_node and volumes is not None:
        node = NodeServicer(config, volumes, notify)
        register.append(lambda s: csi_pb2_grpc.add_NodeServicer_to_server(node, s))
    if config.serves_controller and volumes is not None:
        controller = ControllerServicer(Provisioner(volumes, topology_key(config.driver_name)))
        register.append(lambda s: csi_pb2_grpc.add_ControllerServicer_to_server(controller, s))
    interceptor = LoggingInterceptor(metrics.rpc if metrics is not None else None)
    return Server(config.socket_path, register, interceptor)


class ClusterIntegration:
    """What API access adds to a node plugin: events on pods, and the orphan reaper."""

    def __init__(self, api: KubeApi | None, volumes: Volumes, config: Config,
                 shredder: Shredder | None = None) -> None:  # fmt: skip
        self.api = api
        self.node_id = config.node_id
        self.shred_watch = (
            NodeShredWatch(api, shredder, config.node_id, config.state_dir)
            if api is not None and shredder is not None
            else None
        )
        self.notify: Notify = PodEvents(api) if api is not None else no_notify
        self.reaper = (
            OrphanReaper(volumes, api, config.node_id, config.reaper_grace)
            if api is not None
            else None
        )

    @classmethod
    def connect(
        cls, config: Config, volumes: Volumes, environ: dict[str, str],
        shredder: Shredder | None = None,
    ) -> ClusterIntegration:
        return cls(KubeApi.connect(config, environ), volumes, config, shredder)

    def start(self, interval: float) -> None:
        if self.reaper is not None:
            self.reaper.start(interval)
            log.info("orphan reaper on: every %.0f s, grace %.0f s", interval, self.reaper.grace)
        if self.shred_watch is not None:
            self.shred_watch.start()
            log.info("emergency shred trigger on: annotation %s on node %s", ANNOTATION,
                     self.node_id)  # fmt: skip

    def stop(self) -> None:
        if self.shred_watch is not None:
            self.shred_watch.stop()  # before the API client closes
        if self.reaper is not None:
            self.reaper.stop()
        if self.api is not None:
            self.api.close()


def serve(config: Config) -> int:
    """Harden this process, then serve until SIGTERM or SIGINT."""
    hardening.harden_process()  # before any key exists, and before any child is spawned
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return run(config, stop)


def run(
    config: Config,
    stop: threading.Event,
    host: NodeHost | None = None,
    environ: dict[str, str] | None = None,
) -> int:
    """Start everything ``config`` asks for, serve until ``stop`` is set, then shut down.

    Every mode journals in the state dir, so every mode first becomes the only driver on it
    (LockHeld otherwise), before the journal is read and before the start-up reconcile.
    """
    with state_dir_lock(config.state_dir).acquire(config.state_lock_wait, stop):
        hardening.warn_unless_in_memory(config.state_dir)
        return _run_locked(config, stop, host, dict(os.environ) if environ is None else environ)


def _run_locked(
    config: Config, stop: threading.Event, host: NodeHost | None, environ: dict[str, str]
) -> int:
    cluster = None
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    metrics = Metrics(registry, config.driver_name)
    # every mode needs the lifecycle: the controller reserves capacity in this node's journal
    os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
    volumes = Volumes(config, host or linux_host(config), after_step=crash_hook(environ),
                      events=metrics)  # fmt: skip
    metrics.watch_usage(volumes.usage)
    register_namespace_metrics(registry, volumes.capacity)
    metrics.watch_seal(volumes.seal.is_sealed)
    shredder = Shredder(volumes, metrics)
    admin_server: AdminServer | None = None
    if config.serves_node:
        report = volumes.reconcile()
        log.info(
            "start-up reconcile done",
            extra={"fields": {"rolled_back": report.rolled_back,
                              "orphans_removed": report.orphans_removed,
                              "failures": report.failures}},
        )  # fmt: skip
        cluster = ClusterIntegration.connect(config, volumes, environ, shredder)
        admin_server = AdminServer(config.state_dir, operator.handlers(shredder))
        admin_server.start()
    metrics_server: MetricsServer | None = None
    if config.metrics_address:
        metrics_server = serve_metrics(metrics.registry, config.metrics_address)
        log.info("metrics on http://%s/metrics", config.metrics_address)
    server = build_server(config, volumes, metrics,
                          cluster.notify if cluster is not None else no_notify)  # fmt: skip
    server.start()
    if cluster is not None:
        cluster.start(config.reaper_interval)
    log.info("luks-ephemeral-csi %s serving %s as %s", __version__, config.mode,
             config.driver_name)  # fmt: skip
    while not stop.wait(3600):
        pass
    log.info("signal received: finishing in-flight RPCs")
    if cluster is not None:
        cluster.stop()  # no reaping while the server shuts down
    server.stop()
    if admin_server is not None:
        admin_server.stop()
    if metrics_server is not None:
        metrics_server.stop()
    return 0


def linux_host(config: Config) -> LinuxHost:
    """The real host; qcow2 volumes only when a qemu-storage-daemon socket is configured."""
    qcow2 = None
    if config.qsd_socket:
        qcow2 = Qcow2Nbd(config.qsd_socket, os.path.join(config.state_dir, "nbd"))
    return LinuxHost(qcow2=qcow2)


def owner_of(record: Record) -> str:
    """Who the volume is for: the inline volume's pod, or the PVC (``pvc:namespace/name``)."""
    if record.provisioned:
        return f"pvc:{record.claim}" if record.claim else "pvc"
    return "/".join(p for p in (record.pod.get("namespace"), record.pod.get("name")) if p)


def list_volumes(config: Config, as_json: bool) -> int:
    """Read-only, so it takes no state-dir lock: it is meant to run beside the serving driver
    (``kubectl exec``). Journal records are replaced by atomic renames, so it never sees half
    a record, and a record deleted while it lists is skipped."""
    volumes = Volumes(config, linux_host(config))
    rows = []
    for info in volumes.list():
        rec = info.record
        rows.append({
            "volume_id": rec.volume_id,
            "pod": owner_of(rec),
            "state": rec.state,
            "size": format_bytes(rec.spec.size),
            "allocated": info.allocated_bytes,
            "device": info.device or "-",
            "opened": info.opened or "-",
            "mount": (rec.staging_path if rec.provisioned else rec.target_path)
                     if info.mounted else "-",
        })  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["volume_id", "pod", "state", "size", "allocated", "device", "opened", "mount"]
    table = [columns, *[[str(r[c]) for c in columns] for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no volumes on this node)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="luks-ephemeral-csi", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    for mode in ("node", "controller", "all"):
        add_flags(sub.add_parser(mode, help=f"serve the {mode} plugin"))
    listing = sub.add_parser("volumes", help="list this node's volumes from the journal")
    add_flags(listing)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    shred = sub.add_parser("shred", help="wipe volume keys from the kernel now (emergency); "
                           "--all also seals the node")  # fmt: skip
    add_flags(shred)
    which = shred.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every volume on this node; seals it")
    which.add_argument("--volume", metavar="ID", help="one volume (the node stays unsealed)")
    shred.add_argument("--json", action="store_true", help="print JSON instead of a table")
    unseal = sub.add_parser("unseal", help="allow publish and stage again after a shred")
    add_flags(unseal)
    unseal.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    mode = args.command if args.command in MODES else "node"
    try:
        config = from_args(mode, args)
    except DriverError as exc:
        parser.error(str(exc))
    logs.setup(config.log_format, config.log_level)
    if args.command == "volumes":
        return list_volumes(config, args.json)
    if args.command == "shred":
        request = {"command": "shred", "volume": None if args.all else args.volume}
        return operator.run(config, request, linux_host(config), args.json)
    if args.command == "unseal":
        return operator.run(config, {"command": "unseal"}, linux_host(config), args.json)
    try:
        return serve(config)
    except LockHeld as exc:
        log.error("%s", exc)
        return EXIT_LOCK_HELD


if __name__ == "__main__":
    sys.exit(main())
