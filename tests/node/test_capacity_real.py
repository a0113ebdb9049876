"""Capacity: the budget and the data dir's real free space are both enforced."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.node.conftest import Driver, SmallFs, leftovers, rpc_code


@pytest.fixture
def small(base: Path) -> Iterator[Driver]:
    fs = SmallFs(base, "small", 160)
    d = Driver(base, fs.mountpoint, "--capacity", "1Gi")
    d.start()
    yield d
    d.cleanup()
    fs.close()


def test_free_space_refusal_leaves_nothing(small: Driver) -> None:
    with pytest.raises(grpc.RpcError) as err:
        small.publish("pod-big", attributes={"size": "512Mi"})
    assert rpc_code(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "data dir" in str(err.value.details())
    assert leftovers(small, "pod-big") == []
    assert [n for n in os.listdir(small.data_dir) if n.endswith(".img")] == []


def test_budget_refusal_leaves_nothing(base: Path, data_fs: SmallFs) -> None:
    d = Driver(base, data_fs.mountpoint, "--capacity", "96Mi")
    d.start()
    try:
        d.publish("pod-b1", attributes={"size": "64Mi"})
        with pytest.raises(grpc.RpcError) as err:
            d.publish("pod-b2", attributes={"size": "64Mi"})
        assert rpc_code(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "budget" in str(err.value.details())
        assert leftovers(d, "pod-b2") == []
        d.unpublish("pod-b1")
        d.publish("pod-b2", attributes={"size": "64Mi"})  # room again once released
        d.unpublish("pod-b2")
        assert leftovers(d, "pod-b2") == []
    finally:
        d.cleanup()
