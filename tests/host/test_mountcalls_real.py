"""Bind, bind-remount and unmount through mount(2)/umount2(2) (``csi.host.mountcalls``, through
``LinuxHost``) on this machine's kernel: the per-mount flags mountinfo shows, a device node
bound onto a file, busy and not-mounted unmounts; and the flags and time against mount(8)."""

from __future__ import annotations

import errno
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import Busy
from csi.host import commands, mountcalls
from csi.host.linux import LinuxHost
from csi.host.runner import run

ATIME = {"noatime", "relatime", "strictatime"}


def vfs_options(point: Path) -> set[str]:
    """The per-mount options of the visible mount at ``point`` (mountinfo's sixth field)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(point):
                found = set(fields[5].split(","))
    assert found is not None, f"{point} is not a mount point"
    return found


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    (source / "data").write_text("x")
    yield source, target
    while LinuxHost().is_mountpoint(str(target)):
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_ro_nosuid_nodev_noexec_are_exactly_the_binds_flags(
    host: LinuxHost, dirs: tuple[Path, Path]
) -> None:
    source, target = dirs
    host.bind_mount(str(source), str(target), ["ro", "nosuid", "nodev", "noexec", "commit=30"])
    assert vfs_options(target) - ATIME == {"ro", "nosuid", "nodev", "noexec"}
    with pytest.raises(OSError) as caught:
        (target / "new").write_text("y")
    assert caught.value.errno == errno.EROFS
    assert (target / "data").read_text() == "x"
    host.umount(str(target))
    assert not host.is_mountpoint(str(target))


def test_rw_works(host: LinuxHost, dirs: tuple[Path, Path]) -> None:
    source, target = dirs
    host.bind_mount(str(source), str(target), ["rw", "nosuid", "nodev"])
    assert {"rw", "nosuid", "nodev"} <= vfs_options(target)
    (target / "new").write_text("y")
    assert (source / "new").read_text() == "y"
    host.umount(str(target))


@pytest.mark.parametrize("options", [
    ["ro", "nosuid", "nodev", "noexec"], ["rw", "nosuid", "nodev"], ["rw", "noatime"],
    ["ro", "nodiratime", "strictatime"], ["rw", "relatime", "nosuid"], [],
])  # fmt: skip
def test_the_flags_are_the_ones_mount8_sets(
    host: LinuxHost, tmp_path: Path, options: list[str]
) -> None:
    """Over a source mount with flags of its own (the bind inherits them): mount(8)'s
    remount and ours leave the same per-mount flags."""
    source, by_cmd, by_call = tmp_path / "src", tmp_path / "cmd", tmp_path / "call"
    for d in (source, by_cmd, by_call):
        d.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "nosuid,noexec,noatime,size=1m", "src", str(source)])
    try:
        run(commands.bind_mount(str(source), str(by_cmd)))
        run(commands.bind_remount(str(by_cmd), options))
        host.bind_mount(str(source), str(by_call), options)
        assert vfs_options(by_call) == vfs_options(by_cmd)
    finally:
        for d in (by_call, by_cmd, source):
            subprocess.run(["umount", str(d)], check=False, capture_output=True)


def test_a_device_node_binds_onto_a_file(host: LinuxHost, tmp_path: Path) -> None:
    target = tmp_path / "node"
    host.make_file(str(target))
    host.bind_mount("/dev/null", str(target), ["rw", "nosuid"])
    try:
        st = os.stat(target)
        assert st.st_rdev == os.stat("/dev/null").st_rdev
        assert host.is_mountpoint(str(target))
        assert "nosuid" in vfs_options(target)
    finally:
        host.umount(str(target))
    assert not host.is_mountpoint(str(target))
    assert os.stat(target).st_size == 0


def test_umount_of_a_busy_mount_is_busy(host: LinuxHost, dirs: tuple[Path, Path]) -> None:
    source, target = dirs
    host.bind_mount(str(source), str(target), ["rw", "nosuid", "nodev"])
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=target)
    try:
        with pytest.raises(Busy, match=f"target {target} is busy.*retry later"):
            host.umount(str(target))
        assert host.is_mountpoint(str(target))
    finally:
        holder.kill()
        holder.wait()
    host.umount(str(target))
    assert not host.is_mountpoint(str(target))


def test_umount_of_what_is_not_mounted_is_done(host: LinuxHost, tmp_path: Path) -> None:
    """As umount(8) was: a directory that is no mount point and a path that does not exist
    are unmounted already (EINVAL, ENOENT), so a repeated unpublish succeeds."""
    with pytest.raises(OSError) as caught:
        mountcalls.unmount(str(tmp_path))
    assert caught.value.errno == errno.EINVAL
    host.umount(str(tmp_path))
    host.umount(str(tmp_path / "gone"))


def _median_ms(rounds: int, once: object) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        once()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def test_syscalls_are_faster_than_commands(
    host: LinuxHost, dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """50 rounds of bind + remount (nosuid,nodev) + umount each way; printed with -s."""
    source, target = dirs
    options = ["rw", "nosuid", "nodev"]

    def by_commands() -> None:
        run(commands.bind_mount(str(source), str(target)))
        run(commands.bind_remount(str(target), options))
        run(commands.umount(str(target)))

    def by_syscalls() -> None:
        host.bind_mount(str(source), str(target), options)
        host.umount(str(target))

    old, new = _median_ms(50, by_commands), _median_ms(50, by_syscalls)
    with capsys.disabled():
        print(f"\nbind+remount+umount median of 50: commands {old:.3f} ms, "
              f"syscalls {new:.3f} ms ({old / new:.0f}x)")  # fmt: skip
    assert new < old
