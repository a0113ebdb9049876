"""dir_mounts across mount namespaces, and the probe's leftovers, on a real ext4 image.

A bind made in another mount namespace (a container's, whose processes a driver without
hostPID cannot see) is invisible in our /proc/self/mountinfo: dir_mounts must find it through
/proc/<pid>/mountinfo, and must not count the copies propagation makes of our own binds."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.host import KEY_ABSENT, KEY_PRESENT
from csi.host.fscrypt import PROBE_PREFIX
from csi.host.linux import LinuxHost
from csi.keys import random_key
from tests.host.conftest import Ext4Image, sh


def volume(host: LinuxHost, root: str, name: str) -> tuple[str, str]:
    path = os.path.join(root, name)
    os.mkdir(path, 0o700)
    with random_key(64) as key:
        identifier = host.fscrypt_add_key(root, key)
    host.fscrypt_set_policy(path, identifier)
    return path, identifier


def in_namespace(script: str, propagation: str = "private") -> subprocess.Popen[str]:
    """sh running ``script`` in a new mount namespace; returns once it printed "ready"."""
    child = subprocess.Popen(
        ["unshare", "-m", f"--propagation={propagation}", "sh", "-ec", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        raise AssertionError(f"the namespace did not start: {line!r} {child.communicate()}")
    return child


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        child.kill()
        child.wait(timeout=10)


def own_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def test_a_bind_in_another_namespace_is_reported_until_it_goes(
    host: LinuxHost, enc: Ext4Image, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path, _ = volume(host, enc.root, "v")
    target = tmp_path / "container-target"
    target.mkdir()
    child = in_namespace(f"mount --bind '{path}/' '{target}'; echo ready; exec sleep 60")
    children.append(child)
    assert str(target) not in own_points()  # invisible in our namespace
    assert host.dir_mounts(path) == [f"{target} (mount namespace of pid {child.pid})"]
    assert host.dir_mounts(os.path.join(enc.root, "lost+found")) == []
    child.kill()
    child.wait(timeout=10)
    assert host.dir_mounts(path) == []


def test_a_bind_of_a_subdirectory_and_a_deleted_one_are_reported(
    host: LinuxHost, enc: Ext4Image, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path, _ = volume(host, enc.root, "v")
    os.mkdir(os.path.join(path, "sub"))
    os.mkdir(os.path.join(path, "gone"))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    child = in_namespace(f"mount --bind '{path}/sub' '{a}'; mount --bind '{path}/gone' '{b}'; "
                         f"rmdir '{path}/gone'; echo ready; exec sleep 60")  # fmt: skip
    children.append(child)
    with open(f"/proc/{child.pid}/mountinfo") as f:
        assert any(line.split()[3].endswith("/gone//deleted") for line in f)
    assert sorted(host.dir_mounts(path)) == sorted(
        f"{p} (mount namespace of pid {child.pid})" for p in (a, b))  # fmt: skip
    assert host.dir_mounts(os.path.join(path, "sub")) == [
        f"{a} (mount namespace of pid {child.pid})"]  # fmt: skip


def test_propagation_copies_of_our_binds_are_not_counted_but_a_bind_of_them_is(
    host: LinuxHost, enc: Ext4Image, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    """A shared dir as the kubelet dir is with Bidirectional: our bind there propagates into
    a namespace made from ours (the host's, for the driver pod) and goes with ours; a bind of
    that copy which the namespace makes itself (a container's) stays and is reported."""
    path, _ = volume(host, enc.root, "v")
    shared = tmp_path / "kubelet"
    (shared / "target").mkdir(parents=True)
    own = tmp_path / "container"
    own.mkdir()
    go = tmp_path / "go"
    os.mkfifo(go)
    sh("mount", "--bind", str(shared), str(shared))
    try:
        sh("mount", "--make-shared", str(shared))
        child = in_namespace(f"echo ready; read x < '{go}'; "
                             f"mount --bind '{shared}/target' '{own}'; "
                             "echo bound; exec sleep 60", propagation="unchanged")  # fmt: skip
        children.append(child)
        host.bind_mount(path, str(shared / "target"), ["nosuid", "nodev"])
        try:
            with open(f"/proc/{child.pid}/mountinfo") as f:  # the copy is there
                assert any(line.split()[4] == str(shared / "target") for line in f)
            assert host.dir_mounts(path) == [str(shared / "target")]
            with open(go, "w") as f:
                f.write("go\n")
            assert child.stdout is not None and child.stdout.readline().strip() == "bound"
            assert host.dir_mounts(path) == [
                str(shared / "target"), f"{own} (mount namespace of pid {child.pid})"]  # fmt: skip
        finally:
            host.umount(str(shared / "target"))
        assert host.dir_mounts(path) == [f"{own} (mount namespace of pid {child.pid})"]
    finally:
        sh("umount", "-l", str(shared), check=False)


def test_dir_mounts_over_many_namespaces_is_fast(
    host: LinuxHost, enc: Ext4Image, tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path, _ = volume(host, enc.root, "v")
    for _ in range(50):
        children.append(in_namespace("echo ready; exec sleep 60"))
    last = tmp_path / "last"
    last.mkdir()
    children.append(in_namespace(f"mount --bind '{path}' '{last}'; echo ready; exec sleep 60"))
    start = time.perf_counter()
    found = host.dir_mounts(path)
    elapsed = time.perf_counter() - start
    assert found == [f"{last} (mount namespace of pid {children[-1].pid})"]
    assert elapsed < 0.5, f"dir_mounts over 51+ namespaces took {elapsed * 1e3:.1f} ms"


def test_a_probe_killed_halfway_leaves_nothing_after_the_next(
    host: LinuxHost, enc: Ext4Image
) -> None:
    """What a probe killed between its key and its cleanup leaves: a locked dir with a file
    (its key removed by the kernel at no point), an unlocked one, an empty one."""
    locked, locked_id = volume(host, enc.root, PROBE_PREFIX + "killed1")
    with open(os.path.join(locked, "probe"), "w") as f:
        f.write("probe")
    assert host.fscrypt_remove_key(enc.root, locked_id).status == KEY_ABSENT
    unlocked, unlocked_id = volume(host, enc.root, PROBE_PREFIX + "killed2")
    with open(os.path.join(unlocked, "probe"), "w") as f:
        f.write("probe")
    os.mkdir(os.path.join(enc.root, PROBE_PREFIX + "killed3"))
    keep = os.path.join(enc.root, "fscrypt-probe-not-ours")
    os.mkdir(keep)
    assert host.fscrypt_key_status(enc.root, unlocked_id) == KEY_PRESENT
    host.fscrypt_unavailable(enc.root)  # no project quotas on enc: a reason, after the probe
    assert not [n for n in os.listdir(enc.root) if n.startswith(PROBE_PREFIX)]
    assert os.path.isdir(keep)
    assert host.fscrypt_key_status(enc.root, unlocked_id) == KEY_ABSENT


def test_a_probe_never_removes_one_this_process_is_running(
    host: LinuxHost, enc: Ext4Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    from csi.host import fscrypt

    running = os.path.join(enc.root, PROBE_PREFIX + "running")
    os.mkdir(running)
    monkeypatch.setattr(fscrypt, "_PROBES", {running})
    host.fscrypt_unavailable(enc.root)
    assert os.path.isdir(running)
    assert [n for n in os.listdir(enc.root) if n.startswith(PROBE_PREFIX)] == [
        PROBE_PREFIX + "running"]  # fmt: skip
