"""Volume keys: drawn from the OS CSPRNG into a mutable buffer that is zeroed after use.

A key is a context manager. Inside the ``with`` block ``key.view`` is a read-only view that can be
written to a pipe; on exit the buffer is overwritten with zeros. The object never renders its bytes
in ``repr``/``str``, so it cannot leak into a log line or an error message by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

PASSPHRASE_BYTES = 64  # 512 bits of CSPRNG output unlock the LUKS2 keyslot


class VolumeKey:
    """A secret byte buffer with a guaranteed wipe."""

    __slots__ = ("_buf", "_wiped")

    def __init__(self, buf: bytearray) -> None:
        self._buf = buf
        self._wiped = False

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

    @property
    def wiped(self) -> bool:
        return self._wiped and not any(self._buf)

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
    """A fresh key read straight from the kernel CSPRNG into a bytearray (no immutable copy)."""
    buf = bytearray(size)
    with open("/dev/urandom", "rb", buffering=0) as rng:
        got = rng.readinto(buf)
    if got != size:
        raise OSError("short read from /dev/urandom")
    return VolumeKey(buf)
