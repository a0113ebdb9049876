"""The Controller service over real gRPC (``all`` mode, fake host): CreateVolume, DeleteVolume,
GetCapacity, ValidateVolumeCapabilities and ControllerExpandVolume, with the capacity rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from csi.capability import Capability
from csi.journal import RESERVED, STAGED
from csi.proto import csi_pb2 as pb
from csi.staged import StagedVolumes, StageRequest
from tests.unit.harness import CrashAfter, Harness, SimulatedCrash, code_of, fails

MiB = 1024**2
GiB = 1024**3
KEY = "luks-ephemeral.csi.io/node"
Mode = pb.VolumeCapability.AccessMode.Mode


def create(h: Harness, name: str = "pvc-1", **kwargs: Any) -> pb.Volume:
    request = h.provisioner.create_request(name, h.config.node_id, **kwargs)
    volume: pb.Volume = h.controller.CreateVolume(request, timeout=30).volume
    return volume


def create_fails(h: Harness, code: grpc.StatusCode, name: str = "pvc-1", **kwargs: Any) -> str:
    request = h.provisioner.create_request(name, h.config.node_id, **kwargs)
    details = fails(lambda: h.controller.CreateVolume(request, timeout=30), code)
    assert h.journal_files() == [], "a refused CreateVolume reserves nothing"
    return details


# --- CreateVolume -------------------------------------------------------------------------
def test_create_reserves_on_this_node_and_touches_no_disk(h: Harness) -> None:
    volume = create(h, required=64 * MiB)
    assert re.fullmatch(r"node-1/[0-9a-f]{32}", volume.volume_id)
    assert volume.capacity_bytes == 64 * MiB
    assert [dict(t.segments) for t in volume.accessible_topology] == [{KEY: "node-1"}]
    assert dict(volume.volume_context) == {
        "size": "64Mi", "backing": "loop", "preallocate": "false", "integrity": "none",
        "header": "detached", "cipher": "aes-xts-plain64",
    }  # fmt: skip
    record = h.record(volume.volume_id)
    assert record.state == RESERVED
    assert record.name == "pvc-1"
    assert record.claim == "default/claim-pvc-1"
    assert h.host.files == {} and h.host.calls == []  # the backing comes at stage time


def test_create_is_idempotent_by_name(h: Harness) -> None:
    first = create(h, required=64 * MiB, parameters={"preallocate": "true"})
    again = create(h, required=64 * MiB, parameters={"preallocate": "true"})
    assert again == first
    assert len(h.journal_files()) == 1
    other = create(h, "pvc-2", required=64 * MiB)
    assert other.volume_id != first.volume_id
    assert len(h.journal_files()) == 2


@pytest.mark.parametrize(
    ("changes", "word"),
    [({"parameters": {"integrity": "hmac-sha256"}}, "parameters"),
     ({"required": 128 * MiB}, "size"),
     ({"block": True}, "mount access")],
    ids=["parameters", "bigger", "block"],
)  # fmt: skip
def test_same_name_different_request_is_already_exists(
    h: Harness, changes: dict[str, object], word: str
) -> None:
    create(h, required=64 * MiB)
    request = h.provisioner.create_request("pvc-1", "node-1", **{"required": 64 * MiB, **changes})  # type: ignore[arg-type]
    details = fails(lambda: h.controller.CreateVolume(request, timeout=30),
                    grpc.StatusCode.ALREADY_EXISTS)  # fmt: skip
    assert word in details
    assert len(h.journal_files()) == 1


def test_same_name_smaller_request_is_the_same_volume(h: Harness) -> None:
    """The existing volume satisfies a smaller required size: that is compatible."""
    first = create(h, required=64 * MiB)
    assert create(h, required=32 * MiB).volume_id == first.volume_id


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [({"required": 10 * MiB}, 16 * MiB),  # raised to the node's minimum
     ({"required": 100 * MiB + 1}, 101 * MiB),  # rounded up to whole MiB
     ({}, 1 * GiB),  # no range: the default size
     ({"parameters": {"size": "128Mi"}}, 128 * MiB),  # no range: the StorageClass's size
     ({"required": 64 * MiB, "parameters": {"size": "128Mi"}}, 64 * MiB),  # the range wins
     ({"limit": 512 * MiB}, 512 * MiB),  # the default trimmed to the limit
     ({"required": 100 * MiB, "fs_type": "xfs"}, 300 * MiB),  # what mkfs.xfs needs
     ({"required": 100 * MiB, "block": True}, 100 * MiB)],
    ids=["min", "round", "default", "sc-size", "range-wins", "limit", "xfs", "block"],
)  # fmt: skip
def test_capacity_range_to_size(h: Harness, kwargs: dict[str, Any], size: int) -> None:
    volume = create(h, **kwargs)
    assert volume.capacity_bytes == size
    assert h.record(volume.volume_id).spec.size == size


@pytest.mark.parametrize(
    ("kwargs", "code", "word"),
    [({"required": 2 * 1024**4}, grpc.StatusCode.OUT_OF_RANGE, "maximum"),
     ({"required": 10 * MiB + 1, "limit": 10 * MiB + 2}, grpc.StatusCode.OUT_OF_RANGE, "limit"),
     ({"required": 100 * MiB, "limit": 200 * MiB, "fs_type": "xfs"},
      grpc.StatusCode.OUT_OF_RANGE, "300Mi"),
     ({"required": 64 * MiB, "limit": 32 * MiB}, grpc.StatusCode.INVALID_ARGUMENT, "limit")],
    ids=["above-max", "no-whole-mib", "xfs-limit", "required-over-limit"],
)  # fmt: skip
def test_capacity_range_refused(
    h: Harness, kwargs: dict[str, Any], code: grpc.StatusCode, word: str
) -> None:
    assert word in create_fails(h, code, **kwargs)


@pytest.mark.parametrize(
    ("parameters", "words"),
    [({"colour": "blue"}, ["colour"]),
     ({"backing": "qcow3"}, ["backing", "qcow3"]),
     ({"cipher": "xchacha12,aes-adiantum-plain64", "integrity": "hmac-sha256"}, ["integrity"]),
     ({"size": "2Ti"}, ["size", "maximum"]),
     ({"preallocate": "yes"}, ["preallocate"])],
    ids=["unknown", "qcow2", "combination", "sc-size-range", "bad-value"],
)  # fmt: skip
def test_parameters_follow_the_inline_rules(
    h: Harness, parameters: dict[str, str], words: list[str]
) -> None:
    details = create_fails(h, grpc.StatusCode.INVALID_ARGUMENT, required=64 * MiB,
                           parameters=parameters)  # fmt: skip
    for word in words:
        assert word in details


def test_co_keys_are_allowed(h: Harness) -> None:
    params = {"csi.storage.k8s.io/pv/name": "pv-1", "csi.storage.k8s.io/fstype": "ext4"}
    assert create(h, required=64 * MiB, parameters=params).capacity_bytes == 64 * MiB


def test_create_request_shape_refusals(h: Harness) -> None:
    request = h.provisioner.create_request("pvc-1", "node-1", 64 * MiB)
    mutations: list[tuple[Callable[[pb.CreateVolumeRequest], object], str]] = [
        (lambda r: r.ClearField("name"), "name"),
        (lambda r: r.ClearField("volume_capabilities"), "volume_capabilities"),
        (lambda r: setattr(r.volume_capabilities[0].access_mode, "mode",
                           Mode.MULTI_NODE_MULTI_WRITER), "MULTI_NODE_MULTI_WRITER"),
        (lambda r: r.volume_content_source.snapshot.SetInParent(), "snapshots"),
        (lambda r: r.volume_capabilities.append(
            pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                                access_mode=r.volume_capabilities[0].access_mode)), "mix"),
    ]  # fmt: skip
    for mutate, word in mutations:
        bad = pb.CreateVolumeRequest()
        bad.CopyFrom(request)
        mutate(bad)
        details = fails(lambda b=bad: h.controller.CreateVolume(b, timeout=30),  # type: ignore[misc]
                        grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        assert word in details
    assert h.journal_files() == []


def test_topology_other_node_is_resource_exhausted(h: Harness) -> None:
    """Each controller provisions on its own node only (distributed provisioning)."""
    request = h.provisioner.create_request("pvc-1", "node-2", 64 * MiB)
    details = fails(lambda: h.controller.CreateVolume(request, timeout=30),
                    grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
    assert "node-1" in details and "node-2" in details
    unknown_key = pb.Topology(segments={KEY: "node-1", "zone": "a"})
    del request.accessibility_requirements.requisite[:]
    request.accessibility_requirements.requisite.append(unknown_key)
    fails(lambda: h.controller.CreateVolume(request, timeout=30),
          grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
    assert h.journal_files() == []


def test_topology_any_of_the_requisite_and_none_at_all(h: Harness) -> None:
    request = h.provisioner.create_request("pvc-1", "node-2", 64 * MiB)
    request.accessibility_requirements.requisite.append(pb.Topology(segments={KEY: "node-1"}))
    volume = h.controller.CreateVolume(request, timeout=30).volume
    assert volume.volume_id.startswith("node-1/")
    request = h.provisioner.create_request("pvc-2", "node-1", 64 * MiB)
    request.ClearField("accessibility_requirements")
    volume = h.controller.CreateVolume(request, timeout=30).volume
    assert [dict(t.segments) for t in volume.accessible_topology] == [{KEY: "node-1"}]


def test_node_id_unusable_in_a_volume_id() -> None:
    h = Harness(mode="all", node_id="Node_With_Capitals")
    try:
        request = h.provisioner.create_request("pvc-1", "Node_With_Capitals", 64 * MiB)
        details = fails(lambda: h.controller.CreateVolume(request, timeout=30),
                        grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
        assert "node name" in details
    finally:
        h.close()


# --- capacity is reserved at CreateVolume -------------------------------------------------
def test_budget_is_enforced_and_released() -> None:
    h = Harness(mode="all", capacity=256 * MiB)
    try:
        first = create(h, "pvc-1", required=128 * MiB)
        create(h, "pvc-2", required=128 * MiB)
        details = create_fails_keep(h, "pvc-3", 64 * MiB)
        assert "budget" in details
        h.provisioner.delete(first.volume_id)
        create(h, "pvc-3", required=64 * MiB)  # room again
    finally:
        h.close()


def create_fails_keep(h: Harness, name: str, size: int) -> str:
    """A refused CreateVolume that leaves the other reservations alone."""
    before = h.journal_files()
    request = h.provisioner.create_request(name, h.config.node_id, size)
    details = fails(lambda: h.controller.CreateVolume(request, timeout=30),
                    grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
    assert h.journal_files() == before
    return details


def test_free_space_is_enforced(h: Harness) -> None:
    h.host.free = 200 * MiB
    create(h, "pvc-1", required=128 * MiB)
    assert "data dir" in create_fails_keep(h, "pvc-2", 128 * MiB)


def test_volume_limit_is_enforced() -> None:
    h = Harness(mode="all", max_volumes=1)
    try:
        create(h, "pvc-1", required=64 * MiB)
        assert "max-volumes" in create_fails_keep(h, "pvc-2", 64 * MiB)
    finally:
        h.close()


def test_inline_and_provisioned_volumes_share_the_budget() -> None:
    h = Harness(mode="all", capacity=256 * MiB)
    try:
        h.publish(attributes={"size": "128Mi"})
        assert "budget" in create_fails_keep(h, "pvc-1", 192 * MiB)
        create(h, "pvc-1", required=128 * MiB)
        with pytest.raises(grpc.RpcError) as err:  # the reservation holds inline room too
            h.publish(pod="pod-b", attributes={"size": "64Mi"})
        assert code_of(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        h.close()


# --- DeleteVolume -------------------------------------------------------------------------
def test_delete_is_idempotent(h: Harness) -> None:
    volume = create(h, required=64 * MiB)
    h.provisioner.delete(volume.volume_id)
    assert h.journal_files() == []
    h.provisioner.delete(volume.volume_id)  # again: OK
    h.provisioner.delete("node-1/" + "0" * 32)  # never existed: OK
    h.provisioner.delete("csi-0123")  # not an id we ever returned: OK, and nothing touched
    assert h.leftovers() == []


def test_delete_refuses_another_nodes_volume_and_an_empty_id(h: Harness) -> None:
    details = fails(lambda: h.provisioner.delete("node-2/" + "0" * 32),
                    grpc.StatusCode.FAILED_PRECONDITION)  # fmt: skip
    assert "node-2" in details
    fails(lambda: h.provisioner.delete(""), grpc.StatusCode.INVALID_ARGUMENT)


def test_delete_refuses_a_staged_volume(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    details = fails(lambda: h.provisioner.delete(pv.volume_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "unstage" in details
    assert h.record(pv.volume_id).state == STAGED
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def test_delete_cleans_up_what_a_failed_node_left(h: Harness) -> None:
    """A stage that died half-way (no restart since) leaves objects: delete removes them."""
    pv = h.provision(size=64 * MiB)
    request = StageRequest(pv.volume_id, h.k.staging_path(pv), Capability("mount"))
    h.volumes.after_step = CrashAfter("mkfs")
    with pytest.raises(SimulatedCrash):
        StagedVolumes(h.volumes).stage(request)
    h.volumes.after_step = lambda step: None
    assert h.host.mappings and h.host.loops and h.host.files
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


# --- GetCapacity --------------------------------------------------------------------------
def test_get_capacity_is_budget_minus_reservations() -> None:
    h = Harness(mode="all", capacity=1 * GiB, max_size=512 * MiB)
    try:
        assert h.provisioner.capacity("node-1") == (1 * GiB, 512 * MiB)
        create(h, "pvc-1", required=768 * MiB - 512 * MiB)
        assert h.provisioner.capacity("node-1") == (768 * MiB, 512 * MiB)
        assert h.provisioner.capacity("node-2") == (0, 0)  # another node's segment
        response = h.controller.GetCapacity(pb.GetCapacityRequest(), timeout=30)
        assert response.available_capacity == 768 * MiB  # no topology: this node
        assert response.minimum_volume_size.value == 16 * MiB
        # an attached header takes 1 MiB of the backing file beside the volume
        attached = h.provisioner.capacity("node-1", {"header": "attached"})
        assert attached == (767 * MiB, 512 * MiB)
    finally:
        h.close()


def test_get_capacity_is_bounded_by_free_space_minus_promises(h: Harness) -> None:
    h.host.free = 1 * GiB
    assert h.provisioner.capacity("node-1")[0] == 1 * GiB  # no budget: free space only
    pv = h.provision(size=256 * MiB)
    assert h.provisioner.capacity("node-1")[0] == 768 * MiB  # promised, though nothing written
    h.k.stage(pv)  # sparse: still promised in full, charged once
    assert h.provisioner.capacity("node-1")[0] == 768 * MiB - 16 * MiB  # minus the header
    h.host.free = 100 * MiB
    assert h.provisioner.capacity("node-1")[0] == 0


def test_get_capacity_zero_at_the_volume_limit_and_bad_parameters() -> None:
    h = Harness(mode="all", max_volumes=1)
    try:
        create(h, required=64 * MiB)
        assert h.provisioner.capacity("node-1")[0] == 0
        details = fails(lambda: h.provisioner.capacity("node-1", {"colour": "x"}),
                        grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        assert "colour" in details
    finally:
        h.close()


# --- ValidateVolumeCapabilities -----------------------------------------------------------
def validate(h: Harness, volume_id: str, mode: int = Mode.SINGLE_NODE_WRITER,
             **fields: dict[str, str]) -> pb.ValidateVolumeCapabilitiesResponse:  # fmt: skip
    capability = pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
                                     access_mode=pb.VolumeCapability.AccessMode(mode=mode))  # type: ignore[arg-type]  # fmt: skip
    request = pb.ValidateVolumeCapabilitiesRequest(
        volume_id=volume_id, volume_capabilities=[capability], **fields
    )
    response: pb.ValidateVolumeCapabilitiesResponse = h.controller.ValidateVolumeCapabilities(
        request, timeout=30
    )
    return response


def test_validate_volume_capabilities(h: Harness) -> None:
    volume = create(h, required=64 * MiB)
    ok = validate(h, volume.volume_id, volume_context=dict(volume.volume_context))
    assert ok.HasField("confirmed")
    assert ok.confirmed.volume_context == volume.volume_context
    multi = validate(h, volume.volume_id, mode=Mode.MULTI_NODE_MULTI_WRITER)
    assert not multi.HasField("confirmed") and "MULTI_NODE" in multi.message
    bad = validate(h, volume.volume_id, parameters={"colour": "x"})
    assert not bad.HasField("confirmed") and "colour" in bad.message
    fails(lambda: validate(h, "node-1/" + "1" * 32), grpc.StatusCode.NOT_FOUND)
    fails(lambda: validate(h, "csi-1234"), grpc.StatusCode.NOT_FOUND)
    fails(lambda: validate(h, "not/an id!"), grpc.StatusCode.NOT_FOUND)
    empty = pb.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id)
    fails(lambda: h.controller.ValidateVolumeCapabilities(empty, timeout=30),
          grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip


# --- ControllerExpandVolume ---------------------------------------------------------------
def test_expand_unstaged_volume_just_takes_the_new_size(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    response = h.provisioner.expand(pv.volume_id, 128 * MiB)
    assert (response.capacity_bytes, response.node_expansion_required) == (128 * MiB, False)
    assert h.record(pv.volume_id).spec.size == 128 * MiB
    h.k.stage(pv)  # made at the new size
    assert h.host.files[h.volumes.names(pv.volume_id).backing].size == 128 * MiB


def test_expand_staged_volume_reserves_and_asks_the_node(h: Harness) -> None:
    h.host.free = 1 * GiB
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    response = h.provisioner.expand(pv.volume_id, 256 * MiB)
    assert (response.capacity_bytes, response.node_expansion_required) == (256 * MiB, True)
    record = h.record(pv.volume_id)
    assert (record.spec.size, record.grow_to, record.charge) == (64 * MiB, 256 * MiB, 256 * MiB)
    assert h.provisioner.capacity("node-1")[0] == 1 * GiB - 256 * MiB - 16 * MiB
    assert h.k.expand(pv, 256 * MiB) == 256 * MiB  # the node grows it into the reservation
    record = h.record(pv.volume_id)
    assert (record.spec.size, record.grow_to) == (256 * MiB, 0)
    again = h.provisioner.expand(pv.volume_id, 128 * MiB)  # smaller: nothing to do
    assert (again.capacity_bytes, again.node_expansion_required) == (256 * MiB, False)


def test_expand_refusals() -> None:
    h = Harness(mode="all", capacity=256 * MiB)
    try:
        pv = h.provision(size=64 * MiB)
        details = fails(lambda: h.provisioner.expand(pv.volume_id, 512 * MiB),
                        grpc.StatusCode.RESOURCE_EXHAUSTED)  # fmt: skip
        assert "budget" in details
        assert h.record(pv.volume_id).charge == 64 * MiB
        fails(lambda: h.provisioner.expand(pv.volume_id, 2 * 1024**4),
              grpc.StatusCode.OUT_OF_RANGE)  # fmt: skip
        fails(lambda: h.provisioner.expand("node-1/" + "2" * 32, 128 * MiB),
              grpc.StatusCode.NOT_FOUND)  # fmt: skip
        authenticated = h.provision("pvc-i", 64 * MiB, parameters={"integrity": "hmac-sha256"})
        details = fails(lambda: h.provisioner.expand(authenticated.volume_id, 128 * MiB),
                        grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
        assert "integrity" in details
        no_range = pb.ControllerExpandVolumeRequest(volume_id=pv.volume_id)
        fails(lambda: h.controller.ControllerExpandVolume(no_range, timeout=30),
              grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    finally:
        h.close()


def test_expand_another_nodes_volume_leaves_it_to_that_node(h: Harness) -> None:
    response = h.provisioner.expand("node-2/" + "3" * 32, 128 * MiB)
    assert (response.capacity_bytes, response.node_expansion_required) == (128 * MiB, True)
    assert h.journal_files() == []
