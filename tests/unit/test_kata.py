"""Kata hand-off (kata=guest|host) through the driver's real gRPC server, on the fake host."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from csi.host import GUARD_SOURCE, DirectVolume
from csi.journal import Names
from csi.proto import csi_pb2 as pb
from tests.unit.harness import Harness, code_of, fails

MiB = 1024**2
GUEST = {"kata": "guest", "size": "64Mi"}
HOST = {"kata": "host", "size": "64Mi"}


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(mode="all", kata_direct_volume_root="/run/kata/direct-volumes")
    harness.host.dirs.add("/run/kata/direct-volumes")
    yield harness
    harness.close()


def root(h: Harness) -> str:
    return h.config.kata_direct_volume_root


def leftovers(h: Harness) -> list[str]:
    return [*h.leftovers(), *map(str, h.host.direct_volumes)]


def test_guest_mode_hands_over_a_raw_file_and_mounts_nothing_of_it(h: Harness) -> None:
    h.publish(attributes=GUEST, fs_group="2000", mount_flags=["noatime"])
    names, target = h.names(), h.target()
    host = h.host
    assert host.direct_volume_read(root(h), target) == DirectVolume(
        "directvol", names.backing, "ext4",
        {"encryptionKey": "ephemeral", "createFilesystem": "true", "fsGroup": "2000"},
        ["noatime"],
    )  # fmt: skip
    assert names.backing in host.files  # the raw disk: nothing on it, never opened here
    assert not (host.loops or host.mappings or host.luks or host.filesystems)
    assert list(host.mounts) == [target] and host.mounts[target].source == GUARD_SOURCE
    assert host.is_guarded(target)
    assert not any(c.startswith(("luks_format", "loop_attach", "mkfs", "mount ")) for c in
                   host.calls)  # fmt: skip
    assert host.seen_keys == []  # no key was ever made on the host
    h.unpublish()
    assert leftovers(h) == [] and not host.exists(target)
    h.unpublish()  # again: OK


def test_host_mode_hands_over_the_formatted_mapping_without_mounting_it(h: Harness) -> None:
    h.publish(attributes=HOST, readonly=True)
    names, target = h.names(), h.target()
    host = h.host
    volume = host.direct_volume_read(root(h), target)
    assert volume == DirectVolume("directvol", names.mapper_device, "ext4", {}, ["ro"])
    assert host.filesystems[names.mapper_device] == "ext4"  # the fstype it claims
    assert list(host.mounts) == [target] and host.is_guarded(target)  # only the guard
    h.unpublish()
    assert leftovers(h) == []


@pytest.mark.parametrize(
    ("attributes", "capability", "why"),
    [
        ({"kata": "guest", "backing": "qcow2"}, {}, "use backing=loop"),
        ({"kata": "guest", "backing": "fscrypt"}, {}, "cannot hand over"),
        ({"kata": "host", "backing": "fscrypt"}, {}, "backing=loop or backing=qcow2"),
        ({"kata": "guest"}, {"fs_type": "xfs"}, "always as ext4"),
        ({"kata": "guest", "integrity": "hmac-sha256"}, {}, "parameter integrity"),
        ({"kata": "guest", "header": "attached"}, {}, "parameter header"),
        ({"kata": "guest", "cipher": "xchacha12,aes-adiantum-plain64"}, {}, "parameter cipher"),
        ({"kata": "maybe"}, {}, "kata='maybe' is not supported"),
    ],
)
def test_what_a_hand_off_cannot_be_is_invalid_and_leaves_nothing(
    h: Harness, attributes: dict[str, str], capability: dict[str, str], why: str
) -> None:
    request = h.publish_request(attributes=attributes, **capability)
    message = fails(lambda: h.node.NodePublishVolume(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert why in message
    assert leftovers(h) == []


def test_block_volumes_cannot_be_handed_over(h: Harness) -> None:
    message = fails(lambda: h.provision(parameters={"kata": "guest"}, block=True),
                    grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert "block access is not supported" in message


def test_a_vm_still_holding_the_disk_refuses_unpublish_and_keeps_the_hand_off(
    h: Harness,
) -> None:
    h.publish(attributes=GUEST)
    names, target = h.names(), h.target()
    h.host.file_holders[names.backing] = ["pid 77 (qemu-system-x86)"]
    message = fails(lambda: h.node.NodeUnpublishVolume(h.unpublish_request()),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "qemu-system-x86" in message
    assert h.host.direct_volume_read(root(h), target) is not None and h.host.is_guarded(target)
    assert names.backing in h.host.files
    h.host.file_holders.clear()
    h.unpublish()
    assert leftovers(h) == []


def test_a_pvc_is_prepared_at_stage_and_handed_to_each_pod(h: Harness) -> None:
    pv = h.provision(parameters={"kata": "guest"})
    assert pv.volume_id.endswith(".kata")  # it can never grow: the controller knows from the id
    staging = h.k.stage(pv)
    names = Names.of(pv.volume_id, h.config.data_dir, h.config.state_dir)
    assert names.backing in h.host.files and staging not in h.host.mounts
    target = h.k.publish_pvc(pv, "pod-1", readonly=True)
    volume = h.host.direct_volume_read(root(h), target)
    assert volume is not None and volume.device == names.backing and "ro" in volume.options
    assert h.host.is_guarded(target)
    h.k.publish_pvc(pv, "pod-1", readonly=True)  # again: OK
    message = fails(lambda: h.provisioner.expand(pv.volume_id, 128 * MiB),
                    grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert "Kata VM cannot grow" in message
    h.k.unpublish_pvc(pv, "pod-1")
    assert h.host.direct_volumes == {} and target not in h.host.mounts
    h.k.unstage(pv)
    assert names.backing not in h.host.files


def test_stats_report_the_disks_allocation_and_say_where_the_filesystem_is(h: Harness) -> None:
    h.publish(attributes=GUEST)
    assert h.kubelet is not None
    stats = h.kubelet.stats("pod-a", "scratch")
    assert stats.volume_condition.abnormal is False
    assert "Kata VM" in stats.volume_condition.message
    by_unit = {u.unit: u for u in stats.usage}
    assert by_unit[pb.VolumeUsage.BYTES].total == 64 * MiB
    h.host.direct_volumes.clear()
    stats = h.kubelet.stats("pod-a", "scratch")
    assert stats.volume_condition.abnormal
    assert "not handed to a Kata VM" in stats.volume_condition.message


def test_start_up_takes_back_hand_offs_no_record_names(h: Harness) -> None:
    h.publish(attributes=GUEST)
    target = h.target()
    h.lose_tmpfs()  # the journal is lost, the direct volume and its guard are still there
    h.restart()
    assert h.last_report is not None
    assert h.last_report.orphans_removed.get("handoff_without_record") == 1
    assert h.host.direct_volumes == {} and target not in h.host.mounts


def test_start_up_leaves_hand_offs_of_others_alone(h: Harness) -> None:
    other = DirectVolume("directvol", "/dev/sdz", "ext4", {}, [])
    h.host.direct_volumes[(root(h), "/var/lib/kubelet/pods/x/volumes/y")] = other
    h.host.direct_volumes[(root(h), "/var/lib/kubelet/pods/x/volumes/z")] = None
    h.restart()
    assert len(h.host.direct_volumes) == 2


def test_a_record_whose_hand_off_was_removed_is_torn_down_at_start_up(h: Harness) -> None:
    h.publish(attributes=GUEST)
    h.host.direct_volumes.clear()  # someone removed it: no VM can get the disk any more
    other = DirectVolume("directvol", "/dev/sdz", "ext4", {}, [])  # the root is in use
    h.host.direct_volumes[(root(h), "/var/lib/kubelet/pods/x/volumes/y")] = other
    h.restart()
    assert h.last_report is not None and h.last_report.rolled_back == [h.volume_id()]
    assert h.leftovers() == [] and list(h.host.direct_volumes) == [
        (root(h), "/var/lib/kubelet/pods/x/volumes/y")]  # fmt: skip


def test_an_empty_root_with_handed_off_records_tears_nothing_down(h: Harness) -> None:
    """A new or wrong --kata-direct-volume-root (the chart creates it if missing) must not
    cost every published kata volume its data."""
    h.publish(attributes=GUEST)
    h.host.direct_volumes.clear()
    h.restart()
    assert h.last_report is not None and h.last_report.rolled_back == []
    assert any("is empty" in f for f in h.last_report.failures)
    assert h.record(h.volume_id()) is not None


def test_start_up_leaves_a_hand_off_whose_vm_still_holds_the_disk(h: Harness) -> None:
    h.publish(attributes=GUEST)
    names, target = h.names(), h.target()
    h.host.file_holders[names.backing] = ["pid 9 (qemu)"]
    h.lose_tmpfs()
    h.restart()
    assert h.last_report is not None
    assert any("still in use" in f for f in h.last_report.failures)
    assert h.host.is_guarded(target) and names.backing in h.host.files
    assert h.host.direct_volume_read(root(h), target) is not None
    h.host.file_holders.clear()
    h.restart()  # the VM is gone: now it is all taken back, the target dir too
    assert h.host.direct_volumes == {} and h.leftovers() == []
    assert not h.host.exists(target)


def test_unpublish_with_no_record_takes_back_the_hand_off(h: Harness) -> None:
    h.publish(attributes=GUEST)
    h.stop()
    h.lose_tmpfs()
    h.host.dirs.add(h.config.kubelet_root)
    h.start()
    h.unpublish()
    assert h.host.direct_volumes == {} and h.leftovers() == []


def test_a_pvc_pod_whose_vm_still_holds_the_disk_cannot_unpublish(h: Harness) -> None:
    pv = h.provision(parameters={"kata": "guest"})
    h.k.stage(pv)
    target = h.k.publish_pvc(pv, "pod-1")
    names = Names.of(pv.volume_id, h.config.data_dir, h.config.state_dir)
    h.host.file_holders[names.backing] = ["pid 5 (qemu)"]
    fails(lambda: h.k.unpublish_pvc(pv, "pod-1"), grpc.StatusCode.FAILED_PRECONDITION)
    assert h.host.is_guarded(target)
    fails(lambda: h.k.publish_pvc(pv, "pod-2"), grpc.StatusCode.FAILED_PRECONDITION)
    h.host.file_holders.clear()
    h.k.unpublish_pvc(pv, "pod-1")
    h.k.publish_pvc(pv, "pod-2")


def test_no_direct_volume_root_means_start_up_looks_at_nothing(h: Harness) -> None:
    h.publish(attributes=GUEST)
    h.host.dirs.discard(root(h))
    h.host.direct_volumes.clear()
    h.restart()
    assert h.last_report is not None and h.last_report.rolled_back == []
    assert h.record(h.volume_id()) is not None


@pytest.mark.parametrize("step", ["reserve", "create_backing", "mount", "record"])
def test_crash_after_each_publish_step_recovers(h: Harness, step: str) -> None:
    hook = h.crash_after(step)
    request = h.publish_request(attributes=GUEST)
    error = h.call_until_crash(h.node.NodePublishVolume, request, hook)
    assert code_of(error) != grpc.StatusCode.OK
    report = h.recover()
    assert report.failures == []
    if step != "record":
        assert leftovers(h) == []
    h.publish(attributes=GUEST)
    h.unpublish()
    assert leftovers(h) == []


@pytest.mark.parametrize("step", ["unmount", "close", "delete", "forget"])
def test_crash_after_each_teardown_step_recovers(h: Harness, step: str) -> None:
    h.publish(attributes=GUEST)
    hook = h.crash_after(step)
    h.call_until_crash(h.node.NodeUnpublishVolume, h.unpublish_request(), hook)
    h.recover()
    h.unpublish()
    assert leftovers(h) == []


def test_the_guard_covers_the_target_before_kata_can_see_the_volume(h: Harness) -> None:
    h.publish(attributes=GUEST)
    calls = [c.split()[0] for c in h.host.calls]
    assert calls.index("guard_mount") < calls.index("direct_volume_write")
    assert os.path.basename(h.target()) == "mount"


def test_a_second_pod_never_gets_the_same_disk(h: Harness) -> None:
    """Two VMs on one disk would both format (guest) or mount (host) it: corruption."""
    pv = h.provision(parameters={"kata": "host"})
    h.k.stage(pv)
    h.k.publish_pvc(pv, "pod-1")
    message = fails(lambda: h.k.publish_pvc(pv, "pod-2"), grpc.StatusCode.FAILED_PRECONDITION)
    assert "two VMs on one disk" in message
    assert len(h.host.direct_volumes) == 1
    h.k.unpublish_pvc(pv, "pod-1")
    h.k.publish_pvc(pv, "pod-2")  # once the first pod is gone, the next one may have it
    assert len(h.host.direct_volumes) == 1
