"""The capacity model on the real kernel: what sparse and preallocated volumes really take from
the node's disk, and that each is charged at its full size from CreateVolume on, so a sparse
volume filling up later can never run the data dir out of space under another pod.

With LEC_MEASUREMENTS=<file> the measured numbers are written there (JSON) for the README.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import grpc
import pytest

from csi.journal import Names
from tests.node.conftest import Driver, SmallFs, rpc_code, volume_leftovers

MiB = 1024**2
GiB = 1024**3
NODE = "node-test"
WRITE = 128 * MiB


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def write_file(path: Path, size: int) -> float:
    """Write ``size`` bytes of incompressible data with fsync; return the seconds it took."""
    chunk = os.urandom(4 * MiB)
    start = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return time.monotonic() - start


def measure(d: Driver, preallocate: bool) -> dict[str, float]:
    name = "pvc-prealloc" if preallocate else "pvc-sparse"
    start = time.monotonic()
    pv = d.p.create(name, NODE, 1 * GiB, parameters={"preallocate": str(preallocate).lower()})
    room_reserved = d.p.capacity(NODE)[0]
    d.k.stage(pv)
    stage_seconds = time.monotonic() - start
    backing = Names.of(pv.volume_id, str(d.data_dir), str(d.state_dir)).backing
    after_stage = allocated(backing)
    room_staged = d.p.capacity(NODE)[0]
    target = d.k.publish_pvc(pv, "pod-a")
    write_seconds = write_file(Path(target, "data"), WRITE)
    after_write = allocated(backing)
    room_written = d.p.capacity(NODE)[0]
    d.k.unpublish_pvc(pv, "pod-a")
    d.k.unstage(pv)
    d.p.delete(pv.volume_id)
    assert volume_leftovers(d, pv) == []
    # the promise is made at CreateVolume: writing into the volume does not change what is left
    assert room_reserved == room_staged == room_written
    return {
        "allocated_after_stage_mib": after_stage / MiB,
        "allocated_after_write_mib": after_write / MiB,
        "create_and_stage_seconds": round(stage_seconds, 2),
        "write_128mib_fsync_seconds": round(write_seconds, 2),
    }


def test_sparse_and_preallocated_volumes_footprint(d: Driver) -> None:
    sparse = measure(d, preallocate=False)
    prealloc = measure(d, preallocate=True)
    assert sparse["allocated_after_stage_mib"] < 64  # a few MiB of filesystem metadata
    assert sparse["allocated_after_write_mib"] >= WRITE / MiB  # grows with what pods write
    assert prealloc["allocated_after_stage_mib"] >= 1024  # every block taken up front
    assert prealloc["allocated_after_write_mib"] == prealloc["allocated_after_stage_mib"]
    out = os.environ.get("LEC_MEASUREMENTS")
    if out:
        Path(out).write_text(json.dumps({"sparse": sparse, "preallocated": prealloc}, indent=2))


def test_sparse_volumes_cannot_overcommit_the_data_dir(base: Path) -> None:
    """On a 200 MiB data dir a 128 MiB sparse volume takes almost nothing from the disk, yet a
    second 128 MiB volume is refused: both filling up would run the disk out of space."""
    fs = SmallFs(base, "tight", 200)
    d = Driver(base, fs.mountpoint, "--metrics-address", "", mode="all")
    d.start()
    try:
        pv = d.p.create("pvc-t1", NODE, 128 * MiB)
        d.k.stage(pv)
        backing = Names.of(pv.volume_id, str(d.data_dir), str(d.state_dir)).backing
        assert allocated(backing) < 32 * MiB
        with pytest.raises(grpc.RpcError) as err:
            d.p.create("pvc-t2", NODE, 128 * MiB)
        assert rpc_code(err.value) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "promised" in str(err.value.details())
        d.k.unstage(pv)
        d.p.delete(pv.volume_id)
        assert volume_leftovers(d, pv) == []
    finally:
        d.cleanup()
        fs.close()
