"""Bind, bind-remount and unmount through the mount(2)/umount2(2) syscalls (ctypes), not by
spawning mount(8)/umount(8): a publish of a directory backing is one bind and one remount, and
two process spawns were almost all of its time.

``remount_bind`` passes the flags ``mount -o remount,bind,<options>`` of util-linux (2.38,
checked with strace) passes: the target's current per-mount flags (a fresh bind has its
source's), with the asked ``BIND_FLAGS`` applied on top in order (``rw`` clears ``ro``). The
kernel sets the per-mount flags of a bind remount to exactly what it is given, so without the
merge a bind of a nosuid,nodev,noexec staging mount would lose noexec where mount(8) keeps it.
Failures raise ``OSError(errno, strerror, target)``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterable

from csi.host.commands import BIND_FLAGS

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
UMOUNT_NOFOLLOW = 8

# option -> (flags it sets, flags it clears); every key is in BIND_FLAGS and back
_OPTION_FLAGS: dict[str, tuple[int, int]] = {
    "ro": (MS_RDONLY, 0),
    "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0),
    "nodev": (MS_NODEV, 0),
    "noexec": (MS_NOEXEC, 0),
    "noatime": (MS_NOATIME, 0),
    "nodiratime": (MS_NODIRATIME, 0),
    "relatime": (MS_RELATIME, 0),
    "strictatime": (MS_STRICTATIME, 0),
}
assert frozenset(_OPTION_FLAGS) == BIND_FLAGS

# statvfs(2) f_flag bit -> the mount(2) flag libmount passes back for it (ST_RELATIME is not
# MS_RELATIME; strictatime has no bit: neither noatime nor relatime)
_CURRENT_FLAGS = (
    (os.ST_RDONLY, MS_RDONLY),
    (os.ST_NOSUID, MS_NOSUID),
    (os.ST_NODEV, MS_NODEV),
    (os.ST_NOEXEC, MS_NOEXEC),
    (os.ST_NOATIME, MS_NOATIME),
    (os.ST_NODIRATIME, MS_NODIRATIME),
    (os.ST_RELATIME, MS_RELATIME),
)


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]  # fmt: skip
    libc.mount.restype = ctypes.c_int
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.umount2.restype = ctypes.c_int
    return libc


def _check(result: int, target: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def current_flags(f_flag: int) -> int:
    """The mount(2) per-mount flags of a statvfs ``f_flag``."""
    return sum(ms for st, ms in _CURRENT_FLAGS if f_flag & st)


def remount_flags(current: int, options: Iterable[str]) -> int:
    """``MS_BIND | MS_REMOUNT`` with ``current`` (mount(2) flags) and the per-mount options
    among ``options`` applied in order; any other option is ignored (as
    ``commands.bind_remount`` ignores it)."""
    flags = current
    for option in options:
        if option in BIND_FLAGS:
            add, clear = _OPTION_FLAGS[option]
            flags = (flags & ~clear) | add
    return flags | MS_BIND | MS_REMOUNT


def bind(source: str, target: str) -> None:
    """mount(source, target, NULL, MS_BIND, NULL): also binds a device node onto a file."""
    _check(_libc().mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None), target)


def remount_bind(target: str, options: Iterable[str]) -> None:
    """Set the per-mount flags of the bind at ``target``: what ``mount -o
    remount,bind,<options>`` does (its current flags, the asked ones on top)."""
    flags = remount_flags(current_flags(os.statvfs(target).f_flag), options)
    _check(_libc().mount(b"none", os.fsencode(target), None, flags, None), target)


def unmount(target: str) -> None:
    """umount2(target, UMOUNT_NOFOLLOW): a symlink at ``target`` is not followed."""
    _check(_libc().umount2(os.fsencode(target), UMOUNT_NOFOLLOW), target)
