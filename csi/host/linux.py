"""The real host: loop devices, cryptsetup, mkfs and mount on the running Linux kernel."""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import inspect
import logging
import mmap
import os
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from csi.errors import (
    Busy,
    DriverError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    ResourceExhausted,
)
from csi.host import (
    DirectVolume,
    FsStats,
    KeyRemoval,
    KeyWipe,
    LuksFormat,
    MappingUse,
    Quota,
    mountcalls,
)
from csi.host import commands as cmd
from csi.host.commands import EXT4_GROUP_BYTES as EXT4_GROUP_BYTES  # re-export (tests)
from csi.host.commands import FORMAT_TIMEOUT, GROW_TIMEOUT
from csi.host.commands import unwiped_prefill as unwiped_prefill  # re-export (tests)
from csi.host.dm import DeviceMapper
from csi.host.fscrypt import FscryptHost
from csi.host.kata import KataHost
from csi.host.nbd import Qcow2Nbd
from csi.host.runner import DEFAULT_TIMEOUT, CommandFailed, Runner, run
from csi.host.wipe import KeyWiper
from csi.keys import VolumeKey

INTEGRITY_SUFFIX = "_dif"  # cryptsetup's name for the dm-integrity mapping under ours

log = logging.getLogger(__name__)
R = TypeVar("R")

REQUIRED_TOOLS = (
    "cryptsetup", "dmsetup", "losetup", "mkfs.ext4", "mkfs.xfs", "mount", "umount", "resize2fs",
    "xfs_growfs",
)  # fmt: skip
QCOW2_OFF = (
    "backing=qcow2 is off on this node: the driver runs without --qsd-socket (the chart's "
    "value qcow2.enabled); use backing=loop"
)


_OCTAL = re.compile(r"\\([0-7]{3})")
TEMPORARY_MAPPING = "temporary-cryptsetup-"  # what cryptsetup names its short-lived mappings
DEVICE_FS = frozenset({"devtmpfs", "tmpfs"})  # where a bound device node can live


def _unescape_mountinfo(field: str) -> str:
    """The kernel escapes space, tab, newline and backslash in mountinfo as \\ooo (octal)."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo: where, the device number of the filesystem, the path inside it
    that is mounted (for a bound device node: the node), the source string and fs type."""

    point: str
    dev: str  # "major:minor"
    root: str
    source: str
    fs_type: str


def read_mounts(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """Every mount of this mount namespace, from the kernel's own table."""
    entries = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            entries.append(MountEntry(
                point=_unescape_mountinfo(fields[4]), dev=fields[2],
                root=_unescape_mountinfo(fields[3]), source=_unescape_mountinfo(rfields[1]),
                fs_type=rfields[0],
            ))  # fmt: skip
    return entries


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[tuple[str, str, str]]:
    """(mount point, source, fs type) of every mount."""
    return [(e.point, e.source, e.fs_type) for e in read_mounts(path)]


def typed_os_error(exc: OSError, what: str) -> DriverError:
    """An OS error as a domain error with a message a person can act on."""
    reason = exc.strerror or str(exc)
    code = exc.errno
    if code == errno.EBUSY:
        return Busy(f"{what}: {reason}; it is still in use, retry later")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: {reason}; free space on the node or ask for less")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailedPrecondition(f"{what}: {reason}; the driver needs root and a writable path")
    if code == errno.ELOOP:
        return InvalidArgument(f"{what}: a symlink is in the way; refusing to follow it")
    if code == errno.ENOTEMPTY:
        return FailedPrecondition(f"{what}: the directory is not empty")
    return Internal(f"{what}: {reason}")


def _typed_os_errors(method: Callable[..., R]) -> Callable[..., R]:
    """Wrap a host method so no bare OSError leaves the host layer."""

    @functools.wraps(method)
    def wrapper(self: LinuxHost, *args: Any, **kwargs: Any) -> R:
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            subject = args[0] if args and isinstance(args[0], str) else ""
            raise typed_os_error(exc, f"{method.__name__} {subject}".strip()) from None

    return wrapper


ZERO_CHUNK = 1 << 20


class LinuxHost:
    """Every method checks the kernel's view first, so repeating a step is harmless."""

    def __init__(
        self,
        sysfs: str = "/sys",
        qcow2: Qcow2Nbd | None = None,
        *,
        runner: Runner | None = None,
        proc: str = "/proc",
        dev: str = "/dev",
        dm: DeviceMapper | None = None,
    ) -> None:
        """``runner`` runs every command (``None``: ``csi.host.runner.run``, looked up in this
        module at each call so a test may patch ``csi.host.linux.run``); ``sysfs``, ``proc``
        and ``dev`` are where the kernel's tables are read (a fixture tree in tests); ``dm``
        makes the device-mapper ioctls (a scripted kernel in tests)."""
        self.sysfs = sysfs
        self.proc = proc
        self.dev = dev
        self.dm = dm or DeviceMapper(dev)
        self.qcow2 = qcow2
        self._runner = runner

    @property
    def runner(self) -> Runner:
        return run if self._runner is None else self._runner

    def _mounts(self) -> list[MountEntry]:
        return read_mounts(os.path.join(self.proc, "self", "mountinfo"))

    def _mountinfo(self) -> list[tuple[str, str, str]]:
        return [(e.point, e.source, e.fs_type) for e in self._mounts()]

    # files -------------------------------------------------------------------------------
    def create_backing(self, path: str, size: int, preallocate: bool) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if preallocate:
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise Internal(f"cannot create backing file {path}: {exc.strerror}") from None
        os.close(fd)

    def grow_backing(self, path: str, size: int, preallocate: bool) -> None:
        """Grow (never shrink) a backing file; preallocated ones get real blocks for the new
        range too, so the promise "this volume cannot run the node out of space" still holds."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError as exc:
            raise Internal(f"cannot open backing file {path}: {exc.strerror}") from None
        try:
            if preallocate:
                os.posix_fallocate(fd, 0, size)  # fills only what is not allocated yet
            elif os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as exc:
            raise Internal(f"cannot grow backing file {path}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def remove_file(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path) and not os.path.islink(path)

    def list_dir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def allocated_bytes(self, path: str) -> int:
        try:
            return os.stat(path).st_blocks * 512
        except FileNotFoundError:
            return 0

    def free_bytes(self, path: str) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def realpath(self, path: str) -> str:
        return os.path.realpath(path)

    def is_symlink(self, path: str) -> bool:
        return os.path.islink(path)

    def make_dir(self, path: str) -> None:
        os.makedirs(path, mode=0o750, exist_ok=True)

    def make_file(self, path: str) -> None:
        """An empty file to bind-mount a block device onto (never follows a symlink)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        os.close(fd)

    def remove_dir(self, path: str) -> None:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                raise FailedPrecondition(
                    f"target {path} is not a mount of the volume and holds files: they were "
                    "written outside the encrypted volume, on the node's disk; the volume itself "
                    "is gone: inspect and remove the directory"
                ) from None
            if exc.errno == errno.EBUSY:
                raise Busy(
                    f"target {path} is still a mount point of something that is not this "
                    "volume; unmount it and retry"
                ) from None
            raise

    def set_volume_root(self, path: str, group: int | None) -> None:
        if group is None:
            os.chmod(path, 0o777)  # like emptyDir: the pod's user may not be root
        else:
            os.chown(path, -1, group)
            os.chmod(path, 0o2775)

    # loop --------------------------------------------------------------------------------
    def _loops(self) -> dict[str, str]:
        """loop device -> backing file path (a deleted file keeps its old path)."""
        loops = {}
        for entry in glob.glob(os.path.join(self.sysfs, "block", "loop*", "loop", "backing_file")):
            try:
                with open(entry) as f:
                    current = f.read().strip()
            except OSError:
                continue
            loops["/dev/" + entry.split(os.sep)[-3]] = current.removesuffix(" (deleted)")
        return loops

    def loop_find(self, backing: str) -> str | None:
        for device, path in self._loops().items():
            if path == backing:
                return device
        return None

    def loops_in(self, directory: str) -> dict[str, str]:
        prefix = directory.rstrip("/") + "/"
        return {d: p for d, p in self._loops().items() if p.startswith(prefix)}

    def loop_attach(self, backing: str) -> str:
        try:
            out = self.runner(cmd.losetup_attach(backing, direct_io=True))
        except CommandFailed as exc:
            # tmpfs and some other filesystems refuse O_DIRECT: fall back to buffered I/O
            log.warning("direct I/O refused for %s (%s); attaching with buffered I/O",
                        backing, exc.stderr[-200:])
            if (stale := self.loop_find(backing)) is not None:
                self.loop_detach(stale)
            out = self.runner(cmd.losetup_attach(backing, direct_io=False))
        device = out.strip()
        if not device.startswith("/dev/loop"):
            raise Internal(f"losetup gave no loop device for {backing}")
        return device

    def loop_detach(self, device: str) -> None:
        try:
            self.runner(cmd.losetup_detach(device))
        except CommandFailed as exc:
            if "No such device" in exc.stderr or not os.path.exists(device):
                return
            raise

    def loop_refresh(self, device: str) -> None:
        """Make the loop device see its backing file's new size."""
        self.runner(cmd.losetup_set_capacity(device))

    # qcow2 over NBD --------------------------------------------------------------------
    def _nbd(self) -> Qcow2Nbd:
        if self.qcow2 is None:
            raise FailedPrecondition(QCOW2_OFF)
        return self.qcow2

    def qcow2_unavailable(self) -> str | None:
        return QCOW2_OFF if self.qcow2 is None else self.qcow2.unavailable()

    def qcow2_create(self, path: str, size: int, preallocate: bool) -> None:
        self._nbd().create(path, size, preallocate)

    def nbd_find(self, export: str) -> str | None:
        return self.qcow2.find(export) if self.qcow2 else None

    def nbd_attach(self, backing: str, export: str) -> str:
        return self._nbd().attach(backing, export)

    def nbd_detach(self, export: str) -> None:
        if self.qcow2:
            self.qcow2.detach(export)

    def nbd_exports(self) -> list[str]:
        return self.qcow2.exports() if self.qcow2 else []

    def nbd_export_alive(self, export: str) -> bool:
        return self.qcow2.export_alive(export) if self.qcow2 else False

    # dm-crypt ----------------------------------------------------------------------------
    def luks_format(self, device: str, key: VolumeKey, options: LuksFormat) -> None:
        self.runner(cmd.luks_format(device, options), stdin=key.view, timeout=FORMAT_TIMEOUT)

    def crypt_open(
        self, device: str, name: str, key: VolumeKey, header: str | None, *, keyring: bool = True
    ) -> None:
        """Open the mapping. ``keyring=False`` keeps the volume key in the dm-crypt table
        instead of a kernel keyring reference: only then can ``cryptsetup resize`` reload the
        table at a new size without the passphrase (which we no longer have)."""
        self.runner(cmd.crypt_open(device, name, header, keyring=keyring), stdin=key.view)

    def crypt_resize(self, name: str, header: str | None) -> None:
        """Grow the mapping to its (grown) device. stdin is /dev/null: if cryptsetup wanted a
        passphrase it fails at once instead of waiting for one."""
        try:
            self.runner(cmd.crypt_resize(name, header))
        except CommandFailed as exc:
            if "Nothing to read on input" in exc.stderr or "passphrase" in exc.stderr.lower():
                raise FailedPrecondition(
                    f"mapping {name} holds its key by keyring reference (it was opened by an "
                    "older driver version), and the key is not kept anywhere: it cannot grow "
                    "online; unstage and stage it again (its data is lost) to get the new size"
                ) from None
            raise

    def device_size(self, device: str) -> int:
        try:
            fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Internal(f"cannot open {device}: {exc.strerror}") from None
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)

    def crypt_close(self, name: str) -> None:
        if not self.crypt_exists(name):
            return
        try:
            self.runner(cmd.crypt_close(name))
        except CommandFailed as exc:
            if "in use" in exc.stderr or "busy" in exc.stderr.lower():
                raise Busy(f"mapping {name} is still in use; it stays open") from None
            if not self.crypt_exists(name):
                return
            if not KeyWiper(self).wiped(name):
                raise
            self._remove_wiped(name)

    def _remove_wiped(self, name: str) -> None:
        """cryptsetup no longer knows a mapping whose table was wiped: remove it (and the
        dm-integrity mapping it stood on, which holds no key) with dmsetup."""
        for mapping in (name, name + INTEGRITY_SUFFIX):
            if mapping not in self._dm_names():
                continue
            try:
                self.runner(cmd.dmsetup_remove(mapping))
            except CommandFailed as exc:
                if mapping in self._dm_names():
                    if "busy" in exc.stderr.lower() or "in use" in exc.stderr:
                        raise Busy(f"mapping {mapping} is still in use; it stays") from None
                    raise

    def crypt_wipe_keys(self, names: list[str]) -> list[KeyWipe]:
        """Forced: each key leaves the kernel now, in use or not; later I/O fails with EIO
        (``csi.host.wipe``)."""
        return KeyWiper(self).wipe(names)

    def _dm_names(self) -> dict[str, str]:
        """dm name -> kernel device name (dm-N), read from sysfs."""
        names = {}
        for entry in glob.glob(os.path.join(self.sysfs, "block", "dm-*", "dm", "name")):
            with contextlib.suppress(OSError), open(entry) as f:
                names[f.read().strip()] = entry.split(os.sep)[-3]
        return names

    def crypt_exists(self, name: str) -> bool:
        return name in self._dm_names()

    def crypt_names(self, prefix: str) -> list[str]:
        return sorted(n for n in self._dm_names() if n.startswith(prefix))

    # filesystems -------------------------------------------------------------------------
    def mkfs(self, device: str, fs_type: str, *, eager: bool = False) -> None:
        """``eager`` is for an unwiped dm-integrity device, where reading a sector that was
        never written fails with EIO: first zero the blocks mkfs writes only in part (its
        superblocks are 1 KiB writes into 4 KiB blocks, which the kernel must read first) and
        the regions blkid and fsck probe, pinning the layout those ranges assume; then make the
        filesystem writing every metadata block now (inode tables, journal)."""
        if fs_type not in cmd.FILESYSTEMS:
            raise Internal(f"no mkfs for {fs_type}")
        extra: list[str] = []
        if eager:
            ranges, extra = unwiped_prefill(fs_type, self.device_size(device))
            self._zero(device, ranges)
        argv = cmd.mkfs(device, fs_type, eager=eager, layout=extra)
        # only ext4's eager mkfs writes whole inode tables and the journal now
        slow = eager and fs_type == "ext4"
        self.runner(argv, timeout=FORMAT_TIMEOUT if slow else DEFAULT_TIMEOUT)

    def _zero(self, device: str, ranges: list[tuple[int, int]]) -> None:
        """Write zeros over byte ranges of a block device, with O_DIRECT (page-aligned buffer)."""
        fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        zeros = mmap.mmap(-1, ZERO_CHUNK)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            with memoryview(zeros) as view:
                for start, length in ranges:
                    pos, end = start, min(size, start + length)
                    while pos < end:
                        pos += os.pwritev(fd, [view[: min(ZERO_CHUNK, end - pos)]], pos)
            os.fsync(fd)
        except OSError as exc:
            raise Internal(f"cannot zero the metadata blocks of {device}: {exc.strerror}") from None
        finally:
            zeros.close()
            os.close(fd)

    def mount(self, source: str, target: str, fs_type: str, options: list[str]) -> None:
        self.runner(cmd.mount(source, target, fs_type, options))

    def bind_mount(self, source: str, target: str, options: list[str]) -> None:
        """Bind ``source`` (a staged directory, or a device node onto a file) onto ``target``,
        then remount the bind with the per-mount flags: a plain bind takes none of ro/nosuid/
        nodev. Both are mount(2) calls (``csi.host.mountcalls``), not mount(8): two process
        spawns were nearly all of a directory publish. A failed remount takes the bare bind
        away again: never leave a bind without its nosuid/nodev/ro."""
        try:
            mountcalls.bind(source, target)
        except OSError as exc:
            raise typed_os_error(exc, f"bind {source} onto {target}") from None
        try:
            mountcalls.remount_bind(target, options)
        except OSError as exc:
            try:
                mountcalls.unmount(target)
            except OSError as undo:
                log.error("the bare bind at %s stays: unmounting it failed: %s", target,
                          undo.strerror)  # fmt: skip
            raise typed_os_error(exc, f"remount of the bind at {target} with {options}") from None

    def is_mountpoint(self, path: str) -> bool:
        return any(point == path for point, _, _ in self._mountinfo())

    def _dm_dir(self, name: str) -> str | None:
        kname = self._dm_names().get(name)
        return os.path.join(self.sysfs, "block", kname) if kname else None

    @staticmethod
    def _dm_dev(directory: str) -> tuple[str, int]:
        """The mapping's device number from its sysfs dir: as mountinfo writes it
        ("major:minor") and as ``st_rdev``."""
        with open(os.path.join(directory, "dev")) as f:
            dev = f.read().strip()
        major, minor = (int(n) for n in dev.split(":"))
        return dev, os.makedev(major, minor)

    def _dm_open_count(self, name: str) -> int:
        """How many times the kernel has the mapping open (mounts of one filesystem share one)."""
        out = self.runner(cmd.dmsetup_open_count(name))
        try:
            return int(out.strip())
        except ValueError:
            raise Internal(f"dmsetup gave no open count for {name}: {out.strip()[:80]!r}") from None

    def _binds_device(self, entry: MountEntry, kname: str, name: str, rdev: int) -> bool:
        """A device node bound onto a file: its mount is of /dev (devtmpfs or a tmpfs), and the
        node itself says which device it is."""
        if entry.fs_type not in DEVICE_FS or os.path.basename(entry.root) not in (kname, name):
            return False
        try:
            st = os.stat(entry.point)
        except OSError:
            return False
        return stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev

    def mapping_users(self, name: str) -> list[MappingUse]:
        """Everything the kernel says holds the mapping: mounts of its filesystem (by device
        number, whatever the source string says), bound device nodes, stacked devices, and
        opens that none of those explain (a process, or a mount in another mount namespace)."""
        directory = self._dm_dir(name)
        if directory is None:
            return []
        kname = os.path.basename(directory)
        dev, rdev = self._dm_dev(directory)
        uses = []
        mounted = False
        for entry in self._mounts():
            if entry.dev == dev:
                mounted = True
                uses.append(MappingUse("mounted", entry.point))
            elif self._binds_device(entry, kname, name, rdev):
                uses.append(MappingUse("bound", entry.point))
        holders = sorted(os.listdir(os.path.join(directory, "holders")))
        uses += [MappingUse("held", holder) for holder in holders]
        unexplained = self._dm_open_count(name) - int(mounted) - len(holders)
        if unexplained > 0:
            uses.append(MappingUse("open", str(unexplained)))
        return uses

    def is_mounted_from(self, path: str, name: str) -> bool:
        """Whether the visible mount at ``path`` is the mapping's filesystem or its device node
        (decided by device number, not by the source string)."""
        directory = self._dm_dir(name)
        if directory is None:
            return False
        dev, rdev = self._dm_dev(directory)
        visible = [e for e in self._mounts() if e.point == path]
        if not visible:
            return False
        entry = visible[-1]  # the last entry wins: it is the visible one
        return entry.dev == dev or self._binds_device(entry, os.path.basename(directory), name,
                                                      rdev)  # fmt: skip

    def temporary_mappings_on(self, device: str) -> list[str]:
        """cryptsetup's own short-lived mappings (``temporary-cryptsetup-*``, made while it
        formats or wipes) stacked on ``device``, directly or on each other (an integrity
        format stacks a crypt mapping on an integrity one): a cryptsetup killed mid-way leaves
        them. Ordered top first, the order they can be removed in."""
        names = {v: k for k, v in self._dm_names().items()}
        found: list[str] = []
        level = [os.path.basename(os.path.realpath(device))]
        while level:
            above = []
            for kname in level:
                try:
                    holders = os.listdir(os.path.join(self.sysfs, "block", kname, "holders"))
                except FileNotFoundError:
                    continue
                above += [h for h in sorted(holders)
                          if names.get(h, "").startswith(TEMPORARY_MAPPING)]  # fmt: skip
            found += [names[h] for h in above if names[h] not in found]
            level = above
        return list(reversed(found))

    def remove_temporary_mapping(self, name: str) -> None:
        if not name.startswith(TEMPORARY_MAPPING):
            raise InvalidArgument(f"{name} is not one of cryptsetup's temporary mappings")
        if name not in self._dm_names():
            return
        try:
            self.runner(cmd.dmsetup_remove(name))
        except CommandFailed as exc:
            if name in self._dm_names():
                if "busy" in exc.stderr.lower() or "in use" in exc.stderr:
                    raise Busy(f"temporary mapping {name} is still in use") from None
                raise

    def umount(self, target: str) -> None:
        """umount2(2) (``csi.host.mountcalls``), not umount(8): no process spawn on unpublish.
        Busy (EBUSY) leaves the volume mounted: kubelet retries. Any other failure where
        mountinfo shows nothing at ``target`` (EINVAL: not a mount point, ENOENT) is success:
        it is unmounted already, so a repeated unpublish is harmless."""
        try:
            mountcalls.unmount(target)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise Busy(
                    f"target {target} is busy: a process still holds files on it; "
                    "the volume stays mounted with its data intact, retry later"
                ) from None
            if self.mount_source(target) is None:
                return
            raise typed_os_error(exc, f"umount {target}") from None

    def mount_source(self, target: str) -> str | None:
        found = None
        for point, source, _ in self._mountinfo():
            if point == target:
                found = source  # the last entry wins: it is the visible one
        return found

    def mountpoints_of(self, source: str) -> list[str]:
        return [point for point, src, _ in self._mountinfo() if src == source]


    def fs_stats(self, path: str) -> FsStats:
        st = os.statvfs(path)
        return FsStats(
            total_bytes=st.f_blocks * st.f_frsize,
            available_bytes=st.f_bavail * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
            total_inodes=st.f_files,
            free_inodes=st.f_ffree,
            used_inodes=st.f_files - st.f_ffree,
        )

    def fs_error_count(self, device: str) -> int:
        try:
            kname = os.path.basename(os.path.realpath(device))
            with open(os.path.join(self.sysfs, "fs", "ext4", kname, "errors_count")) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def fs_grow(self, device: str, mount_point: str, fs_type: str) -> None:
        """Grow a mounted filesystem to its device (both tools work online and are no-ops when
        there is nothing to grow)."""
        self.runner(cmd.fs_grow(device, mount_point, fs_type), timeout=GROW_TIMEOUT)

    # directories and fscrypt (csi.host.fscrypt) --------------------------------------------
    @functools.cached_property
    def _fscrypt(self) -> FscryptHost:
        return FscryptHost(self)

    def remove_tree(self, path: str) -> None:
        self._fscrypt.remove_tree(path)

    def clear_dir(self, path: str) -> None:
        self._fscrypt.clear_dir(path)

    def is_bound_from(self, path: str, directory: str) -> bool:
        return self._fscrypt.is_bound_from(path, directory)

    def dir_mounts(self, directory: str) -> list[str]:
        return self._fscrypt.dir_mounts(directory)

    def fscrypt_unavailable(self, root: str) -> str | None:
        return self._fscrypt.unavailable(root)

    def fscrypt_pool(self, image: str, root: str, size: int) -> None:
        self._fscrypt.pool(image, root, size)

    def make_project_dir(self, path: str, project: int) -> None:
        self._fscrypt.make_project_dir(path, project)

    def dir_project(self, path: str) -> int:
        return self._fscrypt.dir_project(path)

    def fscrypt_add_key(self, root: str, key: VolumeKey) -> str:
        return self._fscrypt.add_key(root, key)

    def fscrypt_set_policy(self, path: str, identifier: str) -> None:
        self._fscrypt.set_policy(path, identifier)

    def fscrypt_policy_of(self, path: str) -> str | None:
        return self._fscrypt.policy_of(path)

    def fscrypt_key_status(self, root: str, identifier: str) -> str:
        return self._fscrypt.key_status(root, identifier)

    def fscrypt_remove_key(self, root: str, identifier: str) -> KeyRemoval:
        return self._fscrypt.remove_key(root, identifier)

    def quota_get(self, root: str, project: int) -> Quota:
        return self._fscrypt.quota_get(root, project)

    def quota_set(self, root: str, project: int, bytes_limit: int, inodes_limit: int) -> None:
        self._fscrypt.quota_set(root, project, bytes_limit, inodes_limit)

    def files_open_in(self, root: str, project: int) -> list[str]:
        return self._fscrypt.files_open_in(root, project)

    # Kata direct volumes and the guard (csi.host.kata) ----------------------------------------
    @functools.cached_property
    def _kata(self) -> KataHost:
        return KataHost(self)

    def direct_volume_write(self, root: str, target: str, volume: DirectVolume) -> None:
        self._kata.write(root, target, volume)

    def direct_volume_read(self, root: str, target: str) -> DirectVolume | None:
        return self._kata.read(root, target)

    def direct_volume_remove(self, root: str, target: str) -> None:
        self._kata.remove(root, target)

    def direct_volume_targets(self, root: str) -> dict[str, DirectVolume | None]:
        return self._kata.targets(root)

    def guard_mount(self, target: str) -> None:
        self._kata.guard_mount(target)

    def is_guarded(self, target: str) -> bool:
        return self._kata.is_guarded(target)

    def file_users(self, path: str) -> list[str]:
        return self._kata.file_users(path)

    # readiness ---------------------------------------------------------------------------
    def missing_requirements(self) -> list[str]:
        missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool, path=_PATH) is None]
        control = os.path.join(self.dev, "mapper", "control")
        if not (
            os.path.exists(control)
            and stat.S_ISCHR(os.stat(control).st_mode)
            and _kernel_has_device_mapper(os.path.join(self.proc, "misc"))
        ):
            missing.append(f"device-mapper ({control})")
        return missing


for _name, _method in list(vars(LinuxHost).items()):
    if not _name.startswith("_") and inspect.isfunction(_method):
        setattr(LinuxHost, _name, _typed_os_errors(_method))


_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _kernel_has_device_mapper(misc: str = "/proc/misc") -> bool:
    """A /dev/mapper/control node can exist where the kernel has no device-mapper (containers
    with a copied /dev): the kernel's own list of misc devices is the truth."""
    try:
        with open(misc) as f:
            return any(line.split()[-1:] == ["device-mapper"] for line in f)
    except OSError:
        return False
