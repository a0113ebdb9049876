"""CSI Node service: translate requests into lifecycle calls, and results into responses."""

from __future__ import annotations

import logging

import grpc

from csi.config import Config
from csi.errors import (
    DriverError,
    InvalidArgument,
    NamespaceLimitExceeded,
    NotFound,
    ResourceExhausted,
)
from csi.params import VolumeSpec, check_combination, parse_attributes
from csi.pods import Notify, no_notify, pod_of
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.rpc import handles_errors
from csi.staged import ExpandRequest, StagedVolumes, StageRequest, TargetRequest
from csi.volumes import PublishRequest, Volumes, is_provisioned_id
from csi.wire import Mode, capability_of, check_access_mode, required_capability

TOPOLOGY_KEY_SUFFIX = "/node"
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
POD_KEYS = {
    "csi.storage.k8s.io/pod.name": "name",
    "csi.storage.k8s.io/pod.namespace": "namespace",
    "csi.storage.k8s.io/pod.uid": "uid",
    "csi.storage.k8s.io/serviceAccount.name": "service_account",
}
RpcType = pb.NodeServiceCapability.RPC.Type

log = logging.getLogger(__name__)


# Refusals worth an event on the pod, and the event's reason. The first class the error is an
# instance of wins: a subclass comes before its base.
EVENT_REASONS: dict[type[DriverError], str] = {
    InvalidArgument: "InvalidVolumeParameter",
    NamespaceLimitExceeded: "NamespaceLimitExceeded",
    ResourceExhausted: "CapacityExhausted",
}


def topology_key(driver_name: str) -> str:
    """``<driver>/node``: the one topology segment, whose value is the node id."""
    return driver_name + TOPOLOGY_KEY_SUFFIX


def spec_from_request(request: pb.NodePublishVolumeRequest, config: Config) -> VolumeSpec:
    """Validate everything the CO sent and build the volume's spec, or raise InvalidArgument."""
    if not request.HasField("volume_capability"):
        raise InvalidArgument("volume_capability is required")
    capability = request.volume_capability
    if capability.HasField("block"):
        raise InvalidArgument("inline ephemeral volumes are filesystem volumes: block access "
                              "is not supported for them")
    if not capability.HasField("mount"):
        raise InvalidArgument("volume_capability must set the mount access type")
    check_access_mode(capability)
    attributes = dict(request.volume_context)
    fields = parse_attributes(attributes, min_size=config.min_size, max_size=config.max_size)
    cap = capability_of(capability)
    spec = VolumeSpec(
        **fields,
        fs_type=cap.fs_type,
        access_type="mount",
        mount_flags=cap.mount_flags,
        readonly=request.readonly or capability.access_mode.mode == Mode.SINGLE_NODE_READER_ONLY,
        mount_group=cap.mount_group,
    )
    check_combination(spec)
    return spec


class NodeServicer(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(self, config: Config, volumes: Volumes, notify: Notify = no_notify) -> None:
        self.config = config
        self.volumes = volumes
        self.staged = StagedVolumes(volumes)
        self.notify = notify

    @handles_errors
    def NodeGetInfo(
        self, request: pb.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetInfoResponse:
        return pb.NodeGetInfoResponse(
            node_id=self.config.node_id,
            max_volumes_per_node=self.config.max_volumes,
            accessible_topology=pb.Topology(
                segments={topology_key(self.config.driver_name): self.config.node_id}
            ),
        )

    @handles_errors
    def NodeGetCapabilities(
        self, request: pb.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetCapabilitiesResponse:
        types = [RpcType.STAGE_UNSTAGE_VOLUME, RpcType.EXPAND_VOLUME, RpcType.GET_VOLUME_STATS,
                 RpcType.VOLUME_CONDITION, RpcType.VOLUME_MOUNT_GROUP]  # fmt: skip
        caps = [pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t)) for t in types]
        return pb.NodeGetCapabilitiesResponse(capabilities=caps)

    @handles_errors
    def NodePublishVolume(
        self, request: pb.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodePublishVolumeResponse:
        # a bad volume id or target is kubelet's problem, not the pod owner's: no event for it
        self.volumes.check_volume_id(request.volume_id)
        self.volumes.check_target(request.target_path)
        try:
            self._publish(request)
        except (InvalidArgument, ResourceExhausted) as exc:
            self._tell_pod(request, exc)
            raise
        return pb.NodePublishVolumeResponse()

    def _publish(self, request: pb.NodePublishVolumeRequest) -> None:
        if request.volume_context.get(EPHEMERAL) != "true":
            if not is_provisioned_id(request.volume_id):
                raise InvalidArgument(
                    f"volume {request.volume_id} is neither an inline ephemeral volume "
                    f"(volume_context {EPHEMERAL}=true) nor a volume this driver provisioned "
                    "(<node>/<hash>, staged first)"
                )
            self.staged.publish(
                TargetRequest(
                    volume_id=request.volume_id,
                    staging_path=request.staging_target_path,
                    target_path=request.target_path,
                    capability=required_capability(request),
                    readonly=request.readonly,
                )
            )
            return
        spec = spec_from_request(request, self.config)
        pod = {v: request.volume_context[k] for k, v in POD_KEYS.items()
               if k in request.volume_context}
        self.volumes.publish(PublishRequest(request.volume_id, request.target_path, spec, pod))

    def _tell_pod(self, request: pb.NodePublishVolumeRequest, error: DriverError) -> None:
        """Post the refusal on the pod; whatever happens here, the RPC's result stays the same."""
        pod = pod_of(dict(request.volume_context))
        reason = next((r for cls, r in EVENT_REASONS.items() if isinstance(error, cls)), None)
        if pod is None or reason is None:
            return
        try:
            self.notify(pod, reason, str(error))
        except Exception:
            log.warning("notifier failed for pod %s/%s", pod.namespace, pod.name, exc_info=True)

    @handles_errors
    def NodeUnpublishVolume(
        self, request: pb.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnpublishVolumeResponse:
        if is_provisioned_id(request.volume_id):
            self.staged.unpublish(request.volume_id, request.target_path)
        else:
            self.volumes.unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()

    @handles_errors
    def NodeStageVolume(
        self, request: pb.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeStageVolumeResponse:
        self.volumes.check_provisioned_id(request.volume_id)
        self.staged.stage(
            StageRequest(
                volume_id=request.volume_id,
                staging_path=request.staging_target_path,
                capability=required_capability(request),
                context=dict(request.volume_context),
            )
        )
        return pb.NodeStageVolumeResponse()

    @handles_errors
    def NodeUnstageVolume(
        self, request: pb.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeUnstageVolumeResponse:
        self.staged.unstage(request.volume_id, request.staging_target_path)
        return pb.NodeUnstageVolumeResponse()

    @handles_errors
    def NodeExpandVolume(
        self, request: pb.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> pb.NodeExpandVolumeResponse:
        # arguments that name the volume first, then whether it exists, then the rest: an
        # unknown volume is NOT_FOUND whatever else the request lacks (csi-sanity checks this)
        self.volumes.check_volume_id(request.volume_id)
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        record = self.staged.journal.load(request.volume_id)
        if record is None:
            raise NotFound(f"volume {request.volume_id} is not on this node")
        if not record.provisioned:
            raise InvalidArgument(f"volume {request.volume_id} is an inline ephemeral volume: "
                                  "those keep the size they were published with")  # fmt: skip
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required: the size to grow the volume to")
        if request.HasField("volume_capability"):
            capability_of(request.volume_capability)
        size = self.staged.expand(
            ExpandRequest(
                volume_id=request.volume_id,
                volume_path=request.volume_path,
                required=int(request.capacity_range.required_bytes),
                limit=int(request.capacity_range.limit_bytes),
            )
        )
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    @handles_errors
    def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetVolumeStatsResponse:
        stats = self.volumes.stats(request.volume_id, request.volume_path)
        usage = []
        if stats.block_bytes is not None:
            usage = [pb.VolumeUsage(total=stats.block_bytes, unit=pb.VolumeUsage.BYTES)]
        if stats.usage is not None:
            u = stats.usage
            usage = [
                pb.VolumeUsage(available=u.available_bytes, total=u.total_bytes,
                               used=u.used_bytes, unit=pb.VolumeUsage.BYTES),
                pb.VolumeUsage(available=u.free_inodes, total=u.total_inodes,
                               used=u.used_inodes, unit=pb.VolumeUsage.INODES),
            ]  # fmt: skip
        condition = pb.VolumeCondition(
            abnormal=stats.health.abnormal, message=stats.health.message
        )
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)
