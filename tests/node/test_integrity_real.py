"""Integrity (hmac-sha256) volumes on the real kernel: filesystems skip the O(size) wipe and
still never read a sector nobody wrote; block volumes keep the wipe.

dm-crypt in authenticated mode fails every read of a sector whose tag was never written (EIO
for buffered I/O, EILSEQ for O_DIRECT) and logs "INTEGRITY AEAD ERROR". That makes the proof
direct: an O_DIRECT read of an untouched high sector of a freshly published filesystem volume
fails (the format did not wipe), while mkfs, mount, writes, reads after dropping caches,
unmount and an offline fsck all work and the kernel log holds no error for our devices except
the ones our own probe caused. A block volume's every sector reads back fine: it was wiped.

udev's blkid probe of a new dm device would also read unwritten sectors (udev, not the driver,
and only log noise); while these tests run, a rule under /run/udev/rules.d tells udev not to
probe ``luks-eph-*`` devices, so every kernel message left is from the driver's own work.
Only reads are ever done on the raw mapper device here, never writes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import mmap
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import pytest

from csi.journal import Names
from csi.tools.kubelet import PvcVolume
from tests.node.conftest import (
    Driver,
    leftovers,
    mountpoints,
    sh,
    volume_leftovers,
)

MiB = 1024**2
NODE = "node-test"
INTEGRITY = {"integrity": "hmac-sha256"}
BLOCK = 4096
# a sector whose tag was never written: EILSEQ through O_DIRECT, EIO through the page cache
UNWRITTEN = (errno.EILSEQ, errno.EIO)
PROBE_AT = (0.5, 0.65, 0.8, 0.95)  # few: dm rate-limits its error messages (10 per 5 s)
ERROR = re.compile(r"error|I/O|corrupt|fail|suppressed", re.IGNORECASE)
AEAD = re.compile(r"INTEGRITY AEAD ERROR, sector (\d+)")
UDEV_RULE = Path("/run/udev/rules.d/58-luks-eph-test-noscan.rules")


# --- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def udev_does_not_probe_our_devices() -> Iterator[None]:
    if not os.path.exists("/run/udev/control") or shutil.which("udevadm") is None:
        yield
        return
    UDEV_RULE.parent.mkdir(parents=True, exist_ok=True)
    UDEV_RULE.write_text('SUBSYSTEM=="block", KERNEL=="dm-[0-9]*", ENV{DM_NAME}=="luks-eph-*", '
                         'ENV{DM_NOSCAN}="1"\n')  # fmt: skip
    sh("udevadm", "control", "--reload")
    try:
        yield
    finally:
        UDEV_RULE.unlink(missing_ok=True)
        sh("udevadm", "control", "--reload", check=False)


# --- the kernel's log ----------------------------------------------------------------------
class KernelLog:
    """Kernel messages from now on (``/dev/kmsg`` opened at its end; never cleared), with our
    own step markers in between so that a failure shows which step the kernel complained in."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self.fd, 0, os.SEEK_END)

    def mark(self, step: str) -> None:
        with open("/dev/kmsg", "w") as f:
            f.write(f"luks-eph-test: {step}\n")

    def read(self) -> list[str]:
        lines: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                return lines
            except BrokenPipeError:  # overwritten before we read it: go on with the rest
                continue
            lines.append(record.decode(errors="replace").split(";", 1)[-1].split("\n", 1)[0])

    def assert_clean(
        self,
        devices: set[str],
        probed: Collection[int] = frozenset(),
        explain: Callable[[list[int]], str] | None = None,
    ) -> None:
        """No error about ``devices`` since the last call, but the AEAD errors of our own
        probe at ``probed`` sectors (512-byte units). ``explain`` tells what the sectors of
        the failed reads hold, for the failure message."""
        lines = self.read()
        bad = errors_about(lines, devices, probed)
        if not bad:
            return
        sectors = sorted({int(m.group(1)) for line in bad if (m := AEAD.search(line))})
        why = explain(sectors) if explain and sectors else ""
        raise AssertionError(
            f"kernel errors for {sorted(devices)}:\n  " + "\n  ".join(bad)
            + "\nwhole log since the last check:\n  " + "\n  ".join(lines) + why
        )  # fmt: skip

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def kmsg() -> Iterator[KernelLog]:
    log = KernelLog()
    yield log
    log.close()


def settle() -> None:
    """Let udev finish its work on our devices, so what follows is ours alone."""
    if shutil.which("udevadm") and os.path.exists("/run/udev/control"):
        sh("udevadm", "settle", "--timeout=120", check=False)


def knames(mapping: str) -> set[str]:
    """Kernel names (dm-N) of the crypt mapping and the dm-integrity device under it."""
    found = set()
    for entry in glob.glob("/sys/block/dm-*/dm/name"):
        with open(entry) as f:
            if f.read().strip() in (mapping, f"{mapping}_dif"):
                found.add(entry.split(os.sep)[3])
    return found


def errors_about(
    lines: list[str], devices: set[str], probed: Collection[int] = frozenset()
) -> list[str]:
    """Error messages that name one of ``devices`` (or say messages were suppressed), less the
    AEAD errors at ``probed`` sectors, which our own probe caused."""
    ours = re.compile(r"\b(" + "|".join(map(re.escape, sorted(devices))) + r")\b")
    bad = []
    for line in lines:
        if not (ours.search(line) or "suppressed" in line) or not ERROR.search(line):
            continue
        aead = AEAD.search(line)
        if aead and int(aead.group(1)) in probed:
            continue
        bad.append(line)
    return bad


# --- reading the raw device (never writing it) ---------------------------------------------
def read_block(device: str, offset: int) -> bytes | int:
    """One 4 KiB block with O_DIRECT: its bytes, or the errno of the failed read."""
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
    try:
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        buf.close()
        os.close(fd)


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def probe_unwritten(device: str) -> dict[int, int]:
    """Read a few high blocks; return {offset: errno} of those that failed."""
    size = device_size(device)
    failed = {}
    for fraction in PROBE_AT:
        offset = int(size * fraction) // BLOCK * BLOCK
        result = read_block(device, offset)
        if isinstance(result, int):
            failed[offset] = result
    return failed


def assert_integrity_stack(mapping: str) -> None:
    table = sh("dmsetup", "table", mapping)
    assert "hmac(sha256)" in table and "integrity:" in table, table
    assert "integrity" in sh("dmsetup", "table", f"{mapping}_dif")


def assert_not_wiped(kmsg: KernelLog, names: Names, devices: set[str]) -> None:
    """The format skipped the wipe: untouched high blocks fail to read. Those reads are ours:
    the kernel log since then may hold their AEAD errors, and nothing else."""
    failed = probe_unwritten(names.mapper_device)
    assert failed, "every probed block read back: the device was wiped at format time"
    assert set(failed.values()) <= set(UNWRITTEN), failed
    kmsg.assert_clean(devices, probed={offset // 512 for offset in failed})


# --- using the filesystem ------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def write_and_read_back(root: str, big_mib: int = 50) -> None:
    """A big file, many small ones in many directories (ext4 spreads directories over its
    groups), a preallocated file written in its middle, a sparse one; all fsynced, then read
    back from the device after dropping the caches."""
    expected: dict[str, str] = {}

    def put(rel: str, data: bytes, offset: int = 0, mode: str = "wb") -> None:
        path = Path(root, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, mode) as f:
            f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    chunk = os.urandom(MiB)
    with open(Path(root, "big"), "wb") as f:
        for i in range(big_mib):
            f.write(chunk[i:] + chunk[:i])
        f.flush()
        os.fsync(f.fileno())
    expected["big"] = hashlib.sha256(
        b"".join(chunk[i:] + chunk[:i] for i in range(big_mib))
    ).hexdigest()
    for j in range(40):
        for i in range(10):
            data = f"{j}/{i} ".encode() * (i + 1)
            put(f"d{j:02d}/f{i}", data)
            expected[f"d{j:02d}/f{i}"] = hashlib.sha256(data).hexdigest()
    fd = os.open(Path(root, "prealloc"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 8 * MiB)
    finally:
        os.close(fd)
    middle = os.urandom(5000)
    put("prealloc", middle, offset=3 * MiB + 123, mode="r+b")
    expected["prealloc"] = hashlib.sha256(
        bytes(3 * MiB + 123) + middle + bytes(8 * MiB - 3 * MiB - 123 - 5000)
    ).hexdigest()
    tail = os.urandom(3 * BLOCK)
    put("sparse", tail, offset=1000 * BLOCK)
    expected["sparse"] = hashlib.sha256(bytes(1000 * BLOCK) + tail).hexdigest()
    drop_caches()
    for rel, digest in expected.items():
        assert hashlib.sha256(Path(root, rel).read_bytes()).hexdigest() == digest, rel


def fsck(device: str, fs_type: str) -> str:
    """Offline check, read-only (e2fsck -fn / xfs_repair -n); returns its output.

    Readahead would read more than fsck asks for: the kernel's own on the block device (a
    buffered read of a metadata block also fetches the next 128 KiB, free blocks and the
    unwritten extents of preallocated files among them) and e2fsck's (the bitmaps and inode
    tables of every group, also of those ext4 marks uninitialised: never written by mkfs, never
    read by the kernel or by e2fsck itself). On an unwiped device such prefetches fail, silently
    for fsck but loudly in the kernel log. Without readahead, fsck reads exactly what it checks.
    """
    sh("blockdev", "--setra", "0", device)  # a setting of our own device, torn down next
    argv = (["e2fsck", "-fn", "-E", "readahead_kb=0", device] if fs_type == "ext4"
            else ["xfs_repair", "-n", device])  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1200, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{out}"
    assert not re.search(r"I/O error|Input/output|multibyte|read failed|corrupt", out, re.I), out
    return out


def ext4_errors(devices: set[str]) -> int:
    total = 0
    for kname in devices:
        with contextlib.suppress(OSError):
            total += int(Path(f"/sys/fs/ext4/{kname}/errors_count").read_text().strip() or 0)
    return total


def ext4_owners(device: str) -> Callable[[list[int]], str]:
    """What the 4 KiB blocks at these dm sectors are, as debugfs (read-only) sees them."""

    def explain(sectors: list[int]) -> str:
        blocks = " ".join(str(sector * 512 // BLOCK) for sector in sectors)
        out = sh("debugfs", "-R", f"icheck {blocks}", device, check=False)
        inodes = [f.split()[1] for f in out.splitlines()[1:] if f.split()[1:2] != ["<block"]]
        if inodes:
            out += sh("debugfs", "-R", "ncheck " + " ".join(inodes), device, check=False)
        out += sh("dumpe2fs", device, check=False)[:6000]
        return f"\nblocks {blocks} (debugfs icheck/ncheck, dumpe2fs):\n{out}"

    return explain


@pytest.fixture
def undo(d: Driver) -> Iterator[list[Callable[[], None]]]:
    """Teardown steps a test registers; run (best effort, last first) even when it failed, so
    that a failure leaves nothing behind for the next test."""
    steps: list[Callable[[], None]] = []
    yield steps
    for step in reversed(steps):
        with contextlib.suppress(Exception):
            step()


# --- the tests -----------------------------------------------------------------------------
@pytest.mark.parametrize(("fs_type", "size"), [("ext4", "256Mi"), ("xfs", "320Mi")])
def test_inline_integrity_filesystem_skips_the_wipe_and_stays_sound(
    d: Driver, kmsg: KernelLog, undo: list[Callable[[], None]], fs_type: str, size: str
) -> None:
    pod = f"pod-int-{fs_type}"
    undo.append(lambda: d.unpublish(pod))
    kmsg.mark("publish")
    target = d.publish(pod, attributes={"size": size, **INTEGRITY}, fs_type=fs_type)
    names = d.names(pod)
    settle()
    devices = knames(names.mapping)
    assert len(devices) == 2, devices
    assert_integrity_stack(names.mapping)
    explain = ext4_owners(names.mapper_device) if fs_type == "ext4" else None
    kmsg.assert_clean(devices)  # format, open, mkfs, mount read no sector they had not written
    kmsg.mark("probe")
    assert_not_wiped(kmsg, names, devices)

    kmsg.mark("write and read back")
    write_and_read_back(target)
    assert not d.k.stats(pod, "scratch").volume_condition.abnormal
    assert ext4_errors(devices) == 0
    kmsg.assert_clean(devices)
    # fsck needs the filesystem unmounted while the mapping stays open: unmount the pod's
    # target ourselves; unpublish must still finish the teardown after that
    kmsg.mark("umount")
    sh("umount", target)
    drop_caches()
    kmsg.assert_clean(devices)
    kmsg.mark("fsck")
    fsck(names.mapper_device, fs_type)
    kmsg.assert_clean(devices, explain=explain)
    d.unpublish(pod)
    assert leftovers(d, pod) == []


def test_staged_integrity_filesystem_skips_the_wipe_and_stays_sound(
    d: Driver, kmsg: KernelLog, undo: list[Callable[[], None]]
) -> None:
    pv = d.p.create("pvc-int", NODE, 256 * MiB, parameters=INTEGRITY)
    undo += [lambda: d.p.delete(pv.volume_id), lambda: d.k.unstage(pv),
             lambda: d.k.unpublish_pvc(pv, "pod-a")]  # fmt: skip
    names = Names.of(pv.volume_id, str(d.data_dir), str(d.state_dir))
    kmsg.mark("stage")
    staging = d.k.stage(pv)
    settle()
    devices = knames(names.mapping)
    assert_integrity_stack(names.mapping)
    kmsg.assert_clean(devices)
    kmsg.mark("probe")
    assert_not_wiped(kmsg, names, devices)

    kmsg.mark("publish, write and read back")
    target = d.k.publish_pvc(pv, "pod-a")
    write_and_read_back(target, big_mib=16)
    d.k.unpublish_pvc(pv, "pod-a")
    assert target not in mountpoints()
    kmsg.assert_clean(devices)
    kmsg.mark("umount")
    sh("umount", staging)  # now nothing has the filesystem mounted: check it
    drop_caches()
    kmsg.assert_clean(devices)
    kmsg.mark("fsck")
    fsck(names.mapper_device, "ext4")
    kmsg.assert_clean(devices, explain=ext4_owners(names.mapper_device))
    d.k.unstage(pv)
    d.p.delete(pv.volume_id)
    assert volume_leftovers(d, pv) == []


def test_block_integrity_pvc_is_wiped(
    d: Driver, kmsg: KernelLog, undo: list[Callable[[], None]]
) -> None:
    pv: PvcVolume = d.p.create("pvc-int-block", NODE, 64 * MiB, parameters=INTEGRITY,
                               block=True)  # fmt: skip
    undo += [lambda: d.p.delete(pv.volume_id), lambda: d.k.unstage(pv),
             lambda: d.k.unpublish_pvc(pv, "pod-a")]  # fmt: skip
    names = Names.of(pv.volume_id, str(d.data_dir), str(d.state_dir))
    d.k.stage(pv)
    device = d.k.publish_pvc(pv, "pod-a")
    settle()
    devices = knames(names.mapping)
    assert_integrity_stack(names.mapping)
    size = device_size(device)
    assert 60 * MiB < size <= 64 * MiB  # dm-integrity keeps its tags and journal in the volume
    spread = (0.0, 1 / 3, 0.5, *PROBE_AT)
    offsets = sorted({BLOCK, size - 5 * BLOCK, size - BLOCK,
                      *(int(size * f) // BLOCK * BLOCK for f in spread)})  # fmt: skip
    for offset in offsets:
        result = read_block(device, offset)
        assert not isinstance(result, int), f"read at {offset} failed: {os.strerror(result)}"
        assert result == bytes(BLOCK), f"a wiped device reads zeros, not so at {offset}"
    kmsg.assert_clean(devices)
    d.k.unpublish_pvc(pv, "pod-a")
    d.k.unstage(pv)
    d.p.delete(pv.volume_id)
    assert volume_leftovers(d, pv) == []
