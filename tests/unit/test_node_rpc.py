"""The Node service over a real gRPC server on a unix socket, backed by the fake host."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from csi.backings.luks import ATTACHED_HEADER_BYTES
from csi.journal import Names
from csi.params import MiB
from csi.proto import csi_pb2 as pb
from csi.tools.kubelet import InlineVolume
from tests.unit.harness import Harness, code_of

Mode = pb.VolumeCapability.AccessMode.Mode
RpcType = pb.NodeServiceCapability.RPC.Type
SMALL = {"size": "64Mi"}


# --- helpers ------------------------------------------------------------------------------


def request_for(
    harness: Harness, pod: str = "pod-a", name: str = "scratch", **kwargs: Any
) -> pb.NodePublishVolumeRequest:
    """The request kubelet would send, without touching the real filesystem."""
    assert harness.kubelet is not None
    kwargs.setdefault("attributes", dict(SMALL))
    request: pb.NodePublishVolumeRequest = harness.kubelet.publish_request(
        InlineVolume(pod, name, **kwargs)
    )
    return request


def publish(harness: Harness, request: pb.NodePublishVolumeRequest) -> None:
    harness.node.NodePublishVolume(request, timeout=30)


def unpublish(harness: Harness, volume_id: str, target: str) -> None:
    harness.node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target), timeout=30
    )


def stats(harness: Harness, volume_id: str, path: str) -> pb.NodeGetVolumeStatsResponse:
    response: pb.NodeGetVolumeStatsResponse = harness.node.NodeGetVolumeStats(
        pb.NodeGetVolumeStatsRequest(volume_id=volume_id, volume_path=path), timeout=30
    )
    return response


def fails(call: Callable[[], object], code: grpc.StatusCode) -> str:
    """Run ``call``, assert it fails with ``code``, return the error's details."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert code_of(err.value) == code, err.value.details()
    return str(err.value.details())


def refused(harness: Harness, request: pb.NodePublishVolumeRequest, *words: str) -> None:
    """The publish is INVALID_ARGUMENT, names ``words``, and leaves nothing behind."""
    details = fails(lambda: publish(harness, request), grpc.StatusCode.INVALID_ARGUMENT)
    for word in words:
        assert word in details, details
    assert harness.leftovers() == []
    assert harness.host.dirs == {harness.config.kubelet_root}  # no mount point left either


def names(harness: Harness, request: pb.NodePublishVolumeRequest) -> Names:
    return harness.volumes.names(request.volume_id)


def published(harness: Harness, **kwargs: Any) -> pb.NodePublishVolumeRequest:
    request = request_for(harness, **kwargs)
    publish(harness, request)
    return request


# --- NodeGetInfo / NodeGetCapabilities ----------------------------------------------------


def test_node_get_info(harness: Harness) -> None:
    info = harness.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-1"
    assert info.max_volumes_per_node == 128
    assert dict(info.accessible_topology.segments) == {"luks-ephemeral.csi.io/node": "node-1"}


def test_node_get_info_follows_config(harness: Harness) -> None:
    harness.reconfigure(node_id="worker-9", max_volumes=7, driver_name="scratch.example.com")
    info = harness.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "worker-9"
    assert info.max_volumes_per_node == 7
    assert dict(info.accessible_topology.segments) == {"scratch.example.com/node": "worker-9"}


def test_node_get_capabilities(harness: Harness) -> None:
    response = harness.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())
    types = [cap.rpc.type for cap in response.capabilities]
    assert sorted(types) == sorted(
        [RpcType.STAGE_UNSTAGE_VOLUME, RpcType.EXPAND_VOLUME, RpcType.GET_VOLUME_STATS,
         RpcType.VOLUME_CONDITION, RpcType.VOLUME_MOUNT_GROUP]
    )  # fmt: skip


# --- NodePublishVolume: parameters --------------------------------------------------------


def test_publish_defaults(harness: Harness) -> None:
    request = published(harness, attributes={})
    n = names(harness, request)
    assert harness.host.files[n.backing].size == 1024**3
    assert harness.host.files[n.backing].allocated == 0
    mount = harness.host.mounts[request.target_path]
    assert mount.source == n.mapper_device
    assert mount.fs_type == "ext4"
    assert mount.options == ["rw", "nosuid", "nodev"]
    options = harness.host.luks_options[n.header]
    assert (options.cipher, options.key_bits, options.integrity) == ("aes-xts-plain64", 512, "none")
    record = harness.volumes.journal.load(request.volume_id)
    assert record is not None and record.state == "published"
    assert record.pod == {"name": "demo", "namespace": "default", "uid": "pod-a",
                          "service_account": "default"}  # fmt: skip


@pytest.mark.parametrize(
    ("size", "expected"),
    [("512Mi", 512 * MiB), ("1G", 954 * MiB), ("1Gi", 1024 * MiB), ("100000000", 96 * MiB)],
)
def test_publish_size_forms(harness: Harness, size: str, expected: int) -> None:
    request = published(harness, attributes={"size": size})
    n = names(harness, request)
    assert harness.host.files[n.backing].size == expected
    usage = stats(harness, request.volume_id, request.target_path).usage
    assert usage[0].unit == pb.VolumeUsage.BYTES and usage[0].total == expected


def test_publish_backing_loop(harness: Harness) -> None:
    request = published(harness, attributes={"size": "64Mi", "backing": "loop"})
    n = names(harness, request)
    assert list(harness.host.loops.values()) == [n.backing]


def test_publish_backing_qcow2_without_qemu_storage_daemon(harness: Harness) -> None:
    harness.host.qsd_running = False
    request = request_for(harness, attributes={"size": "64Mi", "backing": "qcow2"})
    details = fails(lambda: publish(harness, request), grpc.StatusCode.FAILED_PRECONDITION)
    assert "qemu-storage-daemon" in details
    assert harness.leftovers() == []


@pytest.mark.parametrize(("value", "allocated"), [("true", 64 * MiB), ("false", 0)])
def test_publish_preallocate(harness: Harness, value: str, allocated: int) -> None:
    request = published(harness, attributes={"size": "64Mi", "preallocate": value})
    backing = harness.host.files[names(harness, request).backing]
    assert backing.size == 64 * MiB
    assert backing.allocated == allocated


def test_publish_integrity(harness: Harness) -> None:
    request = published(harness, attributes={"size": "64Mi", "integrity": "hmac-sha256"})
    options = harness.host.luks_options[names(harness, request).header]
    assert options.integrity == "hmac-sha256"
    assert options.key_bits == 512  # cryptsetup adds the HMAC key itself


def test_publish_header_detached(harness: Harness) -> None:
    request = published(harness, attributes={"size": "64Mi", "header": "detached"})
    n = names(harness, request)
    assert n.header.startswith(harness.config.state_dir + "/")
    assert n.header in harness.host.files
    assert n.header in harness.host.luks
    assert n.backing not in harness.host.luks  # the backing file carries no header
    assert harness.host.files[n.backing].size == 64 * MiB
    harness.unpublish()
    assert harness.leftovers() == []


def test_publish_header_attached(harness: Harness) -> None:
    request = published(harness, attributes={"size": "64Mi", "header": "attached"})
    n = names(harness, request)
    assert n.header not in harness.host.files
    assert harness.host.luks_options[n.backing].header is None
    assert harness.host.files[n.backing].size == 64 * MiB + ATTACHED_HEADER_BYTES
    harness.unpublish()
    assert harness.leftovers() == []


def test_publish_cipher_adiantum(harness: Harness) -> None:
    attributes = {"size": "64Mi", "cipher": "xchacha12,aes-adiantum-plain64"}
    request = published(harness, attributes=attributes)
    options = harness.host.luks_options[names(harness, request).header]
    assert options.cipher == "xchacha12,aes-adiantum-plain64"
    assert options.key_bits == 256


def test_publish_integrity_with_adiantum_refused(harness: Harness) -> None:
    attributes = {"size": "64Mi", "cipher": "xchacha12,aes-adiantum-plain64",
                  "integrity": "hmac-sha256"}  # fmt: skip
    refused(harness, request_for(harness, attributes=attributes), "integrity", "aes-xts-plain64")


@pytest.mark.parametrize(("fs_type", "size"), [("ext4", "64Mi"), ("xfs", "300Mi"), ("", "64Mi")])
def test_publish_fs_types(harness: Harness, fs_type: str, size: str) -> None:
    request = published(harness, attributes={"size": size}, fs_type=fs_type)
    n = names(harness, request)
    expected = fs_type or "ext4"
    assert harness.host.filesystems[n.mapper_device] == expected
    assert harness.host.mounts[request.target_path].fs_type == expected


def test_publish_small_xfs_refused(harness: Harness) -> None:
    request = request_for(harness, attributes={"size": "299Mi"}, fs_type="xfs")
    refused(harness, request, "xfs", "300Mi")


def test_publish_unknown_fs_type_refused(harness: Harness) -> None:
    refused(harness, request_for(harness, fs_type="btrfs"), "btrfs")


def test_publish_readonly_mounts_ro(harness: Harness) -> None:
    request = published(harness, readonly=True)
    options = harness.host.mounts[request.target_path].options
    assert options[0] == "ro"
    assert "rw" not in options
    assert {"nosuid", "nodev"} <= set(options)


def test_publish_reader_only_access_mode_mounts_ro(harness: Harness) -> None:
    request = request_for(harness)
    request.volume_capability.access_mode.mode = Mode.SINGLE_NODE_READER_ONLY
    publish(harness, request)
    assert harness.host.mounts[request.target_path].options[0] == "ro"


def test_publish_mount_flags_pass_through(harness: Harness) -> None:
    request = published(harness, mount_flags=["noatime,discard", "commit=30"])
    options = harness.host.mounts[request.target_path].options
    assert options == ["rw", "nosuid", "nodev", "noatime", "discard", "commit=30"]


def test_publish_ro_mount_flag_mounts_ro(harness: Harness) -> None:
    request = published(harness, mount_flags=["ro", "noexec"])
    assert harness.host.mounts[request.target_path].options == ["ro", "nosuid", "nodev", "noexec"]


@pytest.mark.parametrize("flag", ["suid", "dev", "exec", "remount", "bind"])
def test_publish_disallowed_mount_flag_refused(harness: Harness, flag: str) -> None:
    refused(harness, request_for(harness, mount_flags=["noatime", flag]), repr(flag))


def test_publish_numeric_mount_group(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    groups: list[tuple[str, int | None]] = []
    monkeypatch.setattr(harness.host, "set_volume_root",
                        lambda path, group: groups.append((path, group)))  # fmt: skip
    request = published(harness, fs_group="2000")
    assert groups == [(request.target_path, 2000)]
    record = harness.volumes.journal.load(request.volume_id)
    assert record is not None and record.spec.mount_group == "2000"


def test_publish_without_mount_group_sets_no_group(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[int | None] = []
    monkeypatch.setattr(harness.host, "set_volume_root", lambda path, group: groups.append(group))
    published(harness)
    assert groups == [None]


def test_publish_non_numeric_mount_group_refused(harness: Harness) -> None:
    refused(harness, request_for(harness, fs_group="staff"), "staff", "numeric")


def test_publish_non_ascii_digit_mount_group_refused(harness: Harness) -> None:
    refused(harness, request_for(harness, fs_group="²"), "numeric")


def test_publish_out_of_range_mount_group_refused(harness: Harness) -> None:
    refused(harness, request_for(harness, fs_group="99999999999999999999"), "group")


def test_publish_pod_context_is_recorded_not_treated_as_parameter(harness: Harness) -> None:
    request = published(harness, pod_name="web-0", namespace="shop")
    record = harness.volumes.journal.load(request.volume_id)
    assert record is not None
    assert (record.pod["name"], record.pod["namespace"]) == ("web-0", "shop")


# --- NodePublishVolume: bad input leaves nothing behind ---------------------------------


@pytest.mark.parametrize("size", ["lots", "-1Gi", "1.5.5Gi", "10XB", "", "2Ti", "99999999999Ei"])
def test_publish_bad_or_huge_size_refused(harness: Harness, size: str) -> None:
    refused(harness, request_for(harness, attributes={"size": size}), "size")


def test_publish_unknown_parameter_refused(harness: Harness) -> None:
    refused(harness, request_for(harness, attributes={"size": "64Mi", "zize": "1"}), "'zize'")


@pytest.mark.parametrize(
    ("key", "value"),
    [("backing", "nbd"), ("preallocate", "yes"), ("integrity", "crc32"), ("header", "none"),
     ("cipher", "aes-cbc")],
)  # fmt: skip
def test_publish_bad_parameter_value_refused(harness: Harness, key: str, value: str) -> None:
    request = request_for(harness, attributes={"size": "64Mi", key: value})
    refused(harness, request, f"{key}={value!r}")


def test_publish_target_outside_kubelet_root_refused(harness: Harness) -> None:
    root = harness.config.kubelet_root
    for target in ("/etc/evil", root + "evil/pods/x/mount", "/tmp/mount", root):
        request = request_for(harness)
        request.target_path = target
        refused(harness, request, "target_path")


def test_publish_target_with_dotdot_refused(harness: Harness) -> None:
    request = request_for(harness)
    request.target_path = harness.config.kubelet_root + "/pods/../../../etc/cron.d"
    refused(harness, request, "'..'")


@pytest.mark.parametrize(
    "target", ["{root}/pods//x/mount", "{root}/pods/x/mount/", "{root}/pods/./x/mount",
               "pods/x/mount", "{root}/pods/x/mo\0unt"],
)  # fmt: skip
def test_publish_unnormalised_target_refused(harness: Harness, target: str) -> None:
    request = request_for(harness)
    request.target_path = target.format(root=harness.config.kubelet_root)
    refused(harness, request, "target_path")


def test_publish_target_symlink_escape_refused(harness: Harness) -> None:
    root = harness.config.kubelet_root
    harness.host.symlinks[root + "/pods/evil"] = "/etc"
    request = request_for(harness)
    request.target_path = root + "/pods/evil/mount"
    refused(harness, request, "symlink")
    harness.host.symlinks.clear()
    request = request_for(harness)
    harness.host.symlinks[request.target_path] = "/etc"
    refused(harness, request, "symlink")


@pytest.mark.parametrize("volume_id", ["a/b", "../../etc", "/abs", "a\\b", "-x", ".hidden",
                                       "x" * 129, "sp ace"])  # fmt: skip
def test_publish_bad_volume_id_refused(harness: Harness, volume_id: str) -> None:
    request = request_for(harness)
    request.volume_id = volume_id
    refused(harness, request, "volume_id")


def test_publish_volume_id_with_trailing_newline_refused(harness: Harness) -> None:
    request = request_for(harness)
    request.volume_id = "vol-1\n"
    refused(harness, request, "volume_id")


def test_publish_missing_volume_id_refused(harness: Harness) -> None:
    request = request_for(harness)
    request.volume_id = ""
    refused(harness, request, "volume_id is required")


def test_publish_missing_target_refused(harness: Harness) -> None:
    request = request_for(harness)
    request.target_path = ""
    refused(harness, request, "target_path is required")


def test_publish_missing_capability_refused(harness: Harness) -> None:
    request = request_for(harness)
    request.ClearField("volume_capability")
    refused(harness, request, "volume_capability is required")


def test_publish_capability_without_access_type_refused(harness: Harness) -> None:
    request = request_for(harness)
    request.volume_capability.ClearField("mount")
    refused(harness, request, "mount access type")


def test_publish_block_capability_refused(harness: Harness) -> None:
    request = request_for(harness)
    request.volume_capability.block.SetInParent()
    assert request.volume_capability.WhichOneof("access_type") == "block"
    refused(harness, request, "block")


@pytest.mark.parametrize(
    "mode",
    [Mode.MULTI_NODE_MULTI_WRITER, Mode.MULTI_NODE_READER_ONLY, Mode.MULTI_NODE_SINGLE_WRITER,
     Mode.UNKNOWN],
)  # fmt: skip
def test_publish_multi_node_access_mode_refused(harness: Harness, mode: int) -> None:
    request = request_for(harness)
    request.volume_capability.access_mode.mode = mode  # type: ignore[assignment]
    refused(harness, request, Mode.Name(mode))


@pytest.mark.parametrize("value", [None, "false", "True"])
def test_publish_neither_inline_nor_provisioned_refused(
    harness: Harness, value: str | None
) -> None:
    """Without ephemeral=true the volume must be one this driver provisioned (and staged)."""
    request = request_for(harness)
    if value is None:
        del request.volume_context["csi.storage.k8s.io/ephemeral"]
    else:
        request.volume_context["csi.storage.k8s.io/ephemeral"] = value
    refused(harness, request, "ephemeral", "provisioned")


# --- idempotency, conflicts, concurrency -------------------------------------------------


def test_publish_twice_is_ok_and_one_volume(harness: Harness) -> None:
    request = published(harness)
    publish(harness, request)
    assert len(harness.journal_files()) == 1
    assert len(harness.host.loops) == 1
    assert len(harness.host.mappings) == 1
    assert list(harness.host.mounts) == [request.target_path]
    assert sum(c.startswith("luks_format") for c in harness.host.calls) == 1
    assert sum(c.startswith("mkfs") for c in harness.host.calls) == 1


def test_publish_again_remounts_a_lost_mount(harness: Harness) -> None:
    request = published(harness)
    del harness.host.mounts[request.target_path]
    publish(harness, request)
    assert harness.host.mount_source(request.target_path) == names(harness, request).mapper_device
    assert sum(c.startswith("luks_format") for c in harness.host.calls) == 1


def test_publish_again_after_mapping_lost_is_failed_precondition(harness: Harness) -> None:
    request = published(harness)
    del harness.host.mounts[request.target_path]
    del harness.host.mappings[names(harness, request).mapping]
    details = fails(lambda: publish(harness, request), grpc.StatusCode.FAILED_PRECONDITION)
    assert "delete the pod" in details


@pytest.mark.parametrize(
    "change",
    [
        {"readonly": True},
        {"fs_type": "xfs", "attributes": {"size": "300Mi"}},
        {"attributes": {"size": "128Mi"}},
        {"attributes": {"size": "64Mi", "header": "attached"}},
        {"mount_flags": ["noatime"]},
        {"fs_group": "3000"},
    ],
)
def test_publish_same_volume_incompatible_is_already_exists(
    harness: Harness, change: dict[str, Any]
) -> None:
    first = published(harness)
    second = request_for(harness, **change)
    assert second.volume_id == first.volume_id
    fails(lambda: publish(harness, second), grpc.StatusCode.ALREADY_EXISTS)
    record = harness.volumes.journal.load(first.volume_id)
    assert record is not None and record.spec.size == 64 * MiB and not record.spec.readonly
    assert harness.host.mounts[first.target_path].options[0] == "rw"


def test_publish_same_volume_other_access_mode_is_already_exists(harness: Harness) -> None:
    first = published(harness)
    second = request_for(harness)
    second.volume_capability.access_mode.mode = Mode.SINGLE_NODE_READER_ONLY
    fails(lambda: publish(harness, second), grpc.StatusCode.ALREADY_EXISTS)
    assert harness.host.mounts[first.target_path].options[0] == "rw"


def test_publish_same_volume_other_target_is_already_exists(harness: Harness) -> None:
    first = published(harness)
    second = request_for(harness)
    second.target_path = first.target_path.replace("/mount", "/other")
    details = fails(lambda: publish(harness, second), grpc.StatusCode.ALREADY_EXISTS)
    assert first.target_path in details
    assert list(harness.host.mounts) == [first.target_path]


def test_publish_while_volume_locked_is_aborted(harness: Harness) -> None:
    request = request_for(harness)
    with harness.volumes.locks.hold(request.volume_id):
        details = fails(lambda: publish(harness, request), grpc.StatusCode.ABORTED)
    assert "in progress" in details
    assert harness.leftovers() == []
    publish(harness, request)  # the lock is free again
    assert request.target_path in harness.host.mounts


def test_unpublish_while_volume_locked_is_aborted(harness: Harness) -> None:
    request = published(harness)
    with harness.volumes.locks.hold(request.volume_id):
        fails(lambda: unpublish(harness, request.volume_id, request.target_path),
              grpc.StatusCode.ABORTED)  # fmt: skip
    assert request.target_path in harness.host.mounts
    unpublish(harness, request.volume_id, request.target_path)
    assert harness.leftovers() == []


def test_concurrent_publish_of_same_volume_is_aborted(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real_mkfs = harness.host.mkfs

    def slow_mkfs(device: str, fs_type: str, *, eager: bool = False) -> None:
        entered.set()
        assert release.wait(10)
        real_mkfs(device, fs_type, eager=eager)

    monkeypatch.setattr(harness.host, "mkfs", slow_mkfs)
    request = request_for(harness)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            publish(harness, request)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(10)
        fails(lambda: publish(harness, request), grpc.StatusCode.ABORTED)
        fails(lambda: unpublish(harness, request.volume_id, request.target_path),
              grpc.StatusCode.ABORTED)  # fmt: skip
    finally:
        release.set()
        thread.join(10)
    assert errors == []
    assert len(harness.host.mappings) == 1
    assert harness.host.mount_source(request.target_path) == names(harness, request).mapper_device


def test_two_volumes_are_independent(harness: Harness) -> None:
    a = published(harness, pod="pod-a")
    b = published(harness, pod="pod-b")
    assert a.volume_id != b.volume_id
    assert len(harness.host.mappings) == 2
    unpublish(harness, a.volume_id, a.target_path)
    assert list(harness.host.mounts) == [b.target_path]
    assert len(harness.journal_files()) == 1


# --- NodeUnpublishVolume ------------------------------------------------------------------


def test_unpublish_tears_everything_down(harness: Harness) -> None:
    request = published(harness, attributes={"size": "64Mi", "preallocate": "true"})
    unpublish(harness, request.volume_id, request.target_path)
    assert harness.leftovers() == []
    assert request.target_path not in harness.host.dirs
    calls = [c.split()[0] for c in harness.host.calls]
    assert calls.index("umount") < calls.index("crypt_close") < calls.index("loop_detach")


def test_unpublish_twice_is_ok(harness: Harness) -> None:
    request = published(harness)
    unpublish(harness, request.volume_id, request.target_path)
    unpublish(harness, request.volume_id, request.target_path)
    assert harness.leftovers() == []


def test_unpublish_unknown_volume_is_ok(harness: Harness) -> None:
    target = harness.config.kubelet_root + "/pods/nobody/volumes/kubernetes.io~csi/x/mount"
    unpublish(harness, "never-published", target)
    assert harness.leftovers() == []


def test_unpublish_unmounted_target_is_ok(harness: Harness) -> None:
    request = published(harness)
    del harness.host.mounts[request.target_path]
    unpublish(harness, request.volume_id, request.target_path)
    assert harness.leftovers() == []


def test_unpublish_other_target_leaves_volume(harness: Harness) -> None:
    request = published(harness)
    other = request.target_path.replace("/mount", "/elsewhere")
    unpublish(harness, request.volume_id, other)
    assert harness.host.mount_source(request.target_path) == names(harness, request).mapper_device
    assert len(harness.journal_files()) == 1


def test_unpublish_unknown_volume_does_not_touch_another_volumes_mount(harness: Harness) -> None:
    request = published(harness)
    unpublish(harness, "some-other-volume", request.target_path)
    assert harness.host.mount_source(request.target_path) == names(harness, request).mapper_device


def test_unpublish_busy_target_fails_and_keeps_volume(harness: Harness) -> None:
    request = published(harness)
    harness.host.busy.add(request.target_path)
    details = fails(lambda: unpublish(harness, request.volume_id, request.target_path),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "busy" in details
    n = names(harness, request)
    assert harness.host.mount_source(request.target_path) == n.mapper_device
    assert n.mapping in harness.host.mappings
    assert len(harness.journal_files()) == 1
    harness.host.busy.clear()
    unpublish(harness, request.volume_id, request.target_path)
    assert harness.leftovers() == []


@pytest.mark.parametrize(
    ("volume_id", "target", "word"),
    [("", "/pods/x/mount", "volume_id is required"), ("a/b", "/pods/x/mount", "volume_id"),
     ("vol", "", "target_path is required"), ("vol", "/pods/../../etc", "'..'"),
     ("vol", "!/etc", "outside the kubelet root")],
)  # fmt: skip
def test_unpublish_bad_input_refused(
    harness: Harness, volume_id: str, target: str, word: str
) -> None:
    root = harness.config.kubelet_root
    path = "/etc" if target.startswith("!") else (root + target if target else "")
    details = fails(lambda: unpublish(harness, volume_id, path), grpc.StatusCode.INVALID_ARGUMENT)
    assert word in details


# --- NodeGetVolumeStats -------------------------------------------------------------------


def test_stats_usage_and_healthy_condition(harness: Harness) -> None:
    request = published(harness)
    response = stats(harness, request.volume_id, request.target_path)
    by_unit = {u.unit: u for u in response.usage}
    size = 64 * MiB
    assert set(by_unit) == {pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES}
    b = by_unit[pb.VolumeUsage.BYTES]
    assert (b.total, b.used, b.available) == (size, 4096, size - 4096)
    i = by_unit[pb.VolumeUsage.INODES]
    assert (i.total, i.used, i.available) == (size // 16384, 11, size // 16384 - 11)
    assert response.volume_condition.abnormal is False
    assert response.volume_condition.message == "volume is healthy"


def _break_mapping(h: Harness, n: Names) -> None:
    del h.host.mappings[n.mapping]


def _break_loop(h: Harness, n: Names) -> None:
    device = h.host.loop_find(n.backing)
    assert device is not None
    del h.host.loops[device]


def _break_backing(h: Harness, n: Names) -> None:
    del h.host.files[n.backing]


def _break_fs(h: Harness, n: Names) -> None:
    h.host.fs_errors[n.mapper_device] = 3


def _break_mount(h: Harness, n: Names) -> None:
    for target in h.host.mountpoints_of(n.mapper_device):
        del h.host.mounts[target]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_break_mapping, "is closed"),
        (_break_loop, "loop device is detached"),
        (_break_backing, "is gone"),
        (_break_fs, "recorded 3 errors"),
        (_break_mount, "not mounted"),
    ],
)
def test_stats_abnormal_condition(
    harness: Harness, damage: Callable[[Harness, Names], None], reason: str
) -> None:
    request = published(harness)
    damage(harness, names(harness, request))
    condition = stats(harness, request.volume_id, request.target_path).volume_condition
    assert condition.abnormal is True
    assert reason in condition.message


def test_stats_unmounted_volume_reports_no_usage(harness: Harness) -> None:
    request = published(harness)
    _break_mount(harness, names(harness, request))
    response = stats(harness, request.volume_id, request.target_path)
    assert list(response.usage) == []
    assert response.volume_condition.abnormal is True


def test_stats_unknown_volume_or_wrong_path_not_found(harness: Harness) -> None:
    request = published(harness)
    fails(lambda: stats(harness, "unknown-volume", request.target_path),
          grpc.StatusCode.NOT_FOUND)  # fmt: skip
    other = request.target_path.replace("/mount", "/other")
    details = fails(lambda: stats(harness, request.volume_id, other), grpc.StatusCode.NOT_FOUND)
    assert other in details
    unpublish(harness, request.volume_id, request.target_path)
    fails(lambda: stats(harness, request.volume_id, request.target_path),
          grpc.StatusCode.NOT_FOUND)  # fmt: skip


def test_stats_bad_input_refused(harness: Harness) -> None:
    request = published(harness)
    fails(lambda: stats(harness, request.volume_id, ""), grpc.StatusCode.INVALID_ARGUMENT)
    fails(lambda: stats(harness, "", request.target_path), grpc.StatusCode.INVALID_ARGUMENT)
    fails(lambda: stats(harness, "../x", request.target_path), grpc.StatusCode.INVALID_ARGUMENT)


# --- capacity -----------------------------------------------------------------------------


def test_capacity_budget_exceeded(harness: Harness) -> None:
    harness.reconfigure(capacity=100 * MiB)
    first = published(harness, pod="pod-a", attributes={"size": "64Mi"})
    second = request_for(harness, pod="pod-b", attributes={"size": "64Mi"})
    details = fails(lambda: publish(harness, second), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "budget" in details
    assert "36Mi of 100Mi left" in details
    assert len(harness.journal_files()) == 1
    assert list(harness.host.mounts) == [first.target_path]
    assert names(harness, second).backing not in harness.host.files
    unpublish(harness, first.volume_id, first.target_path)
    publish(harness, second)  # the budget is released on unpublish
    assert second.target_path in harness.host.mounts


def test_capacity_budget_smaller_than_volume_leaves_nothing(harness: Harness) -> None:
    harness.reconfigure(capacity=32 * MiB)
    request = request_for(harness, attributes={"size": "64Mi"})
    fails(lambda: publish(harness, request), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert harness.leftovers() == []


def test_capacity_counts_attached_header(harness: Harness) -> None:
    harness.reconfigure(capacity=64 * MiB)
    attached = request_for(harness, attributes={"size": "64Mi", "header": "attached"})
    fails(lambda: publish(harness, attached), grpc.StatusCode.RESOURCE_EXHAUSTED)
    published(harness, attributes={"size": "64Mi", "header": "detached"})


def test_free_space_exceeded(harness: Harness) -> None:
    harness.host.free = 50 * MiB
    request = request_for(harness, attributes={"size": "64Mi"})
    details = fails(lambda: publish(harness, request), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert harness.config.data_dir in details
    assert harness.leftovers() == []


def test_free_space_counts_promises_of_sparse_volumes(harness: Harness) -> None:
    harness.host.free = 100 * MiB
    published(harness, pod="pod-a", attributes={"size": "64Mi"})  # sparse: 0 bytes allocated
    second = request_for(harness, pod="pod-b", attributes={"size": "64Mi"})
    details = fails(lambda: publish(harness, second), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "64 MiB already promised" in details
    assert len(harness.journal_files()) == 1


def test_max_volumes_reached(harness: Harness) -> None:
    harness.reconfigure(max_volumes=2)
    a = published(harness, pod="pod-a")
    published(harness, pod="pod-b")
    third = request_for(harness, pod="pod-c")
    details = fails(lambda: publish(harness, third), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "--max-volumes=2" in details
    assert len(harness.journal_files()) == 2
    assert third.target_path not in harness.host.mounts
    publish(harness, a)  # an existing volume's republish is not a new volume
    unpublish(harness, a.volume_id, a.target_path)
    publish(harness, third)
    assert third.target_path in harness.host.mounts


def test_size_bounds(harness: Harness) -> None:
    harness.reconfigure(min_size=32 * MiB, max_size=128 * MiB)
    refused(harness, request_for(harness, attributes={"size": "31Mi"}), "minimum 32Mi")
    refused(harness, request_for(harness, attributes={"size": "129Mi"}), "maximum 128Mi")
    published(harness, pod="pod-a", attributes={"size": "32Mi"})
    published(harness, pod="pod-b", attributes={"size": "128Mi"})
    assert len(harness.journal_files()) == 2
