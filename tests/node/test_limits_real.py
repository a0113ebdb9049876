"""Per-namespace limits with the real driver and kernel: a namespace over its share of the node
gets RESOURCE_EXHAUSTED naming it and its limit, other namespaces still publish, and the refused
volume leaves no mapping, loop device, file or record."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.node.conftest import Driver, SmallFs, leftovers, rpc_code

SIZE = {"size": "32Mi"}


@pytest.fixture
def limited(base: Path, data_fs: SmallFs) -> Iterator[Driver]:
    """Two volumes per namespace by default; team-b has a byte limit that holds one."""
    overrides = json.dumps({"team-b": {"bytes": "48Mi"}})
    d = Driver(base, data_fs.mountpoint, "--namespace-max-volumes", "2",
               "--namespace-limits", overrides, "--metrics-address", "")  # fmt: skip
    d.start()
    yield d
    d.cleanup()


def refusal(d: Driver, pod: str, namespace: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        d.publish(pod, namespace=namespace, attributes=SIZE)
    assert rpc_code(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    assert leftovers(d, pod) == [], f"the refused volume of {pod} left objects behind"
    assert not os.path.exists(d.names(pod).backing)
    return str(err.value.details())


def test_a_namespace_over_its_share_is_refused_and_others_still_publish(limited: Driver) -> None:
    d = limited
    d.publish("pod-a1", namespace="team-a", attributes=SIZE)
    d.publish("pod-a2", namespace="team-a", attributes=SIZE)
    details = refusal(d, "pod-a3", "team-a")
    assert "namespace team-a" in details and "volumes is 2" in details, details
    d.publish("pod-b1", namespace="team-b", attributes=SIZE)  # another namespace: room
    details = refusal(d, "pod-b2", "team-b")  # its override: 48Mi holds one 32Mi volume
    assert "namespace team-b" in details and "bytes, 48Mi" in details, details
    for pod in ("pod-a1", "pod-a2", "pod-b1"):
        d.unpublish(pod)
        assert leftovers(d, pod) == []
    d.publish("pod-a3", namespace="team-a", attributes=SIZE)  # room again once released
    d.unpublish("pod-a3")
    assert leftovers(d, "pod-a3") == []
