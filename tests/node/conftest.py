"""Real-kernel tier: the real driver process on a unix socket, loop + dm-crypt + mount.

These tests need root and a kernel with device-mapper. ``make test-node`` runs them directly
where ``/dev/mapper/control`` exists, and inside a throwaway VM (tools/vmrun.py) elsewhere.
Without those, they skip with a reason; under CI=true a missing kernel feature is a failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.journal import Names
from csi.tools.kubelet import InlineVolume, Kubelet, Provisioner, PvcVolume

REPO = Path(__file__).resolve().parents[2]


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


class Driver:
    """The real ``python -m csi node`` process, as a DaemonSet would run it."""

    def __init__(self, base: Path, data_dir: Path, *extra: str, mode: str = "node") -> None:
        self.mode = mode
        self.base = base
        self.run_dir = Path(tempfile.mkdtemp(prefix="lec-", dir="/run"))
        self.state_dir = self.run_dir / "state"
        self.data_dir = data_dir
        self.kubelet_root = base / "kubelet"
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"unix://{self.run_dir}/csi.sock"
        self.log_path = base / f"driver-{os.path.basename(self.run_dir)}.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.kubelet: Kubelet | None = None
        self.provisioner: Provisioner | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "csi", self.mode, "--endpoint", self.endpoint,
                "--node-id", "node-test", "--state-dir", str(self.state_dir),
                "--data-dir", str(self.data_dir), "--kubelet-root", str(self.kubelet_root),
                "--min-size", "16Mi", *self.extra]  # fmt: skip
        full_env = {**os.environ, **(env or {})}
        socket_path = Path(self.endpoint[len("unix://"):])
        socket_path.unlink(missing_ok=True)  # a SIGKILLed driver leaves its socket behind
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=full_env, cwd=REPO)
        log.close()
        self.kubelet = Kubelet(self.endpoint, str(self.kubelet_root), timeout=600)
        deadline = time.monotonic() + 600  # python start-up under emulation is slow
        while not socket_path.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"driver exited at start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"driver did not start:\n{self.log()}")
            time.sleep(0.1)
        self.kubelet.wait_ready(300)
        self.provisioner = Provisioner(self.kubelet.channel, "luks-ephemeral.csi.io", timeout=600)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def k(self) -> Kubelet:
        assert self.kubelet is not None
        return self.kubelet

    @property
    def p(self) -> Provisioner:
        assert self.provisioner is not None
        return self.provisioner

    def kill(self) -> None:
        """SIGKILL, like an OOM kill or a crashed container."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        if self.kubelet is not None:
            self.kubelet.close()

    def wait_exit(self, timeout: float = 120) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        if self.kubelet is not None:
            self.kubelet.close()

    def restart(self, env: dict[str, str] | None = None) -> None:
        self.kill()
        self.start(env)

    def names(self, pod: str, name: str = "scratch") -> Names:
        return Names.of(Kubelet.volume_id(pod, name), str(self.data_dir), str(self.state_dir))

    def publish(self, pod: str, name: str = "scratch", **kwargs: object) -> str:
        request = self.k.publish(InlineVolume(pod, name, **kwargs))  # type: ignore[arg-type]
        return str(request.target_path)

    def unpublish(self, pod: str, name: str = "scratch") -> None:
        self.k.unpublish(pod, name)

    def cleanup(self) -> None:
        self.stop()
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
