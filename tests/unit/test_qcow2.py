"""qcow2 backing on the fake host, over real gRPC: the image is created with qemu-img, served by
qemu-storage-daemon as an NBD export named like the mapping, and attached as /dev/nbdN; the same
LUKS2 path follows. The NBD server is not the driver's: a driver restart re-adopts the device."""

from __future__ import annotations

import grpc
import pytest

from csi.backings.qcow2 import QCOW2_METADATA_BYTES
from csi.journal import PUBLISHED, STAGED
from csi.params import VolumeSpec
from csi.steps import PUBLISH_STEPS, TEARDOWN_STEPS
from tests.unit.harness import Harness, fails

MiB = 1024**2
QCOW2 = {"size": "64Mi", "backing": "qcow2"}


def assert_live_qcow2(h: Harness, pod: str = "pod-a") -> str:
    """One published qcow2 volume: image, export, NBD device, mapping over it, mount."""
    names = h.names(pod)
    host = h.host
    assert host.qcow2_sizes[names.backing] == 64 * MiB
    assert host.exports == {names.mapping: names.backing}
    [(device, export)] = host.nbds.items()
    assert export == names.mapping and device.startswith("/dev/nbd")
    assert host.loops == {}
    assert host.mappings == {names.mapping: device}
    assert host.mounts[h.target(pod)].source == names.mapper_device
    assert h.record(h.volume_id(pod)).state == PUBLISHED
    stats = h.k.stats(pod, "scratch")
    assert stats.volume_condition.abnormal is False, stats.volume_condition.message
    return device


def test_publish_write_unpublish_leaves_nothing(h: Harness) -> None:
    h.publish(attributes=QCOW2)
    assert_live_qcow2(h)
    assert any(c.startswith("qcow2_create") for c in h.host.calls)
    assert not any(c.startswith("create_backing") for c in h.host.calls)
    h.unpublish()
    assert h.leftovers() == []


def test_publish_is_idempotent_and_keeps_the_device(h: Harness) -> None:
    request = h.publish(attributes=QCOW2)
    device = assert_live_qcow2(h)
    h.host.calls.clear()
    h.node.NodePublishVolume(request, timeout=30)
    assert not any(c.startswith(("nbd_attach", "qcow2_create", "luks_format"))
                   for c in h.host.calls)  # fmt: skip
    assert assert_live_qcow2(h) == device


@pytest.mark.parametrize(("preallocate", "allocated"), [("true", 64 * MiB), ("false", 0)])
def test_preallocation_reaches_the_image(h: Harness, preallocate: str, allocated: int) -> None:
    h.publish(attributes={**QCOW2, "preallocate": preallocate})
    image = h.host.files[h.names().backing]
    assert image.allocated - 256 * 1024 == allocated  # the fake's metadata plus the data


def test_refused_up_front_without_qemu_storage_daemon(h: Harness) -> None:
    h.host.qsd_running = False
    request = h.publish_request(attributes=QCOW2)
    h.host.calls.clear()
    details = fails(lambda: h.node.NodePublishVolume(request, timeout=30),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "qcow2" in details and "qemu-storage-daemon" in details
    assert h.leftovers() == []
    assert h.host.calls == []  # nothing reserved, created or attached
    h.publish(attributes={"size": "64Mi"})  # loop volumes are unaffected


def test_attach_failing_midway_rolls_back(h: Harness) -> None:
    h.host.fail("nbd_attach")
    request = h.publish_request(attributes=QCOW2)
    fails(lambda: h.node.NodePublishVolume(request, timeout=30), grpc.StatusCode.INTERNAL)
    assert h.leftovers() == []


@pytest.mark.parametrize("step", ["qcow2_create", "luks_format", "crypt_open", "mkfs", "mount"])
def test_failed_host_step_rolls_back(h: Harness, step: str) -> None:
    h.host.fail(step)
    request = h.publish_request(attributes=QCOW2)
    with pytest.raises(grpc.RpcError):
        h.node.NodePublishVolume(request, timeout=30)
    assert h.leftovers() == []
    h.publish(attributes=QCOW2)  # the retry works
    assert_live_qcow2(h)


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_crash_after_each_publish_step_recovers(h: Harness, step: str) -> None:
    hook = h.crash_after(step)
    request = h.publish_request(attributes=QCOW2)
    h.call_until_crash(h.node.NodePublishVolume, request, hook)
    report = h.recover()
    if step == "record":  # the publish finished: the volume is re-adopted as it is
        assert report.rolled_back == []
        assert_live_qcow2(h)
    else:
        assert h.leftovers() == []
    h.node.NodePublishVolume(request, timeout=30)
    assert_live_qcow2(h)
    h.unpublish()
    assert h.leftovers() == []


@pytest.mark.parametrize("step", TEARDOWN_STEPS)
def test_crash_after_each_teardown_step_recovers(h: Harness, step: str) -> None:
    h.publish(attributes=QCOW2)
    hook = h.crash_after(step)
    h.call_until_crash(h.node.NodeUnpublishVolume, h.unpublish_request(), hook)
    h.recover()
    h.unpublish()
    assert h.leftovers() == []


def test_driver_restart_re_adopts_a_live_volume(h: Harness) -> None:
    h.publish(attributes=QCOW2)
    device = assert_live_qcow2(h)
    h.kill()  # SIGKILL: the export and the kernel device are not the driver's, they stay
    report = h.recover()
    assert report.rolled_back == [] and report.orphans_removed == {}
    assert assert_live_qcow2(h) == device
    h.unpublish()
    assert h.leftovers() == []


def test_qemu_storage_daemon_restart_is_reported_and_cleaned_up(h: Harness) -> None:
    h.publish(attributes=QCOW2)
    h.host.restart_qsd()
    condition = h.k.stats("pod-a", "scratch").volume_condition
    assert condition.abnormal is True
    assert "qemu-storage-daemon" in condition.message
    h.host.calls.clear()
    h.unpublish()
    assert h.leftovers() == []
    # the dead device is disconnected before unmount: with no NBD timeout, its in-flight I/O
    # would otherwise never end and the unmount would hang
    steps = [c.split()[0] for c in h.host.calls]
    assert steps.index("nbd_detach") < steps.index("umount")


def test_image_and_export_without_record_are_removed_at_start_up(h: Harness) -> None:
    h.publish(attributes=QCOW2)
    h.stop()
    h.host.umount(h.target())
    h.lose_tmpfs()  # the journal is gone; the image, export and NBD device are not
    report = h.recover()
    assert report.orphans_removed == {"backing_without_record": 1}
    assert h.leftovers() == []


def test_export_whose_image_is_gone_is_removed_at_start_up(h: Harness) -> None:
    h.publish(attributes=QCOW2)
    names = h.names()
    h.stop()
    h.host.umount(h.target())
    h.lose_tmpfs()
    del h.host.files[names.backing]  # deleted while qemu-storage-daemon still held it open
    report = h.recover()
    assert report.orphans_removed == {"mapping_without_record": 1, "export_without_record": 1}
    assert h.leftovers() == []


def test_budget_counts_the_qcow2_tables(h: Harness) -> None:
    spec = VolumeSpec(size=64 * MiB, backing="qcow2")
    assert spec.disk_bytes == 64 * MiB + 64 * MiB // 4096 + QCOW2_METADATA_BYTES
    h.reconfigure(capacity=64 * MiB)  # fits a 64Mi loop volume exactly, not a 64Mi qcow2
    request = h.publish_request(attributes=QCOW2)
    details = fails(lambda: h.node.NodePublishVolume(request, timeout=30),
                    grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
    assert "budget" in details
    assert h.leftovers() == []
    h.publish(attributes={"size": "64Mi"})


# provisioned (PVC) qcow2 volumes -----------------------------------------------------------
def test_pvc_qcow2_stage_publish_unstage_delete(h: Harness) -> None:
    pv = h.provision(size=64 * MiB, parameters={"backing": "qcow2"})
    staging = h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    assert list(h.host.nbds.values()) == [names.mapping]
    assert h.host.mounts[staging].source == names.mapper_device
    assert h.record(pv.volume_id).state == STAGED
    target = h.k.publish_pvc(pv, "pod-a")
    assert h.host.mounts[target].source == names.mapper_device
    details = fails(lambda: h.k.expand(pv, 128 * MiB, "pod-a"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "qcow2" in details and "backing=loop" in details
    h.k.unpublish_pvc(pv, "pod-a")
    h.k.unstage(pv)
    assert h.host.exports == {} and h.host.nbds == {}
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def test_pvc_qcow2_create_refused_without_qemu_storage_daemon(h: Harness) -> None:
    h.host.qsd_running = False
    details = fails(lambda: h.provision(size=64 * MiB, parameters={"backing": "qcow2"}),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "qemu-storage-daemon" in details
    assert h.journal_files() == []


def test_metrics_count_qcow2_volumes(h: Harness) -> None:
    h.publish(attributes=QCOW2)
    usage = h.volumes.usage()
    assert usage.volumes == {("qcow2", "mount"): 1}
    assert usage.reserved == VolumeSpec(size=64 * MiB, backing="qcow2").disk_bytes


def test_loop_teardown_skips_qemu_storage_daemon(h: Harness) -> None:
    """A loop volume never had an export: its unpublish makes no round trip to qsd."""
    h.publish(attributes={"size": "64Mi"})
    h.host.calls.clear()
    h.unpublish()
    assert not any(c.startswith("nbd_detach") for c in h.host.calls)
    assert any(c.startswith("loop_detach") for c in h.host.calls)
    assert h.leftovers() == []


def test_a_failing_qsd_at_start_up_is_reported_not_fatal(h: Harness) -> None:
    h.publish(attributes={"size": "64Mi"})
    h.host.fail("nbd_exports")
    report = h.recover()
    assert any("qcow2 orphans not checked" in f for f in report.failures)
    assert h.k.stats("pod-a", "scratch").volume_condition.abnormal is False


def test_get_capacity_leaves_room_for_the_qcow2_tables(h: Harness) -> None:
    h.reconfigure(capacity=256 * MiB)
    loop_room, _ = h.provisioner.capacity("node-1", {})
    qcow2_room, _ = h.provisioner.capacity("node-1", {"backing": "qcow2"})
    assert loop_room == 256 * MiB
    assert qcow2_room < loop_room
    pv = h.provision("pvc-max", size=qcow2_room, parameters={"backing": "qcow2"})
    assert h.volumes.usage().reserved <= 256 * MiB
    h.provisioner.delete(pv.volume_id)
