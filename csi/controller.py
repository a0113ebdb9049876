"""CSI Controller service: thin translation between the wire and the provisioner.

Served in ``controller`` and ``all`` modes. With distributed provisioning each node's driver is
its own controller (see provision.py): volumes are created on, and only on, this node.
Snapshots, clones, attach (ControllerPublishVolume) and ListVolumes are not offered and stay
UNIMPLEMENTED.
"""

from __future__ import annotations

import grpc

from csi.capability import Capability
from csi.errors import InvalidArgument
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.provision import CreateRequest, Provisioner
from csi.rpc import handles_errors
from csi.wire import capabilities_of, capability_of

RpcType = pb.ControllerServiceCapability.RPC.Type
CAPABILITIES = (RpcType.CREATE_DELETE_VOLUME, RpcType.GET_CAPACITY, RpcType.EXPAND_VOLUME)


def capacity_range(request: object) -> tuple[int, int]:
    """(required_bytes, limit_bytes) of a request; (0, 0) when it sets no range."""
    if not request.HasField("capacity_range"):  # type: ignore[attr-defined]
        return 0, 0
    bounds = request.capacity_range  # type: ignore[attr-defined]
    return int(bounds.required_bytes), int(bounds.limit_bytes)


class ControllerServicer(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    def __init__(self, provisioner: Provisioner) -> None:
        self.provisioner = provisioner

    @handles_errors
    def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetCapabilitiesResponse:
        caps = [pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t))
                for t in CAPABILITIES]  # fmt: skip
        return pb.ControllerGetCapabilitiesResponse(capabilities=caps)

    @handles_errors
    def CreateVolume(
        self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> pb.CreateVolumeResponse:
        if not request.name:
            raise InvalidArgument("name is required")
        capabilities = capabilities_of(list(request.volume_capabilities))
        if request.HasField("volume_content_source"):
            raise InvalidArgument(
                "volumes cannot be pre-populated (no snapshots or clones): every volume starts "
                "empty, under a fresh key"
            )
        required, limit = capacity_range(request)
        topology = request.accessibility_requirements
        created = self.provisioner.create(
            CreateRequest(
                name=request.name,
                capabilities=tuple(capabilities),
                parameters=dict(request.parameters),
                required=required,
                limit=limit,
                requisite=tuple(dict(t.segments) for t in topology.requisite),
                preferred=tuple(dict(t.segments) for t in topology.preferred),
            )
        )
        volume = pb.Volume(
            capacity_bytes=created.size,
            volume_id=created.volume_id,
            volume_context=created.context,
            accessible_topology=[pb.Topology(segments=created.topology)],
        )
        return pb.CreateVolumeResponse(volume=volume)

    @handles_errors
    def DeleteVolume(
        self, request: pb.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> pb.DeleteVolumeResponse:
        self.provisioner.delete(request.volume_id)
        return pb.DeleteVolumeResponse()

    @handles_errors
    def GetCapacity(
        self, request: pb.GetCapacityRequest, context: grpc.ServicerContext
    ) -> pb.GetCapacityResponse:
        if request.volume_capabilities:
            capabilities_of(list(request.volume_capabilities))
        segments = (dict(request.accessible_topology.segments)
                    if request.HasField("accessible_topology") else None)  # fmt: skip
        capacity = self.provisioner.capacity(segments, dict(request.parameters))
        response = pb.GetCapacityResponse(available_capacity=capacity.available)
        if capacity.maximum is not None:
            response.maximum_volume_size.value = capacity.maximum
        if capacity.minimum is not None:
            response.minimum_volume_size.value = capacity.minimum
        return response

    @handles_errors
    def ValidateVolumeCapabilities(
        self, request: pb.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ValidateVolumeCapabilitiesResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required: name at least one")
        unsupported = ""
        capabilities: list[Capability] = []
        try:
            capabilities = capabilities_of(list(request.volume_capabilities))
        except InvalidArgument as exc:
            unsupported = str(exc)
        try:  # an unknown volume is NOT_FOUND even when the capabilities are bad too
            self.provisioner.validate(request.volume_id, dict(request.volume_context),
                                      dict(request.parameters), capabilities)  # fmt: skip
        except InvalidArgument as exc:
            unsupported = unsupported or str(exc)
        if unsupported:
            return pb.ValidateVolumeCapabilitiesResponse(message=unsupported)
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=dict(request.volume_context),
            volume_capabilities=list(request.volume_capabilities),
            parameters=dict(request.parameters),
        )
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @handles_errors
    def ControllerExpandVolume(
        self, request: pb.ControllerExpandVolumeRequest, context: grpc.ServicerContext
    ) -> pb.ControllerExpandVolumeResponse:
        if not request.volume_id:
            raise InvalidArgument("volume_id is required")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        if request.HasField("volume_capability"):
            capability_of(request.volume_capability)
        required, limit = capacity_range(request)
        expanded = self.provisioner.expand(request.volume_id, required, limit)
        return pb.ControllerExpandVolumeResponse(
            capacity_bytes=expanded.size, node_expansion_required=expanded.node_expansion_required
        )
