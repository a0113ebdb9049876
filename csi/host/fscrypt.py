"""fscrypt backing, host side: v2 policies, the filesystem keyring, project quotas, and the
directories and mounts a directory volume lives in.

Why ctypes and not ``fcntl.ioctl`` for the key: CPython's ``fcntl.ioctl`` copies a buffer of up
to 1024 bytes onto the C stack and never clears it, so a key passed through it would stay in
memory. The key goes into the kernel from one page of our own (mmap, locked where the kernel
allows it, left out of core dumps) through libc's ``ioctl`` called with ctypes, and that page is
zeroed with ``memset`` right after the call, whether it succeeded or not. Every other ioctl here
carries nothing secret (identifiers, policies, flags), yet goes through the same ctypes path
(``buffer_ioctl``), so no ioctl here ever uses ``fcntl.ioctl``.

Numbers (linux/fscrypt.h, linux/fs.h, linux/quota.h, linux/dqblk_xfs.h) were checked against the
kernel on an ext4 image: see tests/unit/test_fscrypt_host.py and tests/host/.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import logging
import mmap
import os
import platform
import re
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from csi.errors import Busy, DriverError, FailedPrecondition, Internal, InvalidArgument
from csi.host import (
    KEY_ABSENT,
    KEY_INCOMPLETELY_REMOVED,
    KEY_PRESENT,
    KeyRemoval,
    Quota,
)
from csi.host import commands as cmd
from csi.host.runner import CommandFailed
from csi.keys import VolumeKey, random_key

if TYPE_CHECKING:
    from csi.host.linux import LinuxHost, MountEntry

log = logging.getLogger(__name__)


# ioctl numbers -----------------------------------------------------------------------------
def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    """Linux's _IOC(dir, type, nr, size) on x86/arm (dir: 1 write, 2 read, 3 both)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


_IOW, _IOR, _IOWR = 1, 2, 3
KEY_BYTES = 64  # FSCRYPT_MAX_KEY_SIZE: a v2 master key; AES-256-XTS wants 64
IDENTIFIER_BYTES = 16  # FSCRYPT_KEY_IDENTIFIER_SIZE


class KeySpecifier(ctypes.Structure):
    """struct fscrypt_key_specifier: which key (by identifier, for v2)."""

    _fields_ = [("type", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("u", ctypes.c_uint8 * 32)]  # fmt: skip


class AddKeyArg(ctypes.Structure):
    """struct fscrypt_add_key_arg without its flexible ``raw`` array."""

    _fields_ = [("key_spec", KeySpecifier), ("raw_size", ctypes.c_uint32),
                ("key_id", ctypes.c_uint32), ("reserved", ctypes.c_uint32 * 8)]  # fmt: skip


class AddKeyArgRaw(ctypes.Structure):
    """fscrypt_add_key_arg followed by the 64 key bytes: what the kernel reads."""

    _fields_ = [("arg", AddKeyArg), ("raw", ctypes.c_uint8 * KEY_BYTES)]


class PolicyV2(ctypes.Structure):
    """struct fscrypt_policy_v2."""

    _fields_ = [
        ("version", ctypes.c_uint8), ("contents_encryption_mode", ctypes.c_uint8),
        ("filenames_encryption_mode", ctypes.c_uint8), ("flags", ctypes.c_uint8),
        ("log2_data_unit_size", ctypes.c_uint8), ("reserved", ctypes.c_uint8 * 3),
        ("master_key_identifier", ctypes.c_uint8 * IDENTIFIER_BYTES),
    ]  # fmt: skip


class PolicyUnion(ctypes.Union):
    _fields_ = [("version", ctypes.c_uint8), ("v1", ctypes.c_uint8 * 12), ("v2", PolicyV2)]


class GetPolicyExArg(ctypes.Structure):
    """struct fscrypt_get_policy_ex_arg."""

    _fields_ = [("policy_size", ctypes.c_uint64), ("policy", PolicyUnion)]


class RemoveKeyArg(ctypes.Structure):
    """struct fscrypt_remove_key_arg."""

    _fields_ = [("key_spec", KeySpecifier), ("removal_status_flags", ctypes.c_uint32),
                ("reserved", ctypes.c_uint32 * 5)]  # fmt: skip


class KeyStatusArg(ctypes.Structure):
    """struct fscrypt_get_key_status_arg."""

    _fields_ = [
        ("key_spec", KeySpecifier), ("reserved", ctypes.c_uint32 * 6),
        ("status", ctypes.c_uint32), ("status_flags", ctypes.c_uint32),
        ("user_count", ctypes.c_uint32), ("out_reserved", ctypes.c_uint32 * 13),
    ]  # fmt: skip


class FsXattr(ctypes.Structure):
    """struct fsxattr (FS_IOC_FSGETXATTR / FSSETXATTR): project id and PROJINHERIT."""

    _fields_ = [
        ("xflags", ctypes.c_uint32), ("extsize", ctypes.c_uint32),
        ("nextents", ctypes.c_uint32), ("projid", ctypes.c_uint32),
        ("cowextsize", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 8),
    ]  # fmt: skip


class IfDqblk(ctypes.Structure):
    """struct if_dqblk (Q_GETQUOTA / Q_SETQUOTA): block limits in 1 KiB units, space in bytes."""

    _fields_ = [
        ("bhardlimit", ctypes.c_uint64), ("bsoftlimit", ctypes.c_uint64),
        ("curspace", ctypes.c_uint64), ("ihardlimit", ctypes.c_uint64),
        ("isoftlimit", ctypes.c_uint64), ("curinodes", ctypes.c_uint64),
        ("btime", ctypes.c_uint64), ("itime", ctypes.c_uint64), ("valid", ctypes.c_uint32),
    ]  # fmt: skip


FS_IOC_SET_ENCRYPTION_POLICY = _ioc(_IOR, "f", 19, 12)  # encodes the v1 size, takes v2 too
FS_IOC_GET_ENCRYPTION_POLICY_EX = _ioc(_IOWR, "f", 22, 9)  # size + version
FS_IOC_ADD_ENCRYPTION_KEY = _ioc(_IOWR, "f", 23, ctypes.sizeof(AddKeyArg))
FS_IOC_REMOVE_ENCRYPTION_KEY = _ioc(_IOWR, "f", 24, ctypes.sizeof(RemoveKeyArg))
FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS = _ioc(_IOWR, "f", 25, ctypes.sizeof(RemoveKeyArg))
FS_IOC_GET_ENCRYPTION_KEY_STATUS = _ioc(_IOWR, "f", 26, ctypes.sizeof(KeyStatusArg))
FS_IOC_FSGETXATTR = _ioc(_IOR, "X", 31, ctypes.sizeof(FsXattr))
FS_IOC_FSSETXATTR = _ioc(_IOW, "X", 32, ctypes.sizeof(FsXattr))

FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2
FSCRYPT_POLICY_V2 = 2
FSCRYPT_MODE_AES_256_XTS = 1
FSCRYPT_MODE_AES_256_CTS = 4
FSCRYPT_POLICY_FLAGS_PAD_32 = 3
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY = 1
FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS = 2
KEY_STATUSES = {1: KEY_ABSENT, 2: KEY_PRESENT, 3: KEY_INCOMPLETELY_REMOVED}
FS_XFLAG_PROJINHERIT = 0x00000200

# quotactl: QCMD(cmd, type) = cmd << 8 | type
PRJQUOTA = 2
Q_GETQUOTA = 0x800007
Q_SETQUOTA = 0x800008
Q_XGETQSTAT = (ord("X") << 8) + 5
QIF_BLIMITS, QIF_ILIMITS = 1, 4
QIF_LIMITS = QIF_BLIMITS | QIF_ILIMITS
QUOTA_BLOCK = 1024  # QIF_DQBLKSIZE: the unit of dqb_bhardlimit
FS_QUOTA_PDQ_ACCT, FS_QUOTA_PDQ_ENFD = 1 << 4, 1 << 5
SYSCALLS = {  # (quotactl, quotactl_fd): quotactl_fd appeared in 5.14
    "x86_64": (179, 443), "aarch64": (60, 443),
}  # fmt: skip

POOL_MOUNT_OPTIONS = ("nosuid", "nodev", "discard", "prjquota")
PROBE_PREFIX = ".fscrypt-probe-"
_IDENTIFIER = re.compile(r"[0-9a-f]{32}")
_OPEN_MAGIC = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBES: set[str] = set()  # the probe dirs this process is using now
_PROBES_LOCK = threading.Lock()

Ioctl = Callable[[int, int, int], int]  # (fd, request, address) -> libc's return value


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    libc.ioctl.restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mlock.restype = ctypes.c_int
    return libc


def libc_ioctl(fd: int, request: int, address: int) -> int:
    """libc's ioctl on a pointer: no copy of the buffer anywhere in Python or on the stack."""
    return int(_libc().ioctl(fd, request, address))


def buffer_ioctl(fd: int, request: int, buf: bytearray) -> None:
    """An ioctl on ``buf`` in place through libc (never ``fcntl.ioctl``, which copies the
    buffer onto the C stack and leaves it there); OSError with the errno on failure."""
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        _check(libc_ioctl(fd, request, ctypes.addressof(anchor)), f"ioctl {request:#x}")
    finally:
        del anchor  # release the export of the bytearray


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def parse_identifier(identifier: str) -> bytes:
    """The 16 bytes of a key identifier given as 32 lowercase hex digits."""
    if not _IDENTIFIER.fullmatch(identifier):
        raise InvalidArgument(f"{identifier!r} is not an fscrypt key identifier (32 hex digits)")
    return bytes.fromhex(identifier)


def _spec(identifier: str) -> KeySpecifier:
    spec = KeySpecifier(type=FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER)
    spec.u[:IDENTIFIER_BYTES] = list(parse_identifier(identifier))
    return spec


def policy_v2(identifier: str) -> PolicyV2:
    """The one policy the driver makes: AES-256-XTS contents, AES-256-CTS names, padding 32."""
    policy = PolicyV2(version=FSCRYPT_POLICY_V2,
                      contents_encryption_mode=FSCRYPT_MODE_AES_256_XTS,
                      filenames_encryption_mode=FSCRYPT_MODE_AES_256_CTS,
                      flags=FSCRYPT_POLICY_FLAGS_PAD_32)  # fmt: skip
    policy.master_key_identifier[:] = list(parse_identifier(identifier))
    return policy


@contextlib.contextmanager
def _opened(path: str, flags: int = _DIR) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def _dev_string(st_dev: int) -> str:
    """A device number as mountinfo writes it."""
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"


class KeyPage:
    """The one page a key passes through on its way into the kernel (see the module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        with contextlib.suppress(OSError, AttributeError):
            self._page.madvise(16)  # MADV_DONTDUMP
        with contextlib.suppress(OSError, AttributeError):
            self._page.madvise(18)  # MADV_WIPEONFORK
        self.arg = AddKeyArgRaw.from_buffer(self._page)
        self.address = ctypes.addressof(self.arg)
        _libc().mlock(self.address, mmap.PAGESIZE)  # best effort, as csi.keys does

    @contextlib.contextmanager
    def holding(self, key: VolumeKey) -> Iterator[AddKeyArgRaw]:
        """The add-key argument with ``key`` in it, zeroed again however the block ends."""
        with self._lock:
            try:
                view = key.view
                if len(view) != KEY_BYTES:
                    raise InvalidArgument(f"an fscrypt key has {KEY_BYTES} bytes")
                start = AddKeyArgRaw.raw.offset
                raw = memoryview(self._page)[start : start + KEY_BYTES]
                try:
                    raw[:] = view  # one copy, page to page: no bytes object in between
                finally:
                    raw.release()
                    view.release()
                yield self.arg
            finally:
                ctypes.memset(self.address, 0, ctypes.sizeof(AddKeyArgRaw))

    def is_zero(self) -> bool:
        return not any(ctypes.string_at(self.address, ctypes.sizeof(AddKeyArgRaw)))


class FscryptHost:
    """The ``Fscrypt`` and ``Directories`` protocols on the running kernel, for ``LinuxHost``.

    OSError is left to ``LinuxHost``'s wrapper (typed errors), except where an errno means
    something specific here (no encryption, no project feature, no key)."""

    def __init__(self, host: LinuxHost, *, ioctl: Ioctl | None = None) -> None:
        """``ioctl`` carries the key into the kernel (``None``: libc's, through ctypes); a test
        may pass one that records the buffer address."""
        self.host = host
        self._ioctl = ioctl
        self.key_page = KeyPage()

    def _mounts(self) -> list[MountEntry]:
        return self.host._mounts()

    # keys and policies -------------------------------------------------------------------
    def add_key(self, root: str, key: VolumeKey) -> str:
        with _opened(root) as fd, self.key_page.holding(key) as arg:
            arg.arg.key_spec.type = FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
            arg.arg.raw_size = KEY_BYTES
            try:
                ioctl = self._ioctl or libc_ioctl  # looked up now: a test may patch the module's
                _check(ioctl(fd, FS_IOC_ADD_ENCRYPTION_KEY, self.key_page.address),
                       f"adding a key on {root}")  # fmt: skip
            except OSError as exc:
                if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                    raise FailedPrecondition(
                        f"the filesystem of {root} has no fscrypt (ext4 without the encrypt "
                        "feature, or a kernel without CONFIG_FS_ENCRYPTION)"
                    ) from None
                raise
            return bytes(arg.arg.key_spec.u[:IDENTIFIER_BYTES]).hex()

    def set_policy(self, path: str, identifier: str) -> None:
        wanted = policy_v2(identifier)
        with _opened(path) as fd:
            current = self._policy(fd)
            if current is not None:
                if bytes(current) == bytes(wanted):
                    return
                raise FailedPrecondition(f"{path} is already encrypted under another policy")
            buf = bytearray(bytes(wanted))
            try:
                buffer_ioctl(fd, FS_IOC_SET_ENCRYPTION_POLICY, buf)
            except OSError as exc:
                if exc.errno == errno.ENOKEY:
                    raise FailedPrecondition(
                        f"key {identifier} is not in the keyring of {path}'s filesystem"
                    ) from None
                if exc.errno == errno.ENOTEMPTY:
                    raise FailedPrecondition(
                        f"{path} is not empty: a policy only goes on an empty directory"
                    ) from None
                raise

    @staticmethod
    def _policy(fd: int) -> PolicyV2 | None:
        """The v2 policy on ``fd``; None when it has none; a v1 policy is refused."""
        arg = GetPolicyExArg(policy_size=ctypes.sizeof(PolicyUnion))
        buf = bytearray(bytes(arg))
        try:
            buffer_ioctl(fd, FS_IOC_GET_ENCRYPTION_POLICY_EX, buf)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return None
            raise
        got = GetPolicyExArg.from_buffer(buf)
        if got.policy.version != FSCRYPT_POLICY_V2:
            raise FailedPrecondition(f"found an fscrypt v{got.policy.version} policy, not v2")
        return PolicyV2.from_buffer_copy(bytes(got.policy.v2))

    def policy_of(self, path: str) -> str | None:
        try:
            with _opened(path) as fd:
                policy = self._policy(fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
                return None
            raise
        return None if policy is None else bytes(policy.master_key_identifier).hex()

    def key_status(self, root: str, identifier: str) -> str:
        arg = KeyStatusArg(key_spec=_spec(identifier))
        buf = bytearray(bytes(arg))
        with _opened(root) as fd:
            buffer_ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, buf)
        status = KeyStatusArg.from_buffer(buf).status
        if status not in KEY_STATUSES:
            raise Internal(f"the kernel reported an unknown key status {status}")
        return KEY_STATUSES[status]

    def remove_key(self, root: str, identifier: str) -> KeyRemoval:
        arg = RemoveKeyArg(key_spec=_spec(identifier))
        buf = bytearray(bytes(arg))
        flags = 0
        with _opened(root) as fd:
            try:
                buffer_ioctl(fd, FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS, buf)
                flags = RemoveKeyArg.from_buffer(buf).removal_status_flags
            except OSError as exc:
                if exc.errno != errno.ENOKEY:  # ENOKEY: absent already, nothing to do
                    raise
        return KeyRemoval(
            status=self.key_status(root, identifier),
            files_busy=bool(flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_FILES_BUSY),
            other_users=bool(flags & FSCRYPT_KEY_REMOVAL_STATUS_FLAG_OTHER_USERS),
        )

    # projects ----------------------------------------------------------------------------
    @staticmethod
    def _xattr(fd: int) -> FsXattr:
        buf = bytearray(ctypes.sizeof(FsXattr))
        buffer_ioctl(fd, FS_IOC_FSGETXATTR, buf)
        return FsXattr.from_buffer_copy(buf)

    def make_project_dir(self, path: str, project: int) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        with _opened(path) as fd:
            attr = self._xattr(fd)
            if attr.projid == project and attr.xflags & FS_XFLAG_PROJINHERIT:
                return
            attr.projid = project
            attr.xflags |= FS_XFLAG_PROJINHERIT
            try:
                buffer_ioctl(fd, FS_IOC_FSSETXATTR, bytearray(bytes(attr)))
            except OSError as exc:
                if exc.errno == errno.EOPNOTSUPP:
                    raise FailedPrecondition(
                        f"the filesystem of {path} has no project ids (ext4 without the "
                        "project feature)"
                    ) from None
                raise

    def dir_project(self, path: str) -> int:
        with _opened(path) as fd:
            return int(self._xattr(fd).projid)

    # quotas ------------------------------------------------------------------------------
    def _quotactl(self, root: str, command: int, qid: int, address: int) -> None:
        """quotactl_fd on ``root``; quotactl on the mount's device where that syscall is
        missing (kernels before 5.14)."""
        numbers = SYSCALLS.get(platform.machine())
        if numbers is None:
            raise FailedPrecondition(f"no quotactl numbers known for {platform.machine()}")
        qcmd = ctypes.c_uint((command << 8) | PRJQUOTA)
        libc = _libc()
        with _opened(root) as fd:
            result = libc.syscall(ctypes.c_long(numbers[1]), ctypes.c_int(fd), qcmd,
                                  ctypes.c_uint(qid), ctypes.c_void_p(address))  # fmt: skip
        if result < 0 and ctypes.get_errno() == errno.ENOSYS:
            device = self.mount_of(root).source.encode()
            result = libc.syscall(ctypes.c_long(numbers[0]), qcmd, ctypes.c_char_p(device),
                                  ctypes.c_uint(qid), ctypes.c_void_p(address))  # fmt: skip
        if result < 0:
            err = ctypes.get_errno()
            if err in (errno.ESRCH, errno.ENOSYS):
                raise FailedPrecondition(
                    f"project quotas are off on the filesystem of {root} (ext4 needs the "
                    "project,quota features and the prjquota mount option)"
                )
            raise OSError(err, f"quotactl on {root}: {os.strerror(err)}")

    def quota_get(self, root: str, project: int) -> Quota:
        blk = IfDqblk()
        self._quotactl(root, Q_GETQUOTA, project, ctypes.addressof(blk))
        return Quota(bytes_used=int(blk.curspace), bytes_limit=int(blk.bhardlimit) * QUOTA_BLOCK,
                     inodes_used=int(blk.curinodes), inodes_limit=int(blk.ihardlimit))  # fmt: skip

    def quota_set(self, root: str, project: int, bytes_limit: int, inodes_limit: int) -> None:
        if bytes_limit < 0 or inodes_limit < 0:
            raise InvalidArgument("quota limits cannot be negative")
        blk = IfDqblk(bhardlimit=-(-bytes_limit // QUOTA_BLOCK), ihardlimit=inodes_limit,
                      valid=QIF_LIMITS)  # fmt: skip
        self._quotactl(root, Q_SETQUOTA, project, ctypes.addressof(blk))

    def quota_flags(self, root: str) -> int:
        """Q_XGETQSTAT's qs_flags for the filesystem of ``root`` (0: no quota at all)."""
        buf = ctypes.create_string_buffer(256)  # fs_quota_stat is 80 bytes; room to spare
        try:
            self._quotactl(root, Q_XGETQSTAT, 0, ctypes.addressof(buf))
        except FailedPrecondition:
            return 0
        return int(struct.unpack_from("=H", buf.raw, 2)[0])

    # who holds files -----------------------------------------------------------------------
    def files_open_in(self, root: str, project: int) -> list[str]:
        """Every process in /proc (the host's, with hostPID): its cwd, root, descriptors and
        the mappings /proc/<pid>/maps puts on ``root``'s device; each is decided by stat and
        the project id of the file itself. One listdir and one maps read per process, one
        stat per descriptor: linear in what the node holds open, nothing else."""
        dev = os.stat(root).st_dev
        proc = self.host.proc
        found = []
        for pid in _pids(proc):
            base = os.path.join(proc, str(pid))
            if any(self._holds(link, dev, project) for link in self._links(base, dev)):
                found.append(f"pid {pid} ({self._comm(base)})")
        return found

    @staticmethod
    def _links(base: str, dev: int) -> Iterator[str]:
        """A process's magic links: cwd, root, descriptors, and its mapped files on ``dev``
        (one mapping per file: maps names the device and inode, map_files the file)."""
        yield os.path.join(base, "cwd")
        yield os.path.join(base, "root")
        try:
            names = os.listdir(os.path.join(base, "fd"))
        except OSError:  # gone, or not ours to read
            names = []
        yield from (os.path.join(base, "fd", n) for n in names)
        try:
            with open(os.path.join(base, "maps"), "rb") as f:
                maps = f.read(MAPS_LIMIT + 1)
        except OSError:
            return
        if len(maps) > MAPS_LIMIT:  # not read in full: every mapping, as map_files lists them
            try:
                ranges = os.listdir(os.path.join(base, "map_files"))
            except OSError:
                return
            yield from (os.path.join(base, "map_files", r) for r in ranges)
            return
        seen = set()
        for line in maps.splitlines():
            fields = line.split(None, 5)
            if len(fields) < 5 or fields[4] == b"0":
                continue
            major, _, minor = fields[3].partition(b":")
            try:
                on_dev = os.makedev(int(major, 16), int(minor, 16)) == dev
            except ValueError:
                continue
            if on_dev and fields[4] not in seen:
                seen.add(fields[4])
                yield os.path.join(base, "map_files", fields[0].decode())

    def _holds(self, link: str, dev: int, project: int) -> bool:
        """Whether the file behind a magic link is on ``dev`` and of ``project``: decided on
        the file itself (stat and ioctl through the link), never from the path it shows."""
        try:
            st = os.stat(link)
            if st.st_dev != dev or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return False  # device nodes, fifos, sockets: not opened (side effects)
            with _opened(link, _OPEN_MAGIC) as fd:
                return int(self._xattr(fd).projid) == project
        except OSError:  # the process exited, or the file cannot be opened: ignored
            return False

    @staticmethod
    def _comm(base: str) -> str:
        try:
            with open(os.path.join(base, "comm")) as f:
                return f.read().strip()
        except OSError:
            return "?"

    # the probe -------------------------------------------------------------------------------
    def mount_of(self, path: str) -> MountEntry:
        """The mount that holds ``path`` (the deepest mount point above it, last one wins)."""
        real = os.path.realpath(path)
        dev = _dev_string(os.stat(real).st_dev)
        best: MountEntry | None = None
        for entry in self._mounts():
            inside = real == entry.point or real.startswith(entry.point.rstrip("/") + "/")
            if inside and (best is None or len(entry.point) >= len(best.point)):
                best = entry
        if best is None or best.dev != dev:
            # a mount we cannot see by path (another namespace's view): by device number
            by_dev = [e for e in self._mounts() if e.dev == dev]
            if not by_dev:
                raise Internal(f"no mount in mountinfo holds {path}")
            best = by_dev[-1]
        return best

    def unavailable(self, root: str) -> str | None:
        if not os.path.isdir(root):
            return f"{root} does not exist or is not a directory"
        entry = self.mount_of(root)
        if entry.fs_type != "ext4":
            return (f"{root} is on {entry.fs_type} ({entry.point}), not ext4: fscrypt volumes "
                    "need ext4 with the encrypt and project,quota features; use the driver's "
                    "own pool (an ext4 image in the data dir)")  # fmt: skip
        try:
            with _opened(root) as fd:
                self._policy(fd)
        except OSError as exc:
            if exc.errno == errno.ENOTTY:
                return "this kernel has no fscrypt (CONFIG_FS_ENCRYPTION is off)"
            if exc.errno == errno.EOPNOTSUPP:
                return (f"the ext4 at {entry.point} ({entry.source}) lacks the encrypt feature: "
                        f"`tune2fs -O encrypt {entry.source}`, or use the driver's own pool")
            raise
        except FailedPrecondition:
            pass  # root itself is encrypted (v1): the feature works
        broken = self._test_create(root)
        if broken:
            return broken
        flags = self.quota_flags(root)
        if not flags & FS_QUOTA_PDQ_ACCT:
            return (f"the ext4 at {entry.point} has no project quota accounting (it needs the "
                    "project and quota features, and a kernel with quota support, "
                    "CONFIG_QFMT_V2): use the driver's own pool, on a kernel with quotas")
        if not flags & FS_QUOTA_PDQ_ENFD:
            return (f"project quota limits are not enforced on {entry.point} (only counted): "
                    "mount it with the prjquota option")
        return None

    def _test_create(self, root: str) -> str | None:
        """Make a file under a throwaway key in a temp dir, then remove all of it: a missing
        cipher only shows at file creation (ENOPKG). What an earlier probe killed halfway left
        behind goes first."""
        with _PROBES_LOCK:
            self._remove_stale_probes(root)
            probe = tempfile.mkdtemp(prefix=PROBE_PREFIX, dir=root)
            _PROBES.add(probe)
        identifier = None
        try:
            with random_key(KEY_BYTES) as key:
                identifier = self.add_key(root, key)
            self.set_policy(probe, identifier)
            fd = os.open(os.path.join(probe, "probe"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)  # fmt: skip
            try:
                os.write(fd, b"probe")
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.ENOPKG:
                return ("this kernel lacks a cipher fscrypt needs (AES-256-XTS for contents, "
                        "AES-256-CTS for names): enable the crypto modules (xts, cts, aes)")
            if exc.errno == errno.EOPNOTSUPP:
                return f"encryption is not supported on the filesystem of {root}"
            raise
        finally:
            try:
                self.remove_tree(probe)
                if identifier is not None:
                    self.remove_key(root, identifier)
            finally:
                with _PROBES_LOCK:
                    _PROBES.discard(probe)
        return None

    def _remove_stale_probes(self, root: str) -> None:
        """Delete the probe dirs a killed process left in ``root`` (locked or not), and the
        throwaway key of each if it is still in the keyring; a probe this process is running
        (``_PROBES``, the caller holds ``_PROBES_LOCK``) is never touched. Best effort: what
        cannot be removed now is logged and tried again at the next probe."""
        try:
            names = [n for n in os.listdir(root) if n.startswith(PROBE_PREFIX)]
        except OSError:
            return
        for name in names:
            stale = os.path.join(root, name)
            if stale in _PROBES or not os.path.isdir(stale) or os.path.islink(stale):
                continue
            try:
                identifier = self.policy_of(stale)
                self.remove_tree(stale)
                if identifier is not None:
                    self.remove_key(root, identifier)
                log.info("removed %s, left by a probe that did not finish", stale)
            except (OSError, DriverError) as exc:
                log.warning("cannot remove the leftover probe %s: %s", stale, exc)

    # the pool --------------------------------------------------------------------------------
    def pool(self, image: str, root: str, size: int) -> None:
        visible = [e for e in self._mounts() if e.point == root]
        device = self.host.loop_find(image) if os.path.exists(image) else None
        if visible:
            entry = visible[-1]
            if device is not None and entry.dev == _dev_string(os.stat(device).st_rdev):
                return
            raise FailedPrecondition(
                f"{root} is already a mount of {entry.source}, not of the fscrypt pool {image}: "
                "unmount it or choose another pool directory"
            )
        if not os.path.exists(image):
            self._make_image(image, size)
        if device is None:
            device = self.host.loop_attach(image)
        os.makedirs(root, mode=0o700, exist_ok=True)
        try:
            self.host.runner(cmd.mount(device, root, "ext4", POOL_MOUNT_OPTIONS))
        except CommandFailed as exc:
            with contextlib.suppress(Internal):
                self.host.loop_detach(device)
            raise FailedPrecondition(
                f"cannot mount the fscrypt pool {image} at {root} ({exc.stderr[-200:]}): this "
                "kernel needs ext4 with encryption and quota support (CONFIG_QFMT_V2) for "
                "backing=fscrypt"
            ) from None

    def _make_image(self, image: str, size: int) -> None:
        """Sparse file, mkfs, then rename into place: a crash leaves no half-made pool."""
        partial = image + ".partial"
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            self.host.runner(cmd.mkfs_fscrypt_pool(partial, size), timeout=cmd.FORMAT_TIMEOUT)
            os.rename(partial, image)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
        with _opened(os.path.dirname(image) or ".") as dirfd:
            os.fsync(dirfd)

    # directories -------------------------------------------------------------------------
    def _mounts_under(self, path: str, *, including: bool) -> list[str]:
        real = os.path.realpath(path).rstrip("/")
        return [e.point for e in self._mounts()
                if e.point.startswith(real + "/") or (including and e.point == real)]  # fmt: skip

    def remove_tree(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)  # a file or a symlink: the link itself, never its target
            return
        if mounted := self._mounts_under(path, including=True):
            raise Busy(f"cannot delete {path}: {', '.join(mounted)} is mounted in it")
        with _opened(path) as fd:
            self._clear(fd, os.fstat(fd).st_dev, path)
        os.rmdir(path)

    def clear_dir(self, path: str) -> None:
        if mounted := self._mounts_under(path, including=False):
            raise Busy(f"cannot clear {path}: {', '.join(mounted)} is mounted in it")
        with _opened(path) as fd:
            self._clear(fd, os.fstat(fd).st_dev, path)

    @staticmethod
    def _clear(top: int, dev: int, path: str) -> None:
        """Delete everything under the directory ``top``, relative to directory descriptors
        (names are never resolved again from the top), depth first without recursion."""
        frames: list[tuple[int, list[str]]] = [(top, FscryptHost._unlink_files(top))]
        names: list[str] = []
        try:
            while frames:
                dirfd, subdirs = frames[-1]
                if not subdirs:
                    frames.pop()
                    if frames:
                        os.close(dirfd)
                        os.rmdir(names.pop(), dir_fd=frames[-1][0])
                    continue
                name = subdirs.pop()
                child = os.open(name, _DIR, dir_fd=dirfd)
                if os.fstat(child).st_dev != dev:
                    os.close(child)
                    raise Busy(f"cannot delete {path}: a mount lies under it")
                names.append(name)
                frames.append((child, FscryptHost._unlink_files(child)))
        finally:
            for dirfd, _ in frames[1:]:
                os.close(dirfd)

    @staticmethod
    def _unlink_files(dirfd: int) -> list[str]:
        """Unlink every non-directory in ``dirfd``; return its subdirectories' names."""
        subdirs = []
        with os.scandir(dirfd) as entries:
            listed = list(entries)
        for entry in listed:
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=dirfd)
        return subdirs

    def _root_in_fs(self, directory: str) -> tuple[str, str] | None:
        """(device number, path within its filesystem) of ``directory``; None if absent."""
        try:
            real = os.path.realpath(directory)
            os.stat(real)
        except FileNotFoundError:
            return None
        entry = self.mount_of(real)
        inner = os.path.relpath(real, entry.point)
        return entry.dev, os.path.normpath(os.path.join(entry.root, inner))

    def is_bound_from(self, path: str, directory: str) -> bool:
        visible = [e for e in self._mounts() if e.point == path]
        where = self._root_in_fs(directory)
        if not visible or where is None:
            return False
        entry = visible[-1]
        return entry.dev == where[0] and os.path.normpath(entry.root) == where[1]

    def dir_mounts(self, directory: str) -> list[str]:
        """Mount points showing ``directory`` (or a path under it) in every mount namespace
        visible through /proc: ours as the point itself; another namespace's as "<point>
        (mount namespace of pid N)", which never equals a path of ours. A bind whose source
        was unlinked (root ``.../<dir>//deleted``) counts as showing that directory.

        Left out: another namespace's propagation copy of a mount of ours that we list (same
        peer group, sitting on a copy of its parent: the host's copy of a bind we made under
        the kubelet dir), since that mount goes with ours. Not seen: a namespace no process
        is in (held by a bind of an ns file or a descriptor), a thread's own namespace, and
        mounts outside the chosen process's root."""
        where = self._root_in_fs(directory)
        if where is None:
            return []
        dev, root = where
        ours = _index(_read_mountinfo(os.path.join(self.host.proc, "self", "mountinfo"), None))
        found = [m for m in ours.values() if _shows(m, dev, root)]
        copies = set()  # (peer group of a mount of ours, peer group of its parent)
        for m in found:
            parent = ours.get(m.parent)
            if m.shared and parent is not None and parent.shared:
                copies.add((m.shared, parent.shared))
        points = [m.point for m in found]
        for pid in self._other_namespaces():
            path = os.path.join(self.host.proc, str(pid), "mountinfo")
            try:
                theirs = _index(_read_mountinfo(path, MOUNTINFO_LIMIT))
            except MountinfoTooLong:
                log.warning("the mountinfo of pid %d is over %d bytes: not read", pid,
                            MOUNTINFO_LIMIT)  # fmt: skip
                points.append(f"? (mount namespace of pid {pid}: its mountinfo is over "
                              f"{MOUNTINFO_LIMIT} bytes, not read)")  # fmt: skip
                continue
            except OSError:  # the process exited while we looked, or is not ours to read
                continue
            points += [f"{m.point} (mount namespace of pid {pid})" for m in theirs.values()
                       if _shows(m, dev, root) and not _is_copy(m, theirs, copies)]  # fmt: skip
        return points

    def _other_namespaces(self) -> list[int]:
        """One pid (the lowest) of each mount namespace other than ours among the processes
        in /proc; a pid that is gone or whose namespace cannot be read is skipped."""
        proc = self.host.proc
        try:
            seen = {_ns_key(os.path.join(proc, "self", "ns", "mnt"))}
        except OSError:
            seen = set()  # cannot tell ours: every namespace read is checked
        pids = []
        for pid in _pids(proc):
            try:
                key = _ns_key(os.path.join(proc, str(pid), "ns", "mnt"))
            except OSError:  # exited meanwhile, or not ours to inspect
                continue
            if key not in seen:
                seen.add(key)
                pids.append(pid)
        return pids


DELETED = "//deleted"  # what the kernel appends to the root of a mount whose dentry is unlinked
MAPS_LIMIT = 16 << 20  # bytes of one process's maps read (past that: map_files, every entry)
MOUNTINFO_LIMIT = 16 << 20  # bytes of another namespace's mountinfo read (some 100,000 mounts)
_OCTAL = re.compile(r"\\([0-7]{3})")


class MountinfoTooLong(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Mount:
    """One mountinfo line: ids, device number, root within the filesystem, mount point (as
    the reading process's root sees it) and the peer groups it shares with or receives from."""

    id: str
    parent: str
    dev: str
    root: str
    point: str
    shared: str | None = None
    master: str | None = None


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every well-formed line of a mountinfo (proc(5)); others are skipped."""
    out = []
    for line in text.splitlines():
        fields = line.partition(" - ")[0].split()
        if len(fields) < 6:
            continue
        tags = dict(f.split(":", 1) for f in fields[6:] if ":" in f)
        out.append(Mount(id=fields[0], parent=fields[1], dev=fields[2],
                         root=_unescape(fields[3]), point=_unescape(fields[4]),
                         shared=tags.get("shared"), master=tags.get("master")))  # fmt: skip
    return out


def _read_mountinfo(path: str, limit: int | None) -> list[Mount]:
    """A mountinfo file, at most ``limit`` bytes of it (MountinfoTooLong past that)."""
    with open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise MountinfoTooLong(path)
    return parse_mountinfo(data.decode(errors="surrogateescape"))


def _index(mounts: list[Mount]) -> dict[str, Mount]:
    return {m.id: m for m in mounts}


def _is_copy(m: Mount, table: dict[str, Mount], copies: set[tuple[str, str]]) -> bool:
    """Whether ``m`` (of another namespace) is a propagation copy of one of our mounts: in
    (or receiving from) its peer group, on a parent in (or receiving from) the peer group of
    that mount's parent. A bind of ours a container made itself sits on the container's own
    root, never on such a parent, so it is never taken for a copy."""
    parent = table.get(m.parent)
    if parent is None:
        return False
    groups = {m.shared, m.master} - {None}
    parents = {parent.shared, parent.master} - {None}
    return any(n in groups and k in parents for n, k in copies)


def _shows(m: Mount, dev: str, root: str) -> bool:
    """Whether ``m`` shows ``root`` (a path within the filesystem ``dev``) or a path under
    it; a deleted root (``.../x//deleted``) is taken as showing ``.../x``."""
    if m.dev != dev:
        return False
    entry_root = m.root
    if entry_root.endswith(DELETED):
        entry_root = entry_root[: -len(DELETED)] or "/"
    entry_root = os.path.normpath(entry_root)
    return entry_root == root or entry_root.startswith(root.rstrip("/") + "/")


def _ns_key(link: str) -> tuple[int, int]:
    """The identity of the namespace behind a /proc/<pid>/ns/* link (nsfs device, inode)."""
    st = os.stat(link)
    return st.st_dev, st.st_ino


def _pids(proc: str) -> list[int]:
    """The processes in ``proc`` (every one of the host's when we run in its PID namespace)."""
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit())
