"""The raw file a Kata VM formats itself (``kata=guest``): the confidential hand-off.

The volume is ``<data dir>/<digest>.img``, sparse or preallocated, with nothing on it: the host
never attaches, formats or opens it. The Kata agent in the pod's VM asks its confidential-data
hub to luksFormat it under a key born in the guest (the header stays in guest memory) and makes
the filesystem. The host holds no key at any time, so there is nothing to wipe here: the key
dies with the VM, and deleting the file afterwards leaves only ciphertext of a key that is gone.

Not a value of the ``backing`` parameter: ``backing=loop`` with ``kata=guest`` selects it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

from csi.backings.base import IN_GUEST, Backing, Orphan, Wiped
from csi.backings.luks import KATA_FIXED
from csi.errors import Internal
from csi.exposures import Exposure

if TYPE_CHECKING:
    from csi.journal import Names
    from csi.params import VolumeSpec

log = logging.getLogger(__name__)


class RawFileBacking(Backing):
    name: ClassVar[str] = "raw"
    FIXED_REASONS: ClassVar[dict[str, str]] = {"kata": KATA_FIXED}
    KATA_MODES: ClassVar[tuple[str, ...]] = ("guest",)

    @classmethod
    def disk_bytes(cls, spec: VolumeSpec) -> int:
        return spec.size

    @classmethod
    def largest_fitting(cls, room: int, spec: VolumeSpec) -> int:
        return max(0, room)

    @classmethod
    def fixed_reason(cls, spec: VolumeSpec) -> str:
        return "kata"

    def unavailable(self) -> str | None:
        return None

    def prepare(self, names: Names, spec: VolumeSpec, *, keyring: bool) -> str:
        """Only the file: the guest formats it (nothing of ours may be on it)."""
        del keyring
        with self.context.step("create_backing"):
            if not self.context.host.exists(names.backing):
                self.context.host.create_backing(names.backing, spec.size, spec.preallocate)
        return names.backing

    def find(self, names: Names) -> str | None:
        return names.backing if self.context.host.exists(names.backing) else None

    def attached(self, names: Names) -> str | None:
        return None  # never a device on the host

    def source(self, names: Names) -> str:
        return names.backing

    def shown_at(self, names: Names, path: str) -> bool:
        found = self.context.host.direct_volume_read(self.context.kata_root, path)
        return found is not None and found.device == names.backing

    def filesystem_exposure(self, spec: VolumeSpec, flags: tuple[str, ...], *,
                            readonly: bool) -> Exposure:  # fmt: skip
        raise Internal("a raw Kata disk is only handed over, never mounted on the host")

    def allocated(self, names: Names) -> int:
        return self.context.host.allocated_bytes(names.backing)

    def health(self, names: Names, spec: VolumeSpec) -> list[str]:
        if not self.context.host.exists(names.backing):
            return [f"backing file {names.backing} is gone"]
        return []

    def grow(self, names: Names, spec: VolumeSpec, size: int) -> None:
        self.check_growable(spec)

    def in_use(self, names: Names, ignore: str = "") -> list[str]:
        """The hypervisor of a Kata VM that still has the disk open."""
        del ignore
        if not self.context.host.exists(names.backing):
            return []
        return [f"open by {who}" for who in self.context.host.file_users(names.backing)]

    def release(self, names: Names) -> bool:
        with self.context.step("close"):
            self.check_releasable(names)
        with self.context.step("delete"):
            existed = self.context.host.exists(names.backing)
            self.context.host.remove_file(names.backing)
        return existed

    def detach(self, names: Names) -> None:
        del names

    def wipe_key(self, names: Names, spec: VolumeSpec) -> Wiped:
        """The host has no key of it: the guest made it and keeps it in the VM's memory."""
        del names, spec
        return Wiped(IN_GUEST, "kata=guest: the key was born in the pod's VM and never was on "
                               "this host; only stopping the VM drops it")

    def orphans(self, known: set[str]) -> list[Orphan]:
        return []  # its files are the LUKS file sweep's (``<digest>.img`` with no record)

    def remove_orphan(self, orphan: Orphan) -> None:
        raise Internal(f"no orphans of raw Kata disks to remove: {orphan.label}")
