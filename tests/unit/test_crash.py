"""Crash safety: a crash (or a failed host step) at any point leaves nothing the driver cannot
finish or clean up, and a retry, a restart or a reboot ends with either one healthy volume or
nothing at all.

A crash is an ``after_step`` hook raising a ``BaseException`` (no rollback runs, as with SIGKILL),
followed by stopping the gRPC server at once: the CO sees the RPC fail, then the driver restarts
and its start-up reconcile runs against the same (fake) kernel state and journal.
"""

from __future__ import annotations

import os

import grpc
import pytest

from csi.backings.luks import MAPPING_PREFIX
from csi.host.fake import FakeFile
from csi.journal import CREATING, PUBLISHED, Journal
from csi.node import spec_from_request
from csi.steps import PUBLISH_STEPS, TEARDOWN_STEPS
from csi.volumes import PublishRequest
from tests.unit.harness import CrashAfter, Harness, SimulatedCrash, code_of

SIZE = {"size": "64Mi"}
PUBLISH_HOST_STEPS = (
    "create_backing", "loop_attach", "luks_format", "crypt_open", "mkfs", "mount",
    "set_volume_root",
)  # fmt: skip
UNPUBLISH_HOST_STEPS = ("umount", "crypt_close", "loop_detach", "remove_file")


def assert_one_healthy_volume(harness: Harness, pod: str = "pod-a") -> None:
    """Exactly the objects of one published volume, and its stats say it is healthy."""
    names = harness.names(pod)
    target = harness.target(pod)
    host = harness.host
    assert list(host.mappings) == [names.mapping]
    assert list(host.loops.values()) == [names.backing]
    assert sorted(host.files) == sorted([names.backing, names.header])
    assert list(host.mounts) == [target]
    assert host.mounts[target].source == names.mapper_device
    assert {"nosuid", "nodev"} <= set(host.mounts[target].options)
    assert host.filesystems[names.mapper_device] == "ext4"
    assert harness.journal_files() == [f"{names.digest}.json"]
    record = harness.volumes.journal.load(harness.volume_id(pod))
    assert record is not None
    assert record.state == PUBLISHED
    assert record.target_path == target
    assert harness.kubelet is not None
    stats = harness.kubelet.stats(pod, "scratch")
    assert stats.volume_condition.abnormal is False
    assert stats.volume_condition.message == "volume is healthy"
    assert stats.usage[0].total == 64 * 1024**2


# crashes during publish --------------------------------------------------------------------
@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_crash_after_each_publish_step_recovers(harness: Harness, step: str) -> None:
    hook = harness.crash_after(step)
    request = harness.publish_request(attributes=SIZE)
    error = harness.call_until_crash(harness.node.NodePublishVolume, request, hook)
    assert code_of(error) != grpc.StatusCode.OK
    assert harness.journal_files(), "the crash must happen after the record was reserved"

    report = harness.recover()
    if step == "record":  # the publish had finished: start-up keeps the volume as it is
        assert report.rolled_back == []
        assert_one_healthy_volume(harness)
    else:  # half-done: start-up rolls it back completely
        assert report.rolled_back == [harness.volume_id()]
        assert harness.leftovers() == []
    assert report.orphans_removed == {}
    assert report.failures == []

    harness.host.calls.clear()
    harness.publish(attributes=SIZE)  # kubelet retries the publish
    assert_one_healthy_volume(harness)
    formats = [c for c in harness.host.calls if c.startswith("luks_format")]
    assert len(formats) == (0 if step == "record" else 1)

    harness.unpublish()
    assert harness.leftovers() == []
    assert harness.target() not in harness.host.dirs


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_crash_after_publish_step_then_retry_without_reconcile(harness: Harness, step: str) -> None:
    """If the retry comes before any start-up reconcile, a half-done record is redone cleanly."""
    request = harness.publish_request(attributes=SIZE)
    publish = PublishRequest(
        request.volume_id, request.target_path, spec_from_request(request, harness.config)
    )
    volumes = harness.volumes
    volumes.after_step = CrashAfter(step)
    with pytest.raises(SimulatedCrash):
        volumes.publish(publish)
    record = volumes.journal.load(request.volume_id)
    assert record is not None
    assert record.state == (PUBLISHED if step == "record" else CREATING)

    volumes.after_step = lambda done: None
    volumes.publish(publish)
    assert_one_healthy_volume(harness)
    volumes.unpublish(request.volume_id, request.target_path)
    assert harness.leftovers() == []


# crashes during unpublish ------------------------------------------------------------------
@pytest.mark.parametrize("step", TEARDOWN_STEPS)
def test_crash_after_each_teardown_step_recovers(harness: Harness, step: str) -> None:
    harness.publish(attributes=SIZE)
    assert_one_healthy_volume(harness)
    hook = harness.crash_after(step)
    error = harness.call_until_crash(
        harness.node.NodeUnpublishVolume, harness.unpublish_request(), hook
    )
    assert code_of(error) != grpc.StatusCode.OK
    assert harness.target() not in harness.host.mounts  # the crash came after unmount

    report = harness.recover()
    assert report.failures == []
    assert report.orphans_removed == {}
    harness.unpublish()  # kubelet retries the unpublish
    assert harness.leftovers() == []
    assert harness.target() not in harness.host.dirs
    harness.unpublish()  # and once more: still OK
    assert harness.leftovers() == []


# failures of host steps --------------------------------------------------------------------
@pytest.mark.parametrize("step", PUBLISH_HOST_STEPS)
def test_failed_host_step_in_publish_rolls_back(harness: Harness, step: str) -> None:
    harness.host.fail(step)
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(attributes=SIZE)
    assert code_of(err.value) == grpc.StatusCode.INTERNAL
    assert f"injected failure in {step}" in str(err.value.details())
    assert any(c.startswith(step) for c in harness.host.calls)
    assert harness.leftovers() == []
    assert harness.target() not in harness.host.dirs
    assert step not in harness.host.faults  # the fault was consumed by that very call

    harness.publish(attributes=SIZE)
    assert_one_healthy_volume(harness)
    harness.unpublish()
    assert harness.leftovers() == []


@pytest.mark.parametrize("step", UNPUBLISH_HOST_STEPS)
def test_failed_host_step_in_unpublish_keeps_record_and_retry_cleans(
    harness: Harness, step: str
) -> None:
    harness.publish(attributes=SIZE)
    harness.host.fail(step)
    with pytest.raises(grpc.RpcError) as err:
        harness.unpublish()
    assert code_of(err.value) == grpc.StatusCode.INTERNAL
    names = harness.names()
    assert harness.journal_files() == [f"{names.digest}.json"]  # kubelet must retry
    harness.unpublish()
    assert harness.leftovers() == []


# reboot ------------------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["detached", "attached"])
def test_reboot_removes_orphaned_backing_file(harness: Harness, header: str) -> None:
    harness.publish(attributes={**SIZE, "header": header})
    names = harness.names()
    assert names.backing in harness.host.files

    harness.stop()
    harness.host.reboot()
    harness.lose_tmpfs()
    assert harness.journal_files() == []
    assert list(harness.host.files) == [names.backing]  # only the disk survived
    harness.start()

    report = harness.last_report
    assert report is not None
    assert report.orphans_removed == {"backing_without_record": 1}
    assert report.rolled_back == []
    assert report.failures == []
    assert harness.leftovers() == []

    harness.unpublish()  # the late NodeUnpublish of the pod that was on the node
    assert harness.leftovers() == []


def test_reboot_keeps_nothing_of_several_volumes(harness: Harness) -> None:
    for pod in ("pod-a", "pod-b", "pod-c"):
        harness.publish(pod=pod, attributes=SIZE)
    harness.stop()
    harness.host.reboot()
    harness.lose_tmpfs()
    harness.start()
    assert harness.last_report is not None
    assert harness.last_report.orphans_removed == {"backing_without_record": 3}
    assert harness.leftovers() == []
    for pod in ("pod-a", "pod-b", "pod-c"):
        harness.unpublish(pod=pod)
    assert harness.leftovers() == []


# orphans at start-up -----------------------------------------------------------------------
def test_orphan_mapping_and_header_are_removed_but_published_volume_kept(
    harness: Harness,
) -> None:
    harness.publish(pod="pod-keep", attributes=SIZE)
    orphan = harness.names(pod="pod-gone")
    harness.host.mappings[orphan.mapping] = "/dev/loop77"
    harness.host.files[orphan.header] = FakeFile(16 * 1024**2, 16 * 1024**2)
    harness.host.luks[orphan.header] = "0" * 64
    foreign = "someone-elses-mapping"
    harness.host.mappings[foreign] = "/dev/loop78"

    harness.restart()

    report = harness.last_report
    assert report is not None
    assert report.orphans_removed == {"mapping_without_record": 1, "header_without_record": 1}
    assert report.failures == []
    assert orphan.mapping not in harness.host.mappings
    assert orphan.header not in harness.host.files
    assert orphan.header not in harness.host.luks
    assert harness.host.mappings[foreign] == "/dev/loop78"  # not ours: never touched
    del harness.host.mappings[foreign]
    assert_one_healthy_volume(harness, pod="pod-keep")
    harness.unpublish(pod="pod-keep")
    assert harness.leftovers() == []


def test_backing_file_and_mapping_without_record_are_removed(harness: Harness) -> None:
    """The journal was lost but the node did not reboot: unmounted objects get cleaned."""
    harness.publish(attributes=SIZE)
    names = harness.names()
    harness.host.mounts.clear()  # not mounted any more
    harness.stop()
    for name in harness.journal_files():
        os.unlink(os.path.join(harness.config.state_dir, "volumes", name))
    harness.start()
    report = harness.last_report
    assert report is not None
    assert report.orphans_removed == {"backing_without_record": 1, "header_without_record": 1}
    assert names.mapping not in harness.host.mappings
    assert harness.leftovers() == []


def _lose_record_while_mounted(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    harness.stop()
    journal = os.path.join(harness.config.state_dir, "volumes")
    for name in os.listdir(journal):
        os.unlink(os.path.join(journal, name))
    harness.start()


def test_recordless_mounted_volume_is_left_alone_and_unpublish_tears_it_down(
    harness: Harness,
) -> None:
    _lose_record_while_mounted(harness)
    names = harness.names()
    target = harness.target()
    report = harness.last_report
    assert report is not None
    assert len(report.failures) == 1
    assert "in use (mounted at" in report.failures[0] and "left alone" in report.failures[0]
    assert "backing_without_record" not in report.orphans_removed
    assert "mapping_without_record" not in report.orphans_removed
    host = harness.host
    assert names.backing in host.files
    assert host.loop_find(names.backing) is not None
    assert names.mapping in host.mappings
    assert host.mount_source(target) == names.mapper_device
    assert harness.journal_files() == []

    harness.unpublish()  # NodeUnpublish by its volume id, with no record
    assert harness.leftovers() == []
    assert target not in host.dirs


def test_recordless_mounted_volume_keeps_its_header(harness: Harness) -> None:
    _lose_record_while_mounted(harness)
    names = harness.names()
    report = harness.last_report
    assert report is not None
    assert names.header in harness.host.files
    assert names.header in harness.host.luks
    assert report.orphans_removed == {}


def test_orphan_mapping_loop_is_detached(harness: Harness) -> None:
    harness.publish(attributes=SIZE)
    names = harness.names()
    harness.stop()
    harness.host.mounts.clear()
    del harness.host.files[names.backing]  # deleted while still attached, as losetup allows
    harness.lose_tmpfs()  # and the records are lost (state dir wiped without a reboot)
    harness.start()
    assert names.mapping not in harness.host.mappings
    assert harness.host.loops == {}


def test_reconcile_finishes_a_crashed_creating_record_left_by_an_older_run(
    harness: Harness,
) -> None:
    """A CREATING record whose objects are half there is rolled back, not trusted."""
    hook = harness.crash_after("open")
    request = harness.publish_request(attributes=SIZE)
    harness.call_until_crash(harness.node.NodePublishVolume, request, hook)
    journal = Journal(harness.config.state_dir)
    records = journal.all()
    assert [r.state for r in records] == [CREATING]
    assert harness.names().mapping in harness.host.mappings
    assert all(m.startswith(MAPPING_PREFIX) for m in harness.host.mappings)
    report = harness.recover()
    assert report.rolled_back == [harness.volume_id()]
    assert harness.leftovers() == []
