"""The emergency key wipe of dm-crypt mappings: under live mounts, many at once, fast.

Each mapping's table is replaced by an ``error`` target (a table load and a resume without
flush or freeze, ``csi.host.dm``): dm-crypt's destructor zeroes the key as it frees its old
table, so the key leaves kernel memory at once, and every later I/O fails with EIO instead of
blocking (``cryptsetup luksSuspend`` also wipes the key but parks I/O forever, and an unmount
of a suspended device hangs). A filesystem on the mapping is first shut down
(``FS_IOC_SHUTDOWN``, no log flush): its page cache still holds plaintext, and after the
shutdown even cached reads fail; the block device's own cache is dropped afterwards
(``BLKFLSBUF``). Every step is an ioctl from this process, the shutdowns a few at once (each
writes its journal's superblock): no process per volume, no ``dmsetup`` at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from csi.host import KeyWipe
from csi.host.dm import Table

if TYPE_CHECKING:
    from csi.host.linux import LinuxHost

log = logging.getLogger(__name__)

FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32): ext4 and xfs
SHUTDOWN_NOLOGFLUSH = 2  # EXT4_GOING_FLAGS_NOLOGFLUSH == XFS_FSOP_GOING_FLAGS_NOLOGFLUSH
BLKFLSBUF = 0x1261  # _IO(0x12, 97)
WIPED_TARGET = "error"
SHUTDOWN_WORKERS = 8  # shutdowns at once: each mostly waits for one journal write


class KeyWiper:
    def __init__(self, host: LinuxHost) -> None:
        self.host = host

    def wiped(self, name: str) -> bool:
        """Whether the mapping's table is an error target now (a wiped key)."""
        dm = self.host.dm
        try:
            with dm.opened() as fd:
                return dm.table(fd, name).kinds == [WIPED_TARGET]
        except OSError:
            return False

    def wipe(self, names: list[str]) -> list[KeyWipe]:
        present = self.host._dm_names()
        results: dict[str, KeyWipe] = {n: KeyWipe(n, "no_key", "no mapping")
                                       for n in names if n not in present}  # fmt: skip
        if len(results) == len(names):
            return [results[n] for n in names]
        with self.host.dm.opened() as fd:
            tables: dict[str, Table] = {}
            for name in names:
                if name in results:
                    continue
                try:
                    table = self.host.dm.table(fd, name)
                except OSError as exc:
                    results[name] = self._gone_or_failed(name, "cannot read its table", exc)
                    continue
                if table.kinds == [WIPED_TARGET]:
                    results[name] = KeyWipe(name, "no_key", "already wiped (error table)")
                else:
                    tables[name] = table
            if tables:
                self._shut_down_filesystems({name: present[name] for name in tables})
            for name, table in tables.items():
                results[name] = self._wipe_one(fd, name, table)
        return [results[n] for n in names]

    def _wipe_one(self, fd: int, name: str, table: Table) -> KeyWipe:
        """Swap in the error table, then read the table back to prove it (one bad mapping
        never keeps the others' keys in the kernel: each is on its own)."""
        try:
            self.host.dm.wipe(fd, name, table)
        except OSError as exc:
            return self._gone_or_failed(name, "cannot wipe its table", exc)
        try:
            after = self.host.dm.table(fd, name).kinds
        except OSError as exc:
            return self._gone_or_failed(name, "cannot read its table back", exc)
        if after != [WIPED_TARGET]:
            return KeyWipe(name, "failed", f"table is still {' '.join(after) or 'empty'}")
        self._drop_buffers(name)
        return KeyWipe(name, "wiped", "table replaced by an error target")

    def _gone_or_failed(self, name: str, what: str, exc: OSError) -> KeyWipe:
        if exc.errno == errno.ENXIO or name not in self.host._dm_names():
            return KeyWipe(name, "no_key", "mapping removed meanwhile")
        log.error("%s: %s: %s", name, what, exc.strerror)
        return KeyWipe(name, "failed", f"{what}: {exc.strerror}")

    def _shut_down_filesystems(self, knames: dict[str, str]) -> None:
        """Shut down each filesystem mounted from one of the mappings (name -> dm-N), found by
        device number in mountinfo (one superblock: its first visible mount is enough). A
        shutdown writes its journal's superblock and waits for it: a few run at once."""
        devices: dict[str, str] = {}
        for name, kname in knames.items():
            with contextlib.suppress(OSError):
                directory = os.path.join(self.host.sysfs, "block", kname)
                devices[self.host._dm_dev(directory)[0]] = name
        points: dict[str, list[str]] = {}
        for entry in self.host._mounts():
            if entry.dev in devices:
                points.setdefault(entry.dev, []).append(entry.point)
        if not points:
            return
        with ThreadPoolExecutor(min(SHUTDOWN_WORKERS, len(points))) as pool:
            list(pool.map(shut_down_first, points.values(), points.keys()))

    def _drop_buffers(self, name: str) -> None:
        with contextlib.suppress(OSError):
            device = os.path.join(self.host.dev, "mapper", name)
            fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, BLKFLSBUF)
            finally:
                os.close(fd)


def shut_down_first(paths: list[str], dev: str) -> bool:
    """Shut down device ``dev``'s filesystem at the first of its mounts where that works."""
    return any(shut_down(path, dev) for path in paths)


def shut_down(path: str, dev: str) -> bool:
    """FS_IOC_SHUTDOWN on the filesystem mounted at ``path``, only if the directory opened
    really is on device ``dev`` ("major:minor"): a path that changed meanwhile is left alone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot open %s to shut its filesystem down: %s", path, exc.strerror)
        return False
    try:
        st = os.fstat(fd)
        if f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" != dev:
            return False
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, SHUTDOWN_NOLOGFLUSH.to_bytes(4, "little"))
        return True
    except OSError as exc:
        log.warning("cannot shut down the filesystem at %s: %s", path, exc.strerror)
        return False
    finally:
        os.close(fd)
