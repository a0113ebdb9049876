"""The forced key wipe on the real kernel: after ``Backing.wipe_key`` the mapping's table is an
error target holding no key, and the volume can still be released (the node-wide emergency wipe
builds on this)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.config import Config
from csi.host.linux import LinuxHost
from csi.params import VolumeSpec
from csi.volumes import Volumes
from tests.node.conftest import SmallFs, sh


@pytest.fixture
def volumes(base: Path, data_fs: SmallFs) -> Iterator[Volumes]:
    state = Path("/run/lec-wipe")
    kubelet = base / "kubelet-wipe"
    kubelet.mkdir(exist_ok=True)
    config = Config(state_dir=str(state), data_dir=str(data_fs.mountpoint),
                    kubelet_root=str(kubelet), min_size=16 * 1024**2)  # fmt: skip
    yield Volumes(config, LinuxHost())
    shutil.rmtree(state, ignore_errors=True)


def _key_field(mapping: str) -> str:
    """The key column of the crypt table line (start length crypt cipher KEY ...), or the
    target type when the table is not crypt any more."""
    fields = sh("dmsetup", "table", "--showkeys", mapping).split()
    return fields[4] if fields[2] == "crypt" else fields[2]


@pytest.mark.parametrize("header", ["detached", "attached"])
def test_wipe_key_leaves_no_key_in_the_kernel_and_release_still_shreds(
    volumes: Volumes, header: str
) -> None:
    names = volumes.names(f"wipe-{header}")
    spec = VolumeSpec(size=64 * 1024**2, access_type="block", header=header)
    backing = volumes.backings["loop"]
    backing.prepare(names, spec, keyring=False)  # the key in the dm table, as for a PVC
    try:
        before = _key_field(names.mapping)
        assert len(before) == 128 and set(before) != {"0"}, "a 512-bit key is in the table"
        holder = os.open(names.mapper_device, os.O_RDONLY)  # in use: a polite close refuses
        try:
            backing.wipe_key(names, spec)
        finally:
            os.close(holder)
        after = _key_field(names.mapping)
        assert after == "error", f"the key must be gone from the kernel, table shows {after}"
        assert backing.wipe_key(names, spec).outcome == "no_key"  # again: nothing left
    finally:
        shredded = backing.release(names)
    assert shredded
    assert not os.path.exists(names.mapper_device)
    assert not os.path.exists(names.backing) and not os.path.exists(names.header)
    assert backing.attached(names) is None
