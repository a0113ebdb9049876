"""The bench's node: a disk for backing files, the driver process, qemu-storage-daemon, and
the sweep that removes whatever a run left behind."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.common import COMMAND_TIMEOUT, HOST, BenchError, sh, sh_quiet
from csi.host import commands
from csi.host.linux import read_mounts
from csi.host.nbd import Qcow2Nbd
from csi.tools.driver import Driver
from csi.tools.kubelet import InlineVolume
from csi.tools.qsd import QemuStorageDaemon

STEP_METRIC = re.compile(r'^luks_ephemeral_step_seconds_(sum|count)\{step="([^"]+)"\}\s+(\S+)$')


class DataFs:
    """An ext4 filesystem on a sparse image, loop-mounted: the node's disk for backing files."""

    def __init__(self, base: Path, size: int) -> None:
        self.image = base / "node-disk.img"
        self.mountpoint = base / "node-disk"
        self.mountpoint.mkdir()
        with self.image.open("wb") as f:
            f.truncate(size)
        sh(commands.mkfs(str(self.image), "ext4", eager=False))
        # noinit_itable: no background zeroing of this big filesystem's inode tables during runs
        sh(["mount", "-o", "loop,noinit_itable", str(self.image), str(self.mountpoint)])
        self.mounted = True

    def close(self) -> None:
        if self.mounted:
            sh_quiet(commands.umount(str(self.mountpoint)))  # the loop is autocleared
            self.mounted = False
        self.image.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BenchDriver(Driver):
    """The real ``python -m csi node`` process, as the DaemonSet runs it (metrics on loopback),
    driven with kubelet-shaped requests for inline volumes."""

    def __init__(
        self, base: Path, run_dir: Path, data_dir: Path, log_level: str,
        extra_args: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.port = free_port()
        super().__init__(
            run_dir=run_dir, state_dir=run_dir / "state", data_dir=data_dir,
            kubelet_root=base / "kubelet", log_path=base / f"driver-{log_level.lower()}.log",
            node_id="bench-node",
            extra_args=["--metrics-address", f"127.0.0.1:{self.port}", "--log-level", log_level,
                        *extra_args],
        )  # fmt: skip

    def start(self, env: Mapping[str, str] | None = None, timeout: float = 300.0) -> None:
        super().start(env, timeout)
        self.connect(timeout=COMMAND_TIMEOUT, ready_timeout=120)

    def publish(
        self, pod: str, size: str, name: str = "scratch", backing: str | None = None,
        integrity: str | None = None,
    ) -> None:  # fmt: skip
        attributes = {"size": size}
        if backing is not None:
            attributes["backing"] = backing
        if integrity is not None:
            attributes["integrity"] = integrity
        self.k.publish(InlineVolume(pod, name, attributes))

    def unpublish(self, pod: str, name: str = "scratch") -> None:
        self.k.unpublish(pod, name)
        shutil.rmtree(self.kubelet_root / "pods" / pod, ignore_errors=True)

    def scrape_steps(self) -> dict[str, tuple[float, float]]:
        """luks_ephemeral_step_seconds per step: (sum, count)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=60) as resp:
            text = resp.read().decode()
        steps: dict[str, list[float]] = {}
        for line in text.splitlines():
            if m := STEP_METRIC.match(line):
                pair = steps.setdefault(m.group(2), [0.0, 0.0])
                pair[0 if m.group(1) == "sum" else 1] = float(m.group(3))
        return {step: (v[0], v[1]) for step, v in steps.items()}


class Qsd(QemuStorageDaemon):
    """qemu-storage-daemon, daemonized on its own as the chart's sidecar runs it: the driver
    only drives it over QMP and never starts or stops it."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir / "qsd")

    def start(self, timeout: float = 60.0) -> None:
        try:
            super().start(timeout)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            raise BenchError(f"qemu-storage-daemon did not start: {exc}") from None


def sweep(base: Path, data_mount: Path, state_dir: Path, qsd_socket: Path) -> None:
    """Best effort: remove every mount, mapping, loop and NBD device this run left behind."""
    for entry in reversed(read_mounts()):
        if entry.point.startswith(str(base) + "/") and entry.point != str(data_mount):
            sh_quiet(commands.umount(entry.point))
    for name in HOST.crypt_names("bench-") + HOST.crypt_names("luks-eph-"):
        sh_quiet(commands.crypt_close(name))
    for device in HOST.loops_in(str(data_mount)):
        sh_quiet(commands.losetup_detach(device))
    # the driver's own claim records name the NBD device each export is connected on
    nbd = Qcow2Nbd(str(qsd_socket), str(state_dir / "nbd"))
    for claim in glob.glob(str(state_dir / "nbd" / "luks-eph-*")):
        if (connected := nbd.find(os.path.basename(claim))) is not None:
            sh_quiet(commands.nbd_disconnect(connected))
