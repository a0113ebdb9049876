"""The pod a request is for, and how a refusal reaches its owner: plain values that the node
servicer, the cluster client (csi.kube) and the wiring in csi.__main__ share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PodRef:
    """The pod a request is for, as kubelet names it in the volume context."""

    namespace: str
    name: str
    uid: str


# Tells the pod's owner about a refusal they must act on: (pod, reason, message).
Notify = Callable[[PodRef, str, str], None]


def no_notify(pod: PodRef, reason: str, message: str) -> None:
    """The default notifier: without API access there is nobody to tell."""


def pod_of(volume_context: dict[str, str]) -> PodRef | None:
    """The pod named by kubelet's ``csi.storage.k8s.io/pod.*`` keys, if it names one."""
    namespace = volume_context.get("csi.storage.k8s.io/pod.namespace", "")
    name = volume_context.get("csi.storage.k8s.io/pod.name", "")
    uid = volume_context.get("csi.storage.k8s.io/pod.uid", "")
    if not namespace or not name or len(namespace) > 63 or len(name) > 253 or len(uid) > 128:
        return None  # not a real pod's name: no event that would repeat a hostile value
    return PodRef(namespace, name, uid)
