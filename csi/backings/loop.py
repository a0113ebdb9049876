"""LUKS2 on a sparse (or preallocated) file attached as a loop device with direct I/O and
4096-byte sectors: the default backing, available on every node with device-mapper."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, ClassVar

from csi.backings.base import Orphan
from csi.backings.luks import BACKING_FILE, LuksFileBacking
from csi.errors import FailedPrecondition

if TYPE_CHECKING:
    from csi.journal import Names
    from csi.params import VolumeSpec


class LoopBacking(LuksFileBacking):
    name: ClassVar[str] = "loop"
    KATA_MODES: ClassVar[tuple[str, ...]] = ("off", "guest", "host")  # guest: the raw file

    def unavailable(self) -> str | None:
        return None  # the node's readiness check already requires losetup and device-mapper

    def _create(self, path: str, size: int, preallocate: bool) -> None:
        self.host.create_backing(path, size, preallocate)

    def _attach(self, names: Names) -> str:
        return self.host.loop_find(names.backing) or self.host.loop_attach(names.backing)

    def detach(self, names: Names) -> None:
        device = self.host.loop_find(names.backing)
        if device:
            self.luks.remove_temporary_mappings(device)
            self.host.loop_detach(device)

    def attached(self, names: Names) -> str | None:
        return self.host.loop_find(names.backing)

    def _device_health(self, names: Names) -> list[str]:
        return ["loop device is detached"] if self.host.loop_find(names.backing) is None else []

    def grow(self, names: Names, spec: VolumeSpec, size: int) -> None:
        """File, then loop device, then mapping: each a no-op once done, and never a mapping
        larger than what is under it."""
        self.check_growable(spec)
        with self.step("grow_backing"):
            grown = self.file_bytes(spec) - spec.size + size
            self.host.grow_backing(names.backing, grown, spec.preallocate)
        with self.step("refresh_loop"):
            device = self.host.loop_find(names.backing)
            if device is None:
                raise FailedPrecondition(
                    f"volume {names.volume_id} lost its loop device; its data is gone"
                )
            self.host.loop_refresh(device)
        self.luks.resize(names, spec)

    def orphans(self, known: set[str]) -> list[Orphan]:
        """Loop devices on files of the data dir no record knows (their file was deleted
        while a mapping held it)."""
        found = []
        for device, backing in self.host.loops_in(self.context.data_dir).items():
            match = BACKING_FILE.match(os.path.basename(backing))
            if match and match.group(1) not in known:
                found.append(Orphan("loop_without_record", device, match.group(1)))
        return found

    def remove_orphan(self, orphan: Orphan) -> None:
        self.luks.remove_temporary_mappings(orphan.label)
        self.host.loop_detach(orphan.label)
