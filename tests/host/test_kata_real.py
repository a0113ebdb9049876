"""Host tier: Kata direct volumes (``csi.host.kata`` through ``LinuxHost``) on the running kernel,
as root, no VM: mountInfo.json on a real tmpfs (as /run is) with exact modes, the guard tmpfs
that makes every write at a target fail with EROFS and unmounts cleanly, and file_users finding
a child process that holds a disk file open.

What this cannot show: a real Kata runtime reading the file and attaching the disk to a guest.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.host import GUARD_SOURCE, DirectVolume
from csi.host.kata import MOUNT_INFO, volume_dir_name
from csi.host.linux import LinuxHost, read_mounts

# the standard base64 of this path has "+" and "/", the urlsafe one "-" and "_"; padded "=="
TARGET = "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/~\u00ff\u00ff/mount"
VOLUME = DirectVolume(
    volume_type="directvol", device="/var/lib/luks-ephemeral/kata/v.img", fstype="ext4",
    metadata={"encryptionKey": "ephemeral", "createFilesystem": "true"}, options=["ro"],
)  # fmt: skip


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=check)


def mounts_at(point: Path) -> list[str]:
    return [e.source for e in read_mounts() if e.point == str(point)]


@pytest.fixture
def linux() -> LinuxHost:
    return LinuxHost()


@pytest.fixture
def run_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A private tmpfs standing in for /run (the direct-volume root lives on one)."""
    run = tmp_path / "run"
    run.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "kata-test-run", str(run))
    yield run
    sh("umount", "-l", str(run), check=False)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Path]:
    """A target directory; whatever a test leaves mounted on it is lazily unmounted after."""
    path = tmp_path / "pods" / "p1" / "volumes" / "kubernetes.io~csi" / "v" / "mount"
    yield path
    while mounts_at(path):
        sh("umount", "-l", str(path), check=False)


def test_write_read_list_remove_with_exact_modes(linux: LinuxHost, run_tmpfs: Path) -> None:
    root = run_tmpfs / "kata-containers" / "shared" / "direct-volumes"
    name = volume_dir_name(TARGET)
    assert "-" in name and "_" in name and name.endswith("==")
    linux.direct_volume_write(str(root), TARGET, VOLUME)
    directory = root / name
    st_dir, st_file = os.stat(directory), os.stat(directory / MOUNT_INFO)
    assert stat.S_ISDIR(st_dir.st_mode) and stat.S_IMODE(st_dir.st_mode) == 0o700
    assert stat.S_ISREG(st_file.st_mode) and stat.S_IMODE(st_file.st_mode) == 0o600
    assert (st_dir.st_uid, st_file.st_uid) == (0, 0)
    doc = json.loads((directory / MOUNT_INFO).read_bytes())
    assert doc == {"volume-type": "directvol", "device": VOLUME.device, "fstype": "ext4",
                   "metadata": dict(VOLUME.metadata), "options": ["ro"]}  # fmt: skip
    assert os.listdir(directory) == [MOUNT_INFO]  # no temporary file left
    assert linux.direct_volume_read(str(root), TARGET) == VOLUME
    assert linux.direct_volume_targets(str(root)) == {TARGET: VOLUME}

    (directory / "4c5a7d0e9f1b").touch()  # Kata's runtime: a file named after the sandbox
    rw = DirectVolume("directvol", VOLUME.device, "ext4", dict(VOLUME.metadata), [])
    linux.direct_volume_write(str(root), TARGET, rw)
    assert linux.direct_volume_read(str(root), TARGET) == rw
    assert stat.S_IMODE(os.stat(directory / MOUNT_INFO).st_mode) == 0o600
    assert sorted(os.listdir(directory)) == ["4c5a7d0e9f1b", MOUNT_INFO]

    linux.direct_volume_remove(str(root), TARGET)
    assert not os.path.lexists(directory) and os.listdir(root) == []
    linux.direct_volume_remove(str(root), TARGET)  # again: nothing
    assert linux.direct_volume_targets(str(root)) == {}


def test_the_guard_makes_writes_fail_with_erofs_and_unmounts_cleanly(linux: LinuxHost,
                                                                     target: Path) -> None:
    linux.guard_mount(str(target))  # the target is made first
    assert linux.is_guarded(str(target))
    linux.guard_mount(str(target))  # there already: not stacked again
    assert mounts_at(target) == [GUARD_SOURCE]
    entry = [e for e in read_mounts() if e.point == str(target)][-1]
    assert entry.fs_type == "tmpfs"
    assert os.statvfs(target).f_flag & os.ST_RDONLY
    assert os.listdir(target) == []

    with pytest.raises(OSError) as exc:
        (target / "data").write_bytes(b"plaintext")
    assert exc.value.errno == errno.EROFS
    with pytest.raises(OSError) as exc:
        os.mkdir(target / "dir")
    assert exc.value.errno == errno.EROFS
    with pytest.raises(OSError) as exc:
        os.chmod(target, 0o777)
    assert exc.value.errno == errno.EROFS
    # a remount read-write by a pod is not possible without CAP_SYS_ADMIN; and were it made,
    # the mount would no longer count as the guard
    linux.umount(str(target))
    assert mounts_at(target) == [] and not linux.is_guarded(str(target))
    linux.umount(str(target))  # again: nothing
    (target / "probe").write_bytes(b"")  # the directory underneath is writable again
    (target / "probe").unlink()


def test_is_guarded_is_false_for_another_tmpfs_at_the_target(linux: LinuxHost,
                                                            target: Path) -> None:
    target.mkdir(parents=True)
    sh("mount", "-t", "tmpfs", "-o", "ro,size=4k", "not-the-guard", str(target))
    assert not linux.is_guarded(str(target))
    sh("umount", str(target))
    sh("mount", "-t", "tmpfs", "-o", "size=4k", GUARD_SOURCE, str(target))  # rw: not a guard
    assert not linux.is_guarded(str(target))


def test_file_users_finds_a_child_holding_the_file_open(linux: LinuxHost,
                                                        tmp_path: Path) -> None:
    disk = tmp_path / "v.img"
    disk.write_bytes(b"\0" * 4096)
    alias = tmp_path / "alias.img"
    os.link(disk, alias)
    assert linux.file_users(str(disk)) == []
    code = "import sys, time; f = open(sys.argv[1], 'rb'); print('ok', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code, str(alias)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ok"
        comm = Path(f"/proc/{child.pid}/comm").read_text().strip()
        assert f"pid {child.pid} ({comm})" in linux.file_users(str(disk))
        assert linux.file_users(str(tmp_path)) == []  # a directory no one has open
    finally:
        child.kill()
        child.wait()
    assert all(f"pid {child.pid} " not in u for u in linux.file_users(str(disk)))
