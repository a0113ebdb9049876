"""qcow2 backing: images served by qemu-storage-daemon, attached with the kernel NBD client.

Why this shape: a live volume must survive a crash of the driver. The NBD server therefore is not
a child of the driver but a separate qemu-storage-daemon (a sidecar in the chart) that the driver
only drives over QMP, and the kernel NBD client is connected with ``nbd-client`` over netlink, so
the kernel itself holds the connection and no process of ours sits in the I/O path.

The kernel does not say which export an ``/dev/nbdN`` is connected to, so before connecting we
write a claim file ``<claims_dir>/<export>`` naming the device; after a crash the claim finds it
again. Claims live on the state dir's tmpfs: a reboot clears them together with the devices.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import threading
import time

from csi.errors import FailedPrecondition, Internal, ResourceExhausted
from csi.host.qmp import Qmp, QmpError
from csi.host.runner import CommandFailed, run

log = logging.getLogger(__name__)

EXPORT_PREFIX = "luks-eph-"
CREATE_TIMEOUT = 900.0  # preallocation=falloc of a big image
DISCONNECT_TIMEOUT = 10.0
BLOCK_SIZE = "4096"
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_options(node: str, path: str, *, direct: bool) -> dict[str, object]:
    return {
        "driver": "qcow2", "node-name": node, "discard": "unmap",
        "file": {"driver": "file", "filename": path, "cache": {"direct": direct}},
    }  # fmt: skip


def node_name(export: str) -> str:
    """qemu block node names are at most 31 characters and start with a letter."""
    return "q" + export.removeprefix(EXPORT_PREFIX)[:30]


class Qcow2Nbd:
    """Create, export, attach and detach qcow2 images; every step checks what already exists."""

    def __init__(self, qmp_socket: str, claims_dir: str, sysfs: str = "/sys") -> None:
        self.qmp_socket = qmp_socket
        self.nbd_socket = os.path.join(os.path.dirname(qmp_socket), "nbd.sock")
        self.claims_dir = claims_dir
        self.sysfs = sysfs
        # one device allocation, and one QMP session (qsd's monitor serves one client at a
        # time), at a time
        self._lock = threading.RLock()

    # images ------------------------------------------------------------------------------
    def create(self, path: str, size: int, preallocate: bool) -> None:
        mode = "falloc" if preallocate else "off"
        try:
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"preallocation={mode}",
                 path, str(size)], timeout=CREATE_TIMEOUT)  # fmt: skip
        except Exception:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise

    # devices -----------------------------------------------------------------------------
    def _claim_path(self, export: str) -> str:
        return os.path.join(self.claims_dir, export)

    def _pid_of(self, device: str) -> str | None:
        """A connected NBD device has a ``pid`` attribute: the process that connected it (our
        nbd-client, long gone); a free device has none."""
        path = os.path.join(self.sysfs, "block", os.path.basename(device), "pid")
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    def _connected(self, device: str) -> bool:
        return self._pid_of(device) is not None

    def _claimed(self) -> dict[str, tuple[str, str]]:
        """export -> (device, pid that connected it, "" until the connect is known to be done)
        of every claim file."""
        claims = {}
        for path in glob.glob(os.path.join(self.claims_dir, EXPORT_PREFIX + "*")):
            try:
                with open(path) as f:
                    device, _, pid = f.read().strip().partition(" ")
            except OSError:
                continue
            claims[os.path.basename(path)] = (device, pid)
        return claims

    def _write_claim(self, export: str, device: str, pid: str = "") -> None:
        os.makedirs(self.claims_dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.claims_dir, f".{export}.tmp")  # never matches the claim glob
        with open(tmp, "w") as f:
            f.write(f"{device} {pid}".strip())
        os.replace(tmp, self._claim_path(export))

    def _ours(self, export: str) -> str | None:
        """The device claimed for ``export`` if it is connected and, when the claim recorded
        who connected it, still that same connection (not another NBD user's, later)."""
        device, pid = self._claimed().get(export, ("", ""))
        current = self._pid_of(device) if device else None
        if current is None or (pid and current != pid):
            return None
        return device

    def find(self, export: str) -> str | None:
        with self._lock:
            return self._ours(export)

    def exports(self) -> list[str]:
        """Every export this node's driver may have left: claimed devices and qsd exports."""
        with self._lock:
            names = set(self._claimed())
            with contextlib.suppress(FailedPrecondition):  # no server: no exports to list
                with Qmp(self.qmp_socket) as qmp:
                    for export in qmp.execute("query-block-exports"):
                        if export["id"].startswith(EXPORT_PREFIX):
                            names.add(export["id"])
            return sorted(names)

    def attach(self, path: str, export: str) -> str:
        with self._lock:
            device = self._ours(export)
            if device is not None:
                return device
            self._export(path, export)
            device = self._free_device()
            # claim first: a crash right after the connect must not hide the device
            self._write_claim(export, device)
            try:
                run(["nbd-client", "-unix", self.nbd_socket, device, "-N", export,
                     "-b", BLOCK_SIZE])  # fmt: skip
            except Exception:
                # e.g. another NBD user took the device first: it is not ours to disconnect
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._claim_path(export))
                raise
            self._write_claim(export, device, self._pid_of(device) or "")
            return device

    def _export(self, path: str, export: str) -> None:
        node = node_name(export)
        with Qmp(self.qmp_socket) as qmp:
            try:
                qmp.execute("nbd-server-start",
                            addr={"type": "unix", "data": {"path": self.nbd_socket}})  # fmt: skip
            except QmpError as exc:
                if "already running" not in exc.desc:
                    raise
            nodes = {n["node-name"]: n.get("file", "")
                     for n in qmp.execute("query-named-block-nodes", flat=True)}  # fmt: skip
            if node in nodes and nodes[node] != path:  # a stale node of an earlier image
                self._drop(qmp, export)
                del nodes[node]
            if node not in nodes:
                try:
                    qmp.execute("blockdev-add", **image_options(node, path, direct=True))
                except QmpError as exc:
                    # tmpfs and some other filesystems refuse O_DIRECT: use the page cache
                    log.warning("direct I/O refused for %s (%s); exporting it buffered",
                                path, exc.desc[-200:])  # fmt: skip
                    qmp.execute("blockdev-add", **image_options(node, path, direct=False))
            if export not in {e["id"] for e in qmp.execute("query-block-exports")}:
                qmp.execute("block-export-add", type="nbd", id=export, name=export,
                            writable=True, **{"node-name": node})  # fmt: skip

    def _free_device(self) -> str:
        if not glob.glob(os.path.join(self.sysfs, "block", "nbd*")):
            with contextlib.suppress(CommandFailed, FileNotFoundError):
                run(["modprobe", "nbd", "nbds_max=128"])
        claimed = {device for device, _ in self._claimed().values()}
        devices = glob.glob(os.path.join(self.sysfs, "block", "nbd*"))
        if not devices:
            raise FailedPrecondition(
                "the kernel has no NBD devices (module nbd); backing=qcow2 needs "
                "`modprobe nbd` on the node"
            )
        for entry in sorted(devices, key=lambda p: int(re.sub(r"\D", "", p) or 0)):
            device = "/dev/" + os.path.basename(entry)
            if device not in claimed and not self._connected(device):
                return device
        raise ResourceExhausted(
            f"all {len(devices)} NBD devices are in use; load the nbd module with a larger "
            "nbds_max to run more qcow2 volumes on this node"
        )

    def detach(self, export: str) -> None:
        """Disconnect the kernel device, then drop the export and its block node."""
        with self._lock:
            device = self._ours(export)
            if device is not None:
                run(["nbd-client", "-d", device])
                deadline = time.monotonic() + DISCONNECT_TIMEOUT
                while self._connected(device) and time.monotonic() < deadline:
                    time.sleep(0.05)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._claim_path(export))
            session = Qmp(self.qmp_socket)
            try:
                session.connect()
            except FailedPrecondition:
                return  # no server, so no export left to remove
            with session as qmp:
                self._drop(qmp, export)

    @staticmethod
    def _drop(qmp: Qmp, export: str) -> None:
        """Remove the export (closing any client connection) and its block node."""
        if export in {e["id"] for e in qmp.execute("query-block-exports")}:
            qmp.execute("block-export-del", id=export, mode="hard")
            qmp.wait_until(
                lambda: export not in {e["id"] for e in qmp.execute("query-block-exports")},
                f"removal of export {export}",
            )
        node = node_name(export)
        if node in {n["node-name"] for n in qmp.execute("query-named-block-nodes", flat=True)}:
            qmp.execute("blockdev-del", **{"node-name": node})

    def export_alive(self, export: str) -> bool:
        """Whether qemu-storage-daemon still serves the export (it loses all after a restart)."""
        with self._lock:
            try:
                with Qmp(self.qmp_socket) as qmp:
                    return export in {e["id"] for e in qmp.execute("query-block-exports")}
            except (FailedPrecondition, Internal):
                return False

    def unavailable(self) -> str | None:
        """Why qcow2 volumes cannot be made here, or None."""
        for tool in ("qemu-img", "nbd-client"):
            if shutil.which(tool, path=TOOL_PATH) is None:
                return f"{tool} is not installed on this node"
        if not os.path.exists(self.qmp_socket):
            return (
                f"qemu-storage-daemon is not running: no monitor socket at {self.qmp_socket} "
                "(the chart's qsd sidecar, value qcow2.enabled)"
            )
        return None
