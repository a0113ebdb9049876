"""Real-kernel tier: the real driver process on a unix socket, loop + dm-crypt + mount.

These tests need root and a kernel with device-mapper. ``make test-node`` runs them directly
where ``/dev/mapper/control`` exists, and inside a throwaway VM (tools/vmrun.py) elsewhere.
Without those, they skip with a reason; under CI=true a missing kernel feature is a failure.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from csi.journal import Names
from csi.tools.driver import REPO
from csi.tools.driver import Driver as DriverProcess
from csi.tools.kubelet import InlineVolume, Provisioner, PvcVolume

__all__ = ["REPO"]  # test_sanity imports it from here


def _missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/mapper/control"):
        missing.append("device-mapper (/dev/mapper/control)")
    for tool in ("cryptsetup", "losetup", "mkfs.ext4", "mkfs.xfs", "filefrag"):
        if shutil.which(tool) is None:
            missing.append(tool)
    return missing


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = _missing()
    if not missing:
        return
    reason = (f"real-kernel tier needs {', '.join(missing)}; run `make test-node` "
              "(boots a VM when this kernel lacks device-mapper)")
    if os.environ.get("CI") == "true":
        raise pytest.UsageError(f"CI: {reason}")
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))


def sh(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, input=input, timeout=600, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout.decode(errors="replace")


class SmallFs:
    """An ext4 filesystem of a given size on a loop device: a data dir we control."""

    def __init__(self, base: Path, name: str, size_mib: int) -> None:
        self.image = base / f"{name}.fsimg"
        self.mountpoint = base / name
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        sh("truncate", "-s", f"{size_mib}M", str(self.image))
        sh("mkfs.ext4", "-q", "-F", str(self.image))
        sh("mount", "-o", "loop", str(self.image), str(self.mountpoint))

    def close(self) -> None:
        sh("umount", str(self.mountpoint), check=False)
        self.image.unlink(missing_ok=True)


def names_of(d: Driver, volume_id: str) -> Names:
    """The driver's names for any volume id (a PVC's too)."""
    return Names.of(volume_id, str(d.data_dir), str(d.state_dir))


def record_state(d: Driver, volume_id: str) -> str | None:
    """The state in the volume's journal record, None without one."""
    path = d.state_dir / "volumes" / f"{names_of(d, volume_id).digest}.json"
    return str(json.loads(path.read_text())["state"]) if path.exists() else None


class Driver(DriverProcess):
    """The real ``python -m csi node`` (or ``all``) process, as a DaemonSet would run it."""

    def __init__(self, base: Path, data_dir: Path, *extra: str, mode: str = "node") -> None:
        self.base = base
        run_dir = Path(tempfile.mkdtemp(prefix="lec-", dir="/run"))
        super().__init__(
            run_dir=run_dir, state_dir=run_dir / "state", data_dir=data_dir,
            kubelet_root=base / "kubelet", log_path=base / f"driver-{run_dir.name}.log",
            node_id="node-test", mode=mode, extra_args=["--min-size", "16Mi", *extra],
        )  # fmt: skip
        self.provisioner: Provisioner | None = None

    def start(self, env: Mapping[str, str] | None = None, timeout: float = 600.0) -> None:
        super().start(env, timeout)
        channel = self.connect(timeout=600, ready_timeout=300).channel
        self.provisioner = Provisioner(channel, "luks-ephemeral.csi.io", timeout=600)

    @property
    def p(self) -> Provisioner:
        assert self.provisioner is not None
        return self.provisioner

    def restart(self, env: dict[str, str] | None = None) -> None:
        self.kill()
        self.start(env)

    def publish(self, pod: str, name: str = "scratch", **kwargs: object) -> str:
        request = self.k.publish(InlineVolume(pod, name, **kwargs))  # type: ignore[arg-type]
        return str(request.target_path)

    def unpublish(self, pod: str, name: str = "scratch") -> None:
        self.k.unpublish(pod, name)

    def cleanup(self) -> None:
        self.stop(60)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def rpc_code(error: BaseException) -> grpc.StatusCode:
    assert isinstance(error, grpc.RpcError), error
    code: grpc.StatusCode = error.code()
    return code


@pytest.fixture(scope="session")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lec-node-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def data_fs(base: Path) -> Iterator[SmallFs]:
    fs = SmallFs(base, "data", 20 * 1024)
    yield fs
    fs.close()


@pytest.fixture
def driver(base: Path, data_fs: SmallFs) -> Iterator[Driver]:
    d = Driver(base, data_fs.mountpoint)
    d.start()
    yield d
    d.cleanup()


@pytest.fixture
def d(base: Path, data_fs: SmallFs) -> Iterator[Driver]:
    """The driver in ``all`` mode (node + controller): inline volumes and PVCs from one
    process, so PVCs can be created and deleted; no metrics server."""
    driver = Driver(base, data_fs.mountpoint, "--metrics-address", "", mode="all")
    driver.start()
    yield driver
    driver.cleanup()


# --- what the node's kernel says ----------------------------------------------------------
def mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def crypt_mappings() -> list[str]:
    return [n for n in sh("dmsetup", "ls", "--target", "crypt").split()
            if n.startswith("luks-eph-")]


def loops_on(directory: Path) -> list[str]:
    return [line for line in sh("losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE")
            .splitlines() if str(directory) in line]  # fmt: skip


def mount_fields(path: Path | str) -> list[str] | None:
    """The visible (last) mountinfo line at ``path``, split."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                found = fields
    return found


def loops_of(image: Path) -> list[str]:
    """Loop devices whose backing file is ``image`` (sysfs)."""
    found = []
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if Path(entry).read_text().strip() == str(image):
                found.append("/dev/" + entry.split("/")[3])
    return found


def release_pool(data_dir: Path) -> None:
    """Unmount the driver's pool (and whatever is still bound from it) and detach its loop."""
    root, image = data_dir / "fscrypt", data_dir / "fscrypt.pool"
    fields = mount_fields(root)
    if fields is not None:
        device = fields[2]
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            parts = line.split()
            if parts[2] == device and parts[4] != str(root):
                sh("umount", "-l", parts[4], check=False)
        sh("umount", str(root), check=False)
    for loop in loops_of(image):
        sh("losetup", "-d", loop, check=False)


def cryptsetup_keys() -> list[str]:
    with open("/proc/keys") as f:
        return [line.strip() for line in f if "cryptsetup:" in line]


def volume_leftovers(driver: Driver, pv: PvcVolume) -> list[str]:
    """What a deleted provisioned volume could leave: kernel objects, files, its record, its
    staging and target mounts (kubelet paths name the PV)."""
    names = Names.of(pv.volume_id, str(driver.data_dir), str(driver.state_dir))
    found = [f"mapping {m}" for m in crypt_mappings() if m == names.mapping]
    found += [f"loop {line}" for line in loops_on(driver.data_dir) if names.backing in line]
    found += [f"file {p}" for p in (names.backing, names.header) if os.path.exists(p)]
    record = driver.state_dir / "volumes" / f"{names.digest}.json"
    found += [f"record {record}"] if record.exists() else []
    found += [f"mount {m}" for m in mountpoints()
              if m.startswith(str(driver.kubelet_root) + "/") and f"/{pv.pv_name}/" in m + "/"]
    if not crypt_mappings():
        found += [f"key {k}" for k in cryptsetup_keys()]
    return found


def leftovers(driver: Driver, pod: str, name: str = "scratch") -> list[str]:
    """Everything a torn-down volume could leave behind, as readable strings."""
    names = driver.names(pod, name)
    target = driver.k.target(pod, name)
    found = []
    found += [f"mapping {m}" for m in crypt_mappings() if m == names.mapping]
    found += [f"loop {line}" for line in loops_on(driver.data_dir) if names.backing in line]
    found += [f"file {p}" for p in (names.backing, names.header) if os.path.exists(p)]
    record = driver.state_dir / "volumes" / f"{names.digest}.json"
    found += [f"record {record}"] if record.exists() else []
    found += [f"mount {target}"] if target in mountpoints() else []
    if not crypt_mappings():  # keys carry a LUKS uuid, not our name: only checkable when alone
        found += [f"key {k}" for k in cryptsetup_keys()]
    return found
