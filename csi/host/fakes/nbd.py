"""``Nbd`` over the shared fake state: qcow2 images exported by a fake qemu-storage-daemon and
attached as NBD devices."""

from __future__ import annotations

from csi.errors import FailedPrecondition
from csi.host.fakes.state import FakeFile, FakeState
from csi.host.qmp import QmpError
from csi.host.runner import CommandFailed


class FakeNbd(FakeState):
    def qcow2_unavailable(self) -> str | None:
        return None if self.qsd_running else "qemu-storage-daemon is not running (fake)"

    def qcow2_create(self, path: str, size: int, preallocate: bool) -> None:
        with self._lock:
            self._enter("qcow2_create", path)
            if size > self.free:
                raise CommandFailed(["qemu-img"], 1, f"{path}: No space left on device")
            metadata = 256 * 1024  # header, L1 and refcount tables
            self.files[path] = FakeFile(metadata, size + metadata if preallocate else metadata)
            self.qcow2_sizes[path] = size

    def nbd_find(self, export: str) -> str | None:
        for device, name in self.nbds.items():
            if name == export:
                return device
        return None

    def nbd_attach(self, backing: str, export: str) -> str:
        with self._lock:
            self._enter("nbd_attach", export)
            if not self.qsd_running:
                raise FailedPrecondition("qemu-storage-daemon is not reachable (fake)")
            if backing not in self.files:
                raise QmpError("blockdev-add", "GenericError", f"Could not open '{backing}'")
            self.exports[export] = backing
            device = self.nbd_find(export)
            if device is None:
                device = f"/dev/nbd{self._next_nbd}"
                self._next_nbd += 1
                self.nbds[device] = export
            self.loop_sizes[device] = self.qcow2_sizes[backing]
            return device

    def nbd_detach(self, export: str) -> None:
        with self._lock:
            self._enter("nbd_detach", export)
            device = self.nbd_find(export)
            if device is not None:  # like nbd-client -d: even under a mapping (its I/O fails)
                del self.nbds[device]
                self.loop_sizes.pop(device, None)
            self.exports.pop(export, None)

    def nbd_exports(self) -> list[str]:
        if (error := self.faults.pop("nbd_exports", None)) is not None:  # a query: not a call
            raise error
        return sorted(set(self.exports) | set(self.nbds.values()))

    def nbd_export_alive(self, export: str) -> bool:
        return export in self.exports
