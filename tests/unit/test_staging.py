"""Provisioned volumes on the node over real gRPC (fake host): stage, publish into pods,
unpublish, unstage, block mode, online expansion, stats, busy and conflict rules."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from csi.journal import RESERVED, STAGED
from csi.proto import csi_pb2 as pb
from csi.tools.kubelet import PvcVolume
from tests.unit.harness import Harness, fails

MiB = 1024**2
GiB = 1024**3


def finish(h: Harness, pv: PvcVolume) -> None:
    """Unstage and delete: afterwards nothing at all may be left."""
    h.k.unstage(pv)
    assert h.record(pv.volume_id).state == RESERVED
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


# --- filesystem volumes -------------------------------------------------------------------
def test_stage_publish_unpublish_unstage_leaves_nothing(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    host = h.host
    assert host.files[names.backing].size == 64 * MiB
    assert host.keyring[names.mapping] is False  # key in the dm table: it can grow later
    assert host.filesystems[names.mapper_device] == "ext4"
    assert host.mounts[staging].source == names.mapper_device
    assert host.mounts[staging].options[:3] == ["rw", "nosuid", "nodev"]
    record = h.record(pv.volume_id)
    assert (record.state, record.staging_path, record.targets) == (STAGED, staging, {})

    a = h.k.publish_pvc(pv, "pod-a")
    b = h.k.publish_pvc(pv, "pod-b", readonly=True)
    assert host.mounts[a].source == host.mounts[b].source == names.mapper_device
    assert host.mounts[a].options == ["rw", "nosuid", "nodev"]
    assert host.mounts[b].options == ["ro", "nosuid", "nodev"]
    assert sorted(h.record(pv.volume_id).targets) == sorted([a, b])

    details = fails(lambda: h.k.unstage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    assert a in details and b in details
    h.k.unpublish_pvc(pv, "pod-a")
    assert a not in host.mounts and a not in host.dirs and b in host.mounts
    h.k.unpublish_pvc(pv, "pod-b")
    h.k.unpublish_pvc(pv, "pod-b")  # again: OK
    finish(h, pv)


def test_stage_and_publish_are_idempotent(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    h.host.calls.clear()
    h.k.stage(pv)
    assert h.host.calls == []
    target = h.k.publish_pvc(pv, "pod-a")
    h.host.calls.clear()
    h.k.publish_pvc(pv, "pod-a")
    assert h.host.calls == []
    assert list(h.record(pv.volume_id).targets) == [target]
    h.k.unpublish_pvc(pv, "pod-a")
    finish(h, pv)


def test_restage_remounts_a_lost_staging_mount(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    del h.host.mounts[staging]
    h.k.stage(pv)
    assert h.host.mounts[staging].source == h.volumes.names(pv.volume_id).mapper_device
    h.host.mappings.clear()  # the key is gone: the data cannot come back
    details = fails(lambda: h.k.stage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    assert "data is gone" in details


def test_stage_conflicts(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    other = h.k.stage_request(pv)
    other.staging_target_path += "-other"
    fails(lambda: h.k.node.NodeStageVolume(other, timeout=30), grpc.StatusCode.ALREADY_EXISTS)
    xfs = h.k.stage_request(dataclasses.replace(pv, fs_type="xfs"))
    assert "capability" in fails(lambda: h.k.node.NodeStageVolume(xfs, timeout=30),
                                 grpc.StatusCode.ALREADY_EXISTS)  # fmt: skip


def test_publish_rules(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    details = fails(lambda: h.k.publish_pvc(pv, "pod-a"), grpc.StatusCode.FAILED_PRECONDITION)
    assert "not staged" in details
    h.k.stage(pv)
    wrong = h.k.publish_pvc_request(pv, "pod-a")
    wrong.staging_target_path += "-other"
    fails(lambda: h.k.node.NodePublishVolume(wrong, timeout=30),
          grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    block = h.k.publish_pvc_request(dataclasses.replace(pv, block=True), "pod-a")
    block.staging_target_path = h.k.staging_path(pv)
    assert "block" in fails(lambda: h.k.node.NodePublishVolume(block, timeout=30),
                            grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    h.k.publish_pvc(pv, "pod-a")
    fails(lambda: h.k.publish_pvc(pv, "pod-a", readonly=True), grpc.StatusCode.ALREADY_EXISTS)
    outside = h.k.publish_pvc_request(pv, "pod-b")
    outside.target_path = "/etc/evil"
    fails(lambda: h.k.node.NodePublishVolume(outside, timeout=30),
          grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert len(h.record(pv.volume_id).targets) == 1
    h.k.unpublish_pvc(pv, "pod-a")
    finish(h, pv)


def test_publish_never_binds_an_unmounted_staging_dir(h: Harness) -> None:
    """A bind of the bare staging dir would put the pod's plaintext on the node's disk."""
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    del h.host.mounts[staging]  # someone unmounted it behind our back
    target = h.k.publish_pvc(pv, "pod-a")
    assert h.host.mounts[staging].source == names.mapper_device  # remounted first
    assert h.host.mounts[target].source == names.mapper_device
    del h.host.mounts[staging]
    del h.host.mounts[target]
    h.host.mappings.clear()  # and now the key is gone too
    details = fails(lambda: h.k.publish_pvc(pv, "pod-b"), grpc.StatusCode.FAILED_PRECONDITION)
    assert "data is gone" in details
    assert h.k.pvc_target(pv, "pod-b") not in h.host.mounts
    assert h.k.pvc_target(pv, "pod-b") not in h.record(pv.volume_id).targets


def test_failed_bind_is_undone(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    h.host.fail("bind_mount")
    fails(lambda: h.k.publish_pvc(pv, "pod-a"), grpc.StatusCode.INTERNAL)
    assert h.record(pv.volume_id).targets == {}
    assert h.k.pvc_target(pv, "pod-a") not in h.host.dirs
    finish(h, pv)  # nothing blocks the unstage


def test_unstage_and_unpublish_are_idempotent(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.unstage(pv)  # never staged: OK
    h.k.unpublish_pvc(pv, "pod-x")  # never published: OK
    h.k.stage(pv)
    h.k.unstage(pv)
    h.k.unstage(pv)
    assert h.record(pv.volume_id).state == RESERVED
    h.provisioner.delete(pv.volume_id)
    h.k.unstage(pv)  # even after the delete
    assert h.leftovers() == []


def test_busy_target_and_busy_staging_keep_the_volume(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    target = h.k.publish_pvc(pv, "pod-a")
    h.host.busy.add(target)
    assert "busy" in fails(lambda: h.k.unpublish_pvc(pv, "pod-a"),
                           grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert target in h.record(pv.volume_id).targets
    h.host.busy.clear()
    h.k.unpublish_pvc(pv, "pod-a")
    h.host.busy.add(staging)
    fails(lambda: h.k.unstage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    record = h.record(pv.volume_id)
    assert record.state == STAGED and h.host.mounts[staging]
    h.host.busy.clear()
    finish(h, pv)


def test_a_foreign_mount_of_the_mapping_blocks_unstage(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    h.host.dirs.add("/mnt/admin")
    h.host.mount(names.mapper_device, "/mnt/admin", "ext4", ["rw"])
    assert "/mnt/admin" in fails(lambda: h.k.unstage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    assert h.record(pv.volume_id).state == STAGED
    h.host.umount("/mnt/admin")
    finish(h, pv)


def test_failed_stage_rolls_back_to_reserved_and_retries(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.host.fail("mkfs")
    fails(lambda: h.k.stage(pv), grpc.StatusCode.INTERNAL)
    record = h.record(pv.volume_id)
    assert (record.state, record.staging_path) == (RESERVED, "")
    assert [f for f in h.host.files if not f.startswith(h.config.state_dir)] == []
    assert h.host.mappings == {} and h.host.loops == {}
    h.k.stage(pv)
    assert h.record(pv.volume_id).state == STAGED
    finish(h, pv)


def test_bad_staging_path_and_ids_leave_nothing(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    request = h.k.stage_request(pv)
    request.staging_target_path = "/var/tmp/stage"
    assert "kubelet root" in fails(lambda: h.k.node.NodeStageVolume(request, timeout=30),
                                   grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    request = h.k.stage_request(pv)
    request.volume_id = "csi-abc"  # an inline id cannot be staged
    fails(lambda: h.k.node.NodeStageVolume(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    request = h.k.stage_request(pv)
    request.volume_id = "node-1/../../etc"
    fails(lambda: h.k.node.NodeStageVolume(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    request = h.k.stage_request(pv)
    request.ClearField("volume_capability")
    fails(lambda: h.k.node.NodeStageVolume(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    assert h.record(pv.volume_id).state == RESERVED
    assert h.host.calls == []


def test_stage_without_record_reserves_again_from_the_context(h: Harness) -> None:
    """After a reboot tmpfs is empty; kubelet stages the PV again: a fresh, empty volume."""
    pv = h.provision(size=128 * MiB, parameters={"header": "attached"})
    h.lose_tmpfs()
    h.restart()
    assert h.journal_files() == []
    h.k.stage(pv)
    record = h.record(pv.volume_id)
    assert (record.state, record.spec.size, record.spec.header) == (STAGED, 128 * MiB, "attached")
    finish(h, pv)
    elsewhere = dataclasses.replace(pv, volume_id="node-2/" + "4" * 32)
    assert "node-2" in fails(lambda: h.k.stage(elsewhere), grpc.StatusCode.NOT_FOUND)


def test_stage_without_record_checks_the_context_and_capacity() -> None:
    h = Harness(mode="all", capacity=100 * MiB)
    try:
        pv = h.provision(size=64 * MiB)
        h.lose_tmpfs()
        h.restart()
        bad = dataclasses.replace(pv, context={**pv.context, "colour": "blue"})
        assert "colour" in fails(lambda: h.k.stage(bad), grpc.StatusCode.INVALID_ARGUMENT)
        h.publish(attributes={"size": "64Mi"})  # the room went to someone else meanwhile
        fails(lambda: h.k.stage(pv), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert len(h.journal_files()) == 1
    finally:
        h.close()


# --- block volumes ------------------------------------------------------------------------
def test_block_volume_two_pods_then_nothing_left(h: Harness) -> None:
    pv = h.provision(size=64 * MiB, block=True)
    staging = h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    assert names.mapping in h.host.mappings
    assert not any(c.startswith("mkfs") for c in h.host.calls)  # the pod gets the raw device
    assert staging not in h.host.mounts
    a = h.k.publish_pvc(pv, "pod-a")
    b = h.k.publish_pvc(pv, "pod-b")
    for target in (a, b):
        mount = h.host.mounts[target]
        assert mount.device == names.mapper_device and target in h.host.files
        assert mount.options == ["rw", "nosuid"]  # nodev would make the device unopenable
    stats = h.k.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=pv.volume_id, volume_path=a), timeout=30)  # fmt: skip
    assert [(u.total, u.unit) for u in stats.usage] == [(64 * MiB, pb.VolumeUsage.BYTES)]
    assert stats.volume_condition.abnormal is False
    fails(lambda: h.k.unstage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    h.k.unpublish_pvc(pv, "pod-a")
    assert a not in h.host.files and a not in h.host.mounts
    h.k.unpublish_pvc(pv, "pod-b")
    finish(h, pv)


def test_block_volume_counts_in_the_metrics_usage(h: Harness) -> None:
    h.provision("pvc-b", 64 * MiB, block=True)
    h.provision("pvc-m", 32 * MiB)
    usage = h.volumes.usage()
    assert usage.volumes == {("loop", "block"): 1, ("loop", "mount"): 1}
    assert usage.reserved == 96 * MiB and usage.provisioned == 96 * MiB
    assert usage.allocated == 0  # reserved, nothing written


# --- stats --------------------------------------------------------------------------------
def test_stats_of_staged_filesystem_volume(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    target = h.k.publish_pvc(pv, "pod-a")
    for path in (staging, target):
        stats = h.k.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
            volume_id=pv.volume_id, volume_path=path), timeout=30)  # fmt: skip
        assert stats.usage[0].total == 64 * MiB
        assert stats.volume_condition.message == "volume is healthy"
    fails(lambda: h.k.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=pv.volume_id, volume_path=target + "x"), timeout=30),
        grpc.StatusCode.NOT_FOUND)  # fmt: skip
    del h.host.mounts[target]
    stats = h.k.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=pv.volume_id, volume_path=target), timeout=30)  # fmt: skip
    assert stats.volume_condition.abnormal and "not mounted" in stats.volume_condition.message


# --- expansion ----------------------------------------------------------------------------
@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_online_expansion_grows_every_layer(h: Harness, fs_type: str) -> None:
    size = 320 * MiB
    pv = h.provision(size=size, fs_type=fs_type)
    h.k.stage(pv)
    target = h.k.publish_pvc(pv, "pod-a")
    names = h.volumes.names(pv.volume_id)
    assert h.k.expand(pv, 2 * size, "pod-a") == 2 * size
    host = h.host
    device = host.mappings[names.mapping]
    assert host.files[names.backing].size == 2 * size
    assert host.loop_sizes[device] == 2 * size
    assert host.mapping_sizes[names.mapping] == 2 * size
    assert host.fs_sizes[names.mapper_device] == 2 * size
    assert host.mounts[target].source == names.mapper_device  # still mounted, never unmounted
    assert not any(c.startswith(("umount", "crypt_close")) for c in host.calls)
    record = h.record(pv.volume_id)
    assert (record.spec.size, record.grow_to, record.charge) == (2 * size, 0, 2 * size)
    stats = h.k.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id=pv.volume_id, volume_path=target), timeout=30)  # fmt: skip
    assert stats.usage[0].total == 2 * size
    host.calls.clear()
    assert h.k.expand(pv, size, "pod-a") == 2 * size  # smaller: nothing to do
    assert host.calls == []
    h.k.unpublish_pvc(pv, "pod-a")
    finish(h, pv)


def test_expansion_of_attached_header_preallocated_and_block_volumes(h: Harness) -> None:
    pv = h.provision("pvc-a", 64 * MiB, parameters={"header": "attached", "preallocate": "true"})
    h.k.stage(pv)
    assert h.k.expand(pv, 128 * MiB) == 128 * MiB  # at the staging path
    names = h.volumes.names(pv.volume_id)
    backing = h.host.files[names.backing]
    assert (backing.size, backing.allocated) == (129 * MiB, 129 * MiB)  # +1 MiB of header
    assert h.host.mapping_sizes[names.mapping] == 128 * MiB
    finish(h, pv)
    block = h.provision("pvc-b", 64 * MiB, block=True)
    h.k.stage(block)
    h.k.publish_pvc(block, "pod-b")
    h.host.calls.clear()
    assert h.k.expand(block, 96 * MiB, "pod-b") == 96 * MiB
    request = pb.NodeExpandVolumeRequest(  # kubelet passes a device path of its own for block
        volume_id=block.volume_id, volume_path="/dev/kubelet-knows-this-one",
        capacity_range=pb.CapacityRange(required_bytes=112 * MiB))  # fmt: skip
    assert h.k.node.NodeExpandVolume(request, timeout=30).capacity_bytes == 112 * MiB
    names = h.volumes.names(block.volume_id)
    assert h.host.mapping_sizes[names.mapping] == 112 * MiB
    assert not any(c.startswith("fs_grow") for c in h.host.calls)
    h.k.unpublish_pvc(block, "pod-b")
    finish(h, block)


def test_expansion_refusals() -> None:
    h = Harness(mode="all", capacity=200 * MiB)
    try:
        pv = h.provision(size=64 * MiB)
        fails(lambda: h.k.expand(pv, 128 * MiB), grpc.StatusCode.FAILED_PRECONDITION)  # unstaged
        h.k.stage(pv)
        details = fails(lambda: h.k.expand(pv, 256 * MiB), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "budget" in details
        assert h.host.files[h.volumes.names(pv.volume_id).backing].size == 64 * MiB
        assert h.record(pv.volume_id).charge == 64 * MiB
        fails(lambda: h.k.expand(pv, 128 * MiB, "pod-zz"), grpc.StatusCode.NOT_FOUND)
        request = pb.NodeExpandVolumeRequest(volume_id=pv.volume_id,
                                             volume_path=h.k.staging_path(pv))  # fmt: skip
        fails(lambda: h.k.node.NodeExpandVolume(request, timeout=30),
              grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        fails(lambda: h.k.expand(pv, 2 * 1024**4), grpc.StatusCode.OUT_OF_RANGE)
        finish(h, pv)
        mac = h.provision("pvc-i", 64 * MiB, parameters={"integrity": "hmac-sha256"})
        h.k.stage(mac)
        assert "integrity" in fails(lambda: h.k.expand(mac, 128 * MiB),
                                    grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        finish(h, mac)
    finally:
        h.close()


def test_expansion_needs_a_key_held_in_the_dm_table(h: Harness) -> None:
    """A mapping that holds its key by keyring reference cannot be reloaded without the
    passphrase; the driver keeps none, so staged volumes must not be opened that way."""
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    h.host.keyring[names.mapping] = True  # what an older driver version would have done
    fails(lambda: h.k.expand(pv, 128 * MiB), grpc.StatusCode.INTERNAL)
    record = h.record(pv.volume_id)
    assert (record.spec.size, record.grow_to) == (64 * MiB, 128 * MiB)  # stays reserved
    h.host.keyring[names.mapping] = False
    assert h.k.expand(pv, 128 * MiB) == 128 * MiB  # the retry finishes the job
    finish(h, pv)


def test_unstage_after_expansion_reserved_but_not_done_releases_it_on_delete(h: Harness) -> None:
    h.host.free = 1 * GiB
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    h.provisioner.expand(pv.volume_id, 256 * MiB)
    h.k.unstage(pv)
    assert h.record(pv.volume_id).charge == 256 * MiB
    h.k.stage(pv)  # staged again: made at the size it was grown to
    assert h.host.files[h.volumes.names(pv.volume_id).backing].size == 256 * MiB
    assert h.record(pv.volume_id).spec.size == 256 * MiB
    finish(h, pv)
    assert h.provisioner.capacity("node-1")[0] == 1 * GiB


def test_reaper_ignores_provisioned_volumes(h: Harness) -> None:
    """A staged volume has no pod of its own: kubelet unpublishes, the reaper must not."""
    from csi.reaper import OrphanReaper

    class NoPods:
        def pods_on_node(self, node: str) -> set[str]:
            return {"someone-else"}

    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    h.k.publish_pvc(pv, "pod-a")
    reaper = OrphanReaper(h.volumes, NoPods(), "node-1", grace_seconds=0, clock=lambda: 0.0)
    assert reaper.run_once() == [] and reaper.run_once() == []
    assert h.record(pv.volume_id).state == STAGED


def test_a_ro_mount_flag_makes_the_pods_binds_ro_and_keeps_staging_rw(h: Harness) -> None:
    """The staging mount is the driver's: always rw (its root is fixed up, and online growth
    needs a writable filesystem); "ro" reaches each pod's bind."""
    pv = dataclasses.replace(h.provision(size=64 * MiB), mount_flags=("ro", "noatime"))
    staging = h.k.stage(pv)
    assert h.host.mounts[staging].options == ["rw", "nosuid", "nodev", "noatime"]
    assert f"set_volume_root {staging}" in h.host.calls
    target = h.k.publish_pvc(pv, "pod-a")
    assert h.host.mounts[target].options == ["ro", "nosuid", "nodev", "noatime"]
    h.k.unpublish_pvc(pv, "pod-a")
    finish(h, pv)
