"""The host seam: everything that touches the OS goes through a ``Host``.

``linux.LinuxHost`` drives the real kernel; ``fake.FakeHost`` is an in-memory model with fault
injection for fast unit tests. The lifecycle only ever sees this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from csi.keys import VolumeKey


@dataclass(frozen=True)
class LuksFormat:
    """How to format one volume (never holds the key)."""

    cipher: str
    key_bits: int
    integrity: str  # "none" or "hmac-sha256"
    header: str | None  # detached header file, or None for a header on the device
    # dm-integrity tags are written for every sector at format time unless this is False; a
    # filesystem made with eager_mkfs never reads a sector it did not write, so it can skip that
    wipe: bool = True


@dataclass(frozen=True)
class FsStats:
    total_bytes: int
    available_bytes: int
    used_bytes: int
    total_inodes: int
    free_inodes: int
    used_inodes: int


@dataclass(frozen=True)
class MappingUse:
    """One thing the kernel says holds a mapping open or visible."""

    kind: str  # mounted (its filesystem, at a path) | bound (device node at a path) |
    # held (a stacked device) | open (that many opens no mount or holder explains)
    where: str

    def __str__(self) -> str:
        if self.kind == "open":
            return f"open {self.where} more time(s) (a process, or a mount in another namespace)"
        return f"{self.kind} {'by' if self.kind == 'held' else 'at'} {self.where}"


class Files(Protocol):
    """Files and directories on the node."""

    def create_backing(self, path: str, size: int, preallocate: bool) -> None: ...
    def grow_backing(self, path: str, size: int, preallocate: bool) -> None: ...
    def remove_file(self, path: str) -> None: ...
    def exists(self, path: str) -> bool: ...
    def is_dir(self, path: str) -> bool: ...
    def list_dir(self, path: str) -> list[str]: ...
    def allocated_bytes(self, path: str) -> int: ...
    def free_bytes(self, path: str) -> int: ...
    def realpath(self, path: str) -> str: ...
    def is_symlink(self, path: str) -> bool: ...
    def make_dir(self, path: str) -> None: ...
    def make_file(self, path: str) -> None: ...
    def remove_dir(self, path: str) -> None: ...
    def set_volume_root(self, path: str, group: int | None) -> None: ...


class Mounts(Protocol):
    """Filesystems and mounts; "in use" and "is it ours" come from mountinfo, by device number."""

    def mkfs(self, device: str, fs_type: str, *, eager: bool = False) -> None: ...
    def mount(self, source: str, target: str, fs_type: str, options: list[str]) -> None: ...
    def bind_mount(self, source: str, target: str, options: list[str]) -> None: ...
    def umount(self, target: str) -> None: ...
    def is_mountpoint(self, path: str) -> bool: ...
    def mount_source(self, target: str) -> str | None: ...
    def mountpoints_of(self, source: str) -> list[str]: ...
    def is_mounted_from(self, path: str, name: str) -> bool: ...
    def fs_stats(self, path: str) -> FsStats: ...
    def fs_error_count(self, device: str) -> int: ...
    def fs_grow(self, device: str, mount_point: str, fs_type: str) -> None: ...


class DmCrypt(Protocol):
    """dm-crypt mappings: format, open, resize, close, and who holds one open."""

    def luks_format(self, device: str, key: VolumeKey, options: LuksFormat) -> None: ...
    def crypt_open(
        self, device: str, name: str, key: VolumeKey, header: str | None, *, keyring: bool = True
    ) -> None: ...
    def crypt_resize(self, name: str, header: str | None) -> None: ...
    def device_size(self, device: str) -> int: ...
    def crypt_close(self, name: str) -> None: ...
    def crypt_wipe_keys(self, names: list[str]) -> list[KeyWipe]: ...
    def crypt_exists(self, name: str) -> bool: ...
    def crypt_names(self, prefix: str) -> list[str]: ...
    def mapping_users(self, name: str) -> list[MappingUse]: ...
    def temporary_mappings_on(self, device: str) -> list[str]: ...
    def remove_temporary_mapping(self, name: str) -> None: ...


class Loops(Protocol):
    """Loop devices over backing files (only the loop backing uses these)."""

    def loop_find(self, backing: str) -> str | None: ...
    def loop_attach(self, backing: str) -> str: ...
    def loop_detach(self, device: str) -> None: ...
    def loop_refresh(self, device: str) -> None: ...
    def loops_in(self, directory: str) -> dict[str, str]: ...


class Nbd(Protocol):
    """qcow2 images served over NBD; export names are the volume's mapping name (only the qcow2
    backing uses these)."""

    def qcow2_unavailable(self) -> str | None: ...
    def qcow2_create(self, path: str, size: int, preallocate: bool) -> None: ...
    def nbd_find(self, export: str) -> str | None: ...
    def nbd_attach(self, backing: str, export: str) -> str: ...
    def nbd_detach(self, export: str) -> None: ...
    def nbd_exports(self) -> list[str]: ...
    def nbd_export_alive(self, export: str) -> bool: ...


@dataclass(frozen=True)
class Quota:
    """One project's quota on a filesystem: what it uses and its hard limits (0: none)."""

    bytes_used: int
    bytes_limit: int
    inodes_used: int
    inodes_limit: int


@dataclass(frozen=True)
class KeyWipe:
    """One mapping's forced key wipe: ``outcome`` is "wiped" (its table is an error target
    now), "no_key" (no mapping, or wiped before) or "failed"; ``detail`` says what happened."""

    name: str
    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class KeyRemoval:
    """What FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS reported, and the key's status after it."""

    status: str  # KEY_ABSENT | KEY_PRESENT | KEY_INCOMPLETELY_REMOVED
    files_busy: bool  # some files were still open: their per-file keys stay until closed
    other_users: bool


KEY_ABSENT = "absent"
KEY_PRESENT = "present"
KEY_INCOMPLETELY_REMOVED = "incompletely_removed"


class Directories(Protocol):
    """Directories and the mounts that show them (a directory backing's volumes)."""

    def remove_tree(self, path: str) -> None:
        """Delete ``path`` and everything under it, never following a symlink nor crossing a
        mount; nothing if it is absent. Works on a locked fscrypt tree (names are ciphertext).
        Busy (nothing deleted) if a mount lies in it; binds of it elsewhere do not stop it."""

    def clear_dir(self, path: str) -> None:
        """Delete everything under ``path`` (as ``remove_tree``) but keep ``path`` itself."""

    def is_bound_from(self, path: str, directory: str) -> bool:
        """Whether the visible mount at ``path`` shows ``directory`` (a bind of it, or of a
        bind of it): same device number and the same root within that filesystem."""

    def dir_mounts(self, directory: str) -> list[str]:
        """Every mount that shows ``directory`` or a path under it, in every mount namespace
        a process is in (another namespace's as "<point> (mount namespace of pid N)"; copies
        that only propagate from our own mounts are left out)."""


class Fscrypt(Protocol):
    """fscrypt v2 policies and project quotas on ext4 (ioctls and quotactl through ctypes).

    ``root`` is any directory of the filesystem concerned (the ioctls act per filesystem); key
    identifiers are 32 lowercase hex digits (not secret: the kernel derives them from the key)."""

    def fscrypt_unavailable(self, root: str) -> str | None:
        """Why volumes cannot be made under ``root`` (not ext4, no encryption feature, project
        quota limits not enforced, a cipher the kernel lacks: found by test-creating a file
        under a throwaway key, all removed again), or None."""

    def fscrypt_pool(self, image: str, root: str, size: int) -> None:
        """Make sure the driver's own ext4 pool is mounted at ``root``: create the sparse image
        of ``size`` bytes with encrypt,project,quota if it is absent, attach it to a loop device
        and mount it with project quota limits enforced; each step only if not done yet. The
        pool survives driver restarts; a FailedPrecondition says what this kernel lacks."""

    def make_project_dir(self, path: str, project: int) -> None:
        """mkdir (0700, idempotent) and give it project id ``project`` with PROJINHERIT."""

    def dir_project(self, path: str) -> int:
        """The project id of ``path`` (0: none)."""

    def fscrypt_add_key(self, root: str, key: VolumeKey) -> str:
        """Add ``key`` (64 bytes) to the filesystem's keyring through a ctypes buffer that is
        zeroed right after the ioctl; returns the key identifier."""

    def fscrypt_set_policy(self, path: str, identifier: str) -> None:
        """A v2 policy on the empty directory ``path``: AES-256-XTS contents, AES-256-CTS names,
        padding 32, under key ``identifier``; nothing if it already has exactly that policy."""

    def fscrypt_policy_of(self, path: str) -> str | None:
        """The key identifier of the v2 policy on ``path`` (None: not encrypted or absent)."""

    def fscrypt_key_status(self, root: str, identifier: str) -> str:
        """KEY_ABSENT, KEY_PRESENT or KEY_INCOMPLETELY_REMOVED."""

    def fscrypt_remove_key(self, root: str, identifier: str) -> KeyRemoval:
        """Remove the key for all users (the kernel writes back and evicts what it protects);
        an absent key is not an error."""

    def quota_get(self, root: str, project: int) -> Quota:
        """Usage and hard limits of ``project`` (all 0 for a project never used);
        FailedPrecondition when the filesystem has project quotas off."""

    def quota_set(self, root: str, project: int, bytes_limit: int, inodes_limit: int) -> None:
        """Hard limits for ``project`` (0, 0 removes them); bytes round up to 1 KiB. The kernel
        does not hold a process with CAP_SYS_RESOURCE (a privileged pod) to them."""

    def files_open_in(self, root: str, project: int) -> list[str]:
        """Processes holding a file of ``project`` on ``root``'s filesystem open (a descriptor,
        cwd, root or mapping), as "pid N (comm)"; from /proc, never from path strings."""


@dataclass(frozen=True)
class DirectVolume:
    """A Kata Containers direct-assigned volume: the content of its ``mountInfo.json``."""

    volume_type: str  # "directvol" (runtime-rs requires it; the Go runtime accepts it)
    device: str  # a regular file (attached as a disk) or a block device
    fstype: str
    metadata: dict[str, str]
    options: list[str]


GUARD_SOURCE = "luks-ephemeral-guard"  # the source name of our read-only guard tmpfs


class DirectVolumes(Protocol):
    """Kata's direct-assigned volumes and the guard that makes a non-Kata pod fail closed.

    ``root`` is the direct-volume root (``/run/kata-containers/shared/direct-volumes``); a volume
    lives in ``<root>/<urlsafe base64 of the target path, padded>/mountInfo.json`` (Go's
    ``b64.URLEncoding``), so a target is an absolute path of at most 189 bytes (its name must fit
    in one directory entry). Nothing under ``root`` is ever reached through a symlink."""

    def direct_volume_write(self, root: str, target: str, volume: DirectVolume) -> None:
        """Write the volume's mountInfo.json (directory 0700, file 0600, atomically: a temp file
        in the same directory, fsynced, renamed over, the directory fsynced), with exactly the
        keys ``volume-type``, ``device``, ``fstype``, ``metadata``, ``options``; nothing if it
        already holds exactly this. Other files in the directory (Kata's sandbox-id file) stay.
        InvalidArgument for a target that is not absolute or too long, or a symlink in the way."""

    def direct_volume_read(self, root: str, target: str) -> DirectVolume | None:
        """The volume written for ``target`` (None: none, or not one this driver can read: over
        64 KiB, not a regular file, not such JSON; never an error for a malformed file)."""

    def direct_volume_remove(self, root: str, target: str) -> None:
        """Remove the target's directory with everything in it (Kata puts a file named after
        the sandbox there), never following a symlink (one in its place is removed itself);
        nothing if it is absent."""

    def direct_volume_targets(self, root: str) -> dict[str, DirectVolume | None]:
        """Every target path with a direct volume under ``root`` -> its volume (None if its
        mountInfo.json cannot be read); names that do not decode (exactly, padded, urlsafe) to
        an absolute path, and entries that are not directories, are left out."""

    def guard_mount(self, target: str) -> None:
        """An empty read-only tmpfs (source GUARD_SOURCE, nosuid,nodev,noexec) at ``target``,
        made first if need be, so a pod not run by Kata gets EROFS; nothing if it is there.
        Never stacked over another mount (FailedPrecondition naming it); a target that is a
        symlink is InvalidArgument, one that is not a directory FailedPrecondition. Removed
        with ``umount``."""

    def is_guarded(self, target: str) -> bool:
        """Whether the mount visible at ``target`` (the last mountinfo entry there) is our
        guard: a read-only tmpfs whose source is GUARD_SOURCE."""

    def file_users(self, path: str) -> list[str]:
        """Processes holding the regular file ``path`` open (by device and inode, from /proc;
        a Kata VM's hypervisor holds its disk), as "pid N (comm)", at most 64 of them; none if
        ``path`` is absent."""


class Host(Files, Mounts, DmCrypt, Directories, Protocol):
    """What the generic lifecycle may touch: no loop or NBD method (those belong to backings)."""

    def missing_requirements(self) -> list[str]: ...


class NodeHost(Host, Loops, Nbd, Fscrypt, DirectVolumes, Protocol):
    """Everything one node offers: what ``LinuxHost`` and ``FakeHost`` implement, and what the
    composition root hands out, each backing taking the parts it needs."""
