"""Project quotas and the driver's own pool on a real kernel: they need ext4 quota support
(the VM's Debian kernel has it; this tier skips them, with that reason, where it is missing)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.errors import FailedPrecondition
from csi.host import KEY_ABSENT, KEY_INCOMPLETELY_REMOVED, Quota
from csi.host.linux import LinuxHost, read_mounts
from csi.keys import random_key
from tests.host.conftest import sh

MiB = 1024**2
POOL_SIZE = 256 * MiB


class Pool:
    def __init__(self, base: Path) -> None:
        self.image = str(base / "pool.img")
        self.root = str(base / "pool")

    def mounts(self) -> list[str]:
        return [e.point for e in read_mounts() if e.point == self.root]

    def close(self, host: LinuxHost) -> None:
        while self.mounts():
            sh("umount", self.root, check=False)
            if self.mounts():
                sh("umount", "-l", self.root, check=False)
        if (device := host.loop_find(self.image)) is not None:
            sh("losetup", "-d", device, check=False)


WRITER = """
import errno, os, sys
try:
    with open(sys.argv[1], "wb") as f:
        for _ in range(int(sys.argv[2])):
            f.write(b"\\2" * 1048576)
            f.flush()
            os.fsync(f.fileno())
    print("ok")
except OSError as exc:
    print(errno.errorcode[exc.errno])
"""


def unprivileged_write(path: str, mib: int) -> str:
    """Write ``mib`` MiB as root without CAP_SYS_RESOURCE (like a pod): "ok" or the errno."""
    out = sh("setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource",
             sys.executable, "-c", WRITER, path, str(mib))  # fmt: skip
    return out.strip()


def privileged_write_ignores_limits(path: str) -> bool:
    """The driver itself (CAP_SYS_RESOURCE) is not held to a project's limit."""
    try:
        with open(path, "wb") as f:
            f.write(b"\5" * 12 * MiB)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return False
    finally:
        os.unlink(path)
    return True


@pytest.fixture
def pool(host: LinuxHost, tmp_path: Path) -> Iterator[Pool]:
    p = Pool(tmp_path)
    yield p
    p.close(host)


@pytest.mark.quota
def test_the_pool_is_made_once_and_is_usable(host: LinuxHost, pool: Pool) -> None:
    host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)
    assert pool.mounts() == [pool.root]
    entry = [e for e in read_mounts() if e.point == pool.root][-1]
    assert entry.fs_type == "ext4" and entry.source.startswith("/dev/loop")
    options = sh("findmnt", "-n", "-o", "OPTIONS", pool.root)
    for flag in ("nosuid", "nodev", "discard", "prjquota"):
        assert flag in options, options
    assert os.stat(pool.image).st_blocks * 512 < POOL_SIZE // 4  # sparse
    host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)  # mounted already: nothing
    assert pool.mounts() == [pool.root]
    assert host.fscrypt_unavailable(pool.root) is None
    assert not [n for n in os.listdir(pool.root) if n.startswith(".fscrypt-probe-")]
    # a driver restart after a reboot: image there, no loop, no mount
    pool.close(host)
    host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)
    assert pool.mounts() == [pool.root]


@pytest.mark.quota
def test_deleted_files_give_their_space_back_to_the_data_dir(host: LinuxHost, pool: Pool) -> None:
    """The pool is mounted with discard: the loop device punches holes into the image."""
    host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)
    big = os.path.join(pool.root, "big")
    with open(big, "wb") as f:
        f.write(os.urandom(64 * MiB))
        os.fsync(f.fileno())
    full = os.stat(pool.image).st_blocks * 512
    os.unlink(big)
    os.sync()
    deadline = time.monotonic() + 30
    while os.stat(pool.image).st_blocks * 512 > full - 48 * MiB and time.monotonic() < deadline:
        time.sleep(0.5)
        os.sync()
    assert os.stat(pool.image).st_blocks * 512 <= full - 48 * MiB


@pytest.mark.quota
def test_pool_root_mounted_from_something_else_is_refused(
    host: LinuxHost, pool: Pool, tmp_path: Path
) -> None:
    os.makedirs(pool.root)
    sh("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", pool.root)
    with pytest.raises(FailedPrecondition, match="already a mount"):
        host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)


@pytest.mark.quota
def test_a_project_quota_limits_an_encrypted_volume(host: LinuxHost, pool: Pool) -> None:
    host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)
    path = os.path.join(pool.root, "v42")
    host.make_project_dir(path, 42)
    host.make_project_dir(path, 42)  # idempotent
    assert host.dir_project(path) == 42
    with random_key(64) as key:
        identifier = host.fscrypt_add_key(pool.root, key)
    host.fscrypt_set_policy(path, identifier)
    host.quota_set(pool.root, 42, 8 * MiB, 100)
    quota = host.quota_get(pool.root, 42)
    assert (quota.bytes_limit, quota.inodes_limit) == (8 * MiB, 100)
    os.mkdir(os.path.join(path, "sub"))
    assert host.dir_project(os.path.join(path, "sub")) == 42  # PROJINHERIT
    with open(os.path.join(path, "sub", "four"), "wb") as f:
        f.write(b"\1" * 4 * MiB)
        f.flush()
        os.fsync(f.fileno())
    quota = host.quota_get(pool.root, 42)
    assert 4 * MiB <= quota.bytes_used < 5 * MiB and quota.inodes_used >= 3
    # root with CAP_SYS_RESOURCE ignores hard limits (dquot's ignore_hardlimit): a pod has not
    assert unprivileged_write(os.path.join(path, "big"), 16) == "EDQUOT"
    assert privileged_write_ignores_limits(os.path.join(path, "root-writes"))
    # another project is unaffected
    other = os.path.join(pool.root, "v43")
    host.make_project_dir(other, 43)
    with open(os.path.join(other, "f"), "wb") as f:
        f.write(b"\3" * MiB)
    assert host.quota_get(pool.root, 43).bytes_used >= MiB
    # expansion: raise the limit, the write goes through
    host.quota_set(pool.root, 42, 32 * MiB, 100)
    assert unprivileged_write(os.path.join(path, "more"), 8) == "ok"
    host.quota_set(pool.root, 42, 0, 0)
    assert host.quota_get(pool.root, 42).bytes_limit == 0


@pytest.mark.quota
def test_files_open_in_tells_projects_apart(host: LinuxHost, pool: Pool) -> None:
    host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)
    a, b = os.path.join(pool.root, "a"), os.path.join(pool.root, "b")
    host.make_project_dir(a, 7)
    host.make_project_dir(b, 8)
    with random_key(64) as key:
        identifier = host.fscrypt_add_key(pool.root, key)
    host.fscrypt_set_policy(a, identifier)
    mapped = os.path.join(a, "mapped")
    with open(mapped, "wb") as f:
        f.write(b"\0" * 4096)
    # a process that only maps the file (no descriptor, cwd elsewhere)
    code = ("import mmap,os,sys,time; f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,"
            "access=mmap.ACCESS_READ); f.close(); print('ready',flush=True); time.sleep(60)")
    mapper = subprocess.Popen([sys.executable, "-c", code, mapped],
                              stdout=subprocess.PIPE, cwd="/")  # fmt: skip
    try:
        assert mapper.stdout is not None and mapper.stdout.readline().strip() == b"ready"
        users = host.files_open_in(pool.root, 7)
        assert any(u.startswith(f"pid {mapper.pid} ") for u in users), users
        assert not any(u.startswith(f"pid {mapper.pid} ") for u in host.files_open_in(pool.root, 8))
        removal = host.fscrypt_remove_key(pool.root, identifier)
        assert removal.files_busy and removal.status == KEY_INCOMPLETELY_REMOVED
    finally:
        mapper.kill()
        mapper.wait()
    assert host.fscrypt_remove_key(pool.root, identifier).status == KEY_ABSENT
    host.remove_tree(a)
    host.remove_tree(b)
    assert host.quota_get(pool.root, 7) == Quota(0, 0, 0, 0)


@pytest.mark.no_quota
def test_the_pool_is_refused_where_the_kernel_has_no_quotas(host: LinuxHost, pool: Pool) -> None:
    with pytest.raises(FailedPrecondition, match="CONFIG_QFMT_V2"):
        host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)
    assert host.loop_find(pool.image) is None and pool.mounts() == []
    with pytest.raises(FailedPrecondition, match="CONFIG_QFMT_V2"):  # and again, the same way
        host.fscrypt_pool(pool.image, pool.root, POOL_SIZE)
    assert host.loop_find(pool.image) is None
