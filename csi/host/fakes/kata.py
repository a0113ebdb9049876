"""``DirectVolumes`` over the shared fake state: Kata's direct volumes by (root, target), the
guard as a mount in ``mounts``, and the processes holding a file (set by tests).

What it models of the real host (``csi.host.kata``, measured in tests/host/test_kata_real.py):
target paths are checked the same way (absolute, a base64 name that fits in a directory
entry); a volume whose mountInfo.json cannot be read is None (tests may store None); the guard
is a read-only tmpfs whose source is GUARD_SOURCE, made on a directory, never stacked over
another mount; a reboot empties /run, so every direct volume and guard is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from csi.errors import FailedPrecondition, InvalidArgument
from csi.host import GUARD_SOURCE, DirectVolume
from csi.host.commands import GUARD_OPTIONS
from csi.host.fakes.state import FakeMount, FakeState
from csi.host.kata import volume_dir_name


@dataclass
class FakeDirectVolumes(FakeState):
    # (root, target) -> its volume (None: a mountInfo.json the driver cannot read)
    direct_volumes: dict[tuple[str, str], DirectVolume | None] = field(default_factory=dict)
    # regular file -> the processes holding it open ("pid N (comm)"), set by tests
    file_holders: dict[str, list[str]] = field(default_factory=dict)

    def direct_volume_write(self, root: str, target: str, volume: DirectVolume) -> None:
        with self._lock:
            self._enter("direct_volume_write", target)
            volume_dir_name(target)  # InvalidArgument as the real host
            self.direct_volumes[(root, target)] = DirectVolume(
                volume.volume_type, volume.device, volume.fstype, dict(volume.metadata),
                list(volume.options),
            )  # fmt: skip

    def direct_volume_read(self, root: str, target: str) -> DirectVolume | None:
        self._enter("direct_volume_read", target)
        return self.direct_volumes.get((root, target))

    def direct_volume_remove(self, root: str, target: str) -> None:
        with self._lock:
            self._enter("direct_volume_remove", target)
            if not target.startswith("/"):
                raise InvalidArgument(
                    f"a Kata direct volume needs an absolute target path, not {target!r}"
                )
            self.direct_volumes.pop((root, target), None)

    def direct_volume_targets(self, root: str) -> dict[str, DirectVolume | None]:
        self._enter("direct_volume_targets", root)
        return {t: v for (r, t), v in sorted(self.direct_volumes.items()) if r == root}

    def guard_mount(self, target: str) -> None:
        with self._lock:
            self._enter("guard_mount", target)
            if target in self.symlinks:
                raise InvalidArgument(f"target {target} is a symlink; refusing to follow it")
            if target in self.files:
                raise FailedPrecondition(f"target {target} is not a directory: no guard can "
                                         "cover it")  # fmt: skip
            if self.is_guarded(target):
                return
            if (mount := self.mounts.get(target)) is not None:
                raise FailedPrecondition(
                    f"target {target} is already a mount point ({mount.fs_type} from "
                    f"{mount.source}); the guard is never stacked over another mount"
                )
            self.dirs.add(target)
            self.mounts[target] = FakeMount(GUARD_SOURCE, "tmpfs", list(GUARD_OPTIONS))

    def is_guarded(self, target: str) -> bool:
        self._enter("is_guarded", target)
        mount = self.mounts.get(target)
        return (mount is not None and mount.fs_type == "tmpfs" and mount.source == GUARD_SOURCE
                and "ro" in mount.options)  # fmt: skip

    def file_users(self, path: str) -> list[str]:
        self._enter("file_users", path)
        return list(self.file_holders.get(path, []))

    # whole-node events -------------------------------------------------------------------
    def reboot(self) -> None:
        """/run is a tmpfs: direct volumes go (guards are mounts: they go too), and so do the
        processes that held files."""
        super().reboot()
        self.direct_volumes.clear()
        self.file_holders.clear()

    def is_empty(self) -> bool:
        """No direct volume under any root (guards count as mounts)."""
        return super().is_empty() and not self.direct_volumes
