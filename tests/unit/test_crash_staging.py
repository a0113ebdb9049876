"""Crash safety of provisioned volumes: the driver dies right after any step of a stage, a
publish, an unstage or an expansion (no rollback runs, as with SIGKILL); the CO sees the RPC fail,
the driver restarts and reconciles, and the CO's retries end in a healthy volume, and finally in
nothing at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.capability import Capability
from csi.journal import RESERVED, STAGED, STAGING
from csi.proto import csi_pb2 as pb
from csi.staged import EXPAND_STEPS, STAGE_STEPS, StagedVolumes, StageRequest
from csi.tools.kubelet import PvcVolume
from tests.unit.harness import CrashAfter, Harness, SimulatedCrash, code_of

MiB = 1024**2
BLOCK_STAGE_STEPS = tuple(s for s in STAGE_STEPS if s not in ("mkfs", "mount"))
UNSTAGE_STEPS = ("unmount", "close", "detach", "delete")


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(mode="all")
    yield harness
    harness.close()


def only_the_reservation(h: Harness, pv: PvcVolume) -> None:
    """Nothing on the node but the record that holds CreateVolume's reservation."""
    record = h.record(pv.volume_id)
    assert (record.state, record.staging_path, record.targets) == (RESERVED, "", {})
    names = h.volumes.names(pv.volume_id)
    assert h.leftovers() == [f"{names.digest}.json"]


def use_and_finish(h: Harness, pv: PvcVolume) -> None:
    """Stage (again), publish into a pod, unpublish, unstage, delete: nothing left."""
    h.k.stage(pv)
    target = h.k.publish_pvc(pv, "pod-a")
    names = h.volumes.names(pv.volume_id)
    if pv.block:
        assert h.host.mounts[target].device == names.mapper_device
    else:
        assert h.host.mounts[target].source == names.mapper_device
        assert h.host.filesystems[names.mapper_device] == pv.fs_type
    h.k.unpublish_pvc(pv, "pod-a")
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def stage_until_crash(h: Harness, pv: PvcVolume, step: str) -> grpc.RpcError:
    hook = h.crash_after(step)
    request = h.k.stage_request(pv)
    Path(request.staging_target_path).mkdir(parents=True, exist_ok=True)
    return h.call_until_crash(h.k.node.NodeStageVolume, request, hook)


@pytest.mark.parametrize(
    ("block", "step"),
    [*((False, s) for s in STAGE_STEPS), *((True, s) for s in BLOCK_STAGE_STEPS)],
    ids=[*(f"mount-{s}" for s in STAGE_STEPS), *(f"block-{s}" for s in BLOCK_STAGE_STEPS)],
)
def test_crash_after_each_stage_step(h: Harness, block: bool, step: str) -> None:
    pv = h.provision(size=64 * MiB, block=block)
    error = stage_until_crash(h, pv, step)
    assert code_of(error) != grpc.StatusCode.OK
    report = h.recover()
    assert report.failures == [] and report.orphans_removed == {}
    if step == "record":  # the stage had finished: kept as it is
        assert report.rolled_back == []
        assert h.record(pv.volume_id).state == STAGED
    else:  # half-done: back to RESERVED, the reservation kept, nothing else
        assert report.rolled_back == [pv.volume_id]
        only_the_reservation(h, pv)
    h.host.calls.clear()
    use_and_finish(h, pv)  # kubelet retries the stage
    formats = [c for c in h.host.calls if c.startswith("luks_format")]
    assert len(formats) == (0 if step == "record" else 1)


@pytest.mark.parametrize("step", STAGE_STEPS)
def test_crash_in_stage_then_retry_without_reconcile(h: Harness, step: str) -> None:
    """The retry may come before any start-up reconcile: the stage starts clean by itself."""
    pv = h.provision(size=64 * MiB)
    request = StageRequest(pv.volume_id, h.k.staging_path(pv), Capability("mount"), pv.context)
    staged = StagedVolumes(h.volumes)
    h.volumes.after_step = CrashAfter(step)
    with pytest.raises(SimulatedCrash):
        staged.stage(request)
    assert h.record(pv.volume_id).state == (STAGED if step == "record" else STAGING)
    h.volumes.after_step = lambda done: None
    staged.stage(request)
    assert h.record(pv.volume_id).state == STAGED
    assert len(h.host.mappings) == 1 and len(h.host.loops) == 1
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


@pytest.mark.parametrize("step", UNSTAGE_STEPS)
def test_crash_after_each_unstage_step(h: Harness, step: str) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    h.k.publish_pvc(pv, "pod-a")
    h.k.unpublish_pvc(pv, "pod-a")
    hook = h.crash_after(step)
    request = h.k.stage_request(pv)
    unstage = pb.NodeUnstageVolumeRequest(volume_id=pv.volume_id,
                                          staging_target_path=request.staging_target_path)
    h.call_until_crash(h.k.node.NodeUnstageVolume, unstage, hook)
    report = h.recover()
    assert report.failures == []
    h.k.unstage(pv)  # kubelet retries the unstage
    only_the_reservation(h, pv)
    use_and_finish(h, pv)


@pytest.mark.parametrize("block", [False, True], ids=["mount", "block"])
def test_crash_after_bind_then_publish_again(h: Harness, block: bool) -> None:
    pv = h.provision(size=64 * MiB, block=block)
    h.k.stage(pv)
    hook = h.crash_after("bind")
    request = h.k.publish_pvc_request(pv, "pod-a")
    os.makedirs(os.path.dirname(request.target_path), exist_ok=True)
    h.call_until_crash(h.k.node.NodePublishVolume, request, hook)
    report = h.recover()
    assert report.rolled_back == [] and report.failures == []
    h.host.calls.clear()
    h.k.publish_pvc(pv, "pod-a")  # kubelet retries: already there
    assert not any(c.startswith("bind_mount") for c in h.host.calls)
    h.k.unpublish_pvc(pv, "pod-a")
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


@pytest.mark.parametrize("step", EXPAND_STEPS)
def test_crash_after_each_expansion_step_then_retry(h: Harness, step: str) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    target = h.k.publish_pvc(pv, "pod-a")
    hook = h.crash_after(step)
    request = pb.NodeExpandVolumeRequest(
        volume_id=pv.volume_id, volume_path=target,
        capacity_range=pb.CapacityRange(required_bytes=128 * MiB),
        staging_target_path=h.k.staging_path(pv),
    )  # fmt: skip
    h.call_until_crash(h.k.node.NodeExpandVolume, request, hook)
    report = h.recover()
    assert report.rolled_back == [] and report.failures == []
    assert h.record(pv.volume_id).charge == 128 * MiB  # the grown reservation survived
    assert h.k.expand(pv, 128 * MiB, "pod-a") == 128 * MiB  # kubelet retries
    names = h.volumes.names(pv.volume_id)
    assert h.host.fs_sizes[names.mapper_device] == 128 * MiB
    assert h.host.mounts[target].source == names.mapper_device
    h.k.unpublish_pvc(pv, "pod-a")
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def test_reboot_with_staged_volume_leaves_only_garbage_to_remove(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    h.stop()
    h.host.reboot()
    h.lose_tmpfs()
    h.start()
    assert h.last_report is not None
    assert h.last_report.orphans_removed == {"backing_without_record": 1}
    assert h.leftovers() == []
    use_and_finish(h, pv)  # the pod restarts on the node: a fresh volume from the PV context
