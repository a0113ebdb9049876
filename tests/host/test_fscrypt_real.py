"""The fscrypt host layer on a real ext4 image: encryption at rest, key removal, busy files,
the key page, no key anywhere it must not be, locked-tree deletion, binds, the probe."""

from __future__ import annotations

import errno
import logging
import mmap
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import Busy, FailedPrecondition
from csi.host import KEY_ABSENT, KEY_INCOMPLETELY_REMOVED, KEY_PRESENT
from csi.host.linux import LinuxHost
from csi.keys import VolumeKey, random_key
from tests.host.conftest import Ext4Image, sh

PATTERN = b"PLAINTEXT-PATTERN-4f1d9c-" * 41  # 1025 bytes, repeated below
MARKER_NAME = "MARKER-FILENAME-8a27e3b1"
LINK_TARGET = "SYMLINK-TARGET-SECRET-c6d05f"
CONTROL_DATA = b"CONTROL-PLAINTEXT-b2e4aa"
CONTROL_NAME = "CONTROL-NAME-b2e4aa"


@pytest.fixture
def key() -> Iterator[VolumeKey]:
    with random_key(64) as k:
        yield k


def volume(host: LinuxHost, root: str, name: str, key: VolumeKey) -> tuple[str, str]:
    """An empty directory under a v2 policy with ``key``: (path, identifier)."""
    path = os.path.join(root, name)
    os.mkdir(path, 0o700)
    identifier = host.fscrypt_add_key(root, key)
    host.fscrypt_set_policy(path, identifier)
    return path, identifier


def image_contains(image: Path, needle: bytes) -> bool:
    with open(image, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(needle) != -1


def test_add_key_and_policy_are_fast_and_idempotent(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey
) -> None:
    start = time.perf_counter()
    path, identifier = volume(host, enc.root, "v", key)
    elapsed = time.perf_counter() - start
    assert len(identifier) == 32 and host.fscrypt_policy_of(path) == identifier
    assert host.fscrypt_add_key(enc.root, key) == identifier  # same key, same identifier
    host.fscrypt_set_policy(path, identifier)  # already so: nothing
    assert host.fscrypt_key_status(enc.root, identifier) == KEY_PRESENT
    assert host.fscrypt_policy_of(enc.root) is None
    assert elapsed < 1.0, f"mkdir + add key + set policy took {elapsed * 1e3:.1f} ms"
    with random_key(64) as other:
        other_id = host.fscrypt_add_key(enc.root, other)
    with pytest.raises(FailedPrecondition, match="another policy"):
        host.fscrypt_set_policy(path, other_id)


def test_the_key_page_is_zero_after_a_real_add(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey
) -> None:
    volume(host, enc.root, "v", key)
    assert host._fscrypt.key_page.is_zero()
    with pytest.raises(FailedPrecondition):  # an ioctl the kernel refuses: zero all the same
        host.fscrypt_add_key("/proc", key)
    assert host._fscrypt.key_page.is_zero()


def test_nothing_written_under_the_key_reaches_the_image_in_plaintext(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey
) -> None:
    path, _ = volume(host, enc.root, "v", key)
    with open(os.path.join(path, MARKER_NAME), "wb") as f:
        for _ in range(1024):  # 1 MiB of a known pattern
            f.write(PATTERN)
    os.symlink(LINK_TARGET, os.path.join(path, "link"))
    os.mkdir(os.path.join(path, "sub"))
    with open(os.path.join(enc.root, CONTROL_NAME), "wb") as f:  # outside: plaintext
        f.write(CONTROL_DATA * 100)
    os.sync()
    enc.umount()
    assert image_contains(enc.image, CONTROL_DATA), "the scan cannot see plaintext at all"
    assert image_contains(enc.image, CONTROL_NAME.encode())
    for needle in (PATTERN[:64], MARKER_NAME.encode(), LINK_TARGET.encode()):
        assert not image_contains(enc.image, needle), f"{needle[:30]!r} is on disk in plaintext"


def test_removing_the_key_locks_the_directory(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey
) -> None:
    path, identifier = volume(host, enc.root, "v", key)
    with open(os.path.join(path, "hello.txt"), "w") as f:
        f.write("hello")
    removal = host.fscrypt_remove_key(enc.root, identifier)
    assert (removal.status, removal.files_busy, removal.other_users) == (KEY_ABSENT, False, False)
    assert host.fscrypt_key_status(enc.root, identifier) == KEY_ABSENT
    names = os.listdir(path)
    assert len(names) == 1 and names[0] != "hello.txt"
    with pytest.raises(OSError) as caught:
        open(os.path.join(path, names[0])).close()
    assert caught.value.errno == errno.ENOKEY
    assert host.fscrypt_policy_of(path) == identifier  # the policy stays; the key is gone
    again = host.fscrypt_remove_key(enc.root, identifier)  # absent already: not an error
    assert again.status == KEY_ABSENT


def test_a_busy_file_leaves_the_key_incompletely_removed(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey
) -> None:
    path, identifier = volume(host, enc.root, "v", key)
    held = open(os.path.join(path, "held"), "w+")
    held.write("still here")
    held.flush()
    sleeper = subprocess.Popen(["sleep", "60"], cwd=path)
    try:
        project = host.dir_project(path)
        users = host.files_open_in(enc.root, project)
        assert f"pid {os.getpid()} " in " ".join(users) + " "
        assert any(u.startswith(f"pid {sleeper.pid} (sleep)") for u in users)  # by its cwd
        removal = host.fscrypt_remove_key(enc.root, identifier)
        assert removal.files_busy and removal.status == KEY_INCOMPLETELY_REMOVED
        held.seek(0)
        assert held.read() == "still here"  # the open descriptor still reads plaintext
    finally:
        held.close()
        sleeper.kill()
        sleeper.wait()
    assert host.fscrypt_key_status(enc.root, identifier) == KEY_INCOMPLETELY_REMOVED
    assert host.fscrypt_remove_key(enc.root, identifier).status == KEY_ABSENT  # retry: done
    assert not any(u.startswith(f"pid {os.getpid()} ")
                   for u in host.files_open_in(enc.root, host.dir_project(path)))  # fmt: skip


def test_the_key_is_never_in_proc_keys_argv_env_or_logs(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    raw = bytes(key.view)  # a copy for the search only
    path, identifier = volume(host, enc.root, "v", key)
    with open(os.path.join(path, "f"), "w") as f:
        f.write("x")
    host.fscrypt_unavailable(enc.root)
    host.fscrypt_remove_key(enc.root, identifier)
    for where in ("/proc/keys", "/proc/self/cmdline", "/proc/self/environ"):
        with open(where, "rb") as f:
            content = f.read()
        assert raw not in content and raw.hex().encode() not in content, where
    assert raw.hex() not in caplog.text and raw.hex().upper() not in caplog.text
    assert repr(raw)[2:40] not in caplog.text


def test_remove_tree_deletes_a_locked_tree(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey
) -> None:
    path, identifier = volume(host, enc.root, "v", key)
    for d in ("a", "a/b", "a/b/c", "e"):
        os.mkdir(os.path.join(path, d))
        with open(os.path.join(path, d, "file"), "w") as f:
            f.write("data" * 1000)
    os.symlink("somewhere", os.path.join(path, "a", "link"))
    os.mkfifo(os.path.join(path, "a", "fifo"))
    assert host.fscrypt_remove_key(enc.root, identifier).status == KEY_ABSENT
    host.remove_tree(path)
    assert not os.path.lexists(path)
    host.remove_tree(path)  # absent: nothing


def test_binds_of_a_volume_are_recognised(
    host: LinuxHost, enc: Ext4Image, key: VolumeKey, tmp_path: Path
) -> None:
    path, _ = volume(host, enc.root, "v", key)
    other = os.path.join(enc.root, "other")
    os.mkdir(other)
    target, second = tmp_path / "target", tmp_path / "second"
    target.mkdir()
    second.mkdir()
    host.bind_mount(path, str(target), ["nosuid", "nodev"])
    try:
        host.bind_mount(str(target), str(second), ["ro"])  # a bind of the bind
        try:
            assert host.is_bound_from(str(target), path)
            assert host.is_bound_from(str(second), path)
            assert not host.is_bound_from(str(target), other)
            assert not host.is_bound_from(str(tmp_path), path)
            assert sorted(host.dir_mounts(path)) == sorted([str(target), str(second)])
            assert host.dir_mounts(other) == []
            inner = os.path.join(path, "inner")
            os.mkdir(inner)
            host.bind_mount(other, inner, [])
            try:
                with pytest.raises(Busy, match="mounted"):
                    host.remove_tree(path)
            finally:
                host.umount(inner)
        finally:
            host.umount(str(second))
    finally:
        host.umount(str(target))
    assert host.dir_mounts(path) == []


def test_files_open_in_ignores_other_filesystems(
    host: LinuxHost, enc: Ext4Image, tmp_path: Path
) -> None:
    with open(tmp_path / "elsewhere", "w"):
        users = host.files_open_in(enc.root, 0)
    assert not any(u.startswith(f"pid {os.getpid()} ") for u in users)


def test_probe_reasons(host: LinuxHost, enc: Ext4Image, tmp_path: Path) -> None:
    from tests.host.conftest import quota_missing

    reason = host.fscrypt_unavailable(enc.root)
    if quota_missing() is None:  # encrypt without the project feature
        assert reason is not None and "project quota" in reason
    else:
        assert reason is not None and "no project quota accounting" in reason
    assert not [n for n in os.listdir(enc.root) if n.startswith(".fscrypt-probe-")]
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmpfs))
    try:
        reason = host.fscrypt_unavailable(str(tmpfs))
        assert reason is not None and "tmpfs" in reason and "not ext4" in reason
    finally:
        sh("umount", str(tmpfs))
    (tmp_path / "plain").mkdir()
    plain = Ext4Image(tmp_path / "plain", "^encrypt", "nosuid,nodev", size_mib=32)
    try:
        reason = host.fscrypt_unavailable(plain.root)
        assert reason is not None and "lacks the encrypt feature" in reason
    finally:
        plain.close()


def test_make_project_dir_needs_the_project_feature(host: LinuxHost, enc: Ext4Image) -> None:
    with pytest.raises(FailedPrecondition, match="project"):
        host.make_project_dir(os.path.join(enc.root, "p"), 42)
    assert sh("stat", "-c", "%a", os.path.join(enc.root, "p")).strip() == "700"
