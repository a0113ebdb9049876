"""``Mounts`` over the shared fake state: filesystems, mounts, binds and busy targets."""

from __future__ import annotations

from typing import TYPE_CHECKING

from csi.errors import Busy
from csi.host import FsStats
from csi.host.fakes.state import FakeMount, FakeState
from csi.host.runner import CommandFailed


class FakeMounts(FakeState):
    if TYPE_CHECKING:  # FakeDmCrypt's, in FakeHost: a filesystem is as big as its device

        def device_size(self, device: str) -> int: ...

    def mkfs(self, device: str, fs_type: str, *, eager: bool = False) -> None:
        with self._lock:
            self._enter("mkfs", device)
            self.filesystems[device] = fs_type
            self.mkfs_eager[device] = eager
            self.fs_sizes[device] = self.device_size(device)
            self.fs_errors.pop(device, None)

    def mount(self, source: str, target: str, fs_type: str, options: list[str]) -> None:
        with self._lock:
            self._enter("mount", target)
            if self.filesystems.get(source) != fs_type:
                raise CommandFailed(["mount"], 32, f"wrong fs type, bad superblock on {source}")
            if target not in self.dirs:
                raise CommandFailed(["mount"], 32, f"mount point {target} does not exist")
            self.mounts[target] = FakeMount(source, fs_type, list(options))

    def bind_mount(self, source: str, target: str, options: list[str]) -> None:
        """A staged directory onto a directory, a device node onto a file, or a plain
        directory onto a directory; like the kernel, a bound device node shows "udev" as its
        source and does not hold the device open, and a bind of a bind shows what the first
        one showed."""
        with self._lock:
            self._enter("bind_mount", target)
            if source in self.mounts:
                if target not in self.dirs:
                    raise CommandFailed(["mount"], 32, f"mount point {target} does not exist")
                staged = self.mounts[source]
                self.mounts[target] = FakeMount(staged.source, staged.fs_type, list(options),
                                                directory=staged.directory)  # fmt: skip
            elif source.removeprefix("/dev/mapper/") in self.mappings:
                if target not in self.files:
                    raise CommandFailed(["mount"], 32, f"mount point {target} does not exist")
                self.mounts[target] = FakeMount("udev", "devtmpfs", list(options), source)
            elif source in self.dirs:
                if target not in self.dirs:
                    raise CommandFailed(["mount"], 32, f"mount point {target} does not exist")
                self.mounts[target] = FakeMount(source, "none", list(options), directory=source)
            else:
                raise CommandFailed(["mount"], 32, f"special device {source} does not exist")

    def is_mountpoint(self, path: str) -> bool:
        return path in self.mounts

    def umount(self, target: str) -> None:
        with self._lock:
            self._enter("umount", target)
            if target in self.busy:
                raise Busy(f"target {target} is busy: a process still holds files on it")
            self.mounts.pop(target, None)

    def mount_source(self, target: str) -> str | None:
        mount = self.mounts.get(target)
        return mount.source if mount else None

    def mountpoints_of(self, source: str) -> list[str]:
        return [t for t, m in self.mounts.items() if m.source == source]

    def is_mounted_from(self, path: str, name: str) -> bool:
        mount = self.mounts.get(path)
        device = f"/dev/mapper/{name}"
        return mount is not None and name in self.mappings and device in (mount.source,
                                                                           mount.device)

    def fs_stats(self, path: str) -> FsStats:
        mount = self.mounts.get(path)  # a path of the node's own disk: its free space
        size = self.fs_sizes.get(mount.source, 0) if mount else self.free
        return FsStats(size, size - 4096, 4096, size // 16384, size // 16384 - 11, 11)

    def fs_error_count(self, device: str) -> int:
        return self.fs_errors.get(device, 0)

    def fs_grow(self, device: str, mount_point: str, fs_type: str) -> None:
        with self._lock:
            self._enter("fs_grow", device)
            if self.filesystems.get(device) != fs_type:
                raise CommandFailed(["resize2fs"], 1, f"bad magic number in super-block: {device}")
            if self.mount_source(mount_point) != device:
                raise CommandFailed(["xfs_growfs"], 1, f"{mount_point} is not a mounted filesystem")
            self.fs_sizes[device] = self.device_size(device)
