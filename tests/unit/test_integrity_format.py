"""Integrity volumes skip the O(size) dm-integrity wipe where a filesystem is made on them.

``cryptsetup luksFormat --integrity`` writes a tag for every sector unless told not to, so the
publish cost grows with the volume. A filesystem made eagerly (all metadata written at mkfs
time) never reads a sector it did not write, so filesystem volumes skip the wipe; a block
volume's reader may read anything, so it keeps it. Lifecycle choices through the fake host,
then the real host's command lines with ``run`` intercepted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from csi.host import LuksFormat
from csi.host import linux as linux_host
from csi.host.linux import LinuxHost
from csi.keys import random_key
from csi.tools.kubelet import InlineVolume
from tests.unit.harness import Harness

MiB = 1024**2
INTEGRITY = {"integrity": "hmac-sha256"}


def inline(h: Harness, pod: str, fs_type: str = "ext4", **attributes: str) -> tuple[str, str]:
    """Publish an inline volume; return (where its LUKS header is, its mapper device)."""
    size = "320Mi" if fs_type == "xfs" else "64Mi"
    h.k.publish(InlineVolume(pod, "scratch", {"size": size, **attributes}, fs_type=fs_type))
    names = h.names(pod)
    return names.header, names.mapper_device


# --- the lifecycle's choices (fake host) -----------------------------------------------------
@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_inline_integrity_filesystem_skips_the_wipe_and_makes_eager_metadata(
    h: Harness, fs_type: str
) -> None:
    header, device = inline(h, "pod-i", fs_type, **INTEGRITY)
    options = h.host.luks_options[header]
    assert (options.integrity, options.wipe) == ("hmac-sha256", False)
    assert h.host.filesystems[device] == fs_type
    assert h.host.mkfs_eager[device] is True
    h.unpublish("pod-i")
    assert h.leftovers() == []


def test_staged_integrity_filesystem_skips_the_wipe_and_makes_eager_metadata(h: Harness) -> None:
    pv = h.provision("pvc-int", 64 * MiB, parameters=INTEGRITY)
    h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    options = h.host.luks_options[names.header]
    assert (options.integrity, options.wipe) == ("hmac-sha256", False)
    assert h.host.mkfs_eager[names.mapper_device] is True
    target = h.k.publish_pvc(pv, "pod-a")
    assert h.host.mounts[target].source == names.mapper_device
    h.k.unpublish_pvc(pv, "pod-a")
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def test_block_integrity_pvc_is_wiped_and_gets_no_filesystem(h: Harness) -> None:
    pv = h.provision("pvc-int-block", 64 * MiB, parameters=INTEGRITY, block=True)
    h.k.stage(pv)
    names = h.volumes.names(pv.volume_id)
    options = h.host.luks_options[names.header]
    assert (options.integrity, options.wipe) == ("hmac-sha256", True)
    assert names.mapper_device not in h.host.filesystems  # a raw device: nothing made on it
    assert names.mapper_device not in h.host.mkfs_eager
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


@pytest.mark.parametrize("kind", ["inline", "staged"])
def test_volume_without_integrity_keeps_lazy_mkfs(h: Harness, kind: str) -> None:
    if kind == "inline":
        header, device = inline(h, "pod-plain")
    else:
        pv = h.provision("pvc-plain", 64 * MiB)
        h.k.stage(pv)
        names = h.volumes.names(pv.volume_id)
        header, device = names.header, names.mapper_device
    options = h.host.luks_options[header]
    assert options.integrity == "none"
    assert h.host.mkfs_eager[device] is False


# --- the real host's command lines (run intercepted) -----------------------------------------
class Recorder:
    """Stands in for ``csi.host.linux.run``: keeps every argv, runs nothing."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> str:
        self.calls.append([str(a) for a in argv])
        return ""

    def only(self, program: str) -> list[str]:
        found = [argv for argv in self.calls if argv[0] == program]
        assert len(found) == 1, f"expected one {program} call, got {self.calls}"
        return found[0]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(linux_host, "run", rec)
    return rec


def format_argv(recorder: Recorder, integrity: str, wipe: bool) -> list[str]:
    key = random_key(64)
    try:
        options = LuksFormat("aes-xts-plain64", 512, integrity, "/run/hdr", wipe=wipe)
        LinuxHost().luks_format("/dev/loop7", key, options)
    finally:
        key.wipe()
    return recorder.only("cryptsetup")


@pytest.mark.parametrize(
    ("integrity", "wipe", "no_wipe"),
    [("hmac-sha256", False, True), ("hmac-sha256", True, False),
     ("none", False, False), ("none", True, False)],
)  # fmt: skip
def test_luks_format_skips_the_wipe_exactly_when_asked_on_integrity(
    recorder: Recorder, integrity: str, wipe: bool, no_wipe: bool
) -> None:
    argv = format_argv(recorder, integrity, wipe)
    assert argv[:2] == ["cryptsetup", "luksFormat"] and argv[-1] == "/dev/loop7"
    assert ("--integrity-no-wipe" in argv) is no_wipe
    if integrity == "none":
        assert "--integrity" not in argv
    else:
        assert argv[argv.index("--integrity") + 1] == integrity
    assert "--key-file=-" in argv  # the key still goes through stdin only


def extended_options(argv: list[str]) -> set[str]:
    return set(argv[argv.index("-E") + 1].split(","))


@pytest.fixture
def device(tmp_path: Path) -> str:
    """A sparse file standing in for the mapper device (the host may look at or write to the
    device itself before mkfs, so it has to exist)."""
    path = tmp_path / "luks-eph-x"
    with open(path, "wb") as f:
        f.truncate(320 * MiB)
    return str(path)


@pytest.mark.parametrize("eager", [True, False])
def test_mkfs_ext4_writes_inode_tables_and_journal_now_only_when_eager(
    recorder: Recorder, device: str, eager: bool
) -> None:
    LinuxHost().mkfs(device, "ext4", eager=eager)
    argv = recorder.only("mkfs.ext4")
    assert argv[-1] == device
    lazy = "0" if eager else "1"
    assert {f"lazy_itable_init={lazy}", f"lazy_journal_init={lazy}", "nodiscard"} <= (
        extended_options(argv)
    )


@pytest.mark.parametrize("eager", [True, False])
def test_mkfs_xfs_is_made_without_discard(recorder: Recorder, device: str, eager: bool) -> None:
    LinuxHost().mkfs(device, "xfs", eager=eager)
    argv = recorder.only("mkfs.xfs")
    assert "-K" in argv and argv[-1] == device


def test_unwiped_prefill_covers_what_mkfs_writes_in_part_and_pins_the_layout() -> None:
    from csi.host.linux import EXT4_GROUP_BYTES, unwiped_prefill

    size = 1024 * 1024**2
    ranges, extra = unwiped_prefill("ext4", size)
    assert extra == ["-b", "4096"]
    assert (0, 1 << 20) in ranges and (size - (2 << 20), 2 << 20) in ranges
    assert [r for r in ranges if r[1] == 4096] == [(g, 4096) for g in
                                                   range(EXT4_GROUP_BYTES, size, EXT4_GROUP_BYTES)]
    xfs_ranges, xfs_extra = unwiped_prefill("xfs", 320 * 1024**2)
    assert xfs_extra == ["-d", f"agsize={80 * 1024**2}"]
    assert [r[0] for r in xfs_ranges if r[1] == 128 * 1024] == [80 * 1024**2 * i for i in (1, 2, 3)]
    assert sum(length for _, length in ranges) < 4 * 1024**2  # cheap: not O(size)
