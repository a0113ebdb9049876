"""Device-mapper ioctls on ``/dev/mapper/control``, for the emergency key wipe.

A shred must finish in about the time one unpublish takes, and under a shred the node is busy:
udev handles a change event per wiped mapping, and every ``dmsetup`` process (exec, library
set-up, one ioctl per device) then costs seconds instead of a fraction of one. Three ioctls per
mapping (table status, table load, resume) from this process do the same work as
``dmsetup table`` + ``dmsetup wipe_table`` without a process at all.

Only target types and lengths are ever read (table status without ``DM_STATUS_TABLE_FLAG``:
dm-crypt reports nothing then), so no key is copied out of the kernel, unlike ``dmsetup table``,
which reads every crypt key and hides it only when it prints. Layouts and numbers are those of
``include/uapi/linux/dm-ioctl.h`` (interface version 4).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7]; 312 bytes, no implicit padding
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7x")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]; params follow
SPEC = struct.Struct("=QQiI16s")
VERSION = (4, 0, 0)  # the major must match the kernel's; minor 0 asks for nothing newer

DM_IOCTL = 0xFD
DEV_SUSPEND_CMD = 6  # without DM_SUSPEND_FLAG: resume (swapping in the inactive table)
TABLE_LOAD_CMD = 9
TABLE_CLEAR_CMD = 10
TABLE_STATUS_CMD = 12

READONLY_FLAG = 1 << 0
ACTIVE_PRESENT_FLAG = 1 << 5
BUFFER_FULL_FLAG = 1 << 8
SKIP_LOCKFS_FLAG = 1 << 10  # no filesystem freeze: nothing more is to be written through it
NOFLUSH_FLAG = 1 << 11  # in-flight I/O is not written out first: it fails on the new table

STATUS_BUFFER = 16 * 1024  # one mapping's target list, types and lengths only
MAX_BUFFER = 1 << 20  # a bound on retries after DM_BUFFER_FULL_FLAG

Ioctl = Callable[[int, int, bytearray, bool], int]


def request(command: int) -> int:
    """_IOWR(DM_IOCTL, command, struct dm_ioctl)."""
    return (3 << 30) | (HEADER.size << 16) | (DM_IOCTL << 8) | command


@dataclass(frozen=True)
class Target:
    start: int  # in 512-byte sectors
    length: int
    kind: str  # target type: crypt, integrity, error, ...


@dataclass(frozen=True)
class Table:
    targets: tuple[Target, ...]
    readonly: bool

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.targets]

    @property
    def sectors(self) -> int:
        return max((t.start + t.length for t in self.targets), default=0)


def pack(name: str, *, flags: int = 0, targets: int = 0, payload: bytes = b"",
         size: int = 0) -> bytearray:  # fmt: skip
    """A request buffer: the header, then ``payload``, in at least ``size`` bytes."""
    raw = name.encode()
    if not raw or len(raw) >= 128 or b"\0" in raw:
        raise ValueError(f"not a device-mapper name: {name!r}")
    total = max(HEADER.size + len(payload), size)
    buffer = bytearray(total)
    HEADER.pack_into(buffer, 0, *VERSION, total, HEADER.size, targets, 0, flags, 0, 0, 0,
                     raw, b"")  # fmt: skip
    buffer[HEADER.size:HEADER.size + len(payload)] = payload
    return buffer


def error_table(sectors: int) -> bytes:
    """One ``error`` target over the whole device, no parameters (an empty string)."""
    spec = SPEC.pack(0, sectors, 0, 0, b"error")
    return spec + b"\0" * 8  # the NUL of the empty parameter string, padded to 8 bytes


def parse_targets(buffer: bytes | bytearray) -> Table:
    """A table status answer -> its targets (``next`` counts from the first spec)."""
    fields = HEADER.unpack_from(buffer, 0)
    data_size, data_start, count, flags = fields[3], fields[4], fields[5], fields[7]
    end = min(data_size, len(buffer))
    targets, offset = [], data_start
    for _ in range(count if flags & ACTIVE_PRESENT_FLAG else 0):
        if offset + SPEC.size > end:
            raise ValueError("device-mapper answer ends inside a target")
        start, length, _status, following, kind = SPEC.unpack_from(buffer, offset)
        targets.append(Target(start, length, kind.split(b"\0", 1)[0].decode(errors="replace")))
        offset = data_start + following
    return Table(tuple(targets), bool(flags & READONLY_FLAG))


class DeviceMapper:
    """The few device-mapper calls the key wipe needs, by device name."""

    def __init__(self, dev: str = "/dev", ioctl: Ioctl | None = None) -> None:
        self.control = os.path.join(dev, "mapper", "control")
        self._ioctl: Ioctl = ioctl or fcntl.ioctl

    @contextlib.contextmanager
    def opened(self) -> Iterator[int]:
        """The control device, open for the calls below; closed after them."""
        fd = os.open(self.control, os.O_RDWR | os.O_CLOEXEC)
        try:
            yield fd
        finally:
            os.close(fd)

    def _call(self, fd: int, command: int, buffer: bytearray) -> bytearray:
        self._ioctl(fd, request(command), buffer, True)
        return buffer

    def table(self, fd: int, name: str) -> Table:
        """The active table's targets; OSError ENXIO when there is no such device."""
        size = STATUS_BUFFER
        while True:
            answer = self._call(fd, TABLE_STATUS_CMD, pack(name, size=size))
            if not HEADER.unpack_from(answer, 0)[7] & BUFFER_FULL_FLAG or size >= MAX_BUFFER:
                try:
                    return parse_targets(answer)
                except ValueError as exc:  # a caller handles OSError only: one bad answer
                    raise OSError(errno.EPROTO, str(exc)) from None
            size *= 4

    def wipe(self, fd: int, name: str, table: Table) -> None:
        """Load one error target of the same size and swap it in without flush or freeze:
        dm-crypt frees its old table (zeroing the key) before the resume returns."""
        flags = READONLY_FLAG if table.readonly else 0
        self._call(fd, TABLE_LOAD_CMD,
                   pack(name, flags=flags, targets=1, payload=error_table(table.sectors)))
        try:
            self._call(fd, DEV_SUSPEND_CMD, pack(name, flags=NOFLUSH_FLAG | SKIP_LOCKFS_FLAG))
        except OSError:
            try:  # as dmsetup does: no inactive error table left behind to surprise later
                self._call(fd, TABLE_CLEAR_CMD, pack(name))
            except OSError:
                pass
            raise
