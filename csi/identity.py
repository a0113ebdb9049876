"""CSI Identity service: who we are, what we offer, and whether this node can work."""

from __future__ import annotations

import grpc

from csi import __version__
from csi.config import Config
from csi.errors import FailedPrecondition
from csi.host import Host
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.rpc import handles_errors

Cap = pb.PluginCapability


class IdentityServicer(csi_pb2_grpc.IdentityServicer):  # type: ignore[misc]
    def __init__(self, config: Config, host: Host | None) -> None:
        self.config = config
        self.host = host

    @handles_errors
    def GetPluginInfo(
        self, request: pb.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginInfoResponse:
        return pb.GetPluginInfoResponse(name=self.config.driver_name, vendor_version=__version__)

    @handles_errors
    def GetPluginCapabilities(
        self, request: pb.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.GetPluginCapabilitiesResponse:
        types = [Cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        if self.config.serves_controller:
            types.insert(0, Cap.Service.CONTROLLER_SERVICE)
        caps = [Cap(service=Cap.Service(type=t)) for t in types]
        if self.config.serves_controller:  # staged volumes grow while pods use them
            online = Cap.VolumeExpansion.ONLINE
            caps.append(Cap(volume_expansion=Cap.VolumeExpansion(type=online)))
        return pb.GetPluginCapabilitiesResponse(capabilities=caps)

    @handles_errors
    def Probe(self, request: pb.ProbeRequest, context: grpc.ServicerContext) -> pb.ProbeResponse:
        missing = self.host.missing_requirements() if self.host is not None else []
        if missing:
            raise FailedPrecondition(f"not ready: this node lacks {', '.join(missing)}")
        response = pb.ProbeResponse()
        response.ready.value = True
        return response
