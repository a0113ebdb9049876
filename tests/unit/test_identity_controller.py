"""The Identity and Controller services over a real gRPC server on a unix socket."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

import csi
from csi.proto import csi_pb2 as pb
from tests.unit.harness import Harness, code_of

Service = pb.PluginCapability.Service.Type


@pytest.fixture
def all_mode() -> Iterator[Harness]:
    h = Harness(mode="all")
    try:
        yield h
    finally:
        h.close()


def services(h: Harness) -> list[int]:
    response = h.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    return [cap.service.type for cap in response.capabilities if cap.HasField("service")]


def expansion(h: Harness) -> list[int]:
    response = h.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    return [c.volume_expansion.type for c in response.capabilities
            if c.HasField("volume_expansion")]  # fmt: skip


def test_get_plugin_info(harness: Harness) -> None:
    info = harness.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "luks-ephemeral.csi.io"
    assert info.vendor_version == csi.__version__
    assert info.vendor_version == "0.1.0"


def test_get_plugin_info_uses_configured_name(harness: Harness) -> None:
    harness.reconfigure(driver_name="scratch.example.com")
    info = harness.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "scratch.example.com"


def test_plugin_capabilities_node_mode(harness: Harness) -> None:
    assert services(harness) == [Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
    assert expansion(harness) == []


def test_plugin_capabilities_all_mode(all_mode: Harness) -> None:
    found = services(all_mode)
    assert sorted(found) == sorted(
        [Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
    )
    assert expansion(all_mode) == [pb.PluginCapability.VolumeExpansion.ONLINE]


def test_probe_ready(harness: Harness) -> None:
    response = harness.identity.Probe(pb.ProbeRequest())
    assert response.HasField("ready")
    assert response.ready.value is True


def test_probe_names_missing_tool(harness: Harness) -> None:
    harness.host.missing = ["cryptsetup"]
    with pytest.raises(grpc.RpcError) as err:
        harness.identity.Probe(pb.ProbeRequest())
    assert code_of(err.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert "cryptsetup" in str(err.value.details())
    harness.host.missing = ["cryptsetup", "losetup"]
    with pytest.raises(grpc.RpcError) as err:
        harness.identity.Probe(pb.ProbeRequest())
    assert "cryptsetup, losetup" in str(err.value.details())
    harness.host.missing = []
    assert harness.identity.Probe(pb.ProbeRequest()).ready.value is True


def test_probe_in_controller_mode_does_not_need_the_node_s_kernel() -> None:
    controller_only = Harness(mode="controller")
    try:
        controller_only.host.missing = ["device-mapper (/dev/mapper/control)"]
        assert controller_only.identity.Probe(pb.ProbeRequest()).ready.value is True
    finally:
        controller_only.close()


def test_controller_get_capabilities_all_mode(all_mode: Harness) -> None:
    response = all_mode.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    assert isinstance(response, pb.ControllerGetCapabilitiesResponse)
    rpc = pb.ControllerServiceCapability.RPC.Type
    assert sorted(c.rpc.type for c in response.capabilities) == sorted(
        [rpc.CREATE_DELETE_VOLUME, rpc.GET_CAPACITY, rpc.EXPAND_VOLUME]
    )


def test_controller_service_absent_in_node_mode(harness: Harness) -> None:
    with pytest.raises(grpc.RpcError) as err:
        harness.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    assert code_of(err.value) == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("ControllerPublishVolume", pb.ControllerPublishVolumeRequest(volume_id="vol-1")),
        ("ControllerUnpublishVolume", pb.ControllerUnpublishVolumeRequest(volume_id="vol-1")),
        ("ListVolumes", pb.ListVolumesRequest()),
        ("CreateSnapshot", pb.CreateSnapshotRequest(name="snap-1")),
    ],
)
def test_unimplemented_controller_rpc(
    all_mode: Harness, method: str, request_message: object
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        getattr(all_mode.controller, method)(request_message)
    assert code_of(err.value) == grpc.StatusCode.UNIMPLEMENTED


def test_all_mode_serves_node_too(all_mode: Harness) -> None:
    info = all_mode.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-1"
    all_mode.publish(attributes={"size": "64Mi"})
    assert len(all_mode.host.mounts) == 1
    all_mode.unpublish()
    assert all_mode.leftovers() == []


def test_controller_mode_serves_no_node_service() -> None:
    h = Harness(mode="controller")
    try:
        assert Service.CONTROLLER_SERVICE in services(h)
        with pytest.raises(grpc.RpcError) as err:
            h.node.NodeGetInfo(pb.NodeGetInfoRequest())
        assert code_of(err.value) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        h.close()
