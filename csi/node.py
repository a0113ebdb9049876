"""CSI Node service: translate requests into lifecycle calls, and results into responses."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from csi.config import Config
from csi.errors import DriverError, InvalidArgument, ResourceExhausted
from csi.params import (
    VolumeSpec,
    check_combination,
    parse_attributes,
    validate_fs_type,
    validate_mount_flags,
    validate_mount_group,
)
from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc
from csi.rpc import handles_errors
from csi.volumes import PublishRequest, Volumes

TOPOLOGY_KEY_SUFFIX = "/node"
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
POD_KEYS = {
    "csi.storage.k8s.io/pod.name": "name",
    "csi.storage.k8s.io/pod.namespace": "namespace",
    "csi.storage.k8s.io/pod.uid": "uid",
    "csi.storage.k8s.io/serviceAccount.name": "service_account",
}
Mode = pb.VolumeCapability.AccessMode.Mode
SINGLE_NODE_MODES = {
    Mode.SINGLE_NODE_WRITER,
    Mode.SINGLE_NODE_READER_ONLY,
    Mode.SINGLE_NODE_SINGLE_WRITER,
    Mode.SINGLE_NODE_MULTI_WRITER,
}
RpcType = pb.NodeServiceCapability.RPC.Type

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PodRef:
    """The pod a request is for, as kubelet names it in the volume context."""

    namespace: str
    name: str
    uid: str


# Tells the pod's owner about a refusal they must act on: (pod, reason, message).
Notify = Callable[[PodRef, str, str], None]

# Refusals worth an event on the pod, and the event's reason.
EVENT_REASONS: dict[type[DriverError], str] = {
    InvalidArgument: "InvalidVolumeParameter",
    ResourceExhausted: "CapacityExhausted",
}


def no_notify(pod: PodRef, reason: str, message: str) -> None:
    """The default notifier: without API access there is nobody to tell."""


def pod_of(volume_context: dict[str, str]) -> PodRef | None:
    """The pod named by kubelet's ``csi.storage.k8s.io/pod.*`` keys, if it names one."""
    namespace = volume_context.get("csi.storage.k8s.io/pod.namespace", "")
    name = volume_context.get("csi.storage.k8s.io/pod.name", "")
    if not namespace or not name:
        return None
    return PodRef(namespace, name, volume_context.get("csi.storage.k8s.io/pod.uid", ""))


def topology_key(driver_name: str) -> str:
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
    mode = capability.access_mode.mode
    if mode not in SINGLE_NODE_MODES:
        raise InvalidArgument(
            f"access mode {Mode.Name(mode)} is not supported: volumes are local to one node "
            "(use a SINGLE_NODE_* mode)"
        )
    attributes = dict(request.volume_context)
    fields = parse_attributes(attributes, min_size=config.min_size, max_size=config.max_size)
    mount = capability.mount
    spec = VolumeSpec(
        **fields,
        fs_type=validate_fs_type(mount.fs_type),
        access_type="mount",
        mount_flags=validate_mount_flags(list(mount.mount_flags)),
        readonly=request.readonly or mode == Mode.SINGLE_NODE_READER_ONLY,
        mount_group=validate_mount_group(mount.volume_mount_group),
    )
    check_combination(spec)
    return spec


class NodeServicer(csi_pb2_grpc.NodeServicer):  # type: ignore[misc]
    def __init__(self, config: Config, volumes: Volumes, notify: Notify = no_notify) -> None:
        self.config = config
        self.volumes = volumes
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
        types = [RpcType.GET_VOLUME_STATS, RpcType.VOLUME_CONDITION, RpcType.VOLUME_MOUNT_GROUP]
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
            raise InvalidArgument(
                "only inline ephemeral volumes (volume_context csi.storage.k8s.io/ephemeral=true) "
                "are supported by this driver version; persistent volumes need staging"
            )
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
        self.volumes.unpublish(request.volume_id, request.target_path)
        return pb.NodeUnpublishVolumeResponse()

    @handles_errors
    def NodeGetVolumeStats(
        self, request: pb.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> pb.NodeGetVolumeStatsResponse:
        stats = self.volumes.stats(request.volume_id, request.volume_path)
        usage = []
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
