"""NodeExpandVolume checks that the volume exists before it checks the rest of the request.

csi-sanity v5.4.0 ("NodeExpandVolume should fail when volume is not found") sends an unknown
volume id with a volume path and no capacity_range, and wants NOT_FOUND, not INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi.params import MiB
from csi.proto import csi_pb2 as pb
from tests.unit.harness import Harness, fails


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(mode="all")
    yield harness
    harness.close()


def expand(h: Harness, **fields: Any) -> pb.NodeExpandVolumeResponse:
    response: pb.NodeExpandVolumeResponse = h.k.node.NodeExpandVolume(
        pb.NodeExpandVolumeRequest(**fields), timeout=30
    )
    return response


@pytest.mark.parametrize(
    "volume_id",
    ["fake-vol-id-0123456789", "node-1/" + "0" * 32, "node-2/" + "0" * 32],
    ids=["not-ours", "ours-unknown", "other-node"],
)
def test_unknown_volume_without_capacity_range_is_not_found(h: Harness, volume_id: str) -> None:
    details = fails(lambda: expand(h, volume_id=volume_id, volume_path="some/path"),
                    grpc.StatusCode.NOT_FOUND)  # fmt: skip
    assert volume_id in details


def test_unknown_volume_with_capacity_range_is_not_found(h: Harness) -> None:
    fails(lambda: expand(h, volume_id="fake-vol-id-0123456789", volume_path="some/path",
                         capacity_range=pb.CapacityRange(required_bytes=128 * MiB)),
          grpc.StatusCode.NOT_FOUND)  # fmt: skip


def test_missing_volume_id_or_path_is_still_invalid_argument(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    fails(lambda: expand(h, volume_path="some/path"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "volume_path" in fails(lambda: expand(h, volume_id=pv.volume_id),
                                  grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    # an unknown id without a path: the path is an argument, checked before existence
    fails(lambda: expand(h, volume_id="fake-vol-id-0123456789"), grpc.StatusCode.INVALID_ARGUMENT)


def test_known_volume_without_capacity_range_is_invalid_argument(h: Harness) -> None:
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    details = fails(lambda: expand(h, volume_id=pv.volume_id, volume_path=h.k.staging_path(pv)),
                    grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert "capacity_range" in details
    assert h.k.expand(pv, 128 * MiB) == 128 * MiB  # and with one it grows
    h.k.unstage(pv)


def test_inline_volume_cannot_grow(h: Harness) -> None:
    request = h.publish(attributes={"size": "64Mi"})
    details = fails(lambda: expand(h, volume_id=request.volume_id,
                                   volume_path=request.target_path,
                                   capacity_range=pb.CapacityRange(required_bytes=128 * MiB)),
                    grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    assert "inline" in details
    h.unpublish()
