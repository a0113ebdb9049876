"""qcow2 backing: images served by qemu-storage-daemon, attached with the kernel NBD client.

Why this shape: a live volume must survive a crash of the driver. The NBD server therefore is not
a child of the driver but a separate qemu-storage-daemon (a sidecar in the chart) that the driver
only drives over QMP, and the kernel NBD client is connected with ``nbd-client`` over netlink, so
the kernel itself holds the connection and no process of ours sits in the I/O path.

The kernel does not say which export an ``/dev/nbdN`` is connected to, so we keep a claim file
``<claims_dir>/<export>`` per export. It is written before the export is made (empty: "the
export may exist"), names the chosen device before the connect (``/dev/nbdN``: reserves it
against concurrent attaches), and after the connect also the pid the kernel reports as the
device's connector (``/dev/nbdN 1234``). Only that last form is ever trusted: a claim without a
pid, or whose pid is not the device's connecting pid now, says nothing about who uses the device
(the driver died before recording the pid, or our connection ended and another NBD user connected
the device since), so it is never used to adopt or disconnect a device. Claims live on the state
dir's tmpfs: a reboot clears them together with the devices.

qemu-storage-daemon may hang or be busy. Loop volumes and stats must not wait for it: an export
with no claim is answered from local state (see ``detach``), stats wait for the monitor session
only briefly and answer from the last listing when it is not free (see ``export_alive``), and
every QMP wait is bounded.
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
from collections.abc import Iterator

from csi.errors import DriverError, FailedPrecondition, Internal, ResourceExhausted, Unavailable
from csi.host import commands as cmd
from csi.host.qmp import CONNECT_TIMEOUT, REPLY_TIMEOUT, Qmp, QmpError, records
from csi.host.runner import CommandFailed, Runner, run

log = logging.getLogger(__name__)

EXPORT_PREFIX = "luks-eph-"
CREATE_TIMEOUT = cmd.QEMU_IMG_CREATE_TIMEOUT
DISCONNECT_TIMEOUT = 10.0
PID_TIMEOUT = 2.0  # for the kernel to show who connected a device nbd-client just connected
TOOL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NBD_DEVICE = re.compile(r"/dev/nbd[0-9]+")

# Waits for qemu-storage-daemon. Its monitor serves one client at a time, so callers queue for
# the one session; a healthy daemon answers in milliseconds, so these only bite when it is not.
SESSION_WAIT = 5.0  # attach, detach, listing: wait this long for the session, then UNAVAILABLE
ALIVE_WAIT = 0.25  # stats: wait this long for the session, then answer from the last listing
ALIVE_TIMEOUT = 0.5  # stats: connect and each reply (greeting, capabilities, query)
ALIVE_BACKOFF = 10.0  # stats: after the daemon failed to answer, "not served" this long


class QmpBusy(Unavailable):
    """Another request holds qemu-storage-daemon's monitor session for too long."""


def image_options(node: str, path: str, *, direct: bool) -> dict[str, object]:
    return {
        "driver": "qcow2", "node-name": node, "discard": "unmap",
        "file": {"driver": "file", "filename": path, "cache": {"direct": direct}},
    }  # fmt: skip


def node_name(export: str) -> str:
    """qemu block node names are at most 31 characters and start with a letter."""
    return "q" + export.removeprefix(EXPORT_PREFIX)[:30]


class Qcow2Nbd:
    """Create, export, attach and detach qcow2 images; every step checks what already exists.

    Locks: ``_session`` is qsd's one monitor session, taken with a bounded wait (``QmpBusy``
    after ``session_wait``); ``_alloc`` covers only choosing a device and claiming it (local,
    never across QMP or a command); nothing that reads local state (``find``, a detach or
    ``export_alive`` of an unclaimed export) takes either.
    """

    def __init__(
        self,
        qmp_socket: str,
        claims_dir: str,
        sysfs: str = "/sys",
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        reply_timeout: float = REPLY_TIMEOUT,
        session_wait: float = SESSION_WAIT,
        alive_wait: float = ALIVE_WAIT,
        alive_timeout: float = ALIVE_TIMEOUT,
        alive_backoff: float = ALIVE_BACKOFF,
        runner: Runner | None = None,
    ) -> None:
        """``runner`` runs qemu-img, nbd-client and modprobe (``None``: ``csi.host.runner.run``,
        looked up in this module at each call so a test may patch ``csi.host.nbd.run``)."""
        self.qmp_socket = qmp_socket
        self.nbd_socket = os.path.join(os.path.dirname(qmp_socket), "nbd.sock")
        self.claims_dir = claims_dir
        self.sysfs = sysfs
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.session_wait = session_wait
        self.alive_wait = alive_wait
        self.alive_timeout = alive_timeout
        self.alive_backoff = alive_backoff
        self._session_lock = threading.Lock()
        self._alloc = threading.Lock()
        self._state = threading.Lock()  # guards the two fields below; never held across I/O
        self._served: set[str] | None = None  # our exports as qsd last listed them; None: never
        self._alive_retry_at = 0.0
        self._runner = runner

    @property
    def runner(self) -> Runner:
        return run if self._runner is None else self._runner

    # images ------------------------------------------------------------------------------
    def create(self, path: str, size: int, preallocate: bool) -> None:
        try:
            self.runner(cmd.qemu_img_create(path, size, preallocate=preallocate),
                        timeout=CREATE_TIMEOUT)  # fmt: skip
        except Exception:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise

    # QMP ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _session(self, wait: float, timeout: float | None = None) -> Iterator[Qmp]:
        """The monitor session, if it can be had within ``wait`` seconds; QmpBusy if not."""
        if not self._session_lock.acquire(timeout=wait):
            raise QmpBusy(
                f"qemu-storage-daemon's monitor {self.qmp_socket} stayed busy with another "
                f"request for {wait:g}s; retry later"
            )
        try:
            with Qmp(
                self.qmp_socket,
                timeout=self.reply_timeout if timeout is None else timeout,
                connect_timeout=self.connect_timeout if timeout is None else timeout,
            ) as qmp:
                yield qmp
        finally:
            self._session_lock.release()

    def _query_exports(self, qmp: Qmp) -> set[str]:
        """Every export qsd serves now; remembered (ours only) for answers without QMP."""
        rows = records(qmp.execute("query-block-exports"), "query-block-exports", ("id",))
        ids = {row["id"] for row in rows}
        with self._state:
            self._served = {i for i in ids if i.startswith(EXPORT_PREFIX)}
        return ids

    def _note_served(self, export: str, served: bool) -> None:
        with self._state:
            if self._served is not None:
                (self._served.add if served else self._served.discard)(export)

    def _listed(self, export: str) -> bool:
        """Whether qsd's last listing had the export (False if it was never listed)."""
        with self._state:
            return self._served is not None and export in self._served

    def _last_known_alive(self, export: str) -> bool:
        """Alive unless the last listing lacked it: "unknown" is not reported as lost."""
        with self._state:
            return self._served is None or export in self._served

    # claims ------------------------------------------------------------------------------
    def _claim_path(self, export: str) -> str:
        return os.path.join(self.claims_dir, export)

    def _pid_of(self, device: str) -> str | None:
        """A connected NBD device has a ``pid`` attribute: the process that connected it (our
        nbd-client, long gone); a free device has none."""
        path = os.path.join(self.sysfs, "block", os.path.basename(device), "pid")
        try:
            with open(path) as f:
                return f.read().strip() or None
        except OSError:
            return None

    def _connected(self, device: str) -> bool:
        return self._pid_of(device) is not None

    def _claim(self, export: str) -> tuple[str, str] | None:
        """(device or "", connecting pid or "") of the export's claim; None without a claim.
        Anything in the file that is not a device path and a pid reads as absent."""
        try:
            with open(self._claim_path(export)) as f:
                text = f.read(256)
        except FileNotFoundError:
            return None
        except OSError:
            return ("", "")  # there but unreadable: the export may exist, the device is unknown
        device, _, pid = text.strip().partition(" ")
        if not NBD_DEVICE.fullmatch(device):
            return ("", "")
        return (device, pid if pid.isdigit() else "")

    def _claimed(self) -> dict[str, tuple[str, str]]:
        """export -> (device, connecting pid) of every claim file, "" for what it lacks."""
        claims = {}
        for path in glob.glob(os.path.join(self.claims_dir, EXPORT_PREFIX + "*")):
            export = os.path.basename(path)
            if (claim := self._claim(export)) is not None:
                claims[export] = claim
        return claims

    def _write_claim(self, export: str, device: str = "", pid: str = "") -> None:
        os.makedirs(self.claims_dir, mode=0o700, exist_ok=True)
        tmp = os.path.join(self.claims_dir, f".{export}.tmp")  # never matches the claim glob
        with open(tmp, "w") as f:
            f.write(f"{device} {pid}".strip())
        os.replace(tmp, self._claim_path(export))

    def _ours(self, export: str) -> str | None:
        """The device claimed for ``export`` if the kernel shows it connected by the very pid
        the claim recorded. A claim without a pid (the driver died between claiming and
        recording the connect) or with another pid (our connection ended, someone else's
        began) is never trusted: the device may be another NBD user's."""
        device, pid = self._claim(export) or ("", "")
        if not device or not pid:
            return None
        return device if self._pid_of(device) == pid else None

    # devices -----------------------------------------------------------------------------
    def find(self, export: str) -> str | None:
        return self._ours(export)

    def exports(self) -> list[str]:
        """Every export this node's driver may have left: claimed exports and qsd exports.
        Raises only DriverError (QmpBusy, QmpTimeout, QmpProtocolError, ...), which start-up
        reconcile reports and goes on from."""
        names = set(self._claimed())
        try:
            with self._session(self.session_wait) as qmp:
                ids = self._query_exports(qmp)
        except FailedPrecondition:  # no server: no exports to list
            with self._state:
                self._served = set()
            ids = set()
        names.update(i for i in ids if i.startswith(EXPORT_PREFIX))
        return sorted(names)

    def attach(self, path: str, export: str) -> str:
        device = self._ours(export)
        if device is not None:
            return device
        stale = self._claim(export)
        if stale and stale[0] and self._connected(stale[0]):
            log.warning("claim of %s names %s but not the pid that connected it; the device "
                        "is left alone (it may be another NBD user's)",
                        export, stale[0])  # fmt: skip
        # claim before exporting: an export without a claim would be invisible to detach
        self._write_claim(export)
        self._export(path, export)
        with self._alloc:  # the device is chosen and reserved (claimed) in one step
            device = self._free_device()
            self._write_claim(export, device)
        try:
            self.runner(cmd.nbd_connect(self.nbd_socket, device, export))
        except Exception:
            # e.g. another NBD user took the device first: it is not ours to disconnect; the
            # export stays claimed, so detach (rollback) still removes it
            self._write_claim(export)
            raise
        pid = self._wait_for_pid(device)
        if pid is None:
            self._write_claim(export)
            raise Internal(f"nbd-client connected {device} to {export}, but the kernel shows "
                           "no connection on it")  # fmt: skip
        self._write_claim(export, device, pid)
        return device

    def _wait_for_pid(self, device: str) -> str | None:
        deadline = time.monotonic() + PID_TIMEOUT
        while (pid := self._pid_of(device)) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return pid

    def _export(self, path: str, export: str) -> None:
        node = node_name(export)
        with self._session(self.session_wait) as qmp:
            try:
                qmp.execute("nbd-server-start",
                            addr={"type": "unix", "data": {"path": self.nbd_socket}})  # fmt: skip
            except QmpError as exc:
                if "already running" not in exc.desc:
                    raise
            nodes = self._nodes(qmp)
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
            if export not in self._query_exports(qmp):
                qmp.execute("block-export-add", type="nbd", id=export, name=export,
                            writable=True, **{"node-name": node})  # fmt: skip
                self._note_served(export, True)

    def _free_device(self) -> str:
        if not glob.glob(os.path.join(self.sysfs, "block", "nbd*")):
            with contextlib.suppress(CommandFailed, FileNotFoundError):
                self.runner(cmd.modprobe_nbd())
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
        """Disconnect the kernel device, then drop the export and its block node.

        An export with no claim file (so no device of ours) that qsd's last listing did not
        show is answered from local state, without a QMP round trip: it is a loop volume's, or
        one already detached, and a hung qsd must not stall it. That is safe because only
        ``attach`` makes exports and it claims first, a claim goes only once its export is
        gone, and exports an older driver may have left unclaimed are found by start-up
        reconcile, which lists qsd's exports (``exports``, which remembers them) and detaches
        every one no record accounts for.
        """
        claim = self._claim(export)
        if claim is None and not self._listed(export):
            return
        device = self._ours(export)
        if device is not None:
            self.runner(cmd.nbd_disconnect(device))
            deadline = time.monotonic() + DISCONNECT_TIMEOUT
            while self._connected(device) and time.monotonic() < deadline:
                time.sleep(0.05)
        elif claim and claim[0] and self._connected(claim[0]):
            log.warning("claim of %s names %s but not the pid that connected it; not "
                        "disconnecting it (it may be another NBD user's)",
                        export, claim[0])  # fmt: skip
        if claim and claim[0]:
            self._write_claim(export)  # the device is done; the export may still be there
        try:
            with self._session(self.session_wait) as qmp:
                self._drop(qmp, export)
        except FailedPrecondition:
            pass  # no server, so no export left to remove
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._claim_path(export))
        self._note_served(export, False)

    def _drop(self, qmp: Qmp, export: str) -> None:
        """Remove the export (closing any client connection) and its block node."""
        if export in self._query_exports(qmp):
            qmp.execute("block-export-del", id=export, mode="hard")
            qmp.wait_until(
                lambda: export not in self._query_exports(qmp), f"removal of export {export}"
            )
        node = node_name(export)
        if node in self._nodes(qmp):
            qmp.execute("blockdev-del", **{"node-name": node})

    @staticmethod
    def _nodes(qmp: Qmp) -> dict[str, str]:
        """block node name -> its file name ("" if it has none)."""
        result = qmp.execute("query-named-block-nodes", flat=True)
        rows = records(result, "query-named-block-nodes", ("node-name",), ("file",))
        return {row["node-name"]: row.get("file", "") for row in rows}

    def export_alive(self, export: str) -> bool:
        """Whether qemu-storage-daemon still serves the export (it loses all after a restart).

        Kubelet polls this for every qcow2 volume (NodeGetVolumeStats), so it never waits
        long: an unclaimed, unlisted export is not alive, answered locally; otherwise it asks
        qsd only if the monitor session is free within ``alive_wait``, and with
        ``alive_timeout`` for the connect and each reply, so at most
        ``alive_wait + 4 * alive_timeout`` (2.25 s by default, a small fraction of kubelet's
        stats timeout).

        - Socket missing or refusing: the daemon is gone and with it every export: False.
        - Session busy with another of our requests (the daemon itself is fine): the last
          listing's answer, alive if it never listed; contention must not flag healthy
          volumes abnormal.
        - No answer in time, or garbage: False, and for ``alive_backoff`` seconds False again
          without asking. A volume whose daemon does not answer cannot do I/O either, so
          abnormal is the truth; and teardown (which disconnects a device whose export is not
          alive before unmounting) must not unmount over an NBD device whose server hangs.
        """
        if self._claim(export) is None and not self._listed(export):
            return False
        with self._state:
            backing_off = time.monotonic() < self._alive_retry_at
        if backing_off:
            return False
        try:
            with self._session(self.alive_wait, timeout=self.alive_timeout) as qmp:
                return export in self._query_exports(qmp)
        except FailedPrecondition:
            with self._state:
                self._served = set()
            return False
        except QmpBusy:
            return self._last_known_alive(export)
        except DriverError as exc:
            log.warning("qemu-storage-daemon did not answer whether it serves %s (%s); "
                        "taking it as not served for %gs",
                        export, exc, self.alive_backoff)  # fmt: skip
            with self._state:
                self._alive_retry_at = time.monotonic() + self.alive_backoff
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
