"""CSI Controller service. Provisioning arrives with generic ephemeral volumes; until then the
service answers its capability query with none, and every other RPC is UNIMPLEMENTED."""

from __future__ import annotations

import grpc

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.rpc import handles_errors


class ControllerServicer(csi_pb2_grpc.ControllerServicer):  # type: ignore[misc]
    @handles_errors
    def ControllerGetCapabilities(
        self, request: pb.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.ControllerGetCapabilitiesResponse:
        return pb.ControllerGetCapabilitiesResponse()
