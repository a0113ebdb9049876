"""The fscrypt backing through the driver's real gRPC server, on the fake host: every rule of
issue 13 that does not need the real kernel (the host tier and the node tier prove those)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest

from csi.backings.fscrypt import POOL_DIR, FscryptBacking, inode_limit
from csi.errors import Internal
from csi.host import KEY_ABSENT, KEY_INCOMPLETELY_REMOVED, KEY_PRESENT, Quota
from csi.host.fake import FakeFile
from csi.journal import PUBLISHED, Names
from csi.params import VolumeSpec
from csi.proto import csi_pb2 as pb
from csi.steps import DIRECTORY_STEPS
from csi.tools.kubelet import PvcVolume
from tests.unit.harness import Harness, code_of, fails

MiB = 1024**2
FSCRYPT = {"backing": "fscrypt", "size": "64Mi"}


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(mode="all")  # node and controller: inline volumes and PVCs
    yield harness
    harness.close()


def root(h: Harness) -> str:
    return os.path.join(h.config.data_dir, POOL_DIR)


def directory(h: Harness, names: Names) -> str:
    return os.path.join(root(h), names.digest)


def backing(h: Harness) -> FscryptBacking:
    found = h.volumes.backings["fscrypt"]
    assert isinstance(found, FscryptBacking)
    return found


def fscrypt_leftovers(h: Harness) -> list[str]:
    """Keys still in a keyring, project dirs, policies, quota entries, mounts, records."""
    host = h.host
    keys = [k for ring in host.fscrypt_keys.values() for k in ring]
    return [*keys, *host.projects, *host.policies, *map(str, host.quotas), *host.mounts,
            *h.journal_files()]  # fmt: skip


def test_inline_publish_is_a_bound_encrypted_directory_with_its_own_quota(h: Harness) -> None:
    h.publish(attributes=FSCRYPT, fs_group="2000")
    names, target = h.names(), h.target()
    path = directory(h, names)
    host = h.host
    project = host.projects[path]
    identifier = host.policies[path]
    assert host.fscrypt_key_status(root(h), identifier) == KEY_PRESENT
    assert host.quotas[(root(h), project)].bytes_limit == 64 * MiB
    assert host.quotas[(root(h), project)].inodes_limit == inode_limit(64 * MiB) == 4096
    mount = host.mounts[target]
    assert mount.directory == path and {"rw", "nosuid", "nodev"} <= set(mount.options)
    assert f"set_volume_root {target}" in host.calls  # fsGroup, as for a mounted filesystem
    # no device-mapper, loop, file or mkfs at all
    assert not (host.mappings or host.loops or host.files or host.filesystems)
    assert not any(c.startswith(("luks_format", "mkfs", "loop_attach")) for c in host.calls)
    record = h.record(h.volume_id())
    assert record.state == PUBLISHED
    assert record.details == {"key_identifier": identifier, "project": str(project)}
    # the key went in once and is never in the record
    assert len(host.seen_keys) == 1 and host.seen_keys[0].hex() not in str(record.to_json())

    h.unpublish()
    assert fscrypt_leftovers(h) == []
    assert not host.exists(path) and not host.exists(target)
    h.unpublish()  # again: nothing to do, OK


def test_publish_again_is_ok_and_keeps_the_same_key(h: Harness) -> None:
    h.publish(attributes=FSCRYPT)
    h.publish(attributes=FSCRYPT)
    assert len(h.host.seen_keys) == 1
    h.host.mounts.pop(h.target())  # the bind was lost: republish binds it again, same key
    h.publish(attributes=FSCRYPT)
    assert h.host.mounts[h.target()].directory == directory(h, h.names())
    assert len(h.host.seen_keys) == 1


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"integrity": "hmac-sha256"}, "integrity applies only to the LUKS backings"),
        ({"header": "attached"}, "no LUKS header"),
        ({"cipher": "xchacha12,aes-adiantum-plain64"}, "cipher applies only"),
        ({"preallocate": "true"}, "cannot reserve blocks"),
    ],
)
def test_parameters_that_do_not_apply_are_invalid_and_leave_nothing(
    h: Harness, extra: dict[str, str], why: str
) -> None:
    assert h.kubelet is not None
    request = h.publish_request(attributes={**FSCRYPT, **extra})
    message = fails(lambda: h.node.NodePublishVolume(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert "backing=fscrypt" in message and why in message
    assert fscrypt_leftovers(h) == [] and h.host.calls == []


def test_xfs_and_block_are_invalid(h: Harness) -> None:
    request = h.publish_request(attributes=FSCRYPT, fs_type="xfs")
    message = fails(lambda: h.node.NodePublishVolume(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert "ext4" in message
    error = fails(lambda: h.provision(parameters={"backing": "fscrypt"}, block=True),
                  grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert "no block mode" in error


def test_a_node_that_cannot_make_them_refuses_with_the_reason(h: Harness) -> None:
    h.host.fscrypt_reason = "this kernel has no quota support (CONFIG_QFMT_V2)"
    request = h.publish_request(attributes=FSCRYPT)
    message = fails(lambda: h.node.NodePublishVolume(request), grpc.StatusCode.FAILED_PRECONDITION)
    assert "cannot make volumes with backing=fscrypt" in message and "CONFIG_QFMT_V2" in message
    assert fscrypt_leftovers(h) == []
    assert h.journal_files() == []  # refused before anything was reserved


def test_the_data_dir_itself_is_used_when_it_can_hold_them_else_a_pool(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.publish(attributes=FSCRYPT)
    assert h.host.fscrypt_pools == {}  # the fake data dir qualifies: no pool
    other = Harness(mode="all")
    try:
        calls: list[str] = []
        data_dir = other.config.data_dir

        def unavailable(path: str) -> str | None:
            calls.append(path)
            return "not ext4" if path == data_dir else None

        monkeypatch.setattr(other.host, "fscrypt_unavailable", unavailable)
        other.publish(attributes=FSCRYPT)
        pool = os.path.join(data_dir, "fscrypt.pool")
        assert other.host.fscrypt_pools == {os.path.join(data_dir, POOL_DIR): pool}
        assert calls == [data_dir, os.path.join(data_dir, POOL_DIR)]
    finally:
        other.close()


def test_a_file_held_open_refuses_unpublish_with_the_key_and_data_intact(h: Harness) -> None:
    h.publish(attributes=FSCRYPT)
    path = directory(h, h.names())
    project = h.host.projects[path]
    h.host.fscrypt_busy.add(project)
    message = fails(lambda: h.node.NodeUnpublishVolume(h.unpublish_request()),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "open by pid" in message and "key is still present" in message
    assert h.host.fscrypt_key_status(root(h), h.host.policies[path]) == KEY_PRESENT
    assert h.host.mounts[h.target()].directory == path  # the pod still has its volume
    h.host.fscrypt_busy.clear()
    h.unpublish()
    assert fscrypt_leftovers(h) == []


def test_a_file_opened_during_the_removal_is_an_error_until_a_retry_finishes(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check found nothing open, then a file was opened: the key is only incompletely
    removed, which must never be reported as done; the retry completes it."""
    h.publish(attributes=FSCRYPT)
    path = directory(h, h.names())
    project = h.host.projects[path]
    identifier = h.host.policies[path]
    real_clear = h.host.clear_dir

    def clear_then_open(p: str) -> None:
        real_clear(p)
        h.host.fscrypt_busy.add(project)

    monkeypatch.setattr(h.host, "clear_dir", clear_then_open)
    monkeypatch.setattr(h.host, "files_open_in", lambda r, p: [])
    message = fails(lambda: h.node.NodeUnpublishVolume(h.unpublish_request()),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "incompletely removed" in message
    assert h.host.fscrypt_key_status(root(h), identifier) == KEY_INCOMPLETELY_REMOVED
    assert h.host.is_dir(path), "the directory stays: it names the key for the retry"
    monkeypatch.undo()
    h.host.fscrypt_busy.clear()
    h.unpublish()
    assert h.host.fscrypt_key_status(root(h), identifier) == KEY_ABSENT
    assert fscrypt_leftovers(h) == []


def test_stats_come_from_the_quota_and_health_names_what_is_wrong(h: Harness) -> None:
    h.publish(attributes=FSCRYPT)
    path = directory(h, h.names())
    key = (root(h), h.host.projects[path])
    h.host.quotas[key] = Quota(10 * MiB, 64 * MiB, 7, 4096)
    assert h.kubelet is not None
    stats = h.kubelet.stats("pod-a", "scratch")
    assert stats.volume_condition.abnormal is False
    by_unit = {u.unit: u for u in stats.usage}
    size, inodes = by_unit[pb.VolumeUsage.BYTES], by_unit[pb.VolumeUsage.INODES]
    assert (size.total, size.used, size.available) == (64 * MiB, 10 * MiB, 54 * MiB)
    assert (inodes.total, inodes.used, inodes.available) == (4096, 7, 4089)
    del h.host.quotas[key]
    stats = h.kubelet.stats("pod-a", "scratch")
    assert stats.volume_condition.abnormal and "quota is missing" in stats.volume_condition.message
    h.host.fscrypt_keys[root(h)].clear()
    stats = h.kubelet.stats("pod-a", "scratch")
    assert "key is absent" in stats.volume_condition.message


def test_a_pvc_stages_binds_and_grows_by_raising_its_quota(h: Harness) -> None:
    pv = h.provision(parameters={"backing": "fscrypt"})
    staging = h.k.stage(pv)
    path = directory(h, Names.of(pv.volume_id, h.config.data_dir, h.config.state_dir))
    assert h.host.mounts[staging].directory == path
    target = h.k.publish_pvc(pv, "pod-1", readonly=True)
    assert h.host.mounts[target].directory == path and "ro" in h.host.mounts[target].options
    project = h.host.projects[path]
    h.provisioner.expand(pv.volume_id, 128 * MiB)
    assert h.k.expand(pv, 128 * MiB, "pod-1") == 128 * MiB
    assert h.host.quotas[(root(h), project)].bytes_limit == 128 * MiB
    assert h.host.quotas[(root(h), project)].inodes_limit == inode_limit(128 * MiB)
    assert not any(c.startswith("fs_grow") for c in h.host.calls)
    h.k.unpublish_pvc(pv, "pod-1")
    h.k.unstage(pv)
    assert not h.host.is_dir(path) and (root(h), project) not in h.host.quotas
    assert h.host.mounts == {}


def test_start_up_deletes_directories_no_record_names(h: Harness) -> None:
    h.publish(attributes=FSCRYPT)
    path = directory(h, h.names())
    identifier = h.host.policies[path]
    h.host.mounts.clear()  # a reboot: binds and keys are gone, the directory stays
    h.host.fscrypt_keys.clear()
    h.lose_tmpfs()
    h.restart()
    assert h.last_report is not None
    assert h.last_report.orphans_removed == {"directory_without_record": 1}
    assert not h.host.is_dir(path) and h.host.quotas == {}
    assert h.host.fscrypt_key_status(root(h), identifier) == KEY_ABSENT


def test_a_live_orphan_with_its_key_is_removed_with_its_key(h: Harness) -> None:
    """The journal was lost without a reboot: the key is still in the kernel; start-up takes
    it out as it deletes the directory."""
    h.publish(attributes=FSCRYPT)
    path = directory(h, h.names())
    identifier = h.host.policies[path]
    h.host.mounts.clear()
    h.lose_tmpfs()
    h.restart()
    assert h.host.fscrypt_key_status(root(h), identifier) == KEY_ABSENT
    assert fscrypt_leftovers(h) == []


@pytest.mark.parametrize("step", [*DIRECTORY_STEPS, "mount", "record"])
def test_crash_after_each_publish_step_recovers(h: Harness, step: str) -> None:
    hook = h.crash_after(step)
    request = h.publish_request(attributes=FSCRYPT)
    error = h.call_until_crash(h.node.NodePublishVolume, request, hook)
    assert code_of(error) != grpc.StatusCode.OK
    report = h.recover()
    assert report.failures == []
    if step == "record":
        assert report.rolled_back == []
    else:
        assert report.rolled_back == [h.volume_id()]
        assert fscrypt_leftovers(h) == []
    h.publish(attributes=FSCRYPT)  # kubelet retries
    h.unpublish()
    assert fscrypt_leftovers(h) == []
    keys = h.host.seen_keys
    assert len(keys) == len(set(keys)), "every attempt draws a fresh key"


@pytest.mark.parametrize("step", ["unmount", "close", "delete", "forget"])
def test_crash_after_each_teardown_step_recovers(h: Harness, step: str) -> None:
    h.publish(attributes=FSCRYPT)
    hook = h.crash_after(step)
    h.call_until_crash(h.node.NodeUnpublishVolume, h.unpublish_request(), hook)
    h.recover()
    h.unpublish()  # kubelet retries
    assert fscrypt_leftovers(h) == []


def test_every_host_step_failing_leaves_nothing_after_a_retry(h: Harness) -> None:
    for step in ("make_project_dir", "quota_set", "fscrypt_add_key", "fscrypt_set_policy",
                 "bind_mount", "set_volume_root"):  # fmt: skip
        h.host.fail(step)
        with pytest.raises(grpc.RpcError):
            h.publish(attributes=FSCRYPT)
        assert fscrypt_leftovers(h) == [], step
    h.publish(attributes=FSCRYPT)
    h.unpublish()
    assert fscrypt_leftovers(h) == []


def test_project_ids_never_collide(h: Harness) -> None:
    fscrypt = backing(h)
    assert fscrypt.unavailable() is None
    digest = "00000010" + "0" * 24  # names project 17
    h.host.quotas[(root(h), 17)] = Quota(0, MiB, 1, 10)  # taken by someone else
    assert fscrypt._free_project(digest) == 18


def test_wipe_key_takes_the_key_under_a_live_bind_and_release_still_cleans(h: Harness) -> None:
    h.publish(attributes=FSCRYPT)
    names = h.names()
    path = directory(h, names)
    identifier = h.host.policies[path]
    spec = VolumeSpec(size=64 * MiB, backing="fscrypt")
    backing(h).wipe_key(names, spec)
    assert h.host.fscrypt_key_status(root(h), identifier) == KEY_ABSENT
    backing(h).wipe_key(names, spec)  # again: nothing more to do
    h.unpublish()
    assert fscrypt_leftovers(h) == []


def test_capacity_counts_what_the_quota_says_is_used(h: Harness) -> None:
    h.publish(attributes=FSCRYPT)
    key = (root(h), h.host.projects[directory(h, h.names())])
    h.host.quotas[key] = Quota(5 * MiB, 64 * MiB, 3, 4096)
    usage = h.volumes.usage()
    assert usage.allocated == 5 * MiB and usage.reserved == 64 * MiB
    assert usage.volumes == {("fscrypt", "mount"): 1}


def test_pvc_volume_ids_never_carry_a_growth_class() -> None:
    assert FscryptBacking.fixed_reason(VolumeSpec(size=MiB, backing="fscrypt")) == ""


def test_unstage_of_a_pvc_with_an_open_file_keeps_it_staged(h: Harness) -> None:
    pv: PvcVolume = h.provision(parameters={"backing": "fscrypt"})
    staging = h.k.stage(pv)
    path = directory(h, Names.of(pv.volume_id, h.config.data_dir, h.config.state_dir))
    h.host.fscrypt_busy.add(h.host.projects[path])
    with pytest.raises(grpc.RpcError) as err:
        h.k.unstage(pv)
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert h.host.mounts[staging].directory == path
    assert h.record(pv.volume_id).state == "staged"
    h.host.fscrypt_busy.clear()
    h.k.unstage(pv)
    assert not h.host.is_dir(path)


def test_staging_again_after_a_lost_record_never_empties_the_live_volume(h: Harness) -> None:
    """The journal is lost while a pod uses the PVC (no reboot): NodeStageVolume comes again.
    The directory still has its key and its binds: it is refused, and nothing is deleted."""
    pv = h.provision(parameters={"backing": "fscrypt"})
    h.k.stage(pv)
    h.k.publish_pvc(pv, "pod-1")
    path = directory(h, Names.of(pv.volume_id, h.config.data_dir, h.config.state_dir))
    h.host.files[os.path.join(path, "data")] = FakeFile(size=5, allocated=4096)  # the pod wrote it
    h.lose_tmpfs()
    h.restart()
    h.host.calls.clear()
    with pytest.raises(grpc.RpcError) as err:
        h.k.stage(pv)
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "refusing to touch it" in str(err.value.details())
    assert not any(c.startswith(("clear_dir", "remove_tree")) for c in h.host.calls)
    assert os.path.join(path, "data") in h.host.files


def test_a_quota_reset_that_fails_is_retried_not_forgotten(h: Harness) -> None:
    h.publish(attributes=FSCRYPT)
    h.host.fail("quota_set")
    with pytest.raises(grpc.RpcError):
        h.unpublish()
    h.unpublish()
    assert fscrypt_leftovers(h) == []


def test_mount_flags_a_bind_cannot_apply_are_invalid(h: Harness) -> None:
    request = h.publish_request(attributes=FSCRYPT, mount_flags=["noatime", "sync"])
    message = fails(lambda: h.node.NodePublishVolume(request), grpc.StatusCode.INVALID_ARGUMENT)
    assert "mount flag sync cannot apply to a bind" in message
    h.publish(attributes=FSCRYPT, mount_flags=["noatime", "noexec"])
    assert {"noatime", "noexec"} <= set(h.host.mounts[h.target()].options)


def test_allocation_of_a_directory_removed_meanwhile_is_zero(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.publish(attributes=FSCRYPT)
    names = h.names()
    path = directory(h, names)
    real = h.host.dir_project

    def vanished(p: str) -> int:  # the teardown's rmdir runs between is_dir and this call
        h.host.dirs.discard(path)
        return real("/nonexistent") if p != path else _raise()

    def _raise() -> int:
        raise Internal("dir_project: No such file or directory")

    monkeypatch.setattr(h.host, "dir_project", vanished)
    assert backing(h).allocated(names) == 0
