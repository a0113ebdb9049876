"""Teardown never takes a live pod's volume away (hardening items 1, 5, 6, 10 and 11).

The fake host models what the driver cannot see: ``foreign_users`` are opens of a mapping from
another mount namespace or a process (the kernel refuses to close it), a bound device node does
not hold its device open, ``nonempty`` directories hold files of their own, and ``temporary``
mappings are cryptsetup's leftovers stacked on a loop device.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import grpc
import pytest

from csi.errors import Busy, FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from csi.host.fake import FakeFile
from csi.host.linux import LinuxHost, read_mounts, typed_os_error
from csi.journal import PUBLISHED, STAGED
from tests.unit.harness import Harness, fails

SIZE = {"size": "64Mi"}
MiB = 1024**2


def lose_journal(h: Harness) -> None:
    """The state dir's records vanish while the kernel keeps every object (no reboot)."""
    h.stop()
    journal = os.path.join(h.config.state_dir, "volumes")
    for name in os.listdir(journal):
        os.unlink(os.path.join(journal, name))
    h.start()


# --- item 1: a live target is never taken away ---------------------------------------------
def test_a_user_seen_before_unmounting_refuses_and_changes_nothing(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    names, target = harness.names(), harness.target()
    harness.host.foreign_users[names.mapping] = 1  # e.g. a process holding the device open
    details = fails(harness.unpublish, grpc.StatusCode.FAILED_PRECONDITION)
    assert "in use" in details and "nothing was torn down" in details
    assert not any(c.startswith("umount") for c in harness.host.calls)
    assert harness.host.mount_source(target) == names.mapper_device
    assert harness.record(harness.volume_id()).state == PUBLISHED
    harness.host.foreign_users.clear()
    harness.unpublish()
    assert harness.leftovers() == []


def test_a_user_only_close_finds_gets_the_target_mounted_again(harness: Harness) -> None:
    """A container's bind in its own mount namespace: invisible until cryptsetup close says
    busy. The target must be the volume again, never a plain directory on the node's disk."""
    harness.publish(attributes=SIZE)
    names, target = harness.names(), harness.target()
    harness.host.fail("crypt_close", Busy(f"mapping {names.mapping} is still in use"))
    details = fails(harness.unpublish, grpc.StatusCode.FAILED_PRECONDITION)
    assert "still in use" in details
    assert harness.host.mount_source(target) == names.mapper_device  # mounted again
    assert names.mapping in harness.host.mappings
    assert harness.record(harness.volume_id()).state == PUBLISHED
    assert harness.host.loop_find(names.backing) is not None
    harness.unpublish()
    assert harness.leftovers() == []


def test_a_republish_after_a_lost_journal_adopts_the_live_volume(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    names, target = harness.names(), harness.target()
    lose_journal(harness)
    assert names.mapping in harness.host.mappings  # reconcile left the mounted volume alone
    harness.host.calls.clear()
    harness.publish(attributes=SIZE)
    assert not [c for c in harness.host.calls
                if c.startswith(("luks_format", "mkfs", "umount", "crypt_close"))]  # fmt: skip
    assert harness.host.mount_source(target) == names.mapper_device
    record = harness.record(harness.volume_id())
    assert record.state == PUBLISHED and record.target_path == target
    harness.unpublish()
    assert harness.leftovers() == []


def test_a_publish_without_record_never_touches_a_mapping_in_use(harness: Harness) -> None:
    """Same volume id at another target while the live one is mounted: refused, untouched."""
    harness.publish(attributes=SIZE)
    names, target = harness.names(), harness.target()
    lose_journal(harness)
    other = harness.publish_request()
    other.target_path = target.replace("pod-a", "pod-b")
    harness.host.calls.clear()
    details = fails(lambda: harness.node.NodePublishVolume(other, timeout=30),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "in use" in details and "refusing to touch it" in details
    assert not [c for c in harness.host.calls
                if c.startswith(("umount", "crypt_close", "mkfs", "luks_format", "loop_detach",
                                 "remove_file"))]  # fmt: skip
    assert harness.host.mount_source(target) == names.mapper_device
    assert harness.journal_files() == []  # its reservation was released


def test_a_failed_fresh_publish_rolls_back_only_what_it_made(harness: Harness) -> None:
    """An unused open mapping without a record is cleaned first; then a failed mkfs rolls back
    the attempt's own objects and nothing else."""
    harness.publish(attributes=SIZE)
    names = harness.names()
    harness.host.umount(harness.target())  # mapping open, nothing mounted, no record
    lose_journal(harness)
    harness.host.fail("mkfs")
    fails(lambda: harness.publish(attributes=SIZE), grpc.StatusCode.INTERNAL)
    assert harness.leftovers() == []
    harness.publish(attributes=SIZE)
    assert harness.host.mount_source(harness.target()) == names.mapper_device
    harness.unpublish()


def test_unstage_that_cannot_close_mounts_the_staging_path_again(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    h.host.fail("crypt_close", Busy(f"mapping {names.mapping} is still in use"))
    fails(lambda: h.k.unstage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    assert h.host.mount_source(staging) == names.mapper_device
    assert names.mapping in h.host.mappings
    assert h.record(pv.volume_id).state == STAGED
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def test_unstage_mounts_the_staging_path_again_when_another_namespace_holds_it(
    h: Harness,
) -> None:
    """Seen on the real kernel: a pod's bind in its own mount namespace shares the staging
    mount's single open, so it shows only once unstage has unmounted the staging path."""
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    h.host.other_namespaces.add(names.mapping)
    details = fails(lambda: h.k.unstage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    assert "open 1 more time(s)" in details
    assert h.host.mount_source(staging) == names.mapper_device
    assert h.record(pv.volume_id).state == STAGED
    h.host.other_namespaces.clear()
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def test_inline_unpublish_mounts_the_target_again_when_another_namespace_holds_it(
    harness: Harness,
) -> None:
    harness.publish(attributes=SIZE)
    names, target = harness.names(), harness.target()
    harness.host.other_namespaces.add(names.mapping)
    fails(harness.unpublish, grpc.StatusCode.FAILED_PRECONDITION)
    assert harness.host.mount_source(target) == names.mapper_device
    assert harness.record(harness.volume_id()).state == PUBLISHED
    harness.host.other_namespaces.clear()
    harness.unpublish()
    assert harness.leftovers() == []


def test_unstage_refuses_before_unmounting_when_the_kernel_sees_a_user(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    staging = h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    h.host.foreign_users[names.mapping] = 2
    details = fails(lambda: h.k.unstage(pv), grpc.StatusCode.FAILED_PRECONDITION)
    assert "open 2 more time(s)" in details
    assert h.host.mount_source(staging) == names.mapper_device
    assert h.record(pv.volume_id).state == STAGED
    h.host.foreign_users.clear()
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)


# --- item 6: "in use" comes from the kernel, not from a source string ----------------------
def test_a_lost_journal_keeps_a_block_volume_bound_into_a_pod(h: Harness) -> None:
    pv = h.provision(size=64 * MiB, block=True)
    h.k.stage(pv)
    target = h.k.publish_pvc(pv, "pod-a")
    names = h.volumes.names(pv.volume_id)
    assert h.host.mounts[target].source == "udev"  # what mountinfo shows for a device bind
    lose_journal(h)
    report = h.last_report
    assert report is not None
    assert any("bound at" in f and "left alone" in f for f in report.failures), report.failures
    assert names.mapping in h.host.mappings
    assert names.backing in h.host.files
    assert h.host.loop_find(names.backing) is not None
    assert h.host.mounts[target].device == names.mapper_device
    h.k.unpublish_pvc(pv, "pod-a")  # no record: the device bind is still recognised as ours
    assert target not in h.host.mounts and target not in h.host.files


# --- item 5: OS errors are typed, one bad volume stops nothing ------------------------------
def test_a_target_holding_files_is_a_clear_error_after_the_key_is_gone(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    names, target = harness.names(), harness.target()
    harness.host.nonempty.add(target)
    details = fails(harness.unpublish, grpc.StatusCode.FAILED_PRECONDITION)
    assert "holds files" in details
    assert names.mapping not in harness.host.mappings  # the key left the kernel anyway
    assert names.backing not in harness.host.files
    assert harness.journal_files() == []


def test_one_volume_that_fails_oddly_does_not_stop_start_up(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    harness.publish(pod="pod-b", attributes=SIZE)
    lose = harness.names(pod="pod-b")
    harness.stop()
    for volume in (harness.volume_id(), harness.volume_id(pod="pod-b")):
        record = harness.volumes.journal.load(volume)
        assert record is not None
        record.state = "creating"  # both publishes "died half-way"
        harness.volumes.journal.write(record)
    harness.host.foreign_users[lose.mapping] = 1
    harness.host.fail("umount", RuntimeError("a bug"))  # the first volume's teardown blows up
    harness.start()
    report = harness.last_report
    assert report is not None and len(report.failures) == 2  # neither stopped the other


def test_linux_host_turns_os_errors_into_typed_errors(tmp_path: Path) -> None:
    host = LinuxHost(sysfs=str(tmp_path / "sys"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "plaintext").write_text("x")
    with pytest.raises(FailedPrecondition, match="holds files"):
        host.remove_dir(str(full))
    (tmp_path / "real").write_text("")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(InvalidArgument, match="symlink"):
        host.make_file(str(tmp_path / "link"))
    with pytest.raises(Internal, match="fs_stats"):
        host.fs_stats(str(tmp_path / "missing"))
    assert isinstance(typed_os_error(OSError(errno.ENOSPC, "full"), "x"), ResourceExhausted)
    assert isinstance(typed_os_error(OSError(errno.EBUSY, "busy"), "x"), Busy)


def test_mountinfo_is_unescaped_and_carries_device_numbers(tmp_path: Path) -> None:
    fixture = tmp_path / "mountinfo"
    fixture.write_text(
        "36 25 253:3 / /var/lib/kubelet/pods/a\\040b/mount rw,nosuid - ext4 "
        "/dev/mapper/luks-eph-1 rw\n"
        "37 25 0:5 /dm-3 /var/lib/kubelet/x\\134y\\011z rw shared:1 - devtmpfs udev rw\n"
    )
    first, second = read_mounts(str(fixture))
    assert (first.point, first.dev, first.source) == (
        "/var/lib/kubelet/pods/a b/mount", "253:3", "/dev/mapper/luks-eph-1"
    )
    assert (second.point, second.root, second.fs_type) == ("/var/lib/kubelet/x\\y\tz", "/dm-3",
                                                           "devtmpfs")  # fmt: skip


# --- item 11: cryptsetup's temporary mappings ------------------------------------------------
def test_teardown_removes_cryptsetup_leftovers_before_detaching(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    names = harness.names()
    loop = harness.host.loop_find(names.backing)
    assert loop is not None
    # an integrity format stacks cryptsetup's crypt mapping on its integrity mapping
    harness.host.temporary["temporary-cryptsetup-1234_dif"] = loop
    below = "/dev/mapper/temporary-cryptsetup-1234_dif"
    harness.host.temporary["temporary-cryptsetup-1234"] = below
    harness.unpublish()
    removed = [c for c in harness.host.calls if c.startswith("remove_temporary_mapping")]
    assert removed == ["remove_temporary_mapping temporary-cryptsetup-1234",
                       "remove_temporary_mapping temporary-cryptsetup-1234_dif"]
    assert harness.host.temporary == {} and harness.host.loops == {}


def test_start_up_removes_leftovers_of_a_format_killed_mid_way(harness: Harness) -> None:
    """SIGKILL during luksFormat: the backing file and loop exist, cryptsetup's temporary
    mapping holds the loop device, the record says CREATING."""
    names = harness.names()
    harness.stop()
    harness.host.files[names.backing] = FakeFile(64 * MiB, 0)
    harness.host.loops["/dev/loop7"] = names.backing
    harness.host.temporary["temporary-cryptsetup-99"] = "/dev/loop7"
    harness.start()
    assert harness.host.temporary == {}
    assert harness.host.loops == {}
    assert names.backing not in harness.host.files


# --- item 10: ControllerExpandVolume refuses what the node would refuse --------------------
@pytest.mark.parametrize(("parameters", "word"), [({"backing": "qcow2"}, "qcow2"),
                                                  ({"integrity": "hmac-sha256"}, "integrity")])
def test_controller_expansion_of_a_volume_that_cannot_grow_is_refused(
    parameters: dict[str, str], word: str
) -> None:
    node = Harness(mode="all")
    controller = Harness(mode="controller", node_id="controller-1")
    try:
        pv = node.provision(size=64 * MiB, parameters=parameters)
        assert pv.volume_id.endswith(f".{word}")
        details = fails(lambda: controller.provisioner.expand(pv.volume_id, 128 * MiB),
                        grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        assert "cannot grow" in details
        growable = node.provision(name="pvc-2", size=64 * MiB)
        assert "." not in growable.volume_id.split("/")[1]
        controller.provisioner.expand(growable.volume_id, 128 * MiB)
    finally:
        node.close()
        controller.close()


def test_the_same_name_with_another_growth_class_is_already_exists(h: Harness) -> None:
    h.provision(size=64 * MiB)
    request = h.provisioner.create_request("pvc-1", h.config.node_id, 64 * MiB,
                                           {"backing": "qcow2"})  # fmt: skip
    fails(lambda: h.controller.CreateVolume(request, timeout=30), grpc.StatusCode.ALREADY_EXISTS)



def test_a_failed_close_mounts_again_only_a_target_this_teardown_unmounted(
    harness: Harness,
) -> None:
    """Someone else unmounted the target: a close that then fails must not mount the volume
    there again (over whatever is there now)."""
    harness.publish("pod-a")
    target, names = harness.target("pod-a"), harness.names("pod-a")
    harness.host.mounts.pop(target)  # unmounted behind the driver's back
    harness.host.fail("crypt_close", Internal("injected: close failed"))
    with pytest.raises(grpc.RpcError):
        harness.unpublish("pod-a")
    assert target not in harness.host.mounts
    assert harness.host.crypt_exists(names.mapping)
