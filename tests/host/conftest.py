"""Host tier: the fscrypt host layer (``csi.host.fscrypt`` through ``LinuxHost``) on a real ext4
image on a loop device, run natively wherever the kernel has ext4 encryption; no VM needed.

Project quotas need a kernel with ext4 quota support (CONFIG_QFMT_V2): where ext4 refuses a
read-write mount with the project/quota features, those tests skip with that reason (run them
in the VM: ``tools/vmrun.py -- python -m pytest tests/host``). Without root or without ext4
encryption everything skips with a reason; under CI=true that is a failure.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.host.linux import LinuxHost

NO_QUOTA = "no quota support in this kernel (ext4 refuses a rw mount with project,quota)"


def sh(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(list(argv), capture_output=True, timeout=300, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout.decode(errors="replace")


class Ext4Image:
    """A sparse ext4 image with ``features``, on a loop device, mounted in ``base``."""

    def __init__(self, base: Path, features: str, options: str, *, extended: str = "",
                 size_mib: int = 128) -> None:  # fmt: skip
        self.image = base / "fs.img"
        self.mountpoint = base / "mnt"
        self.mountpoint.mkdir()
        sh("truncate", "-s", f"{size_mib}M", str(self.image))
        sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", features,
           *(["-E", extended] if extended else []), str(self.image))  # fmt: skip
        self.device = sh("losetup", "--find", "--show", str(self.image)).strip()
        try:
            sh("mount", "-t", "ext4", "-o", options, self.device, str(self.mountpoint))
        except AssertionError:
            sh("losetup", "-d", self.device, check=False)
            raise
        self.mounted = True
        self.root = str(self.mountpoint)

    def umount(self) -> None:
        if self.mounted:
            sh("umount", str(self.mountpoint))
            self.mounted = False

    def close(self) -> None:
        if self.mounted:
            sh("umount", "-l", str(self.mountpoint), check=False)
            self.mounted = False
        sh("losetup", "-d", self.device, check=False)


def _try_image(features: str, options: str, extended: str = "") -> str | None:
    """None if an image with ``features`` mounts with ``options`` here, else why not."""
    with tempfile.TemporaryDirectory(prefix="fscrypt-probe-") as base:
        try:
            Ext4Image(Path(base), features, options, extended=extended, size_mib=32).close()
        except AssertionError as exc:
            return str(exc).strip().splitlines()[-1][-200:]
    return None


@functools.cache
def missing() -> str | None:
    """Why this tier cannot run at all here (None: it can)."""
    if os.geteuid() != 0:
        return "the host tier needs root (loop devices, mount, the fscrypt ioctls)"
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"the host tier needs {tool}"
    if not os.path.exists("/sys/fs/ext4/features/encryption"):
        subprocess.run(["modprobe", "-q", "ext4"], check=False, capture_output=True)
    if (why := _try_image("encrypt", "nosuid,nodev")) is not None:
        return f"this kernel cannot mount an ext4 image with encrypt: {why}"
    return None


@functools.cache
def quota_missing() -> str | None:
    """Why project quota tests cannot run here (None: they can)."""
    subprocess.run(["modprobe", "-q", "quota_v2"], check=False, capture_output=True)
    if _try_image("encrypt,project,quota", "prjquota", "quotatype=prjquota") is not None:
        return NO_QUOTA
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    host_items = [i for i in items if "tests/host/" in str(i.path)]
    if not host_items:
        return
    reason = missing()
    if reason is not None and os.environ.get("CI") == "true":
        raise pytest.UsageError(f"CI: {reason}")
    for item in host_items:
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif item.get_closest_marker("quota") and (why := quota_missing()) is not None:
            item.add_marker(pytest.mark.skip(reason=why))
        elif item.get_closest_marker("no_quota") and quota_missing() is None:
            item.add_marker(pytest.mark.skip(reason="this kernel has quota support"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quota: needs ext4 project quotas in this kernel")
    config.addinivalue_line("markers", "no_quota: checks the refusal where quotas are missing")


@pytest.fixture
def host() -> LinuxHost:
    return LinuxHost()


@pytest.fixture
def enc(tmp_path: Path) -> Iterator[Ext4Image]:
    """ext4 with encrypt only (what every kernel with ext4 fscrypt mounts)."""
    fs = Ext4Image(tmp_path, "encrypt", "nosuid,nodev")
    yield fs
    fs.close()
