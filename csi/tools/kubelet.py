"""Call the driver's socket exactly as kubelet (and csi-provisioner) do.

Used by ``make demo`` and the tests. Inline volumes: volume ids and target paths follow kubelet's
scheme, ``csi-<sha256(pod uid + volume name)>`` and
``<kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount``. Provisioned volumes (PVCs):
``Provisioner`` calls CreateVolume/DeleteVolume/GetCapacity like csi-provisioner, and kubelet
stages them at ``<root>/plugins/kubernetes.io/csi/pv/<pv>/globalmount`` (block:
``<root>/plugins/kubernetes.io/csi/volumeDevices/staging/<pv>``) and publishes them into
``<root>/pods/<uid>/volumes/kubernetes.io~csi/<pv>/mount`` (block: a file
``<root>/plugins/kubernetes.io/csi/volumeDevices/publish/<pv>/<uid>``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from csi.proto import csi_pb2 as pb
from csi.proto import csi_pb2_grpc

Mode = pb.VolumeCapability.AccessMode.Mode


@dataclass
class InlineVolume:
    pod_uid: str
    name: str
    attributes: dict[str, str] = field(default_factory=dict)
    fs_type: str = "ext4"
    readonly: bool = False
    mount_flags: Sequence[str] = ()
    fs_group: str = ""
    pod_name: str = "demo"
    namespace: str = "default"


@dataclass
class PvcVolume:
    """A provisioned volume as kubelet knows it from its PV, and how pods use it."""

    volume_id: str
    pv_name: str
    context: dict[str, str] = field(default_factory=dict)
    block: bool = False
    fs_type: str = "ext4"
    mount_flags: Sequence[str] = ()
    fs_group: str = ""

    @property
    def capability(self) -> pb.VolumeCapability:
        mode = pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER)
        if self.block:
            return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(), access_mode=mode)
        mount = pb.VolumeCapability.MountVolume(
            fs_type=self.fs_type, mount_flags=list(self.mount_flags),
            volume_mount_group=self.fs_group,
        )  # fmt: skip
        return pb.VolumeCapability(mount=mount, access_mode=mode)


class Provisioner:
    """What csi-provisioner (--node-deployment) sends to the Controller service."""

    def __init__(self, channel: grpc.Channel, driver_name: str, timeout: float = 600.0) -> None:
        self.controller = csi_pb2_grpc.ControllerStub(channel)
        self.topology_key = driver_name + "/node"
        self.timeout = timeout

    def create_request(
        self, name: str, node: str, required: int = 0, parameters: dict[str, str] | None = None,
        block: bool = False, fs_type: str = "ext4", limit: int = 0,
    ) -> pb.CreateVolumeRequest:  # fmt: skip
        capability = PvcVolume("", name, block=block, fs_type=fs_type).capability
        topology = pb.Topology(segments={self.topology_key: node})
        return pb.CreateVolumeRequest(
            name=name,
            capacity_range=pb.CapacityRange(required_bytes=required, limit_bytes=limit),
            volume_capabilities=[capability],
            parameters={"csi.storage.k8s.io/pvc/name": f"claim-{name}",
                        "csi.storage.k8s.io/pvc/namespace": "default", **(parameters or {})},
            accessibility_requirements=pb.TopologyRequirement(requisite=[topology],
                                                              preferred=[topology]),
        )  # fmt: skip

    def create(
        self, name: str, node: str, required: int = 0, parameters: dict[str, str] | None = None,
        block: bool = False, fs_type: str = "ext4",
    ) -> PvcVolume:  # fmt: skip
        request = self.create_request(name, node, required, parameters, block, fs_type)
        response = self.controller.CreateVolume(request, timeout=self.timeout)
        volume = response.volume
        return PvcVolume(volume.volume_id, name, dict(volume.volume_context), block, fs_type)

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=volume_id),
                                     timeout=self.timeout)  # fmt: skip

    def capacity(self, node: str, parameters: dict[str, str] | None = None) -> tuple[int, int]:
        """(available_capacity, maximum_volume_size) for ``node``'s topology segment."""
        response = self.controller.GetCapacity(
            pb.GetCapacityRequest(
                accessible_topology=pb.Topology(segments={self.topology_key: node}),
                parameters=parameters or {},
            ),
            timeout=self.timeout,
        )
        return int(response.available_capacity), int(response.maximum_volume_size.value)

    def expand(self, volume_id: str, size: int) -> pb.ControllerExpandVolumeResponse:
        response: pb.ControllerExpandVolumeResponse = self.controller.ControllerExpandVolume(
            pb.ControllerExpandVolumeRequest(
                volume_id=volume_id, capacity_range=pb.CapacityRange(required_bytes=size)
            ),
            timeout=self.timeout,
        )
        return response


class Kubelet:
    def __init__(self, endpoint: str, kubelet_root: str, timeout: float = 600.0) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.root = kubelet_root
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def volume_id(pod_uid: str, name: str) -> str:
        return "csi-" + hashlib.sha256(f"{pod_uid}{name}".encode()).hexdigest()

    def target(self, pod_uid: str, name: str) -> str:
        return os.path.join(self.root, "pods", pod_uid, "volumes", "kubernetes.io~csi", name,
                            "mount")

    def publish_request(self, volume: InlineVolume) -> pb.NodePublishVolumeRequest:
        context = {
            "csi.storage.k8s.io/ephemeral": "true",
            "csi.storage.k8s.io/pod.name": volume.pod_name,
            "csi.storage.k8s.io/pod.namespace": volume.namespace,
            "csi.storage.k8s.io/pod.uid": volume.pod_uid,
            "csi.storage.k8s.io/serviceAccount.name": "default",
            **volume.attributes,
        }
        capability = pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(
                fs_type=volume.fs_type,
                mount_flags=list(volume.mount_flags),
                volume_mount_group=volume.fs_group,
            ),
            access_mode=pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER),
        )
        return pb.NodePublishVolumeRequest(
            volume_id=self.volume_id(volume.pod_uid, volume.name),
            target_path=self.target(volume.pod_uid, volume.name),
            volume_capability=capability,
            readonly=volume.readonly,
            volume_context=context,
        )

    def publish(self, volume: InlineVolume) -> pb.NodePublishVolumeRequest:
        request = self.publish_request(volume)
        # kubelet creates the volume's directory; the driver creates the mount point in it
        os.makedirs(os.path.dirname(request.target_path), exist_ok=True)
        self.node.NodePublishVolume(request, timeout=self.timeout)
        return request

    def unpublish(self, pod_uid: str, name: str) -> None:
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(
                volume_id=self.volume_id(pod_uid, name), target_path=self.target(pod_uid, name)
            ),
            timeout=self.timeout,
        )

    def stats(self, pod_uid: str, name: str) -> pb.NodeGetVolumeStatsResponse:
        response: pb.NodeGetVolumeStatsResponse = self.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(
                volume_id=self.volume_id(pod_uid, name), volume_path=self.target(pod_uid, name)
            ),
            timeout=self.timeout,
        )
        return response

    # provisioned volumes ---------------------------------------------------------------------
    def staging_path(self, pv: PvcVolume) -> str:
        base = os.path.join(self.root, "plugins", "kubernetes.io", "csi")
        if pv.block:
            return os.path.join(base, "volumeDevices", "staging", pv.pv_name)
        return os.path.join(base, "pv", pv.pv_name, "globalmount")

    def pvc_target(self, pv: PvcVolume, pod_uid: str) -> str:
        if pv.block:
            return os.path.join(self.root, "plugins", "kubernetes.io", "csi", "volumeDevices",
                                "publish", pv.pv_name, pod_uid)  # fmt: skip
        return self.target(pod_uid, pv.pv_name)

    def stage_request(self, pv: PvcVolume) -> pb.NodeStageVolumeRequest:
        return pb.NodeStageVolumeRequest(
            volume_id=pv.volume_id, staging_target_path=self.staging_path(pv),
            volume_capability=pv.capability, volume_context=pv.context,
        )  # fmt: skip

    def stage(self, pv: PvcVolume) -> str:
        """NodeStageVolume; kubelet creates the staging directory first. Returns its path."""
        request = self.stage_request(pv)
        os.makedirs(request.staging_target_path, exist_ok=True)
        self.node.NodeStageVolume(request, timeout=self.timeout)
        return str(request.staging_target_path)

    def unstage(self, pv: PvcVolume) -> None:
        self.node.NodeUnstageVolume(
            pb.NodeUnstageVolumeRequest(volume_id=pv.volume_id,
                                        staging_target_path=self.staging_path(pv)),
            timeout=self.timeout,
        )  # fmt: skip

    def publish_pvc_request(
        self, pv: PvcVolume, pod_uid: str, readonly: bool = False
    ) -> pb.NodePublishVolumeRequest:
        context = {
            "csi.storage.k8s.io/pod.name": f"pod-{pod_uid}",
            "csi.storage.k8s.io/pod.namespace": "default",
            "csi.storage.k8s.io/pod.uid": pod_uid,
            "csi.storage.k8s.io/serviceAccount.name": "default",
            "csi.storage.k8s.io/ephemeral": "false",
            **pv.context,
        }
        return pb.NodePublishVolumeRequest(
            volume_id=pv.volume_id, staging_target_path=self.staging_path(pv),
            target_path=self.pvc_target(pv, pod_uid), volume_capability=pv.capability,
            readonly=readonly, volume_context=context,
        )  # fmt: skip

    def publish_pvc(self, pv: PvcVolume, pod_uid: str, readonly: bool = False) -> str:
        """NodePublishVolume into one pod; kubelet creates the target's parent. Returns it."""
        request = self.publish_pvc_request(pv, pod_uid, readonly)
        os.makedirs(os.path.dirname(request.target_path), exist_ok=True)
        self.node.NodePublishVolume(request, timeout=self.timeout)
        return str(request.target_path)

    def unpublish_pvc(self, pv: PvcVolume, pod_uid: str) -> None:
        self.node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id=pv.volume_id,
                                          target_path=self.pvc_target(pv, pod_uid)),
            timeout=self.timeout,
        )  # fmt: skip

    def expand(self, pv: PvcVolume, size: int, pod_uid: str = "") -> int:
        """NodeExpandVolume at a pod's target (or the staging path); returns the new size."""
        path = self.pvc_target(pv, pod_uid) if pod_uid else self.staging_path(pv)
        response = self.node.NodeExpandVolume(
            pb.NodeExpandVolumeRequest(
                volume_id=pv.volume_id, volume_path=path,
                capacity_range=pb.CapacityRange(required_bytes=size),
                staging_target_path=self.staging_path(pv), volume_capability=pv.capability,
            ),
            timeout=self.timeout,
        )  # fmt: skip
        return int(response.capacity_bytes)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csi.tools.kubelet", description=__doc__)
    parser.add_argument("--endpoint", default="unix:///run/luks-ephemeral-csi/csi.sock")
    parser.add_argument("--kubelet-root", default="/var/lib/kubelet")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("publish", "unpublish", "stats"):
        p = sub.add_parser(name)
        p.add_argument("--pod-uid", required=True)
        p.add_argument("--volume", required=True, help="the volume's name in the pod spec")
        if name == "publish":
            p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE")
            p.add_argument("--fs-type", default="ext4")
            p.add_argument("--readonly", action="store_true")
            p.add_argument("--mount-flag", action="append", default=[])
            p.add_argument("--fs-group", default="")
    sub.add_parser("probe")
    args = parser.parse_args(argv)
    kubelet = Kubelet(args.endpoint, args.kubelet_root)
    try:
        if args.command == "probe":
            ready = kubelet.identity.Probe(pb.ProbeRequest(), timeout=30).ready.value
            print(json.dumps({"ready": ready}))
        elif args.command == "publish":
            attrs = dict(a.split("=", 1) for a in args.attr)
            request = kubelet.publish(InlineVolume(
                args.pod_uid, args.volume, attrs, args.fs_type, args.readonly,
                args.mount_flag, args.fs_group))  # fmt: skip
            print(json.dumps({"volume_id": request.volume_id, "target_path": request.target_path}))
        elif args.command == "unpublish":
            kubelet.unpublish(args.pod_uid, args.volume)
            print(json.dumps({"unpublished": kubelet.volume_id(args.pod_uid, args.volume)}))
        else:
            response = kubelet.stats(args.pod_uid, args.volume)
            print(json.dumps({
                "usage": [{"unit": pb.VolumeUsage.Unit.Name(u.unit), "total": u.total,
                           "used": u.used, "available": u.available} for u in response.usage],
                "abnormal": response.volume_condition.abnormal,
                "message": response.volume_condition.message,
            }))  # fmt: skip
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    finally:
        kubelet.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
