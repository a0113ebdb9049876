"""Kata Containers direct-assigned volumes, host side: the ``mountInfo.json`` files Kata's
runtime reads, the read-only guard tmpfs that makes a pod not run by Kata fail closed, and who
holds a disk file open.

The file layout is Kata's own (src/runtime/pkg/direct-volume in kata-containers): a volume lives
in ``<root>/<b64.URLEncoding of the target path>/mountInfo.json`` (urlsafe alphabet, padded), the
directory 0700, the file 0600; the runtime later adds an empty file named after the sandbox id
to that directory. Names are never resolved through a symlink: the volume directory is opened
with O_NOFOLLOW and everything in it is reached relative to that descriptor.

OSError is left to ``LinuxHost``'s wrapper (typed errors), except where a missing, foreign or
malformed file has a meaning of its own here (None, or left out of a listing).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import stat
from collections.abc import Iterator
from typing import TYPE_CHECKING

from csi.errors import FailedPrecondition, Internal, InvalidArgument
from csi.host import GUARD_SOURCE, DirectVolume
from csi.host import commands as cmd

if TYPE_CHECKING:
    from csi.host.linux import LinuxHost

log = logging.getLogger(__name__)

MOUNT_INFO = "mountInfo.json"
MOUNT_INFO_LIMIT = 64 * 1024  # bytes: a mountInfo.json larger than this is not read
NAME_MAX = 255  # bytes of one path component (every Linux filesystem Kata's root lives on)
DIR_MODE, FILE_MODE = 0o700, 0o600
TEMP_PREFIX = f".{MOUNT_INFO}."  # our temporary files, renamed over MOUNT_INFO when complete
TEMP_SUFFIX = ".tmp"
FILE_USERS_LIMIT = 64  # processes reported by file_users (the scan stops there)
_URLSAFE_NAME = re.compile(r"(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2}==|[A-Za-z0-9_-]{3}=)?")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC  # the root is configuration: followed
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a fifo never blocks us
_OCTAL = re.compile(r"\\([0-7]{3})")


# names and content (pure) ----------------------------------------------------------------------
def _check_target(target: str) -> bytes:
    if not target.startswith("/") or "\0" in target:
        raise InvalidArgument(f"a Kata direct volume needs an absolute target path, not {target!r}")
    try:
        return target.encode()
    except UnicodeEncodeError:
        raise InvalidArgument(f"target path {target!r} is not valid UTF-8") from None


def volume_dir_name(target: str) -> str:
    """The directory name Kata derives from ``target``: Go's ``b64.URLEncoding`` (urlsafe
    alphabet, with padding). InvalidArgument for a path that is not absolute, or so long that
    the name would not fit in one path component (Kata could not store it either)."""
    name = base64.urlsafe_b64encode(_check_target(target)).decode()
    if len(name) > NAME_MAX:
        raise InvalidArgument(
            f"target path {target[:80]!r}... is {len(target.encode())} bytes: its base64 name "
            f"({len(name)} bytes) exceeds {NAME_MAX}, the longest name a directory can have, so "
            "Kata cannot take it as a direct volume; use a shorter volume name"
        )
    return name


def target_of(name: str) -> str | None:
    """The target path a directory name encodes, or None if it is not exactly what
    ``volume_dir_name`` gives for an absolute path (wrong alphabet or padding, not UTF-8, ...)."""
    if not _URLSAFE_NAME.fullmatch(name) or not name:
        return None
    try:
        raw = base64.urlsafe_b64decode(name)
        target = raw.decode()
    except (binascii.Error, ValueError):
        return None
    if base64.urlsafe_b64encode(raw).decode() != name:  # non-zero padding bits
        return None
    if not target.startswith("/") or "\0" in target:
        return None
    return target


def mount_info_bytes(volume: DirectVolume) -> bytes:
    """The JSON Kata's runtime reads, with exactly these keys (all of them, always)."""
    return json.dumps(
        {
            "volume-type": volume.volume_type,
            "device": volume.device,
            "fstype": volume.fstype,
            "metadata": dict(volume.metadata),
            "options": list(volume.options),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode()


def parse_mount_info(data: bytes) -> DirectVolume | None:
    """A mountInfo.json as a ``DirectVolume``, or None if it is not one: not UTF-8 JSON, not an
    object, ``volume-type``, ``device`` or ``fstype`` missing or not a string, ``metadata`` not
    a string map or ``options`` not a string list (both may be absent: Go's ``omitempty``).
    Keys this driver does not know are ignored, as Kata's own ``json.Unmarshal`` does."""
    if len(data) > MOUNT_INFO_LIMIT:
        return None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        return None
    if not isinstance(doc, dict):
        return None
    strings = [doc.get(k) for k in ("volume-type", "device", "fstype")]
    metadata = doc.get("metadata", {})
    options = doc.get("options", [])
    if metadata is None:
        metadata = {}
    if options is None:
        options = []
    if not all(isinstance(s, str) for s in strings):
        return None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        return None
    volume_type, device, fstype = (str(s) for s in strings)
    return DirectVolume(volume_type, device, fstype, dict(metadata), list(options))


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def visible_mount(mountinfo: str, point: str) -> tuple[str, str, set[str]] | None:
    """(fs type, source, per-mount and superblock options) of the mount visible at ``point``
    (the last mountinfo line for it), or None if nothing is mounted there."""
    found = None
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 6 or len(rfields) < 2 or _unescape(fields[4]) != point:
            continue
        options = set(fields[5].split(","))
        if len(rfields) >= 3:
            options |= set(rfields[2].split(","))
        found = (rfields[0], _unescape(rfields[1]), options)
    return found


def is_guard(mount: tuple[str, str, set[str]] | None) -> bool:
    """Whether a visible mount (``visible_mount``) is our guard: a read-only tmpfs whose source
    is GUARD_SOURCE."""
    return mount is not None and mount[0] == "tmpfs" and mount[1] == GUARD_SOURCE and (
        "ro" in mount[2])  # fmt: skip


@contextlib.contextmanager
def _opened(path: str, flags: int, *, dir_fd: int | None = None) -> Iterator[int]:
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def _read_bounded(fd: int) -> bytes | None:
    """At most MOUNT_INFO_LIMIT bytes of a regular file; None if it is larger or not regular."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MOUNT_INFO_LIMIT:
        return None
    chunks, total = [], 0
    while total <= MOUNT_INFO_LIMIT:
        chunk = os.read(fd, MOUNT_INFO_LIMIT + 1 - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    data = b"".join(chunks)
    return None if len(data) > MOUNT_INFO_LIMIT else data


def _check_dir(st: os.stat_result, path: str) -> None:
    """InvalidArgument for a symlink, FailedPrecondition for anything else not a directory."""
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"{path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(st.st_mode):
        raise FailedPrecondition(f"{path} is not a directory: remove it and retry")


class KataHost:
    """The ``DirectVolumes`` protocol on the running kernel, for ``LinuxHost``."""

    def __init__(self, host: LinuxHost) -> None:
        self.host = host

    # mountInfo.json ------------------------------------------------------------------------
    def write(self, root: str, target: str, volume: DirectVolume) -> None:
        name = volume_dir_name(target)
        data = mount_info_bytes(volume)
        if not os.path.isdir(root):
            os.makedirs(root, mode=DIR_MODE, exist_ok=True)
        with _opened(root, _ROOT) as rootfd:
            try:
                os.mkdir(name, DIR_MODE, dir_fd=rootfd)
                created = True
            except FileExistsError:
                created = False
                _check_dir(os.lstat(name, dir_fd=rootfd), f"{root}/{name}")
            with _opened(name, _DIR, dir_fd=rootfd) as dirfd:  # never through a symlink
                if stat.S_IMODE(os.fstat(dirfd).st_mode) != DIR_MODE:
                    os.fchmod(dirfd, DIR_MODE)  # the umask, or someone else's directory
                self._drop_temporaries(dirfd)
                if self._holds(dirfd, data):
                    return
                self._replace(dirfd, data)
            if created:
                os.fsync(rootfd)

    @staticmethod
    def _holds(dirfd: int, data: bytes) -> bool:
        """Whether the directory's mountInfo.json is exactly ``data`` (its mode made 0600)."""
        try:
            with _opened(MOUNT_INFO, _READ, dir_fd=dirfd) as fd:
                if _read_bounded(fd) != data:
                    return False
                if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
                    os.fchmod(fd, FILE_MODE)
                return True
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink named mountInfo.json; it gets replaced
                return False
            raise

    @staticmethod
    def _replace(dirfd: int, data: bytes) -> None:
        """Temp file in the same directory, written, fsynced, renamed over, directory fsynced."""
        temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}{TEMP_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, FILE_MODE, dir_fd=dirfd)
        try:
            try:
                os.fchmod(fd, FILE_MODE)  # exactly 0600 whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, MOUNT_INFO, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dirfd)
            raise
        os.fsync(dirfd)

    @staticmethod
    def _drop_temporaries(dirfd: int) -> None:
        """Temp files a killed writer left: Kata takes any other name in the directory for the
        sandbox id, so none may stay."""
        for entry in os.listdir(dirfd):
            if entry.startswith(TEMP_PREFIX) and entry.endswith(TEMP_SUFFIX):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(entry, dir_fd=dirfd)

    def read(self, root: str, target: str) -> DirectVolume | None:
        try:
            name = volume_dir_name(target)
        except InvalidArgument:
            return None
        return self._read_name(root, name)

    @staticmethod
    def _read_name(root: str, name: str) -> DirectVolume | None:
        try:
            with _opened(os.path.join(root, name), _DIR) as dirfd, \
                    _opened(MOUNT_INFO, _READ, dir_fd=dirfd) as fd:  # fmt: skip
                data = _read_bounded(fd)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a symlink (directory or file): never followed
                return None
            raise
        if data is None:
            log.warning("%s/%s/%s is not a regular file of at most %d bytes: not read", root,
                        name, MOUNT_INFO, MOUNT_INFO_LIMIT)  # fmt: skip
            return None
        return parse_mount_info(data)

    def targets(self, root: str) -> dict[str, DirectVolume | None]:
        try:
            names = sorted(os.listdir(root))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        found: dict[str, DirectVolume | None] = {}
        for name in names:
            target = target_of(name)
            if target is None:
                continue
            try:
                if not stat.S_ISDIR(os.lstat(os.path.join(root, name)).st_mode):
                    continue  # Kata makes directories only: a file or symlink is not a volume
            except FileNotFoundError:
                continue
            found[target] = self._read_name(root, name)
        return found

    def remove(self, root: str, target: str) -> None:
        try:
            name = volume_dir_name(target)
        except InvalidArgument:
            if target.startswith("/"):  # too long: it cannot exist
                return
            raise
        path = os.path.join(root, name)
        if not os.path.lexists(path):
            return
        self.host.remove_tree(path)  # never follows a symlink nor crosses a mount
        with contextlib.suppress(FileNotFoundError), _opened(root, _ROOT) as rootfd:
            os.fsync(rootfd)

    # the guard -----------------------------------------------------------------------------
    def _visible(self, target: str) -> tuple[str, str, set[str]] | None:
        with open(os.path.join(self.host.proc, "self", "mountinfo")) as f:
            return visible_mount(f.read(), os.path.realpath(target))

    def is_guarded(self, target: str) -> bool:
        return is_guard(self._visible(target))

    def guard_mount(self, target: str) -> None:
        if not os.path.lexists(target):
            os.makedirs(target, mode=0o750, exist_ok=True)
        st = os.lstat(target)
        if stat.S_ISLNK(st.st_mode):
            raise InvalidArgument(f"target {target} is a symlink; refusing to follow it")
        if not stat.S_ISDIR(st.st_mode):
            raise FailedPrecondition(f"target {target} is not a directory: no guard can cover it")
        visible = self._visible(target)
        if is_guard(visible):
            return
        if visible is not None:
            raise FailedPrecondition(
                f"target {target} is already a mount point ({visible[0]} from {visible[1]}); "
                "the guard is never stacked over another mount: unmount it and retry"
            )
        self.host.runner(cmd.guard_mount(target))
        if not self.is_guarded(target):
            raise Internal(f"mounted the guard at {target} but mountinfo does not show it there")

    # who holds a file ----------------------------------------------------------------------
    def file_users(self, path: str) -> list[str]:
        """Processes with a descriptor on ``path``'s inode, stat'ed through /proc/<pid>/fd
        (stat never opens: no side effect on fifos or devices); at most FILE_USERS_LIMIT."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        wanted = (st.st_dev, st.st_ino)
        proc = self.host.proc
        found: list[str] = []
        try:
            pids = sorted(int(p) for p in os.listdir(proc) if p.isdigit())
        except OSError:
            return []
        for pid in pids:
            base = os.path.join(proc, str(pid))
            if self._holds_fd(os.path.join(base, "fd"), wanted):
                found.append(f"pid {pid} ({_comm(base)})")
                if len(found) >= FILE_USERS_LIMIT:
                    break
        return found

    @staticmethod
    def _holds_fd(fd_dir: str, wanted: tuple[int, int]) -> bool:
        try:
            with os.scandir(fd_dir) as entries:
                for entry in entries:
                    try:
                        st = os.stat(entry.path)  # through the magic link: the open file
                    except OSError:  # closed meanwhile, or the process exited
                        continue
                    if (st.st_dev, st.st_ino) == wanted:
                        return True
        except OSError:  # the process exited, or its descriptors are not ours to read
            return False
        return False


def _comm(base: str) -> str:
    try:
        with open(os.path.join(base, "comm"), "rb") as f:
            return f.read(64).decode(errors="replace").strip()
    except OSError:
        return "?"
