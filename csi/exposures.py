"""Exposures: how a prepared volume reaches a pod.

A filesystem is mounted (an inline volume's target, a PVC's staging path); a PVC's staging
directory is bound into each pod's target; a block volume's device node is bound onto a file at
each target; a directory backing's volume (fscrypt) is bound at its primary path instead of
mounted; a volume for a Kata VM is handed over (nothing of it is mounted on the host). Every
exposure
answers "is the volume exposed at this path?" from the kernel, through the volume's backing
(``Shows``: the visible mount has the mapping's device number, or is a bind of the volume's
directory), never from a source string, and undoes only its own mount.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from csi.errors import Internal
from csi.host import DirectVolume, DirectVolumes, FsStats, Host

if TYPE_CHECKING:
    from csi.journal import Names


# whether the mount visible at a path shows the volume: the backing's ``shown_at``
Shows = Callable[["Names", str], bool]


class Exposure(ABC):
    def __init__(self, host: Host, shows: Shows | None = None) -> None:
        self.host = host
        self.shows = shows or self._shows_mapping

    def _shows_mapping(self, names: Names, path: str) -> bool:
        """The default, for a device-mapper volume: the mount has the mapping's device number."""
        return self.host.is_mounted_from(path, names.mapping)

    def is_exposed(self, names: Names, path: str) -> bool:
        return bool(path) and self.shows(names, path)

    @abstractmethod
    def expose(self, names: Names, source: str, path: str) -> None:
        """Make ``source`` (a device, or a directory for a bind) visible at ``path``."""

    def unexpose(self, names: Names, path: str) -> bool:
        """Unmount ``path`` if it shows this volume; True if it did."""
        if not self.is_exposed(names, path):
            return False
        self.host.umount(path)
        return True

    def remove(self, path: str) -> None:
        """The empty directory left where a mount was (never its content)."""
        self.host.remove_dir(path)

    def stats(self, names: Names, path: str) -> FsStats | None:
        return self.host.fs_stats(path) if self.is_exposed(names, path) else None


def filesystem_options(flags: tuple[str, ...] | list[str], *, readonly: bool) -> list[str]:
    """A filesystem mount's options: ro or rw, always nosuid,nodev, then the asked flags."""
    rest = [f for f in flags if f not in ("ro", "rw")]
    return ["ro" if readonly or "ro" in flags else "rw", "nosuid", "nodev", *rest]


class MountFilesystem(Exposure):
    """The volume's filesystem, mounted nosuid,nodev plus the asked flags; a writable mount
    first gets its root's owner and mode fixed (the pod's user may not be root)."""

    def __init__(self, host: Host, fs_type: str, flags: tuple[str, ...], *, readonly: bool,
                 group: str, shows: Shows | None = None) -> None:  # fmt: skip
        super().__init__(host, shows)
        self.fs_type = fs_type
        self.options = filesystem_options(flags, readonly=readonly)
        self.group = int(group) if group else None

    def expose(self, names: Names, source: str, path: str) -> None:
        self.host.make_dir(path)
        self._attach(source, path)
        if self.options[0] == "rw":
            self.host.set_volume_root(path, self.group)

    def _attach(self, source: str, path: str) -> None:
        self.host.mount(source, path, self.fs_type, self.options)


class BindFilesystem(MountFilesystem):
    """A directory backing's volume (already on a filesystem of the node's) bound at its
    primary path with the same options and root fix-up as a mounted filesystem."""

    def _attach(self, source: str, path: str) -> None:
        self.host.bind_mount(source, path, self.options)


class Bind(Exposure):
    """A bind mount into one pod's target, with that pod's options."""

    def __init__(self, host: Host, options: list[str], shows: Shows | None = None) -> None:
        super().__init__(host, shows)
        self.options = options


class BindDirectory(Bind):
    """A staging directory bound into a pod's target."""

    def expose(self, names: Names, source: str, path: str) -> None:
        self.host.make_dir(path)
        self.host.bind_mount(source, path, self.options)


class BindDevice(Bind):
    """A block volume's device node bound onto a file at the pod's target."""

    def expose(self, names: Names, source: str, path: str) -> None:
        self.host.make_file(path)
        self.host.bind_mount(source, path, self.options)

    def unexpose(self, names: Names, path: str) -> bool:
        """A recorded target's bind is ours even once the mapping is gone (then the device
        number no longer says so): unmount whatever is mounted on the file."""
        if not self.host.is_mountpoint(path):
            return False
        self.host.umount(path)
        return True

    def remove(self, path: str) -> None:
        self.host.remove_file(path)

    def stats(self, names: Names, path: str) -> FsStats | None:
        return None  # a device has a size, not filesystem usage


class Unrecorded(Exposure):
    """What a path shows of a volume no record describes: it can be found and unmounted
    (a filesystem or a bound device node alike, by device number), never made."""

    def expose(self, names: Names, source: str, path: str) -> None:
        raise Internal(f"volume {names.volume_id} has no record: nothing says how to expose it")

    def remove(self, path: str) -> None:
        if self.host.is_dir(path):
            self.host.remove_dir(path)
        else:
            self.host.remove_file(path)


def kata_volume(kata: str, device: str, fs_type: str, flags: tuple[str, ...] | list[str], *,
                readonly: bool, group: str) -> DirectVolume:  # fmt: skip
    """What Kata's runtime reads for the target. ``guest``: the agent luksFormats the raw disk
    under a key born in the VM and makes ext4 on it (``encryptionKey`` must be exactly
    ``ephemeral``, or the agent formats it as plaintext); ``host``: our opened, formatted
    device, mounted by the guest."""
    metadata = {"fsGroup": group} if group else {}
    if kata == "guest":
        metadata = {"encryptionKey": "ephemeral", "createFilesystem": "true", **metadata}
    options = [f for f in flags if f not in ("ro", "rw")]
    if readonly or "ro" in flags:
        options.append("ro")
    return DirectVolume("directvol", device, fs_type, metadata, options)


class KataHandOff(Exposure):
    """A disk handed to the pod's Kata VM: Kata's mountInfo.json for the target, under a guard
    that covers the target (an empty read-only tmpfs): a pod that is not run by Kata gets EROFS,
    never a writable plain directory on the node's disk. Kata replaces the guard by the disk in
    the VM; on the host nothing of the volume is mounted (two mounts of one ext4 corrupt it)."""

    def __init__(self, host: Host, kata: DirectVolumes, root: str, volume: DirectVolume) -> None:
        super().__init__(host)
        self.kata = kata
        self.root = root
        self.volume = volume

    def _ours(self, path: str) -> bool:
        found = self.kata.direct_volume_read(self.root, path)
        return found is not None and found.device == self.volume.device

    def is_exposed(self, names: Names, path: str) -> bool:
        return bool(path) and self._ours(path) and self.kata.is_guarded(path)

    def expose(self, names: Names, source: str, path: str) -> None:
        self.host.make_dir(path)
        self.kata.guard_mount(path)  # first: covered before Kata could look
        self.kata.direct_volume_write(self.root, path, self.volume)

    def unexpose(self, names: Names, path: str) -> bool:
        """Take back the hand-off (only a mountInfo.json naming our device) and the guard."""
        ours = self._ours(path)
        if ours:
            self.kata.direct_volume_remove(self.root, path)
        guarded = self.kata.is_guarded(path)
        if guarded:
            self.host.umount(path)
        return ours or guarded

    def stats(self, names: Names, path: str) -> FsStats | None:
        return None  # the filesystem lives in the guest
