"""Small files of the driver's own state (the seal, the shred annotation handled): written whole
or not at all, so a crash never leaves half of one, and read with a bound."""

from __future__ import annotations

import contextlib
import errno
import os


def write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a signal, a full device): go on until all is out."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - a regular file either writes or raises
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def fsync_dir(path: str) -> None:
    """Make a rename or unlink in ``path``'s directory durable."""
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_atomically(path: str, data: bytes) -> None:
    """A temp file beside ``path`` (exactly 0600, even if a crashed writer left one), every byte
    written and fsynced, renamed over ``path``, the directory fsynced; the temp file is removed
    if any step fails (the OSError is raised)."""
    temp = f"{path}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)  # fmt: skip
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file already there
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_dir(path)


def read_bounded(path: str, limit: int) -> bytes | None:
    """Up to ``limit + 1`` bytes of ``path`` (so a caller can tell it is too long), None when it
    does not exist; a symlink or any other failure raises OSError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)
