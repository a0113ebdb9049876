"""An in-memory host for unit tests: files, loops, LUKS, mappings and mounts, with faults.

It models just enough of the kernel to catch lifecycle bugs: a mapping can only be opened with the
key it was formatted with (checked by hash), a busy mount refuses umount, and
``fail(step)`` makes the next call of that step raise, so every step can be made to fail or crash.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field

from csi.errors import Busy, FailedPrecondition, Internal
from csi.host import FsStats, LuksFormat, MappingUse
from csi.host.qmp import QmpError
from csi.host.runner import CommandFailed
from csi.keys import VolumeKey

STEPS = (
    "create_backing", "loop_attach", "luks_format", "crypt_open", "mkfs", "mount",
    "set_volume_root", "umount", "crypt_close", "loop_detach", "remove_file",
    "grow_backing", "loop_refresh", "crypt_resize", "fs_grow", "bind_mount", "make_file",
    "qcow2_create", "nbd_attach", "nbd_detach", "nbd_exports", "remove_temporary_mapping",
)  # fmt: skip
ATTACHED_OFFSET = 1024**2  # where the data starts behind an attached LUKS2 header


@dataclass
class FakeFile:
    size: int
    allocated: int


@dataclass
class FakeMount:
    source: str
    fs_type: str
    options: list[str]
    device: str = ""  # for a device node bound onto a file: the device (source is "udev")


@dataclass
class FakeHost:
    free: int = 100 * 1024**3
    files: dict[str, FakeFile] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    symlinks: dict[str, str] = field(default_factory=dict)
    loops: dict[str, str] = field(default_factory=dict)  # device -> backing
    luks: dict[str, str] = field(default_factory=dict)  # header location -> key hash
    luks_options: dict[str, LuksFormat] = field(default_factory=dict)
    mkfs_eager: dict[str, bool] = field(default_factory=dict)  # device -> eager metadata
    mappings: dict[str, str] = field(default_factory=dict)  # name -> device
    qcow2_sizes: dict[str, int] = field(default_factory=dict)  # image -> virtual size
    keyring: dict[str, bool] = field(default_factory=dict)  # name -> key held by keyring ref
    loop_sizes: dict[str, int] = field(default_factory=dict)  # device -> size seen by loop/nbd
    qsd_running: bool = True  # qemu-storage-daemon reachable (qcow2 backing possible)
    exports: dict[str, str] = field(default_factory=dict)  # NBD export -> qcow2 image
    nbds: dict[str, str] = field(default_factory=dict)  # /dev/nbdN -> export it is connected to
    mapping_sizes: dict[str, int] = field(default_factory=dict)  # name -> size of the mapping
    fs_sizes: dict[str, int] = field(default_factory=dict)  # device -> size of its filesystem
    filesystems: dict[str, str] = field(default_factory=dict)  # device -> fs type
    fs_errors: dict[str, int] = field(default_factory=dict)
    mounts: dict[str, FakeMount] = field(default_factory=dict)  # target -> mount
    busy: set[str] = field(default_factory=set)  # busy targets
    # opens of a mapping the driver cannot see as mounts: a process, a mount in another mount
    # namespace (a container's bind of the target); the kernel refuses to close it meanwhile
    foreign_users: dict[str, int] = field(default_factory=dict)
    # mappings whose filesystem another mount namespace also mounts (a container's bind): like
    # the kernel, that shares the one open our own mount explains, so it shows only once we
    # unmount, and the kernel refuses to close the mapping meanwhile
    other_namespaces: set[str] = field(default_factory=set)
    # cryptsetup temp mapping -> the device it sits on (a loop, or /dev/mapper/<another temp>)
    temporary: dict[str, str] = field(default_factory=dict)
    nonempty: set[str] = field(default_factory=set)  # directories holding files of their own
    missing: list[str] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    faults: dict[str, BaseException] = field(default_factory=dict)
    seen_keys: list[bytes] = field(default_factory=list)  # for tests that hunt for key leaks
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _next_loop: int = 0
    _next_nbd: int = 0

    # fault injection ---------------------------------------------------------------------
    def fail(self, step: str, error: BaseException | None = None) -> None:
        """Make the next call of ``step`` raise ``error`` (default: a failed command)."""
        self.faults[step] = error or CommandFailed([step], 1, f"injected failure in {step}")

    def _enter(self, step: str, detail: str = "") -> None:
        self.calls.append(f"{step} {detail}".strip())
        error = self.faults.pop(step, None)
        if error is not None:
            raise error

    def reboot(self) -> None:
        """What a node reboot leaves: files on disk only (tmpfs dirs are the caller's job)."""
        self.loops.clear()
        self.exports.clear()
        self.nbds.clear()
        self.mappings.clear()
        self.keyring.clear()
        self.loop_sizes.clear()
        self.mapping_sizes.clear()
        self.fs_sizes.clear()
        self.mounts.clear()
        self.busy.clear()
        self.foreign_users.clear()
        self.other_namespaces.clear()
        self.temporary.clear()

    def is_empty(self) -> bool:
        return not (
            self.files or self.loops or self.mappings or self.mounts or self.luks or self.exports
            or self.nbds or self.temporary
        )  # fmt: skip

    def restart_qsd(self) -> None:
        """qemu-storage-daemon restarted: every export is gone, kernel devices stay, dead."""
        self.exports.clear()

    def _backing_of(self, device: str) -> str:
        if device in self.loops:
            return self.loops[device]
        return self.exports.get(self.nbds.get(device, ""), "")

    # files -------------------------------------------------------------------------------
    def create_backing(self, path: str, size: int, preallocate: bool) -> None:
        with self._lock:
            self._enter("create_backing", path)
            if size > self.free:
                raise Internal(f"cannot create backing file {path}: No space left on device")
            self.files[path] = FakeFile(size, size if preallocate else 0)

    def grow_backing(self, path: str, size: int, preallocate: bool) -> None:
        with self._lock:
            self._enter("grow_backing", path)
            f = self.files.get(path)
            if f is None:
                raise Internal(f"cannot open backing file {path}: No such file or directory")
            need = (size - f.allocated) if preallocate else 0
            if need > self.free_bytes(path):
                raise Internal(f"cannot grow backing file {path}: No space left on device")
            f.size = max(f.size, size)
            if preallocate:
                f.allocated = f.size

    def remove_file(self, path: str) -> None:
        with self._lock:
            self._enter("remove_file", path)
            self.files.pop(path, None)
            self.luks.pop(path, None)
            self.qcow2_sizes.pop(path, None)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs or path in self.symlinks

    def is_dir(self, path: str) -> bool:
        return path in self.dirs

    def list_dir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = (p[len(prefix) :] for p in self.files if p.startswith(prefix))
        return sorted(n for n in names if "/" not in n)

    def allocated_bytes(self, path: str) -> int:
        f = self.files.get(path)
        return f.allocated if f else 0

    def free_bytes(self, path: str) -> int:
        return self.free - sum(f.allocated for f in self.files.values())

    def realpath(self, path: str) -> str:
        parts = os.path.normpath(path).split("/")
        current = "/"
        for part in parts[1:]:
            current = os.path.join(current, part)
            if current in self.symlinks:
                current = self.symlinks[current]
        return current

    def is_symlink(self, path: str) -> bool:
        return path in self.symlinks

    def make_dir(self, path: str) -> None:
        self.dirs.add(path)

    def make_file(self, path: str) -> None:
        with self._lock:
            self._enter("make_file", path)
            self.files.setdefault(path, FakeFile(0, 0))

    def remove_dir(self, path: str) -> None:
        if path in self.nonempty:
            raise FailedPrecondition(f"target {path} is not a mount of the volume and holds files")
        if path in self.mounts:
            raise Busy(f"target {path} is still a mount point")
        self.dirs.discard(path)

    def set_volume_root(self, path: str, group: int | None) -> None:
        self._enter("set_volume_root", path)

    # loop --------------------------------------------------------------------------------
    def loop_find(self, backing: str) -> str | None:
        for device, path in self.loops.items():
            if path == backing:
                return device
        return None

    def loop_attach(self, backing: str) -> str:
        with self._lock:
            self._enter("loop_attach", backing)
            if backing not in self.files:
                raise CommandFailed(["losetup"], 1, f"{backing}: No such file or directory")
            device = f"/dev/loop{self._next_loop}"
            self._next_loop += 1
            self.loops[device] = backing
            self.loop_sizes[device] = self.files[backing].size
            return device

    def loops_in(self, directory: str) -> dict[str, str]:
        prefix = directory.rstrip("/") + "/"
        return {d: p for d, p in self.loops.items() if p.startswith(prefix)}

    def loop_detach(self, device: str) -> None:
        with self._lock:
            self._enter("loop_detach", device)
            if any(m == device for m in (*self.mappings.values(), *self.temporary.values())):
                # like losetup -d on a busy device: it only marks it for autoclear
                return
            self.loops.pop(device, None)
            self.loop_sizes.pop(device, None)

    def loop_refresh(self, device: str) -> None:
        with self._lock:
            self._enter("loop_refresh", device)
            if device not in self.loops:
                raise CommandFailed(["losetup"], 1, f"{device}: No such device or address")
            self.loop_sizes[device] = self.files[self.loops[device]].size

    # qcow2 over NBD --------------------------------------------------------------------
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

    # dm-crypt ----------------------------------------------------------------------------
    @staticmethod
    def _fingerprint(key: VolumeKey) -> str:
        return hashlib.sha256(key.view).hexdigest()

    def luks_format(self, device: str, key: VolumeKey, options: LuksFormat) -> None:
        with self._lock:
            self._enter("luks_format", device)
            location = options.header or self._backing_of(device)
            self.luks[location] = self._fingerprint(key)
            self.luks_options[location] = options
            if options.header:
                self.files[options.header] = FakeFile(16 * 1024**2, 16 * 1024**2)
            self.seen_keys.append(bytes(key.view))

    def crypt_open(
        self, device: str, name: str, key: VolumeKey, header: str | None, *, keyring: bool = True
    ) -> None:
        with self._lock:
            self._enter("crypt_open", f"{device} {name}")
            if name in self.mappings:
                raise CommandFailed(["cryptsetup"], 5, f"Device {name} already exists.")
            location = header or self._backing_of(device)
            if self.luks.get(location) != self._fingerprint(key):
                raise CommandFailed(["cryptsetup"], 2, "No key available with this passphrase.")
            self.mappings[name] = device
            self.keyring[name] = keyring
            self.mapping_sizes[name] = self._data_size(device, header)

    def _data_size(self, device: str, header: str | None) -> int:
        """What a mapping of ``device`` can hold: all of it, or what follows an attached header."""
        return self.loop_sizes.get(device, 0) - (0 if header else ATTACHED_OFFSET)

    def crypt_resize(self, name: str, header: str | None) -> None:
        """Like cryptsetup 2.6: a key held by keyring reference cannot be reloaded without the
        passphrase, and stdin is empty."""
        with self._lock:
            self._enter("crypt_resize", name)
            if name not in self.mappings:
                raise CommandFailed(["cryptsetup"], 4, f"Device {name} is not active.")
            if self.keyring.get(name, True):
                raise CommandFailed(["cryptsetup"], 1, "Nothing to read on input.")
            self.mapping_sizes[name] = self._data_size(self.mappings[name], header)

    def device_size(self, device: str) -> int:
        if device.startswith("/dev/mapper/"):
            name = device.removeprefix("/dev/mapper/")
            if name in self.mapping_sizes:
                return self.mapping_sizes[name]
        elif device in self.loop_sizes:
            return self.loop_sizes[device]
        raise Internal(f"cannot open {device}: No such file or directory")

    def crypt_close(self, name: str) -> None:
        with self._lock:
            self._enter("crypt_close", name)
            device = f"/dev/mapper/{name}"
            if (any(m.source == device for m in self.mounts.values())
                    or self.foreign_users.get(name) or name in self.other_namespaces):
                raise Busy(f"mapping {name} is still in use; it stays open")
            self.mappings.pop(name, None)
            self.keyring.pop(name, None)
            self.mapping_sizes.pop(name, None)
            self.filesystems.pop(device, None)
            self.fs_sizes.pop(device, None)

    def crypt_exists(self, name: str) -> bool:
        return name in self.mappings

    def crypt_names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.mappings if n.startswith(prefix))

    def mapping_users(self, name: str) -> list[MappingUse]:
        if name not in self.mappings:
            return []
        device = f"/dev/mapper/{name}"
        uses = [MappingUse("mounted", t) for t, m in self.mounts.items() if m.source == device]
        uses += [MappingUse("bound", t) for t, m in self.mounts.items() if m.device == device]
        opens = self.foreign_users.get(name, 0)
        if name in self.other_namespaces and not any(u.kind == "mounted" for u in uses):
            opens += 1
        if opens:
            uses.append(MappingUse("open", str(opens)))
        return uses

    def temporary_mappings_on(self, device: str) -> list[str]:
        found: list[str] = []
        level = [device]
        while level:
            above = sorted(n for n, d in self.temporary.items() if d in level)
            found += above
            level = [f"/dev/mapper/{n}" for n in above]
        return list(reversed(found))

    def remove_temporary_mapping(self, name: str) -> None:
        with self._lock:
            self._enter("remove_temporary_mapping", name)
            if f"/dev/mapper/{name}" in self.temporary.values():
                raise Busy(f"temporary mapping {name} is still in use")
            self.temporary.pop(name, None)

    # filesystems -------------------------------------------------------------------------
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
        """A staged directory onto a directory, or a device node onto a file; like the kernel,
        a bound device node shows "udev" as its source and does not hold the device open."""
        with self._lock:
            self._enter("bind_mount", target)
            if source in self.mounts:
                if target not in self.dirs:
                    raise CommandFailed(["mount"], 32, f"mount point {target} does not exist")
                staged = self.mounts[source]
                self.mounts[target] = FakeMount(staged.source, staged.fs_type, list(options))
            elif source.removeprefix("/dev/mapper/") in self.mappings:
                if target not in self.files:
                    raise CommandFailed(["mount"], 32, f"mount point {target} does not exist")
                self.mounts[target] = FakeMount("udev", "devtmpfs", list(options), source)
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
        size = self.fs_sizes.get(self.mounts[path].source, 0)
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

    # readiness ---------------------------------------------------------------------------
    def missing_requirements(self) -> list[str]:
        return list(self.missing)
