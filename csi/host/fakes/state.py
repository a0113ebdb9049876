"""The one in-memory model of a node that every fake protocol reads and changes.

The kernel's objects depend on each other across the protocols (a mapping sits on a loop or
NBD device, a mount on a mapping, a busy mapping keeps its loop attached), so the fakes do not
each keep their own: ``FakeState`` holds all of it, plus fault injection and the call log, and
each ``Fake<Protocol>`` mixin adds one protocol's methods over it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from csi.host import LuksFormat
from csi.host.runner import CommandFailed

STEPS = (
    "create_backing", "loop_attach", "luks_format", "crypt_open", "mkfs", "mount",
    "set_volume_root", "umount", "crypt_close", "loop_detach", "remove_file",
    "grow_backing", "loop_refresh", "crypt_resize", "fs_grow", "bind_mount", "make_file",
    "qcow2_create", "nbd_attach", "nbd_detach", "nbd_exports", "remove_temporary_mapping",
    "remove_tree", "clear_dir", "is_bound_from", "dir_mounts", "fscrypt_unavailable",
    "fscrypt_pool", "make_project_dir", "dir_project", "fscrypt_add_key", "fscrypt_set_policy",
    "fscrypt_policy_of", "fscrypt_key_status", "fscrypt_remove_key", "quota_get", "quota_set",
    "files_open_in", "direct_volume_write", "direct_volume_read", "direct_volume_remove",
    "direct_volume_targets", "guard_mount", "is_guarded", "file_users",
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
    directory: str = ""  # for a bind of a plain directory (or of such a bind): that directory


@dataclass
class FakeState:
    # files (FakeFiles)
    free: int = 100 * 1024**3
    files: dict[str, FakeFile] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    symlinks: dict[str, str] = field(default_factory=dict)
    # loop devices (FakeLoops)
    loops: dict[str, str] = field(default_factory=dict)  # device -> backing
    # dm-crypt (FakeDmCrypt)
    luks: dict[str, str] = field(default_factory=dict)  # header location -> key hash
    luks_options: dict[str, LuksFormat] = field(default_factory=dict)
    # filesystems (FakeMounts)
    mkfs_eager: dict[str, bool] = field(default_factory=dict)  # device -> eager metadata
    # dm-crypt (FakeDmCrypt)
    mappings: dict[str, str] = field(default_factory=dict)  # name -> device
    # qcow2 (FakeNbd)
    qcow2_sizes: dict[str, int] = field(default_factory=dict)  # image -> virtual size
    # dm-crypt (FakeDmCrypt)
    keyring: dict[str, bool] = field(default_factory=dict)  # name -> key held by keyring ref
    # loop and NBD devices (FakeLoops, FakeNbd)
    loop_sizes: dict[str, int] = field(default_factory=dict)  # device -> size seen by loop/nbd
    # NBD (FakeNbd)
    qsd_running: bool = True  # qemu-storage-daemon reachable (qcow2 backing possible)
    exports: dict[str, str] = field(default_factory=dict)  # NBD export -> qcow2 image
    nbds: dict[str, str] = field(default_factory=dict)  # /dev/nbdN -> export it is connected to
    # dm-crypt (FakeDmCrypt)
    mapping_sizes: dict[str, int] = field(default_factory=dict)  # name -> size of the mapping
    # filesystems and mounts (FakeMounts)
    fs_sizes: dict[str, int] = field(default_factory=dict)  # device -> size of its filesystem
    filesystems: dict[str, str] = field(default_factory=dict)  # device -> fs type
    fs_errors: dict[str, int] = field(default_factory=dict)
    mounts: dict[str, FakeMount] = field(default_factory=dict)  # target -> mount
    busy: set[str] = field(default_factory=set)  # busy targets
    # dm-crypt (FakeDmCrypt): opens of a mapping the driver cannot see as mounts: a process, a
    # mount in another mount namespace (a container's bind of the target); the kernel refuses
    # to close it meanwhile
    foreign_users: dict[str, int] = field(default_factory=dict)
    # mappings whose filesystem another mount namespace also mounts (a container's bind): like
    # the kernel, that shares the one open our own mount explains, so it shows only once we
    # unmount, and the kernel refuses to close the mapping meanwhile
    other_namespaces: set[str] = field(default_factory=set)
    # cryptsetup temp mapping -> the device it sits on (a loop, or /dev/mapper/<another temp>)
    temporary: dict[str, str] = field(default_factory=dict)
    # dm-crypt (FakeDmCrypt): mappings whose key was wiped (suspended, luksSuspend)
    wiped: set[str] = field(default_factory=set)
    # files (FakeFiles)
    nonempty: set[str] = field(default_factory=set)  # directories holding files of their own
    # readiness (FakeHost)
    missing: list[str] = field(default_factory=list)
    # the call log and fault injection (every fake)
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
