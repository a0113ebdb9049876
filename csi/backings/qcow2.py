"""LUKS2 on a qcow2 image served by qemu-storage-daemon and attached with the kernel NBD
client. Sparse by nature and snapshot-friendly; it cannot grow (the NBD client does not learn a
new export size while connected) and needs a reachable qemu-storage-daemon (``--qsd-socket``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

from csi.backings.base import Orphan
from csi.backings.luks import INTEGRITY_FIXED, KATA_FIXED, MAPPING_PREFIX, LuksFileBacking
from csi.errors import Busy

if TYPE_CHECKING:
    from csi.journal import Names
    from csi.params import VolumeSpec

log = logging.getLogger(__name__)

MiB = 1024**2
QCOW2_METADATA_BYTES = 2 * MiB  # header, L1 and slack on top of size/4096 of L2 and refcounts
QCOW2_FIXED = (
    "qcow2 volumes cannot grow: the kernel NBD client does not learn a new export size while "
    "connected; use backing=loop for volumes that must grow"
)


class Qcow2Backing(LuksFileBacking):
    name: ClassVar[str] = "qcow2"
    FIXED_REASONS: ClassVar[dict[str, str]] = {"qcow2": QCOW2_FIXED, "integrity": INTEGRITY_FIXED,
                                               "kata": KATA_FIXED}  # fmt: skip
    KATA_MODES: ClassVar[tuple[str, ...]] = ("off", "host")

    @classmethod
    def disk_bytes(cls, spec: VolumeSpec) -> int:
        """A qcow2 image adds its tables (8 bytes of L2 and 2 of refcount per 64 KiB cluster,
        plus header and L1), bounded here generously by 1/4096 of the size plus 2 MiB."""
        size = cls.file_bytes(spec)
        return size + size // 4096 + QCOW2_METADATA_BYTES

    @classmethod
    def largest_fitting(cls, room: int, spec: VolumeSpec) -> int:
        room = super().largest_fitting(room, spec)
        return max(0, room - QCOW2_METADATA_BYTES) * 4096 // 4097

    @classmethod
    def fixed_reason(cls, spec: VolumeSpec) -> str:
        return "qcow2"

    def unavailable(self) -> str | None:
        return self.host.qcow2_unavailable()

    def _create(self, path: str, size: int, preallocate: bool) -> None:
        self.host.qcow2_create(path, size, preallocate)

    def _attach(self, names: Names) -> str:
        """An NBD device connected to qemu-storage-daemon's export of the image, named like
        the mapping."""
        found = self.host.nbd_find(names.mapping)
        return found or self.host.nbd_attach(names.backing, names.mapping)

    def detach(self, names: Names) -> None:
        self.host.nbd_detach(names.mapping)

    def attached(self, names: Names) -> str | None:
        return self.host.nbd_find(names.mapping)

    def _device_health(self, names: Names) -> list[str]:
        if self.host.nbd_find(names.mapping) is None:
            return ["NBD device is disconnected"]
        if not self.host.nbd_export_alive(names.mapping):
            return ["qemu-storage-daemon no longer serves the image or does not answer "
                    "(restarted or hung?)"]  # fmt: skip
        return []

    def grow(self, names: Names, spec: VolumeSpec, size: int) -> None:
        self.check_growable(spec)  # always refuses: see QCOW2_FIXED

    def before_release(self, names: Names) -> None:
        """A volume whose export qemu-storage-daemon lost (it restarted) can never do I/O again,
        and with no NBD timeout its in-flight requests never end: unmount would hang.
        Disconnecting the device first fails them, so teardown can go on."""
        if self.host.nbd_find(names.mapping) and not self.host.nbd_export_alive(names.mapping):
            log.warning("volume %s lost its NBD export; disconnecting its device before "
                        "teardown", names.volume_id)  # fmt: skip
            self.host.nbd_detach(names.mapping)

    def orphans(self, known: set[str]) -> list[Orphan]:
        """Exports no record knows (their image was deleted while the export held it)."""
        return [Orphan("export_without_record", export, export.removeprefix(MAPPING_PREFIX))
                for export in self.host.nbd_exports()
                if export.removeprefix(MAPPING_PREFIX) not in known]  # fmt: skip

    def remove_orphan(self, orphan: Orphan) -> None:
        if self.host.mapping_users(orphan.label):
            raise Busy(f"{orphan.label}: no record but in use; left alone")
        self.host.crypt_close(orphan.label)
        self.host.nbd_detach(orphan.label)
