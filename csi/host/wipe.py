"""The emergency key wipe of dm-crypt mappings: under live mounts, many at once, fast.

Each mapping's table is replaced by an ``error`` target (``dmsetup wipe_table``): dm-crypt's
destructor zeroes the key as it frees it, so the key leaves kernel memory at once, and every
later I/O fails with EIO instead of blocking (``cryptsetup luksSuspend`` also wipes the key but
parks I/O forever, and an unmount of a suspended device hangs). A filesystem on the mapping is
first shut down (``FS_IOC_SHUTDOWN``, no log flush): its page cache still holds plaintext, and
after the shutdown even cached reads fail; the block device's own cache is dropped afterwards
(``BLKFLSBUF``). One ``dmsetup`` process wipes every mapping, one more lists the tables to
prove it: the cost does not grow with a process per volume.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from typing import TYPE_CHECKING

from csi.host import KeyWipe
from csi.host import commands as cmd
from csi.host.runner import CommandFailed

if TYPE_CHECKING:
    from csi.host.linux import LinuxHost

log = logging.getLogger(__name__)

FS_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32): ext4 and xfs
SHUTDOWN_NOLOGFLUSH = 2  # EXT4_GOING_FLAGS_NOLOGFLUSH == XFS_FSOP_GOING_FLAGS_NOLOGFLUSH
BLKFLSBUF = 0x1261  # _IO(0x12, 97)
WIPED_TARGET = "error"


def parse_tables(out: str) -> dict[str, list[str]]:
    """``dmsetup table`` of every device -> name -> target types, in table order."""
    tables: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, sep, rest = line.partition(": ")
        fields = rest.split()
        if sep and len(fields) >= 3:
            tables.setdefault(name, []).append(fields[2])
    return tables


class KeyWiper:
    def __init__(self, host: LinuxHost) -> None:
        self.host = host

    def tables(self) -> dict[str, list[str]]:
        return parse_tables(self.host.runner(cmd.dmsetup_tables()))

    def wipe(self, names: list[str]) -> list[KeyWipe]:
        present = self.host._dm_names()
        tables = self.tables() if any(n in present for n in names) else {}
        results: dict[str, KeyWipe] = {}
        todo = []
        for name in names:
            if name not in present:
                results[name] = KeyWipe(name, "no_key", "no mapping")
            elif tables.get(name) == [WIPED_TARGET]:
                results[name] = KeyWipe(name, "no_key", "already wiped (error table)")
            else:
                todo.append(name)
        if todo:
            self._shut_down_filesystems({name: present[name] for name in todo})
            self._wipe_tables(todo)
            after = self.tables()
            for name in todo:
                if after.get(name) == [WIPED_TARGET]:
                    self._drop_buffers(name)
                    results[name] = KeyWipe(name, "wiped", "table replaced by an error target")
                elif name not in self.host._dm_names():
                    results[name] = KeyWipe(name, "no_key", "mapping removed meanwhile")
                else:
                    results[name] = KeyWipe(
                        name, "failed", f"table is still {' '.join(after.get(name, ['?']))}"
                    )
        return [results[n] for n in names]

    def _wipe_tables(self, names: list[str]) -> None:
        """One process for all; if it fails (e.g. one mapping vanished meanwhile), one each,
        so one bad mapping never keeps the others' keys in the kernel."""
        try:
            self.host.runner(cmd.dmsetup_wipe_tables(names))
            return
        except CommandFailed as exc:
            log.warning("batched wipe_table failed, wiping one at a time: %s", exc)
        for name in names:
            try:
                self.host.runner(cmd.dmsetup_wipe_tables([name]))
            except CommandFailed as exc:
                log.error("cannot wipe the table of %s: %s", name, exc)

    def _shut_down_filesystems(self, knames: dict[str, str]) -> None:
        """Shut down each filesystem mounted from one of the mappings (name -> dm-N), found by
        device number in mountinfo (one superblock: its first visible mount is enough)."""
        devices: dict[str, str] = {}
        for name, kname in knames.items():
            with contextlib.suppress(OSError):
                directory = os.path.join(self.host.sysfs, "block", kname)
                devices[self.host._dm_dev(directory)[0]] = name
        done: set[str] = set()
        for entry in self.host._mounts():
            if entry.dev in devices and entry.dev not in done and shut_down(entry.point, entry.dev):
                done.add(entry.dev)

    def _drop_buffers(self, name: str) -> None:
        with contextlib.suppress(OSError):
            device = os.path.join(self.host.dev, "mapper", name)
            fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, BLKFLSBUF)
            finally:
                os.close(fd)


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
