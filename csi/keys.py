"""Volume keys: drawn from the OS CSPRNG into a mutable buffer that is zeroed after use.

A key is a context manager. Inside the ``with`` block ``key.view`` is a read-only view that can be
written to a pipe; on exit the buffer is overwritten with zeros. The object never renders its bytes
in ``repr``/``str``, so it cannot leak into a log line or an error message by accident.

``random_key`` puts the key in pages of its own (a private anonymous mapping), locks them in RAM
(``mlock``) so the key never reaches swap, and marks them left out of core dumps and wiped in a
forked child; the wipe zeroes the bytes before it unlocks the pages. A key in a buffer the caller
brings (a bytearray shares its pages with other objects) is zeroed the same way but not locked.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)

PASSPHRASE_BYTES = 64  # 512 bits of CSPRNG output unlock the LUKS2 keyslot
# mlock errors that leave the key usable, only swappable: no CAP_IPC_LOCK and RLIMIT_MEMLOCK 0
# (EPERM) or used up (ENOMEM), or a transient shortage (EAGAIN)
TOLERATED = (errno.EPERM, errno.ENOMEM, errno.EAGAIN)

KeyBuffer = bytearray | mmap.mmap
# Linux madvise(2) values; Python's mmap module lacks MADV_WIPEONFORK on some builds
MADV_DONTDUMP = 16
MADV_WIPEONFORK = 18


class VolumeKey:
    """A secret byte buffer with a guaranteed wipe."""

    __slots__ = ("_buf", "_locked", "_wiped")

    def __init__(self, buf: KeyBuffer) -> None:
        self._buf = buf
        self._wiped = False
        self._locked = False

    @classmethod
    def in_locked_pages(cls, size: int) -> VolumeKey:
        """A zeroed key buffer in pages of its own, locked in RAM where the kernel allows it."""
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        for advice in (MADV_DONTDUMP, MADV_WIPEONFORK):
            try:
                buf.madvise(advice)
            except OSError:  # a kernel without it: the lock still counts
                pass
        key = cls(buf)
        key._locked = _lock_pages(buf)
        return key

    @property
    def view(self) -> memoryview:
        if self._wiped:
            raise ValueError("key has been wiped")
        return memoryview(self._buf).toreadonly()

    def __len__(self) -> int:
        return len(self._buf)

    def wipe(self) -> None:
        self._buf[:] = bytes(len(self._buf))
        self._wiped = True
        if self._locked:  # only now: until the zeros are in, the pages must not be swapped
            _unlock_pages(self._buf)
            self._locked = False

    @property
    def wiped(self) -> bool:
        return self._wiped and not any(memoryview(self._buf))

    @property
    def locked(self) -> bool:
        """True while the key's pages are locked in RAM."""
        return self._locked

    def __enter__(self) -> VolumeKey:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"VolumeKey(<{len(self._buf)} bytes, redacted>)"

    __str__ = __repr__


KeySource = Callable[[int], VolumeKey]


def random_key(size: int) -> VolumeKey:
    """A fresh key read straight from the kernel CSPRNG into locked pages (no immutable copy)."""
    key = VolumeKey.in_locked_pages(size)
    try:
        with open("/dev/urandom", "rb", buffering=0) as rng:
            got = rng.readinto(key._buf)
        if got != size:
            raise OSError("short read from /dev/urandom")
    except BaseException:
        key.wipe()
        raise
    return key


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("mlock", "munlock"):
        function = getattr(libc, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        function.restype = ctypes.c_int
    return libc


def _address(buf: KeyBuffer) -> int:
    anchor = ctypes.c_char.from_buffer(buf)  # no copy: a pointer into the buffer
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # release the export, or the buffer could never be closed


def _lock_pages(buf: KeyBuffer) -> bool:
    if _libc().mlock(_address(buf), len(buf)) == 0:
        return True
    err = ctypes.get_errno()
    if err not in TOLERATED:
        raise OSError(err, f"mlock of a key buffer: {os.strerror(err)}")
    _warn_unlocked(err)
    return False


def _unlock_pages(buf: KeyBuffer) -> None:
    _libc().munlock(_address(buf), len(buf))  # cannot fail on a range that mlock accepted


@functools.cache
def _warn_unlocked(err: int) -> None:
    """Once per process and error: the keys work, but the kernel may swap them out."""
    log.warning(
        "cannot lock volume keys in RAM (mlock: %s): a key may reach swap while it is in use; "
        "give the driver CAP_IPC_LOCK or raise its RLIMIT_MEMLOCK (ulimit -l)",
        os.strerror(err),
    )
