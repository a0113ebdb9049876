"""backing=fscrypt on the real kernel, through the real driver process (``all`` mode).

A volume is a directory ``<data-dir>/fscrypt/<digest>`` under a v2 fscrypt policy with a key of
its own in the filesystem's keyring, sized by a project quota, bind-mounted into the pod. The
data dir here is plain ext4 (no encrypt, no project quota), so the driver mounts its own pool,
``<data-dir>/fscrypt.pool`` on a loop device at ``<data-dir>/fscrypt``.

What is checked, each time against the kernel rather than the driver's word: inline and PVC
publish, quota enforcement (EDQUOT/ENOSPC) without harm to a neighbour, stats from the quota,
online expansion, SIGKILL while a pod writes, a simulated reboot, nothing left after unpublish
(no directory, key status ABSENT, no quota limit, no record), no plaintext in the pool image
(with a plaintext control that the scan does find), and parameters that do not apply.

The key status comes from a small ioctl of our own (FS_IOC_GET_ENCRYPTION_KEY_STATUS, no key
material involved); project ids, policies and quotas from the driver's host layer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.host.linux import LinuxHost
from csi.proto import csi_pb2 as pb
from csi.tools.kubelet import Kubelet
from tests.node.conftest import (
    Driver,
    SmallFs,
    loops_of,
    mount_fields,
    mountpoints,
    names_of,
    release_pool,
    rpc_code,
    sh,
)

MiB = 1024**2
NODE = "node-test"
FSCRYPT = {"backing": "fscrypt"}
HOST = LinuxHost()

# linux/fscrypt.h
FS_IOC_GET_ENCRYPTION_KEY_STATUS = 0xC080661A
FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER = 2
STATUS_NAMES = {1: "absent", 2: "present", 3: "incompletely removed"}
ABSENT, PRESENT = 1, 2


# --- the kernel's side ----------------------------------------------------------------------
def quota_missing() -> str | None:
    """Why this kernel cannot hold fscrypt volumes with project quotas, or None: an ext4 image
    with encrypt,project,quota must mount read-write (a kernel without quota support refuses)."""
    if not os.path.exists("/sys/fs/ext4/features/encryption"):
        return "the kernel's ext4 has no encryption (/sys/fs/ext4/features/encryption)"
    probe = Path("/tmp") / f"quota-probe-{uuid.uuid4().hex[:8]}"
    image, point = probe.with_suffix(".img"), probe
    point.mkdir()
    try:
        sh("truncate", "-s", "64M", str(image))
        sh("mkfs.ext4", "-q", "-F", "-O", "encrypt,project,quota", str(image))
        mounted = subprocess.run(
            ["mount", "-o", "loop,prjquota", str(image), str(point)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if mounted.returncode != 0:
            return (
                "the kernel has no quota support: ext4 refuses a read-write mount with the "
                f"project/quota features ({mounted.stderr.strip()})"
            )
        sh("umount", str(point))
        return None
    finally:
        with contextlib.suppress(OSError):
            point.rmdir()
        image.unlink(missing_ok=True)


def key_status(root: Path, identifier: str) -> int:
    """FS_IOC_GET_ENCRYPTION_KEY_STATUS on ``root``'s filesystem: 1 absent, 2 present, 3
    incompletely removed. The argument is 128 bytes: the key specifier (type, reserved, 32
    bytes of identifier space), 6 reserved words, then status at offset 64."""
    arg = bytearray(128)
    struct.pack_into("<II", arg, 0, FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER, 0)
    arg[8:24] = bytes.fromhex(identifier)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, FS_IOC_GET_ENCRYPTION_KEY_STATUS, arg)  # an identifier, not a key
    finally:
        os.close(fd)
    status: int = struct.unpack_from("<I", arg, 64)[0]
    return status


def options_of(path: Path | str) -> set[str]:
    fields = mount_fields(path)
    assert fields is not None, f"{path} is not a mount point"
    return set(fields[5].split(","))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def scan(image: Path, needles: dict[str, bytes]) -> set[str]:
    """The names of the ``needles`` found anywhere in the allocated extents of ``image`` (the
    pool image is sparse: holes are skipped with SEEK_DATA/SEEK_HOLE)."""
    found: set[str] = set()
    overlap = max(len(n) for n in needles.values()) - 1
    chunk = 8 * MiB
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        end = os.fstat(fd).st_size
        offset = 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after offset
                    break
                raise
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            tail = b""
            pos = start
            while pos < stop:
                data = os.pread(fd, min(chunk, stop - pos), pos)
                if not data:
                    break
                window = tail + data
                for name, needle in needles.items():
                    if needle in window:
                        found.add(name)
                tail = window[-overlap:] if overlap else b""
                pos += len(data)
            offset = stop
    finally:
        os.close(fd)
    return found


POD_WRITER = """
import errno, os, sys
path, limit = sys.argv[1], int(sys.argv[2])
block = os.urandom(1 << 20)
written, error = 0, None
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
try:
    while written < limit:
        view = memoryview(block)[: min(len(block), limit - written)]
        while view:
            n = os.write(fd, view)
            written += n
            view = view[n:]
    os.fsync(fd)
except OSError as exc:
    error = exc.errno
finally:
    os.close(fd)
effective = next(l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:"))
print(effective, written, error if error is not None else "")
"""
CAP_SYS_RESOURCE = 24


def write_until_full(path: Path, limit: int) -> tuple[int, OSError | None]:
    """Write 1 MiB blocks to ``path`` up to ``limit`` bytes, then fsync, as a pod does: from a
    process without CAP_SYS_RESOURCE (with it, the kernel ignores quota hard limits, so a test
    run as root would write past any size). Returns (bytes the kernel took, the error that
    stopped it, if any)."""
    proc = subprocess.run(
        ["setpriv", "--bounding-set", "-sys_resource", "--",
         sys.executable, "-c", POD_WRITER, str(path), str(limit)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    capabilities, written, code = [*proc.stdout.strip().split(" "), ""][:3]
    assert not int(capabilities, 16) & (1 << CAP_SYS_RESOURCE), "the writer kept CAP_SYS_RESOURCE"
    error = OSError(int(code), os.strerror(int(code))) if code else None
    return int(written), error


def write_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes, fsync; their sha256."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the driver's side ----------------------------------------------------------------------
def pool_root(d: Driver) -> Path:
    return d.data_dir / "fscrypt"


def pool_image(d: Driver) -> Path:
    return d.data_dir / "fscrypt.pool"


def volume_dir(d: Driver, volume_id: str) -> Path:
    return pool_root(d) / names_of(d, volume_id).digest


def inline_id(pod: str, name: str = "scratch") -> str:
    return Kubelet.volume_id(pod, name)


def record_of(d: Driver, volume_id: str) -> dict[str, Any] | None:
    path = d.state_dir / "volumes" / f"{names_of(d, volume_id).digest}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def details_of(d: Driver, volume_id: str) -> tuple[str, int]:
    """(key identifier, project id) from the volume's journal record."""
    record = record_of(d, volume_id)
    assert record is not None, f"no journal record for {volume_id}"
    details = record.get("details") or {}
    identifier, project = details.get("key_identifier"), details.get("project")
    assert isinstance(identifier, str) and re.fullmatch(r"[0-9a-f]{32}", identifier), details
    assert project is not None and int(project) > 0, details
    return identifier, int(project)


def inode_limit(size: int) -> int:
    return max(1024, size // 16384)


def assert_live(d: Driver, volume_id: str, size: int) -> tuple[Path, str, int]:
    """A published volume as the design has it: its directory on the mounted pool, under a v2
    policy with the recorded key present, its project id and hard limits. Returns (directory,
    key identifier, project)."""
    root = pool_root(d)
    assert mount_fields(root) is not None, f"the pool is not mounted at {root}:\n{d.log_tail()}"
    directory = volume_dir(d, volume_id)
    assert directory.is_dir(), f"no volume directory {directory}"
    identifier, project = details_of(d, volume_id)
    assert HOST.fscrypt_policy_of(str(directory)) == identifier
    assert STATUS_NAMES.get(key_status(root, identifier)) == "present"
    assert HOST.dir_project(str(directory)) == project
    quota = HOST.quota_get(str(root), project)
    assert (quota.bytes_limit, quota.inodes_limit) == (size, inode_limit(size)), quota
    return directory, identifier, project


def fscrypt_leftovers(
    d: Driver, volume_id: str, identifier: str, project: int, targets: list[str]
) -> list[str]:
    """Everything a torn-down fscrypt volume could leave, as readable strings."""
    found = []
    directory = volume_dir(d, volume_id)
    if os.path.lexists(directory):
        found.append(f"directory {directory}")
    root = pool_root(d)
    if mount_fields(root) is not None:
        status = key_status(root, identifier)
        if status != ABSENT:
            found.append(f"key {identifier} {STATUS_NAMES.get(status, status)}")
        quota = HOST.quota_get(str(root), project)
        if quota.bytes_limit or quota.inodes_limit:
            found.append(f"quota limits of project {project}: {quota}")
        if quota.bytes_used or quota.inodes_used:
            found.append(f"quota usage of project {project}: {quota}")
    if record_of(d, volume_id) is not None:
        found.append(f"record of {volume_id}")
    points = mountpoints()
    for target in targets:
        if target in points:
            found.append(f"mount {target}")
    return found


# --- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fscrypt_data(base: Path) -> Iterator[SmallFs]:
    """A data dir of this module's own (plain ext4: the driver makes its pool on it), so the
    pool and its loop device go with it."""
    reason = quota_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: backing=fscrypt tests need {reason}")
        pytest.skip(f"backing=fscrypt needs project quotas: {reason}")
    fs = SmallFs(base, "fscrypt-data", 4 * 1024)
    yield fs
    release_pool(fs.mountpoint)
    fs.close()


@pytest.fixture
def d(base: Path, fscrypt_data: SmallFs) -> Iterator[Driver]:
    driver = Driver(base, fscrypt_data.mountpoint, "--metrics-address", "", mode="all")
    driver.start()
    yield driver
    driver.stop(60)
    scrub(driver)
    driver.cleanup()


def scrub(d: Driver) -> None:
    """Unmount whatever a failed test left bound from the pool under the kubelet root (later
    tests then start from a clean node; start-up removes the record-less directories)."""
    fields = mount_fields(pool_root(d))
    if fields is None:
        return
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        parts = line.split()
        if parts[2] == fields[2] and parts[4].startswith(str(d.kubelet_root) + "/"):
            sh("umount", "-l", parts[4], check=False)


# --- inline and PVC publish -----------------------------------------------------------------
def test_inline_publish_then_nothing_left(d: Driver) -> None:
    pod = "pod-fs-life"
    volume_id = inline_id(pod)
    target = d.publish(pod, attributes={"size": "64Mi", **FSCRYPT}, mount_flags=["noatime"])
    directory, identifier, project = assert_live(d, volume_id, 64 * MiB)
    record = record_of(d, volume_id)
    assert record is not None and record["state"] == "published"
    assert not re.search(r"[0-9a-f]{64}", json.dumps(record.get("details", {})))  # no key
    assert {"rw", "nosuid", "nodev", "noatime"} <= options_of(target)
    # the target is a bind of the volume's directory (same inode), not a directory of its own
    assert os.stat(target).st_ino == directory.stat().st_ino
    assert os.stat(target).st_dev == directory.stat().st_dev
    assert not os.path.exists(names_of(d, volume_id).backing)  # no backing file, no mapping
    Path(target, "sub").mkdir()
    Path(target, "sub", "f.txt").write_text("through the bind")
    assert (directory / "sub" / "f.txt").read_text() == "through the bind"
    assert HOST.dir_project(str(directory / "sub")) == project  # PROJINHERIT
    assert HOST.fscrypt_policy_of(str(directory / "sub")) == identifier  # inherited policy
    # while published, the leftover checks do see every object: so they can fail below
    assert len(fscrypt_leftovers(d, volume_id, identifier, project, [target])) >= 5

    d.unpublish(pod)
    assert fscrypt_leftovers(d, volume_id, identifier, project, [target]) == []
    assert not os.path.exists(target)
    assert mount_fields(pool_root(d)) is not None, "the pool stays mounted for the next volume"
    listing = subprocess.run(
        [sys.executable, "-m", "csi", "volumes", "--state-dir", str(d.state_dir),
         "--data-dir", str(d.data_dir)], capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "(no volumes on this node)" in listing.stdout


def test_pvc_stage_publish_unstage_delete(d: Driver) -> None:
    pv = d.p.create("pvc-fs-life", NODE, 64 * MiB, parameters=dict(FSCRYPT))
    record = record_of(d, pv.volume_id)
    assert record is not None and record["state"] == "reserved"
    assert not volume_dir(d, pv.volume_id).exists()  # nothing made before stage

    staging = d.k.stage(pv)
    directory, identifier, project = assert_live(d, pv.volume_id, 64 * MiB)
    assert record_of(d, pv.volume_id)["state"] == "staged"  # type: ignore[index]
    assert {"rw", "nosuid", "nodev"} <= options_of(staging)

    a = d.k.publish_pvc(pv, "pod-a")
    b = d.k.publish_pvc(pv, "pod-b", readonly=True)
    Path(a, "hello").write_text("from pod a")
    assert Path(b, "hello").read_text() == "from pod a"  # one directory, two pods
    assert (directory / "hello").read_text() == "from pod a"
    with pytest.raises(OSError):
        Path(b, "nope").write_text("read-only bind")
    assert {"nosuid", "nodev", "rw"} <= options_of(a)
    assert {"nosuid", "nodev", "ro"} <= options_of(b)

    with pytest.raises(grpc.RpcError) as err:
        d.k.unstage(pv)
    assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert Path(a, "hello").read_text() == "from pod a"
    assert STATUS_NAMES.get(key_status(pool_root(d), identifier)) == "present"

    d.k.unpublish_pvc(pv, "pod-a")
    assert not os.path.exists(a)
    assert Path(b, "hello").read_text() == "from pod a"  # the other pod keeps its view
    d.k.unpublish_pvc(pv, "pod-b")
    d.k.unstage(pv)
    assert record_of(d, pv.volume_id)["state"] == "reserved"  # type: ignore[index]
    assert staging not in mountpoints()
    d.p.delete(pv.volume_id)
    assert fscrypt_leftovers(d, pv.volume_id, identifier, project, [a, b, staging]) == []


# --- quota: enforcement, stats, expansion ---------------------------------------------------
def test_writes_past_the_size_fail_and_the_neighbour_is_unaffected(d: Driver) -> None:
    full = d.publish("pod-fs-full", attributes={"size": "32Mi", **FSCRYPT})
    other = d.publish("pod-fs-other", attributes={"size": "32Mi", **FSCRYPT})
    _, id_full, project_full = assert_live(d, inline_id("pod-fs-full"), 32 * MiB)
    _, id_other, project_other = assert_live(d, inline_id("pod-fs-other"), 32 * MiB)
    assert project_full != project_other and id_full != id_other

    written, error = write_until_full(Path(full, "big"), 64 * MiB)
    assert error is not None, f"{written >> 20} MiB written into a 32 MiB volume"
    assert error.errno in (errno.EDQUOT, errno.ENOSPC), error
    assert 24 * MiB <= written <= 32 * MiB, f"stopped after {written / MiB:.1f} MiB"
    _, small = write_until_full(Path(full, "more"), MiB)  # still full: a small file fails too
    assert small is not None and small.errno in (errno.EDQUOT, errno.ENOSPC), small

    assert write_until_full(Path(other, "fill"), 24 * MiB) == (24 * MiB, None)  # its own 32
    digest = write_file(Path(other, "blob"), 4 * MiB)
    drop_caches()
    assert sha256_of(Path(other, "blob")) == digest
    assert HOST.quota_get(str(pool_root(d)), project_other).bytes_used >= 28 * MiB

    os.unlink(Path(full, "big"))  # space given back: the full volume takes writes again
    Path(full, "more").unlink(missing_ok=True)
    assert write_until_full(Path(full, "again"), 16 * MiB) == (16 * MiB, None)

    d.unpublish("pod-fs-full")
    d.unpublish("pod-fs-other")
    assert fscrypt_leftovers(d, inline_id("pod-fs-full"), id_full, project_full, [full]) == []
    assert fscrypt_leftovers(d, inline_id("pod-fs-other"), id_other, project_other, [other]) == []


def usage_of(stats: pb.NodeGetVolumeStatsResponse, unit: int) -> pb.VolumeUsage:
    found = [u for u in stats.usage if u.unit == unit]
    assert len(found) == 1, f"usage {list(stats.usage)}"
    return found[0]


def test_stats_show_the_quota(d: Driver) -> None:
    pod = "pod-fs-stats"
    target = d.publish(pod, attributes={"size": "64Mi", **FSCRYPT})
    _, identifier, project = assert_live(d, inline_id(pod), 64 * MiB)
    write_file(Path(target, "blob"), 8 * MiB)
    for i in range(10):
        Path(target, f"small-{i}").write_text(str(i))
    os.sync()
    stats = d.k.stats(pod, "scratch")
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    space = usage_of(stats, pb.VolumeUsage.BYTES)
    assert 62 * MiB <= space.total <= 64 * MiB, space
    assert 8 * MiB <= space.used <= 10 * MiB, space
    assert abs(space.available - (space.total - space.used)) <= MiB, space
    inodes = usage_of(stats, pb.VolumeUsage.INODES)
    assert inodes.total == inode_limit(64 * MiB), inodes
    assert 11 <= inodes.used <= 20, inodes
    assert inodes.available == inodes.total - inodes.used, inodes
    quota = HOST.quota_get(str(pool_root(d)), project)
    assert space.used == quota.bytes_used and inodes.used == quota.inodes_used
    d.unpublish(pod)
    assert fscrypt_leftovers(d, inline_id(pod), identifier, project, [target]) == []


def test_expansion_of_a_staged_pvc_raises_the_limit(d: Driver) -> None:
    pv = d.p.create("pvc-fs-grow", NODE, 32 * MiB, parameters=dict(FSCRYPT))
    staging = d.k.stage(pv)
    target = d.k.publish_pvc(pv, "pod-a")
    _, identifier, project = assert_live(d, pv.volume_id, 32 * MiB)
    kept = write_file(Path(target, "kept"), 24 * MiB)
    written, error = write_until_full(Path(target, "more"), 16 * MiB)
    assert error is not None and error.errno in (errno.EDQUOT, errno.ENOSPC), (written, error)
    os.unlink(Path(target, "more"))

    with open(Path(target, "held-open"), "wb") as held:  # a pod is using the volume
        held.write(b"before ")
        response = d.p.expand(pv.volume_id, 64 * MiB)
        assert response.capacity_bytes == 64 * MiB
        assert d.k.expand(pv, 64 * MiB, "pod-a") == 64 * MiB
        held.write(b"after")
    quota = HOST.quota_get(str(pool_root(d)), project)
    assert (quota.bytes_limit, quota.inodes_limit) == (64 * MiB, inode_limit(64 * MiB)), quota
    assert details_of(d, pv.volume_id) == (identifier, project)  # same key, same project
    total = usage_of(d.k.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=pv.volume_id, volume_path=target), timeout=600
    ), pb.VolumeUsage.BYTES).total  # fmt: skip
    assert 62 * MiB <= total <= 64 * MiB
    written, error = write_until_full(Path(target, "more"), 16 * MiB)  # failed before: fits now
    assert error is None and written == 16 * MiB, (written, error)
    drop_caches()
    assert sha256_of(Path(target, "kept")) == kept
    assert Path(target, "held-open").read_bytes() == b"before after"

    d.k.unpublish_pvc(pv, "pod-a")
    d.k.unstage(pv)
    d.p.delete(pv.volume_id)
    assert fscrypt_leftovers(d, pv.volume_id, identifier, project, [target, staging]) == []


# --- busy, crash, reboot ----------------------------------------------------------------------
def test_busy_volume_is_not_torn_down(d: Driver) -> None:
    pod = "pod-fs-busy"
    target = d.publish(pod, attributes={"size": "32Mi", **FSCRYPT})
    directory, identifier, project = assert_live(d, inline_id(pod), 32 * MiB)
    Path(target, "keep.txt").write_text("precious")
    with open(Path(target, "keep.txt")) as held:
        with pytest.raises(grpc.RpcError) as err:
            d.unpublish(pod)
        assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        # nothing changed: still mounted, key present, data readable, record as it was
        assert mount_fields(target) is not None
        assert STATUS_NAMES.get(key_status(pool_root(d), identifier)) == "present"
        assert held.read() == "precious"
        assert Path(target, "keep.txt").read_text() == "precious"
        assert record_of(d, inline_id(pod))["state"] == "published"  # type: ignore[index]
        assert directory.is_dir()
    d.unpublish(pod)
    assert fscrypt_leftovers(d, inline_id(pod), identifier, project, [target]) == []


WRITER = """
import hashlib, os, sys, time
path, total = sys.argv[1], int(sys.argv[2])
h = hashlib.sha256()
with open(path, "wb") as f:
    for i in range(total):
        block = hashlib.sha256(str(i).encode()).digest() * 2048
        f.write(block); h.update(block)
        if i % 8 == 0:
            f.flush(); os.fsync(f.fileno())
        time.sleep(0.01)
    f.flush(); os.fsync(f.fileno())
print(h.hexdigest())
"""


def test_sigkill_while_writing_keeps_data_and_readopts(d: Driver) -> None:
    pod = "pod-fs-live"
    attributes = {"size": "128Mi", **FSCRYPT}
    target = d.publish(pod, attributes=attributes)
    _, identifier, project = assert_live(d, inline_id(pod), 128 * MiB)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, f"{target}/live.bin", "300"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        d.kill()
        assert mount_fields(pool_root(d)) is not None, "the pool went with the driver"
        assert mount_fields(target) is not None
        assert STATUS_NAMES.get(key_status(pool_root(d), identifier)) == "present"
        d.start()
        out, _ = writer.communicate(timeout=600)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, "the writer saw an I/O error"
    assert sha256_of(Path(target, "live.bin")) == out.strip()
    assert assert_live(d, inline_id(pod), 128 * MiB)[1:] == (identifier, project)
    # re-adopted: kubelet's repeated publish answers OK without a second bind
    assert d.publish(pod, attributes=attributes) == target
    assert [p for p in mountpoints() if p == target] == [target]
    stats = d.k.stats(pod, "scratch")
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    assert usage_of(stats, pb.VolumeUsage.BYTES).used >= 300 * 64 * 1024
    drop_caches()
    assert sha256_of(Path(target, "live.bin")) == out.strip()
    d.unpublish(pod)
    assert fscrypt_leftovers(d, inline_id(pod), identifier, project, [target]) == []


def test_simulated_reboot_deletes_locked_leftovers(d: Driver, base: Path) -> None:
    pod = "pod-fs-reboot"
    target = d.publish(pod, attributes={"size": "32Mi", **FSCRYPT})
    directory, identifier, project = assert_live(d, inline_id(pod), 32 * MiB)
    Path(target, "secret-name.txt").write_text("written before the reboot")
    d.kill()
    # what a reboot does: mounts and loop devices vanish (and the filesystem keyring with the
    # pool's superblock), the tmpfs state dir is empty
    sh("umount", target)
    sh("umount", str(pool_root(d)))
    for loop in loops_of(pool_image(d)):
        sh("losetup", "-d", loop)
    assert loops_of(pool_image(d)) == [] and mount_fields(pool_root(d)) is None
    shutil.rmtree(d.state_dir)
    # the leftover is really there, locked: its names are ciphertext without the key
    peek = Path(base) / f"peek-{uuid.uuid4().hex[:8]}"
    peek.mkdir()
    try:
        sh("mount", "-o", "loop,ro", str(pool_image(d)), str(peek))
        try:
            locked = peek / directory.name
            assert locked.is_dir(), "the volume's directory is not in the pool image"
            names = os.listdir(locked)
            assert len(names) == 1 and names != ["secret-name.txt"], names
        finally:
            sh("umount", str(peek))
    finally:
        peek.rmdir()
    for loop in loops_of(pool_image(d)):  # in case the ro mount's loop lingers
        sh("losetup", "-d", loop, check=False)

    d.start()
    assert mount_fields(pool_root(d)) is not None, (
        f"start-up did not mount the pool again:\n{d.log_tail()}"
    )
    assert len(loops_of(pool_image(d))) == 1
    assert not directory.exists(), f"start-up left the record-less {directory}:\n{d.log_tail()}"
    assert key_status(pool_root(d), identifier) == ABSENT
    d.unpublish(pod)  # kubelet's late NodeUnpublish
    assert not os.path.exists(target)
    left = fscrypt_leftovers(d, inline_id(pod), identifier, project, [target])
    assert left == [], f"after the reboot: {left}"
    # the pool works after its re-mount
    again = d.publish("pod-fs-after-reboot", attributes={"size": "32Mi", **FSCRYPT})
    _, id_after, project_after = assert_live(d, inline_id("pod-fs-after-reboot"), 32 * MiB)
    Path(again, "ok").write_text("ok")
    d.unpublish("pod-fs-after-reboot")
    assert fscrypt_leftovers(
        d, inline_id("pod-fs-after-reboot"), id_after, project_after, [again]
    ) == []  # fmt: skip


# --- encryption at rest ---------------------------------------------------------------------
def test_no_plaintext_in_the_pool_image(d: Driver) -> None:
    tag = uuid.uuid4().hex
    marker = f"fscrypt-at-rest-content-{tag}\n".encode()
    name = f"fscrypt-at-rest-name-{tag}"
    link = f"fscrypt-at-rest-link-target-{tag}"
    control = f"fscrypt-at-rest-control-{tag}\n".encode()
    control_name = f"fscrypt-at-rest-control-name-{tag}"
    needles = {"content": marker, "name": name.encode(), "symlink target": link.encode()}
    controls = {"control content": control, "control name": control_name.encode()}

    pod = "pod-fs-rest"
    target = d.publish(pod, attributes={"size": "64Mi", **FSCRYPT})
    _, identifier, project = assert_live(d, inline_id(pod), 64 * MiB)
    Path(target, name).write_bytes(marker * 8192)  # ~0.6 MiB
    Path(target, "dir-" + tag).mkdir()
    Path(target, "dir-" + tag, "small").write_bytes(marker)
    os.symlink(link, Path(target, "link"))
    # the control: the same kind of data, written outside any encrypted directory of the pool
    plain = pool_root(d) / control_name
    plain.write_bytes(control * 8192)
    try:
        drop_caches()
        found = scan(pool_image(d), {**needles, **controls})
        assert set(controls) <= found, f"the scan missed the plaintext control: {found}"
        assert found & set(needles) == set(), (
            f"plaintext in the pool image while published: {found}"
        )

        d.unpublish(pod)
        assert fscrypt_leftovers(d, inline_id(pod), identifier, project, [target]) == []
        drop_caches()
        found = scan(pool_image(d), {**needles, **controls})
        assert set(controls) <= found, f"the scan missed the plaintext control: {found}"
        assert found & set(needles) == set(), (
            f"plaintext in the pool image after unpublish: {found}"
        )
    finally:
        plain.unlink(missing_ok=True)
        with contextlib.suppress(grpc.RpcError):
            d.unpublish(pod)


# --- parameters that do not apply -----------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "fs_type", "named"),
    [({"integrity": "hmac-sha256"}, "ext4", "integrity"),
     ({"header": "attached"}, "ext4", "header"),
     ({"cipher": "xchacha12,aes-adiantum-plain64"}, "ext4", "cipher"),
     ({"preallocate": "true"}, "ext4", "preallocate"),
     ({}, "xfs", "xfs")],
    ids=["integrity", "header", "cipher", "preallocate", "xfs"],
)  # fmt: skip
def test_parameters_that_do_not_apply_are_invalid_and_leave_nothing(
    d: Driver, extra: dict[str, str], fs_type: str, named: str
) -> None:
    pod = f"pod-fs-bad-{named}"
    before = sorted(os.listdir(pool_root(d))) if pool_root(d).is_dir() else []
    with pytest.raises(grpc.RpcError) as err:
        d.publish(pod, attributes={"size": "512Mi", **FSCRYPT, **extra}, fs_type=fs_type)
    assert rpc_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert named in str(err.value.details()), err.value.details()
    assert record_of(d, inline_id(pod)) is None
    assert not os.path.lexists(volume_dir(d, inline_id(pod)))
    assert mount_fields(d.k.target(pod, "scratch")) is None
    after = sorted(os.listdir(pool_root(d))) if pool_root(d).is_dir() else []
    assert after == before

    # the same as a StorageClass parameter: CreateVolume refuses it, nothing is reserved
    if extra:
        with pytest.raises(grpc.RpcError) as err:
            d.p.create(f"pvc-fs-bad-{named}", NODE, 32 * MiB, parameters={**FSCRYPT, **extra})
        assert rpc_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert named in str(err.value.details()), err.value.details()


def test_block_mode_is_invalid(d: Driver) -> None:
    before = d.p.capacity(NODE)
    with pytest.raises(grpc.RpcError) as err:
        d.p.create("pvc-fs-block", NODE, 32 * MiB, parameters=dict(FSCRYPT), block=True)
    assert rpc_code(err.value) == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "block" in str(err.value.details()).lower(), err.value.details()
    assert d.p.capacity(NODE) == before  # nothing reserved
