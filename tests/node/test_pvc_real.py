"""Provisioned (PVC) volumes on the real kernel, with the real driver process in ``all`` mode:
CreateVolume, stage, bind-publish into pods, unpublish, unstage, DeleteVolume; block volumes
shared by two pods; online expansion of ext4 and xfs while mounted and in use; the budget."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest

from csi.__main__ import CRASH_ENV
from csi.proto import csi_pb2 as pb
from csi.tools.kubelet import PvcVolume
from tests.node.conftest import (
    Driver,
    SmallFs,
    crypt_mappings,
    loops_on,
    mountpoints,
    names_of,
    record_state,
    rpc_code,
    sh,
    volume_leftovers,
)

MiB = 1024**2
NODE = "node-test"


def options_of(target: str) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        lines = [line.split() for line in f]
    return set(next(fields[5] for fields in reversed(lines) if fields[4] == target).split(","))


def finish(d: Driver, pv: PvcVolume) -> None:
    """Unstage and DeleteVolume; then nothing of the volume may be left anywhere."""
    d.k.unstage(pv)
    assert record_state(d, pv.volume_id) == "reserved"
    d.p.delete(pv.volume_id)
    assert volume_leftovers(d, pv) == []


def test_pvc_stage_publish_unpublish_unstage_leaves_nothing(d: Driver) -> None:
    pv = d.p.create("pvc-life", NODE, 64 * MiB)
    names = names_of(d, pv.volume_id)
    assert pv.volume_id.startswith(f"{NODE}/")
    assert record_state(d, pv.volume_id) == "reserved" and not os.path.exists(names.backing)

    staging = d.k.stage(pv)
    assert names.mapping in crypt_mappings() and staging in mountpoints()
    assert ":logon:" not in sh("dmsetup", "table", names.mapping)  # key in the table: can grow
    assert {"nosuid", "nodev", "rw"} <= options_of(staging)

    a = d.k.publish_pvc(pv, "pod-a")
    b = d.k.publish_pvc(pv, "pod-b", readonly=True)
    Path(a, "hello").write_text("from pod a")
    assert Path(b, "hello").read_text() == "from pod a"  # one filesystem, two pods
    with pytest.raises(OSError):
        Path(b, "nope").write_text("read-only bind")
    assert {"nosuid", "nodev", "rw"} <= options_of(a)
    assert {"nosuid", "nodev", "ro"} <= options_of(b)

    with pytest.raises(grpc.RpcError) as err:
        d.k.unstage(pv)
    assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert Path(a, "hello").read_text() == "from pod a"

    d.k.unpublish_pvc(pv, "pod-a")
    assert not os.path.exists(a) and a not in mountpoints()
    assert Path(b, "hello").read_text() == "from pod a"  # the other pod keeps its view
    d.k.unpublish_pvc(pv, "pod-b")
    d.k.unstage(pv)
    assert names.mapping not in crypt_mappings()
    assert not os.path.exists(names.backing) and not os.path.exists(names.header)
    assert [line for line in loops_on(d.data_dir) if names.backing in line] == []
    assert staging not in mountpoints()
    finish(d, pv)


def test_two_pods_share_a_staged_block_volume(d: Driver) -> None:
    pv = d.p.create("pvc-block", NODE, 64 * MiB, block=True)
    names = names_of(d, pv.volume_id)
    staging = d.k.stage(pv)
    assert staging not in mountpoints()  # a block volume is only opened at stage time
    a = d.k.publish_pvc(pv, "pod-a")
    b = d.k.publish_pvc(pv, "pod-b")
    device = os.stat(names.mapper_device).st_rdev
    for target in (a, b):
        st = os.stat(target)
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == device

    data = os.urandom(MiB)
    fd = os.open(a, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 64 * MiB
        os.pwrite(fd, data, 8 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    fd = os.open(b, os.O_RDONLY)
    try:
        assert os.pread(fd, MiB, 8 * MiB) == data  # written by one pod, read by the other
    finally:
        os.close(fd)
    assert data[:4096] not in Path(names.backing).read_bytes()  # ciphertext only on disk

    stats = d.k.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=pv.volume_id, volume_path=a), timeout=600
    )
    assert [(u.total, u.unit) for u in stats.usage] == [(64 * MiB, pb.VolumeUsage.BYTES)]
    d.k.unpublish_pvc(pv, "pod-a")
    assert not os.path.exists(a)
    d.k.unpublish_pvc(pv, "pod-b")
    finish(d, pv)


@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_online_expansion_while_mounted_keeps_data(d: Driver, fs_type: str) -> None:
    pv = d.p.create(f"pvc-grow-{fs_type}", NODE, 320 * MiB, fs_type=fs_type)
    names = names_of(d, pv.volume_id)
    d.k.stage(pv)
    target = d.k.publish_pvc(pv, "pod-a")
    blob = os.urandom(8 * MiB)
    Path(target, "blob").write_bytes(blob)
    before = os.statvfs(target)
    with open(Path(target, "held-open"), "wb") as held:  # a pod is using the volume
        held.write(b"before ")
        response = d.p.expand(pv.volume_id, 640 * MiB)
        assert (response.capacity_bytes, response.node_expansion_required) == (640 * MiB, True)
        assert d.k.expand(pv, 640 * MiB, "pod-a") == 640 * MiB
        held.write(b"after")
    after = os.statvfs(target)
    grown = (after.f_blocks - before.f_blocks) * after.f_frsize
    assert grown >= 300 * MiB, f"{fs_type} grew by {grown // MiB} MiB only"
    assert Path(target, "blob").read_bytes() == blob
    assert Path(target, "held-open").read_bytes() == b"before after"
    assert os.path.getsize(names.backing) == 640 * MiB
    assert int(sh("blockdev", "--getsize64", names.mapper_device)) == 640 * MiB
    fd = os.open(Path(target, "big"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, 450 * MiB)  # more than the whole volume held before
    finally:
        os.close(fd)
    stats = d.k.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=pv.volume_id, volume_path=target), timeout=600
    )
    # the filesystem's own total, less its metadata (ext4: 590 of 640 MiB, xfs: 576)
    assert stats.usage[0].total == after.f_blocks * after.f_frsize
    assert stats.usage[0].total > 540 * MiB and not stats.volume_condition.abnormal
    d.k.unpublish_pvc(pv, "pod-a")
    finish(d, pv)


def test_budget_used_up_is_resource_exhausted(base: Path, data_fs: SmallFs) -> None:
    d = Driver(base, data_fs.mountpoint, "--capacity", "128Mi", "--metrics-address", "",
               mode="all")  # fmt: skip
    d.start()
    try:
        assert d.p.capacity(NODE) == (128 * MiB, 128 * MiB)
        pv = d.p.create("pvc-b1", NODE, 96 * MiB)
        with pytest.raises(grpc.RpcError) as err:
            d.p.create("pvc-b2", NODE, 64 * MiB)
        assert rpc_code(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "budget" in str(err.value.details())
        assert d.p.capacity(NODE)[0] == 32 * MiB
        with pytest.raises(grpc.RpcError) as err:  # inline volumes count against it too
            d.publish("pod-inline", attributes={"size": "64Mi"})
        assert rpc_code(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        d.k.stage(pv)
        with pytest.raises(grpc.RpcError) as err:  # and so does growth
            d.p.expand(pv.volume_id, 160 * MiB)
        assert rpc_code(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        finish(d, pv)
        assert d.p.capacity(NODE)[0] == 128 * MiB
        again = d.p.create("pvc-b2", NODE, 64 * MiB)  # room again once released
        d.p.delete(again.volume_id)
    finally:
        d.cleanup()


def test_sigkill_during_stage_rolls_back_to_the_reservation(d: Driver) -> None:
    pv = d.p.create("pvc-crash", NODE, 64 * MiB)
    names = names_of(d, pv.volume_id)
    d.restart(env={CRASH_ENV: "open"})
    with pytest.raises(grpc.RpcError):
        d.k.stage(pv)
    assert d.wait_exit() == -9, "the fault hook should have killed the driver"
    assert names.mapping in crypt_mappings()  # the crash left an open mapping behind
    d.start()
    assert record_state(d, pv.volume_id) == "reserved"
    assert names.mapping not in crypt_mappings() and not os.path.exists(names.backing)
    d.k.stage(pv)
    target = d.k.publish_pvc(pv, "pod-a")
    Path(target, "after-crash").write_text("ok")
    d.k.unpublish_pvc(pv, "pod-a")
    finish(d, pv)
