"""Call the driver's socket exactly as kubelet does for an inline CSI ephemeral volume.

Used by ``make demo`` and the real-kernel tests. Volume ids and target paths follow kubelet's
scheme: ``csi-<sha256(pod uid + volume name)>`` and
``<kubelet-root>/pods/<uid>/volumes/kubernetes.io~csi/<name>/mount``.
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
