#!/usr/bin/env python3
"""`make bench`: measure the real driver on the real kernel, against baselines, in one run.

    python bench/run.py [--cycles 20] [--out bench/results.json] [--phases latency,...]

Runs as root where loop devices and dm-crypt work (``make bench`` uses tools/vmrun.py, which
boots a throwaway VM when this kernel lacks device-mapper). It makes a data dir (ext4 on a
sparse loop image), starts the real ``python -m csi node`` process on a unix socket under /run
and drives it with kubelet-shaped requests (csi.tools.kubelet), like kubelet does for an inline
ephemeral volume. Phases:

latency      publish and unpublish of 1 GiB volumes, N cycles, interleaved round-robin with
             three baselines run from this script as plain argv subprocesses:
             floor (no encryption), handrun (the very commands the driver runs, nothing else)
             and conventional (a LUKS driver configured as ceph-csi does: argon2id KDF with
             32 MiB, header on the device, no dm-crypt perf flags, default mkfs.ext4, mount);
             plus the driver's own time per lifecycle step (luks_ephemeral_step_seconds).
concurrency  16 publishes in parallel threads against 16 in sequence.
footprint    blocks allocated in the backing file of a freshly published 10 GiB sparse volume,
             backing=loop and then backing=qcow2 (one volume each, publish and unpublish timed
             once), and the data path: dm table flags (key redacted), sector sizes, loop
             direct I/O. For qcow2 the bench runs its own qemu-storage-daemon (a daemon of its
             own, as the chart's sidecar is) and starts the driver with --qsd-socket.
memory       the driver's RSS idle and with 50 small (64 MiB) volumes published.
integrity    publish of integrity=hmac-sha256 filesystem volumes of 256 MiB and 2 GiB (and, for
             reference, a 256 MiB volume without integrity), interleaved round-robin, with the
             driver's time per step for each publish. dm-integrity's format-time wipe writes
             the whole device (8x the work for 2 GiB); filesystems skip it and write their
             metadata instead, so the goal is a 2 GiB publish within 2x of a 256 MiB one.

``--only PHASE[,PHASE]`` runs just those phases and merges their sections into the existing
results file (the other sections, measured by an earlier run, are kept as they were).

Absolute times under software emulation (QEMU TCG) are 10-50x those of real hardware: read the
ratios. The handrun baseline is the exact argv the driver ran in a first audit publish (its
DEBUG log, normalised), replayed with fresh names; the built-in copy is the fallback.
Benchmarks are not tests: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import glob
import itertools
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi.host.nbd import node_name
from csi.journal import Names
from csi.params import parse_quantity
from csi.tools.kubelet import InlineVolume, Kubelet
from csi.tools.qsd import QemuStorageDaemon

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2
GiB = 1024**3
COMMAND_TIMEOUT = 900.0
PHASES = ("latency", "concurrency", "footprint", "memory", "integrity")
FLOWS = ("ours", "floor", "handrun", "conventional")
# Top-level results keys each phase writes (for --only, which merges them into an old file).
PHASE_KEYS = {
    "latency": ("latency", "handrun_script", "datapath_baselines", "mkfs_default"),
    "footprint": ("footprint", "datapath"),
    "memory": ("memory", "rss_idle_mib"),
}

# Goals (issue: make bench). A ratio goal compares p50 publish latencies.
GOAL_HANDRUN_MAX = 1.15
GOAL_CONVENTIONAL_MIN = 5.0
GOAL_SPEEDUP_MIN = 1.5
GOAL_ALLOC_MAX_MIB = 16.0
GOAL_RSS_MAX_MIB = 80.0
GOAL_INTEGRITY_MAX = 2.0  # integrity publish p50: 2 GiB / 256 MiB
UNPUBLISH_TRIES = 30  # integrity phase: a FAILED_PRECONDITION (busy) unpublish is retried

# Same environment the driver gives its commands (csi/host/runner.py): a fixed PATH and locale,
# and libdevmapper creates /dev/mapper nodes itself where no udev runs.
CMD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}

# The commands of csi/host/linux.py for a default volume (loop, detached header, ext4), with
# placeholders. Used only if the audit publish could not capture the driver's real argv.
HANDRUN_TEMPLATE: tuple[tuple[str, ...], ...] = (
    ("losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on", "{backing}"),
    (
        "cryptsetup",
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--sector-size",
        "4096",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--hash",
        "sha256",
        "--luks2-metadata-size",
        "16k",
        "--luks2-keyslots-size",
        "512k",
        "--key-file=-",
        "--header",
        "{header}",
        "{loop}",
    ),
    (
        "cryptsetup",
        "open",
        "--type",
        "luks2",
        "--key-file=-",
        "--perf-no_read_workqueue",
        "--perf-no_write_workqueue",
        "--header",
        "{header}",
        "{loop}",
        "{mapping}",
    ),
    (
        "mkfs.ext4",
        "-F",
        "-q",
        "-m",
        "0",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        "{mapper}",
    ),
    ("mount", "-t", "ext4", "-o", "rw,nosuid,nodev,noinit_itable", "{mapper}", "{target}"),
    ("umount", "{target}"),
    ("cryptsetup", "close", "{mapping}"),
    ("losetup", "--detach", "{loop}"),
)

# ceph-csi (internal/util/cryptsetup/cryptsetup.go): luksFormat with a 32 MiB argon2 memory cap,
# luksOpen with --disable-keyring; the LUKS2 header (16 MiB) lives on the device itself.
CONVENTIONAL_HEADER_BYTES = 16 * MiB
CONVENTIONAL_FORMAT = (
    "cryptsetup",
    "-q",
    "luksFormat",
    "--type",
    "luks2",
    "--hash",
    "sha256",
    "--pbkdf",
    "argon2id",
    "--pbkdf-memory",
    "32768",
)
LOSETUP = ("losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on")
LAZY_MKFS = (
    "mkfs.ext4",
    "-F",
    "-q",
    "-m",
    "0",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
)
OUR_MOUNT_OPTIONS = "rw,nosuid,nodev,noinit_itable"


class BenchError(Exception):
    """A command or a driver call failed; the message never holds key material."""


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def command_env() -> dict[str, str]:
    env = dict(CMD_ENV)
    if not os.path.exists("/run/udev/control"):
        env["DM_DISABLE_UDEV"] = "1"
    return env


def sh(argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True) -> str:
    """Run an argv (never a shell string); a key goes only through stdin."""
    proc = subprocess.run(
        list(argv),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        env=command_env(),
        check=False,
    )
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-400:]
        raise BenchError(f"{' '.join(argv[:2])} failed (exit {proc.returncode}): {err}")
    return proc.stdout.decode(errors="replace")


def tool_version(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unavailable"


def read_text(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 3)


def r4(x: float) -> float:
    return round(x, 4)


def mib(n: float) -> float:
    return round(n / MiB, 2)


def allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


# ------------------------------------------------------------------------------------------
# Environment


def detect_environment() -> dict[str, Any]:
    cpuinfo = read_text("/proc/cpuinfo")
    flags = next(
        (ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []
    )
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        "",
    )
    vendor = read_text("/sys/devices/virtual/dmi/id/sys_vendor")
    product = read_text("/sys/devices/virtual/dmi/id/product_name")
    clocksources = read_text(
        "/sys/devices/system/clocksource/clocksource0/available_clocksource"
    ).split()
    qemu = vendor == "QEMU" or "QEMU" in model
    # A KVM guest gets the kvm-clock paravirtual clock; QEMU's software emulation (TCG) cannot.
    emulated = qemu and "kvm-clock" not in clocksources
    mem_kib = next(
        (
            int(ln.split()[1])
            for ln in read_text("/proc/meminfo").splitlines()
            if ln.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "kernel": platform.release(),
        "emulated": emulated,
        "virtualisation": {
            "hypervisor_cpu_flag": "hypervisor" in flags,
            "dmi_sys_vendor": vendor,
            "dmi_product_name": product,
            "cpu_model": model,
            "clocksources": clocksources,
            "vmrun_guest": os.environ.get("VMRUN_GUEST") == "1",
        },
        "cpus": os.cpu_count(),
        "memory_mib": mem_kib // 1024,
        "python": platform.python_version(),
        "tools": {
            "cryptsetup": tool_version(["cryptsetup", "--version"]),
            "mke2fs": tool_version(["mke2fs", "-V"]),
            "losetup": tool_version(["losetup", "--version"]),
            "qemu-storage-daemon": tool_version(["qemu-storage-daemon", "--version"]),
            "nbd-client": tool_version(["nbd-client", "-V"]),
        },
        "udev": os.path.exists("/run/udev/control"),
    }


def mkfs_default_meaning() -> dict[str, Any]:
    """What a plain ``mkfs.ext4`` does here (e2fsprogs: /etc/mke2fs.conf over built-ins)."""
    conf = read_text("/etc/mke2fs.conf")
    itable_conf = re.search(r"lazy_itable_init\s*=\s*(\S+)", conf)
    journal_conf = re.search(r"lazy_journal_init\s*=\s*(\S+)", conf)
    kernel_lazy = os.path.exists("/sys/fs/ext4/features/lazy_itable_init")
    return {
        "argv": ["mkfs.ext4", "-F", "-q", "{mapper}"],
        "lazy_itable_init": itable_conf.group(1) if itable_conf else int(kernel_lazy),
        "lazy_itable_init_source": "mke2fs.conf"
        if itable_conf
        else "built-in: on because the kernel has /sys/fs/ext4/features/lazy_itable_init",
        "lazy_journal_init": journal_conf.group(1) if journal_conf else 0,
        "lazy_journal_init_source": "mke2fs.conf"
        if journal_conf
        else "built-in default 0: mke2fs zeroes the whole journal (32 MiB for 1 GiB)",
        "discard": "attempted by default; dm-crypt without allow_discards refuses it",
        "mount": "plain `mount -t ext4`: init_itable on, the kernel zeroes inode tables "
        "in the background after mount",
    }


# ------------------------------------------------------------------------------------------
# Scratch space and the driver process


class DataFs:
    """An ext4 filesystem on a sparse image, loop-mounted: the node's disk for backing files."""

    def __init__(self, base: Path, size: int) -> None:
        self.image = base / "node-disk.img"
        self.mountpoint = base / "node-disk"
        self.mountpoint.mkdir()
        with self.image.open("wb") as f:
            f.truncate(size)
        sh([*LAZY_MKFS, str(self.image)])
        # noinit_itable: no background zeroing of this big filesystem's inode tables during runs
        sh(["mount", "-o", "loop,noinit_itable", str(self.image), str(self.mountpoint)])
        self.mounted = True

    def close(self) -> None:
        if self.mounted:
            sh(["umount", str(self.mountpoint)], check=False)  # loop is autocleared
            self.mounted = False
        self.image.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Driver:
    """The real ``python -m csi node`` process, as the DaemonSet runs it (metrics on loopback)."""

    def __init__(
        self,
        base: Path,
        run_dir: Path,
        data_dir: Path,
        log_level: str,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.extra_args = list(extra_args)
        self.state_dir = run_dir / "state"
        self.data_dir = data_dir
        self.kubelet_root = base / "kubelet"
        self.kubelet_root.mkdir(exist_ok=True)
        self.socket = run_dir / "csi.sock"
        self.endpoint = f"unix://{self.socket}"
        self.port = free_port()
        self.log_path = base / f"driver-{log_level.lower()}.log"
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.kubelet: Kubelet | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "csi",
            "node",
            "--endpoint",
            self.endpoint,
            "--node-id",
            "bench-node",
            "--state-dir",
            str(self.state_dir),
            "--data-dir",
            str(self.data_dir),
            "--kubelet-root",
            str(self.kubelet_root),
            "--metrics-address",
            f"127.0.0.1:{self.port}",
            "--log-level",
            self.log_level,
            *self.extra_args,
        ]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, cwd=REPO, stdin=subprocess.DEVNULL
            )
        self.kubelet = Kubelet(self.endpoint, str(self.kubelet_root), timeout=COMMAND_TIMEOUT)
        deadline = time.monotonic() + 300
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise BenchError(f"driver exited at start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"driver did not create its socket:\n{self.log_tail()}")
            time.sleep(0.1)
        self.kubelet.wait_ready(120)

    @property
    def k(self) -> Kubelet:
        if self.kubelet is None:
            raise BenchError("driver not started")
        return self.kubelet

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("driver not started")
        return self.proc.pid

    def names(self, pod: str, name: str = "scratch") -> Names:
        return Names.of(Kubelet.volume_id(pod, name), str(self.data_dir), str(self.state_dir))

    def publish(
        self,
        pod: str,
        size: str,
        name: str = "scratch",
        backing: str | None = None,
        integrity: str | None = None,
    ) -> None:
        attributes = {"size": size}
        if backing is not None:
            attributes["backing"] = backing
        if integrity is not None:
            attributes["integrity"] = integrity
        self.k.publish(InlineVolume(pod, name, attributes))

    def unpublish(self, pod: str, name: str = "scratch") -> None:
        self.k.unpublish(pod, name)
        shutil.rmtree(self.kubelet_root / "pods" / pod, ignore_errors=True)

    def rss(self) -> dict[str, int]:
        status = read_text(f"/proc/{self.pid}/status")
        out: dict[str, int] = {}
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out[key] = int(value.split()[0])
        return out

    def scrape_steps(self) -> dict[str, tuple[float, float]]:
        """luks_ephemeral_step_seconds per step: (sum, count)."""
        url = f"http://127.0.0.1:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=60) as resp:
            text = resp.read().decode()
        steps: dict[str, list[float]] = {}
        pattern = re.compile(r'^luks_ephemeral_step_seconds_(sum|count)\{step="([^"]+)"\}\s+(\S+)$')
        for line in text.splitlines():
            m = pattern.match(line)
            if m:
                pair = steps.setdefault(m.group(2), [0.0, 0.0])
                pair[0 if m.group(1) == "sum" else 1] = float(m.group(3))
        return {step: (v[0], v[1]) for step, v in steps.items()}

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.kubelet is not None:
            self.kubelet.close()
            self.kubelet = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


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


def qcow2_unavailable() -> str | None:
    """What is missing here for backing=qcow2, or None. Like the driver, loads the nbd module
    (nbds_max=128) when the kernel has no NBD devices yet."""
    missing = [
        tool
        for tool in ("qemu-storage-daemon", "qemu-img", "nbd-client")
        if shutil.which(tool, path=CMD_ENV["PATH"]) is None
    ]
    if not glob.glob("/sys/block/nbd*") and shutil.which("modprobe", path=CMD_ENV["PATH"]):
        sh(["modprobe", "nbd", "nbds_max=128"], check=False)
    if not glob.glob("/sys/block/nbd*"):
        missing.append("kernel NBD devices (no /sys/block/nbd*, `modprobe nbd` did not add any)")
    return "missing " + ", ".join(missing) if missing else None


def connected_nbds() -> list[str]:
    """NBD devices the kernel has connected: those with a ``pid`` attribute."""
    return sorted("/dev/" + p.split(os.sep)[-2] for p in glob.glob("/sys/block/nbd*/pid"))


# ------------------------------------------------------------------------------------------
# Flows: one publish + unpublish cycle each, timed


@dataclass
class Sample:
    publish: float
    unpublish: float
    alloc_bytes: int
    steps: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "publish_s": r4(self.publish),
            "unpublish_s": r4(self.unpublish),
            "cycle_s": r4(self.publish + self.unpublish),
            "alloc_bytes": self.alloc_bytes,
            "steps_s": {k: r4(v) for k, v in self.steps.items()},
        }


@dataclass
class Objects:
    """What one baseline cycle creates, so a failure can be cleaned up."""

    backing: str
    header: str
    mapping: str
    target: str
    loop: str = ""

    @property
    def mapper(self) -> str:
        return f"/dev/mapper/{self.mapping}"

    def fill(self, token: str) -> str:
        for key in ("backing", "header", "mapping", "mapper", "target", "loop"):
            token = token.replace("{" + key + "}", str(getattr(self, key)))
        return token


class Timer:
    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - start


def step_of(argv: Sequence[str]) -> str:
    """Lifecycle step name of a command, matching the driver's step metric labels."""
    tool, verb = argv[0], argv[1] if len(argv) > 1 else ""
    if tool == "losetup":
        return "detach" if "--detach" in argv or "-d" in argv else "attach"
    if tool == "cryptsetup":
        for arg in argv[1:]:
            if arg in ("luksFormat",):
                return "format"
            if arg in ("open", "luksOpen"):
                return "open"
            if arg in ("close", "luksClose"):
                return "close"
        return f"cryptsetup {verb}"
    if tool.startswith("mkfs"):
        return "mkfs"
    if tool == "mount":
        return "mount"
    if tool == "umount":
        return "unmount"
    return tool


def uses_key(argv: Sequence[str]) -> bool:
    return "--key-file=-" in argv or any(
        a in ("-d", "--key-file") and b == "-" for a, b in itertools.pairwise(argv)
    )


class Baseline:
    """A flow run from this script: plain argv subprocesses, nothing else."""

    name = ""
    extra_bytes = 0

    def __init__(self, root: Path, header_dir: Path, size: int) -> None:
        self.root = root
        self.header_dir = header_dir
        self.size = size
        self.datapath: dict[str, Any] | None = None

    def objects(self, i: int) -> Objects:
        tag = f"bench-{self.name}-{i}-{uuid.uuid4().hex[:8]}"
        return Objects(
            backing=str(self.root / "backing" / f"{tag}.img"),
            header=str(self.header_dir / f"{tag}.hdr"),
            mapping=tag,
            target=str(self.root / "mnt" / tag),
        )

    def cycle(self, i: int) -> Sample:
        obj = self.objects(i)
        timer = Timer()
        try:
            start = time.perf_counter()
            self.up(obj, timer)
            published = time.perf_counter()
            alloc = allocated(obj.backing)
            if self.datapath is None and self.has_mapping:
                self.datapath = datapath_of(obj.mapping, obj.backing)
                self.datapath["keyslot_kdf"] = self.kdf(obj)
            unstart = time.perf_counter()
            self.down(obj, timer)
            done = time.perf_counter()
        except BaseException:
            self.cleanup(obj)
            raise
        return Sample(published - start, done - unstart, alloc, timer.steps)

    has_mapping = True

    def kdf(self, obj: Objects) -> dict[str, str]:
        return keyslot_kdf(obj.loop, obj.header if os.path.exists(obj.header) else None)

    def up(self, obj: Objects, timer: Timer) -> None:
        raise NotImplementedError

    def down(self, obj: Objects, timer: Timer) -> None:
        raise NotImplementedError

    # pieces shared by the baselines ----------------------------------------------------
    def create_backing(self, obj: Objects, timer: Timer) -> None:
        with timer.step("create_backing"):  # in-process, as the driver does (minus its fsync)
            fd = os.open(obj.backing, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.size + self.extra_bytes)
            finally:
                os.close(fd)

    def run(self, argv: Sequence[str], timer: Timer, key: bytes | None = None) -> str:
        with timer.step(step_of(argv)):
            if argv[0] == "mount":
                os.makedirs(argv[-1], exist_ok=True)
            out = sh(argv, stdin=key)
            if argv[0] == "umount":
                os.rmdir(argv[-1])
        return out

    def delete(self, obj: Objects, timer: Timer) -> None:
        with timer.step("delete"):
            os.unlink(obj.backing)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(obj.header)

    def cleanup(self, obj: Objects) -> None:
        if obj.target in (p for p, _ in mounts()):
            sh(["umount", obj.target], check=False)
        if os.path.exists(obj.mapper):
            sh(["cryptsetup", "close", obj.mapping], check=False)
        loop = obj.loop or loop_of(obj.backing)
        if loop:
            sh(["losetup", "--detach", loop], check=False)
        for path in (obj.backing, obj.header):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(obj.target)


class Floor(Baseline):
    """No encryption: sparse file, loop (same flags), lazy mkfs.ext4, mount; and back."""

    name = "floor"
    has_mapping = False

    def up(self, obj: Objects, timer: Timer) -> None:
        self.create_backing(obj, timer)
        obj.loop = self.run([*LOSETUP, obj.backing], timer).strip()
        self.run([*LAZY_MKFS, obj.loop], timer)
        self.run(["mount", "-t", "ext4", "-o", OUR_MOUNT_OPTIONS, obj.loop, obj.target], timer)

    def down(self, obj: Objects, timer: Timer) -> None:
        self.run(["umount", obj.target], timer)
        self.run(["losetup", "--detach", obj.loop], timer)
        self.delete(obj, timer)


class HandRun(Baseline):
    """The exact commands the driver runs (captured from it, or the built-in copy)."""

    name = "handrun"

    def __init__(
        self, root: Path, header_dir: Path, size: int, script: Sequence[Sequence[str]]
    ) -> None:
        super().__init__(root, header_dir, size)
        split = next(i for i, argv in enumerate(script) if argv[0] == "umount")
        self.publish_script = [list(a) for a in script[:split]]
        self.unpublish_script = [list(a) for a in script[split:]]

    def up(self, obj: Objects, timer: Timer) -> None:
        self.create_backing(obj, timer)
        key = os.urandom(64)
        for template in self.publish_script:
            argv = [obj.fill(t) for t in template]
            out = self.run(argv, timer, key if uses_key(argv) else None)
            if argv[0] == "losetup" and "--show" in argv:
                obj.loop = out.strip()

    def down(self, obj: Objects, timer: Timer) -> None:
        for template in self.unpublish_script:
            self.run([obj.fill(t) for t in template], timer)
        self.delete(obj, timer)


class Conventional(Baseline):
    """As ceph-csi configures LUKS: argon2id (32 MiB), header on the device, no perf flags,
    default mkfs.ext4, plain mount. The file is 16 MiB larger to hold the on-device header."""

    name = "conventional"
    extra_bytes = CONVENTIONAL_HEADER_BYTES

    def up(self, obj: Objects, timer: Timer) -> None:
        self.create_backing(obj, timer)
        obj.loop = self.run([*LOSETUP, obj.backing], timer).strip()
        key = os.urandom(64)
        self.run([*CONVENTIONAL_FORMAT, obj.loop, "-d", "-"], timer, key)
        self.run(
            ["cryptsetup", "luksOpen", obj.loop, obj.mapping, "--disable-keyring", "-d", "-"],
            timer,
            key,
        )
        self.run(["mkfs.ext4", "-F", "-q", obj.mapper], timer)
        self.run(["mount", "-t", "ext4", obj.mapper, obj.target], timer)

    def down(self, obj: Objects, timer: Timer) -> None:
        self.run(["umount", obj.target], timer)
        self.run(["cryptsetup", "luksClose", obj.mapping], timer)
        self.run(["losetup", "--detach", obj.loop], timer)
        self.delete(obj, timer)


class Ours:
    """The driver, through its socket, as kubelet calls it."""

    name = "ours"

    def __init__(self, driver: Driver, size: str) -> None:
        self.driver = driver
        self.size = size

    def cycle(self, i: int) -> Sample:
        pod = str(uuid.uuid4())
        try:
            start = time.perf_counter()
            self.driver.publish(pod, self.size)
            published = time.perf_counter()
            alloc = allocated(self.driver.names(pod).backing)
            unstart = time.perf_counter()
            self.driver.unpublish(pod)
            done = time.perf_counter()
        except BaseException:
            with contextlib.suppress(Exception):
                self.driver.unpublish(pod)
            raise
        return Sample(published - start, done - unstart, alloc)


# ------------------------------------------------------------------------------------------
# Kernel views


def mounts() -> list[tuple[str, str]]:
    out = []
    for line in read_text("/proc/self/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) > 4 and len(rfields) > 1:
            out.append((fields[4].replace("\\040", " "), rfields[1]))
    return out


def loop_of(backing: str) -> str | None:
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        if read_text(entry).removesuffix(" (deleted)") == backing:
            return "/dev/" + entry.split(os.sep)[-3]
    return None


def dm_kname(mapping: str) -> str | None:
    for entry in glob.glob("/sys/block/dm-*/dm/name"):
        if read_text(entry) == mapping:
            return entry.split(os.sep)[-3]
    return None


UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def redact_table(line: str) -> str:
    """A crypt table line with its key field replaced: never print anything key-like."""
    toks = line.split()
    if len(toks) > 4 and toks[2] == "crypt":
        key = toks[4]
        if key.startswith(":"):  # :<bytes>:<type>:<description>, a reference into the keyring
            size, _, rest = key[1:].partition(":")
            ktype = rest.partition(":")[0]
            toks[4] = f":{size}:{ktype}:<keyring reference redacted>"
        else:
            toks[4] = "<key redacted>"
    text = " ".join(toks)
    text = UUID_RE.sub("<uuid>", text)
    return re.sub(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}", "<redacted>", text)


def keyslot_kdf(device: str, header: str | None) -> dict[str, str]:
    """The keyslot's PBKDF parameters, from luksDump (never the salt or any digest)."""
    text = sh(
        ["cryptsetup", "luksDump", *(["--header", header] if header else []), device], check=False
    )
    wanted = ("PBKDF", "Time cost", "Memory", "Threads", "Iterations")
    found: dict[str, str] = {}
    in_keyslots = False
    for line in text.splitlines():
        if line.startswith("Keyslots:"):
            in_keyslots = True
        elif line and not line[0].isspace():
            in_keyslots = False
        key, _, value = line.strip().partition(":")
        if in_keyslots and key in wanted and key not in found:
            found[key] = value.strip()
    return found


def datapath_of(mapping: str, backing: str) -> dict[str, Any]:
    raw = sh(["dmsetup", "table", mapping]).strip()
    table = redact_table(raw)
    toks = raw.split()
    options: list[str] = []
    if len(toks) > 8 and toks[2] == "crypt" and toks[8].isdigit():
        options = toks[9 : 9 + int(toks[8])]
    kname = dm_kname(mapping)
    loop = loop_of(backing)
    lname = os.path.basename(loop) if loop else None
    sector = next((o.split(":", 1)[1] for o in options if o.startswith("sector_size:")), "512")
    return {
        "dm_table": table,
        "cipher": toks[3] if len(toks) > 3 else None,
        "key_in_kernel_keyring": len(toks) > 4 and toks[4].startswith(":"),
        "crypt_options": options,
        "perf_no_read_workqueue": "no_read_workqueue" in options,
        "perf_no_write_workqueue": "no_write_workqueue" in options,
        "crypt_sector_size": int(sector),
        "dm_logical_block_size": int(read_text(f"/sys/block/{kname}/queue/logical_block_size", "0"))
        if kname
        else None,
        "loop_device": loop,
        "loop_direct_io": read_text(f"/sys/block/{lname}/loop/dio") == "1" if lname else None,
        "loop_logical_block_size": int(
            read_text(f"/sys/block/{lname}/queue/logical_block_size", "0")
        )
        if lname
        else None,
    }


# ------------------------------------------------------------------------------------------
# Phases


RUN_LOG = re.compile(r"^run (\[.*\])$")


def driver_commands(log_text: str) -> list[list[str]]:
    """The argv of every command the driver ran, from its DEBUG JSON log."""
    found: list[list[str]] = []
    for line in log_text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        m = RUN_LOG.match(str(entry.get("msg", ""))) if isinstance(entry, dict) else None
        if m:
            argv = ast.literal_eval(m.group(1))
            if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
                found.append(argv)
    return found


def normalise(argv: Sequence[str], names: Names, target: str) -> list[str]:
    subs = [
        (names.mapper_device, "{mapper}"),
        (names.backing, "{backing}"),
        (names.header, "{header}"),
        (target, "{target}"),
        (names.mapping, "{mapping}"),
    ]
    out = []
    for token in argv:
        for real, placeholder in subs:
            token = token.replace(real, placeholder)
        out.append(re.sub(r"/dev/loop\d+", "{loop}", token))
    return out


def audit(base: Path, run_dir: Path, data_dir: Path, size: str) -> dict[str, Any]:
    """Publish once with a DEBUG driver and capture the argv it runs: the handrun script."""
    driver = Driver(base, run_dir, data_dir, "DEBUG")
    template = [list(a) for a in HANDRUN_TEMPLATE]
    try:
        driver.start()
        pod = str(uuid.uuid4())
        names, target = driver.names(pod), driver.k.target(pod, "scratch")
        start = time.perf_counter()
        driver.publish(pod, size)
        publish_s = time.perf_counter() - start
        driver.unpublish(pod)
        captured = [
            normalise(a, names, target) for a in driver_commands(driver.log_path.read_text())
        ]
    except Exception as exc:
        say(f"audit failed, using the built-in handrun script: {exc}")
        return {
            "source": "built-in template (audit failed)",
            "error": str(exc),
            "script": template,
            "matches_template": None,
        }
    finally:
        driver.stop()
    if not any(a[0] == "umount" for a in captured):
        say("audit captured no commands (is DEBUG logging of commands gone?): built-in script")
        return {
            "source": "built-in template (nothing captured)",
            "script": template,
            "captured": captured,
            "matches_template": None,
        }
    matches = captured == template
    if not matches:
        say("note: the driver's commands differ from bench's built-in copy; using the driver's")
    return {
        "source": "captured from the driver's DEBUG log",
        "script": captured,
        "matches_template": matches,
        "audit_publish_s": r4(publish_s),
    }


def flow_stats(samples: list[Sample]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(samples)}
    series: dict[str, list[float]] = {
        "publish": [s.publish for s in samples],
        "unpublish": [s.unpublish for s in samples],
        "cycle": [s.publish + s.unpublish for s in samples],
    }
    for what, values in series.items():
        for name, q in (("p50", 0.5), ("p95", 0.95)):
            v = percentile(values, q)
            out[f"{what}_{name}_s"] = None if v is None else r4(v)
        out[f"{what}_mean_s"] = r4(sum(values) / len(values)) if values else None
    allocs = [float(s.alloc_bytes) for s in samples]
    p = percentile(allocs, 0.5)
    out["alloc_p50_mib"] = None if p is None else mib(p)
    return out


def step_means(samples: list[Sample]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for s in samples:
        for step, seconds in s.steps.items():
            totals.setdefault(step, []).append(seconds)
    return {step: r4(sum(v) / len(v)) for step, v in totals.items()}


def latency_phase(
    driver: Driver, flows: dict[str, Ours | Baseline], cycles: int, warmup: int
) -> dict[str, Any]:
    samples: dict[str, list[Sample]] = {name: [] for name in flows}
    errors: dict[str, list[str]] = {name: [] for name in flows}
    order = list(flows)
    for w in range(warmup):
        say(f"latency: warm-up round {w + 1}/{warmup}")
        for name in order:
            flows[name].cycle(-1 - w)
    before = driver.scrape_steps()
    for i in range(cycles):
        rotated = order[i % len(order) :] + order[: i % len(order)]
        for name in rotated:
            try:
                samples[name].append(flows[name].cycle(i))
            except Exception as exc:
                errors[name].append(f"cycle {i}: {exc}")
                say(f"latency: {name} cycle {i} failed: {exc}")
        line = ", ".join(
            f"{n} {samples[n][-1].publish:.2f}+{samples[n][-1].unpublish:.2f}s"
            for n in order
            if samples[n]
        )
        say(f"latency: round {i + 1}/{cycles}: {line}")
    after = driver.scrape_steps()
    ours_steps = {}
    for step, (total, count) in after.items():
        t0, c0 = before.get(step, (0.0, 0.0))
        if count - c0 > 0:
            ours_steps[step] = r4((total - t0) / (count - c0))
    result: dict[str, Any] = {"order": "round-robin, rotated by one flow each round", "flows": {}}
    for name in flows:
        result["flows"][name] = {
            "stats": flow_stats(samples[name]),
            "step_means_s": ours_steps if name == "ours" else step_means(samples[name]),
            "errors": errors[name],
            "samples": [s.to_json() for s in samples[name]],
        }
    return result


def concurrency_phase(driver: Driver, n: int, size: str, repeats: int) -> dict[str, Any]:
    def timed(action: Callable[[], None]) -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    def run_all(
        pods: list[str], action: Callable[[str], None], parallel: bool
    ) -> tuple[float, list[float], list[str]]:
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def one(pod: str) -> None:
            try:
                t = timed(lambda: action(pod))
                with lock:
                    latencies.append(t)
            except Exception as exc:
                with lock:
                    errors.append(f"{pod}: {exc}")

        start = time.perf_counter()
        if parallel:
            with ThreadPoolExecutor(max_workers=len(pods)) as pool:
                list(pool.map(one, pods))
        else:
            for pod in pods:
                one(pod)
        return time.perf_counter() - start, latencies, errors

    # ABBA order (sequential, concurrent, concurrent, sequential, ...): on a shared, noisy
    # host, drift in the background load then hits both modes alike.
    order = [
        m
        for r in range(repeats)
        for m in (("sequential", "concurrent") if r % 2 == 0 else ("concurrent", "sequential"))
    ]
    runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
    for k, mode in enumerate(order):
        pods = [str(uuid.uuid4()) for _ in range(n)]
        parallel = mode == "concurrent"
        say(f"concurrency: {n} publishes, {mode} ({k + 1}/{len(order)})")
        wall, lat, errs = run_all(pods, lambda p: driver.publish(p, size), parallel)
        say(f"concurrency: {mode} publish wall {wall:.1f} s, {len(errs)} errors")
        uwall, ulat, uerrs = run_all(pods, driver.unpublish, parallel)
        runs[mode].append(
            {
                "publish_wall_s": r4(wall),
                "publish_latencies_s": [r4(x) for x in sorted(lat)],
                "unpublish_wall_s": r4(uwall),
                "unpublish_latencies_s": [r4(x) for x in sorted(ulat)],
                "errors": errs + uerrs,
            }
        )
    result: dict[str, Any] = {"volumes": n, "size": size, "repeats": repeats, "order": order}
    for mode, mode_runs in runs.items():
        result[mode] = {
            "publish_wall_s": r4(sum(x["publish_wall_s"] for x in mode_runs) / len(mode_runs)),
            "unpublish_wall_s": r4(sum(x["unpublish_wall_s"] for x in mode_runs) / len(mode_runs)),
            "publish_walls_s": [x["publish_wall_s"] for x in mode_runs],
            "errors": [e for x in mode_runs for e in x["errors"]],
            "runs": mode_runs,
        }
    seq, conc = result["sequential"], result["concurrent"]
    # ratio of mean walls (= ratio of summed walls: both modes ran equally often)
    result["speedup"] = ratio(seq["publish_wall_s"], conc["publish_wall_s"])
    result["speedup_per_repeat"] = [
        ratio(a["publish_wall_s"], b["publish_wall_s"])
        for a, b in zip(runs["sequential"], runs["concurrent"], strict=True)
    ]
    result["unpublish_speedup"] = ratio(seq["unpublish_wall_s"], conc["unpublish_wall_s"])
    result["errors"] = len(seq["errors"]) + len(conc["errors"])
    return result


def footprint_phase(
    driver: Driver, size: str, qsd: Qsd | None, qcow2_reason: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = str(uuid.uuid4())
    names = driver.names(pod)
    say(f"footprint: publishing a {size} volume (loop)")
    start = time.perf_counter()
    driver.publish(pod, size)
    publish_s = time.perf_counter() - start
    try:
        alloc_now = allocated(names.backing)
        os.sync()
        alloc_synced = allocated(names.backing)
        st = os.stat(names.backing)
        header = os.stat(names.header).st_size if os.path.exists(names.header) else None
        datapath = datapath_of(names.mapping, names.backing)
        loop = datapath.get("loop_device")
        if loop:
            datapath["keyslot_kdf"] = keyslot_kdf(loop, names.header)
    finally:
        start = time.perf_counter()
        driver.unpublish(pod)
        unpublish_s = time.perf_counter() - start
    footprint: dict[str, Any] = {
        "size": size,
        "backing": "loop",
        "apparent_bytes": st.st_size,
        "allocated_bytes_right_after_publish": alloc_now,
        "allocated_bytes_after_sync": alloc_synced,
        "alloc_mib": mib(max(alloc_now, alloc_synced)),
        "detached_header_bytes_on_tmpfs": header,
        "publish_s": r4(publish_s),
        "unpublish_s": r4(unpublish_s),
        "timing_samples": 1,
        "qcow2_alloc_mib": None,
        "qcow2_note": None,
        "qcow2": None,
    }
    say(f"footprint: {footprint['alloc_mib']} MiB allocated for {size} (loop)")
    if qsd is None:
        footprint["qcow2_note"] = f"not measured: {qcow2_reason or 'no qemu-storage-daemon'}"
        say(f"footprint: qcow2 {footprint['qcow2_note']}")
        return footprint, datapath
    try:
        q = qcow2_footprint(driver, size, qsd)
    except Exception as exc:
        footprint["qcow2_note"] = f"not measured: the qcow2 volume failed: {exc}"
        say(f"footprint: qcow2 {footprint['qcow2_note']}")
        return footprint, datapath
    footprint["qcow2"] = q
    footprint["qcow2_alloc_mib"] = q["alloc_mib"]
    footprint["qcow2_note"] = (
        "measured on one volume, published right after the loop one by the same driver"
        + (f"; LEFT BEHIND after unpublish: {', '.join(q['leftovers'])}" if q["leftovers"] else "")
    )
    say(
        f"footprint: {q['alloc_mib']} MiB allocated for {size} (qcow2), publish "
        f"{q['publish_s']:.2f} s, unpublish {q['unpublish_s']:.2f} s, "
        f"left behind: {', '.join(q['leftovers']) or 'nothing'}"
    )
    return footprint, datapath


def qcow2_footprint(driver: Driver, size: str, qsd: Qsd) -> dict[str, Any]:
    """One backing=qcow2 volume: blocks its image holds right after publish, publish and
    unpublish wall time, and what is left after unpublish (nothing, if all is well)."""
    pod = str(uuid.uuid4())
    names = driver.names(pod)
    before = connected_nbds()
    say(f"footprint: publishing a {size} volume (qcow2)")
    start = time.perf_counter()
    try:
        driver.publish(pod, size, backing="qcow2")
    except BaseException:
        with contextlib.suppress(Exception):
            driver.unpublish(pod)
        raise
    publish_s = time.perf_counter() - start
    try:
        devices = sorted(set(connected_nbds()) - set(before))
        alloc_now = allocated(names.backing)
        os.sync()
        alloc_synced = allocated(names.backing)
        st = os.stat(names.backing)
        header = os.stat(names.header).st_size if os.path.exists(names.header) else None
    finally:
        start = time.perf_counter()
        driver.unpublish(pod)
        unpublish_s = time.perf_counter() - start
    leftovers = []
    if os.path.exists(names.backing):
        leftovers.append(f"image {names.backing}")
    if os.path.exists(names.header):
        leftovers.append(f"header {names.header}")
    if dm_kname(names.mapping):
        leftovers.append(f"mapping {names.mapping}")
    leftovers += [f"connected {d}" for d in connected_nbds() if d not in before]
    if (driver.state_dir / "nbd" / names.mapping).exists():
        leftovers.append(f"claim file {driver.state_dir / 'nbd' / names.mapping}")
    try:
        if names.mapping in qsd.exports():
            leftovers.append(f"qemu-storage-daemon export {names.mapping}")
        if node_name(names.mapping) in qsd.nodes():
            leftovers.append(f"qemu-storage-daemon block node {node_name(names.mapping)}")
    except Exception as exc:
        leftovers.append(f"unknown: qemu-storage-daemon did not answer ({exc})")
    return {
        "size": size,
        "backing": "qcow2",
        "nbd_devices": devices,  # connected by this publish: one, if all is well
        "apparent_bytes": st.st_size,
        "allocated_bytes_right_after_publish": alloc_now,
        "allocated_bytes_after_sync": alloc_synced,
        "alloc_mib": mib(max(alloc_now, alloc_synced)),
        "detached_header_bytes_on_tmpfs": header,
        "publish_s": r4(publish_s),
        "unpublish_s": r4(unpublish_s),
        "timing_samples": 1,
        "leftovers": leftovers,
    }


def memory_phase(driver: Driver, n: int, size: str, idle: dict[str, int]) -> dict[str, Any]:
    before = driver.rss()
    pods = [str(uuid.uuid4()) for _ in range(n)]
    errors: list[str] = []

    def publish(pod: str) -> None:
        try:
            driver.publish(pod, size)
        except Exception as exc:
            errors.append(f"{pod}: {exc}")

    say(f"memory: publishing {n} volumes of {size} (8 at a time)")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(publish, pods))
    time.sleep(2)
    loaded = driver.rss()
    published = len(list((driver.state_dir / "volumes").glob("*.json")))
    say(f"memory: {published} volumes published, driver VmRSS {mib(loaded.get('VmRSS', 0))} MiB")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda p: _quiet(lambda: driver.unpublish(p)), pods))
    after = driver.rss()
    return {
        "volumes": n,
        "volume_size": size,
        "volumes_published": published,
        "errors": errors,
        "idle": idle,
        "before_phase": before,
        "with_volumes": loaded,
        "after_unpublish": after,
        "rss_idle_mib": mib(idle.get("VmRSS", 0)),
        "rss_with_volumes_mib": mib(loaded.get("VmRSS", 0)),
        "note": f"{size} volumes to save time: the driver's memory does not depend on size",
    }


@dataclass(frozen=True)
class IntegrityFlow:
    name: str
    size: str
    integrity: str | None  # None: a volume without integrity, for reference


def integrity_flows(small: str, large: str) -> list[IntegrityFlow]:
    return [
        IntegrityFlow("integrity_small", small, "hmac-sha256"),
        IntegrityFlow("integrity_large", large, "hmac-sha256"),
        IntegrityFlow("plain_small", small, None),
    ]


def step_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Seconds per step between two scrapes of luks_ephemeral_step_seconds (one publish)."""
    out = {}
    for step, (total, count) in after.items():
        t0, c0 = before.get(step, (0.0, 0.0))
        if count > c0:
            out[step] = total - t0
    return out


def integrity_phase(
    driver: Driver, small: str, large: str, cycles: int, warmup: int
) -> dict[str, Any]:
    """Publish + unpublish of integrity filesystem volumes of two sizes (and one without
    integrity), round-robin, rotated by one flow each round; each publish's own step times
    come from scraping the driver's step metric around it (publishes run one at a time)."""
    flows = integrity_flows(small, large)
    samples: dict[str, list[Sample]] = {f.name: [] for f in flows}
    errors: dict[str, list[str]] = {f.name: [] for f in flows}
    retries: dict[str, int] = {f.name: 0 for f in flows}

    def unpublish(flow: IntegrityFlow, pod: str) -> None:
        """As kubelet does: a busy mapping (udev's blkid still probing it, say) is retried."""
        for attempt in range(UNPUBLISH_TRIES):
            try:
                driver.unpublish(pod)
                return
            except grpc.RpcError as exc:
                busy = exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                if not busy or attempt == UNPUBLISH_TRIES - 1:
                    raise
                retries[flow.name] += 1
                time.sleep(1.0)

    def cycle(flow: IntegrityFlow) -> Sample:
        pod = str(uuid.uuid4())
        try:
            before = driver.scrape_steps()
            start = time.perf_counter()
            driver.publish(pod, flow.size, integrity=flow.integrity)
            published = time.perf_counter()
            steps = step_delta(before, driver.scrape_steps())
            alloc = allocated(driver.names(pod).backing)
            unstart = time.perf_counter()
            unpublish(flow, pod)
            done = time.perf_counter()
        except BaseException:
            with contextlib.suppress(Exception):
                unpublish(flow, pod)
            raise
        return Sample(published - start, done - unstart, alloc, steps)

    for w in range(warmup):
        say(f"integrity: warm-up round {w + 1}/{warmup}")
        for flow in flows:
            cycle(flow)
    for i in range(cycles):
        rotated = flows[i % len(flows) :] + flows[: i % len(flows)]
        for flow in rotated:
            try:
                samples[flow.name].append(cycle(flow))
            except Exception as exc:
                errors[flow.name].append(f"cycle {i}: {exc}")
                say(f"integrity: {flow.name} ({flow.size}) cycle {i} failed: {exc}")
        line = ", ".join(
            f"{f.name} {samples[f.name][-1].publish:.2f}s" for f in flows if samples[f.name]
        )
        say(f"integrity: round {i + 1}/{cycles}: {line}")
    result: dict[str, Any] = {
        "order": "round-robin, rotated by one flow each round",
        "cycles": cycles,
        "warmup": warmup,
        "fs_type": "ext4",
        "flows": {},
    }
    for flow in flows:
        result["flows"][flow.name] = {
            "size": flow.size,
            "integrity": flow.integrity or "none",
            "stats": flow_stats(samples[flow.name]),
            "step_means_s": step_means(samples[flow.name]),
            "errors": errors[flow.name],
            "unpublish_busy_retries": retries[flow.name],
            "samples": [s.to_json() for s in samples[flow.name]],
        }

    def p50(name: str) -> float | None:
        v = result["flows"][name]["stats"].get("publish_p50_s")
        return float(v) if v is not None else None

    result["large_vs_small_p50"] = ratio(p50("integrity_large"), p50("integrity_small"))
    result["integrity_vs_plain_small_p50"] = ratio(p50("integrity_small"), p50("plain_small"))
    result["errors"] = sum(len(e) for e in errors.values())
    say(
        f"integrity: publish p50 {small} {p50('integrity_small')} s, {large} "
        f"{p50('integrity_large')} s ({result['large_vs_small_p50']}x), without integrity "
        f"{small} {p50('plain_small')} s"
    )
    return result


def _quiet(action: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        action()


# ------------------------------------------------------------------------------------------
# Summary


def goal(value: float | None, target: float, at_most: bool, unit: str) -> dict[str, Any]:
    met = None if value is None else (value <= target if at_most else value >= target)
    return {"target": f"{'<=' if at_most else '>='} {target:g}{unit}", "value": value, "met": met}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    env = results["environment"]
    lat = results.get("latency", {}).get("flows", {})

    def p50(flow: str, what: str = "publish") -> float | None:
        v = lat.get(flow, {}).get("stats", {}).get(f"{what}_p50_s")
        return float(v) if v is not None else None

    conc = results.get("concurrency", {})
    foot = results.get("footprint", {})
    qcow2 = foot.get("qcow2") or {}
    mem = results.get("memory", {})
    integ = results.get("integrity", {})
    integ_flows = integ.get("flows", {})

    def integ_p50(flow: str) -> float | None:
        v = integ_flows.get(flow, {}).get("stats", {}).get("publish_p50_s")
        return float(v) if v is not None else None

    summary: dict[str, Any] = {
        "publish_vs_handrun_p50": ratio(p50("ours"), p50("handrun")),
        "conventional_vs_ours_p50": ratio(p50("conventional"), p50("ours")),
        "publish_vs_floor_p50": ratio(p50("ours"), p50("floor")),
        "cycle_vs_handrun_p50": ratio(p50("ours", "cycle"), p50("handrun", "cycle")),
        "cycle_conventional_vs_ours_p50": ratio(p50("conventional", "cycle"), p50("ours", "cycle")),
        "cycle_vs_floor_p50": ratio(p50("ours", "cycle"), p50("floor", "cycle")),
        "concurrency_speedup_16": conc.get("speedup"),
        "concurrency_errors": conc.get("errors"),
        "alloc_10g_mib": foot.get("alloc_mib"),
        "alloc_10g_qcow2_mib": foot.get("qcow2_alloc_mib"),
        "qcow2_publish_vs_loop": ratio(qcow2.get("publish_s"), foot.get("publish_s")),
        "qcow2_unpublish_vs_loop": ratio(qcow2.get("unpublish_s"), foot.get("unpublish_s")),
        "rss_idle_mib": mem.get("rss_idle_mib", results.get("rss_idle_mib")),
        "rss_50_volumes_mib": mem.get("rss_with_volumes_mib"),
        # integrity=hmac-sha256 filesystem volumes (keys name the sizes the bench uses)
        "integrity_2g_vs_256m": integ.get("large_vs_small_p50"),
        "integrity_publish_256m_p50_s": integ_p50("integrity_small"),
        "integrity_publish_2g_p50_s": integ_p50("integrity_large"),
        "plain_publish_256m_p50_s": integ_p50("plain_small"),
        "integrity_256m_vs_plain_256m": integ.get("integrity_vs_plain_small_p50"),
        "kernel": env["kernel"],
        "emulated": env["emulated"],
        "date": results["date"],
    }
    summary["goals"] = {
        "publish_vs_handrun_p50": goal(
            summary["publish_vs_handrun_p50"], GOAL_HANDRUN_MAX, True, "x"
        ),
        "conventional_vs_ours_p50": goal(
            summary["conventional_vs_ours_p50"], GOAL_CONVENTIONAL_MIN, False, "x"
        ),
        "concurrency_speedup_16": goal(
            summary["concurrency_speedup_16"], GOAL_SPEEDUP_MIN, False, "x"
        ),
        "alloc_10g_mib": goal(summary["alloc_10g_mib"], GOAL_ALLOC_MAX_MIB, True, " MiB"),
        "rss_50_volumes_mib": goal(summary["rss_50_volumes_mib"], GOAL_RSS_MAX_MIB, True, " MiB"),
        "integrity_2g_vs_256m": goal(
            summary["integrity_2g_vs_256m"], GOAL_INTEGRITY_MAX, True, "x"
        ),
    }
    if conc and conc.get("errors"):
        summary["goals"]["concurrency_speedup_16"]["met"] = False  # zero errors is part of it
    if integ and integ.get("errors"):
        summary["goals"]["integrity_2g_vs_256m"]["met"] = False  # every publish must work
    return summary


# ------------------------------------------------------------------------------------------
# Main


def missing_requirements() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    # a /dev/mapper/control node can exist on a kernel without device-mapper: ask the kernel
    targets = sh(["dmsetup", "targets"], check=False) if shutil.which("dmsetup") else ""
    if not any(line.split()[:1] == ["crypt"] for line in targets.splitlines()):
        missing.append("device-mapper with the crypt target (dmsetup targets)")
    for tool in ("cryptsetup", "losetup", "dmsetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool, path=CMD_ENV["PATH"]) is None:
            missing.append(tool)
    return missing


def sweep(base: Path, data_mount: Path, nbd_claims: Path) -> None:
    """Best effort: remove every mount, mapping, loop and NBD device this run left behind."""
    for point, _ in reversed(mounts()):
        if point.startswith(str(base) + "/") and point != str(data_mount):
            sh(["umount", point], check=False)
    for entry in glob.glob("/sys/block/dm-*/dm/name"):
        name = read_text(entry)
        if name.startswith(("bench-", "luks-eph-")):
            sh(["cryptsetup", "close", name], check=False)
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        if read_text(entry).startswith(str(data_mount) + "/"):
            sh(["losetup", "--detach", "/dev/" + entry.split(os.sep)[-3]], check=False)
    connected = connected_nbds()
    for claim in glob.glob(str(nbd_claims / "luks-eph-*")):  # the driver's own record
        device = read_text(claim)
        if device in connected and shutil.which("nbd-client", path=CMD_ENV["PATH"]):
            sh(["nbd-client", "-d", device], check=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cycles", type=int, default=20, help="latency cycles per flow (20)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (1)")
    parser.add_argument("--size", default="1Gi", help="volume size for latency/concurrency")
    parser.add_argument("--concurrency", type=int, default=16, help="parallel publishes (16)")
    parser.add_argument(
        "--concurrency-repeats",
        type=int,
        default=2,
        help="sequential/concurrent pairs, in ABBA order (2)",
    )
    parser.add_argument("--footprint-size", default="10Gi", help="sparse volume to measure")
    parser.add_argument("--volumes", type=int, default=50, help="volumes for the RSS phase (50)")
    parser.add_argument("--volume-size", default="64Mi", help="size of the RSS phase's volumes")
    parser.add_argument("--data-size", default="40Gi", help="sparse node-disk image (40Gi)")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--only",
        default="",
        help="run only these phases (comma-separated) and merge their sections into the "
        "existing --out file, keeping every other section as it was",
    )
    parser.add_argument(
        "--integrity-sizes",
        default="256Mi,2Gi",
        help="small,large integrity=hmac-sha256 volumes of the integrity phase (256Mi,2Gi)",
    )
    parser.add_argument(
        "--integrity-cycles", type=int, default=3, help="integrity phase cycles per flow (3)"
    )
    parser.add_argument("--work-dir", default="/tmp", help="where the node-disk image goes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args(argv)
    args.merge = bool(args.only)
    phases = [p for p in (args.only or args.phases).split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")
    if not phases:
        parser.error("no phase to run")
    args.phases = phases
    sizes = [x for x in args.integrity_sizes.split(",") if x]
    if len(sizes) != 2:
        parser.error("--integrity-sizes takes two sizes: small,large")
    args.integrity_small, args.integrity_large = sizes
    if args.integrity_cycles < 1:
        parser.error("--integrity-cycles must be at least 1")
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    if args.concurrency_repeats < 1 or args.concurrency < 1:
        parser.error("--concurrency and --concurrency-repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_requirements()
    if missing:
        say("needs " + ", ".join(missing) + "; run `make bench` (it boots a VM when needed)")
        return 2
    size_bytes = parse_quantity(args.size)
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {
            "cycles": args.cycles,
            "warmup": args.warmup,
            "size": args.size,
            "concurrency": args.concurrency,
            "concurrency_repeats": args.concurrency_repeats,
            "footprint_size": args.footprint_size,
            "volumes": args.volumes,
            "volume_size": args.volume_size,
            "integrity_sizes": [args.integrity_small, args.integrity_large],
            "integrity_cycles": args.integrity_cycles,
            "phases": args.phases,
        },
        "environment": detect_environment(),
        "notes": [],
    }
    env = results["environment"]
    say(
        f"kernel {env['kernel']}, emulated={env['emulated']}, {env['cpus']} CPUs, "
        f"phases {','.join(args.phases)}"
    )
    base = Path(tempfile.mkdtemp(prefix="lec-bench-", dir=args.work_dir))
    run_dir = Path(tempfile.mkdtemp(prefix="lec-bench-", dir="/run"))
    data: DataFs | None = None
    driver: Driver | None = None
    qsd: Qsd | None = None
    qcow2_reason: str | None = None
    status = 0
    try:
        data = DataFs(base, parse_quantity(args.data_size))
        driver_dir = data.mountpoint / "driver"
        baseline_root = data.mountpoint / "baseline"
        for d in (baseline_root / "backing", baseline_root / "mnt", run_dir / "bench-headers"):
            d.mkdir(parents=True)
        audit_run = run_dir / "audit"
        audit_run.mkdir()
        if not args.merge or "latency" in args.phases:  # only the latency phase replays it
            say("audit: one publish with a DEBUG driver to capture the commands it runs")
            results["handrun_script"] = audit(base, audit_run, driver_dir, args.size)
        # Whatever the phases, the driver runs as the chart's default (qcow2.enabled) runs it,
        # with --qsd-socket, whenever qemu-storage-daemon can run here: same config every run.
        qcow2_reason = qcow2_unavailable()
        if qcow2_reason is None:
            say("starting qemu-storage-daemon (its own daemon) for backing=qcow2")
            qsd = Qsd(run_dir)
            try:
                qsd.start()
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                qcow2_reason = f"qemu-storage-daemon did not start: {exc}"
                qsd.stop()
                qsd = None
        else:
            say(f"backing=qcow2 not measured: {qcow2_reason}")
        results["config"]["driver_qsd_socket"] = qsd is not None
        qsd_args = ["--qsd-socket", str(qsd.socket)] if qsd is not None else []
        driver = Driver(base, run_dir, driver_dir, "INFO", qsd_args)
        say("starting the driver" + (" with --qsd-socket" if qsd_args else ""))
        driver.start()
        time.sleep(2)
        idle = driver.rss()
        results["rss_idle_mib"] = mib(idle.get("VmRSS", 0))
        say(f"driver idle VmRSS {results['rss_idle_mib']} MiB")
        if "footprint" in args.phases:
            results["footprint"], results["datapath"] = footprint_phase(
                driver, args.footprint_size, qsd, qcow2_reason
            )
        if "latency" in args.phases:
            script = results["handrun_script"]["script"]
            headers = run_dir / "bench-headers"
            flows: dict[str, Ours | Baseline] = {
                "ours": Ours(driver, args.size),
                "floor": Floor(baseline_root, headers, size_bytes),
                "handrun": HandRun(baseline_root, headers, size_bytes, script),
                "conventional": Conventional(baseline_root, headers, size_bytes),
            }
            results["latency"] = latency_phase(driver, flows, args.cycles, args.warmup)
            dp = results.setdefault("datapath_baselines", {})
            for name in ("handrun", "conventional"):
                flow = flows[name]
                if isinstance(flow, Baseline):
                    dp[name] = flow.datapath
            results["mkfs_default"] = mkfs_default_meaning()
        if "concurrency" in args.phases:
            results["concurrency"] = concurrency_phase(
                driver, args.concurrency, args.size, args.concurrency_repeats
            )
        if "memory" in args.phases:
            results["memory"] = memory_phase(driver, args.volumes, args.volume_size, idle)
        if "integrity" in args.phases:
            results["integrity"] = integrity_phase(
                driver,
                args.integrity_small,
                args.integrity_large,
                args.integrity_cycles,
                args.warmup,
            )
            results["integrity"]["measured"] = {
                "date": results["date"],
                "kernel": env["kernel"],
                "emulated": env["emulated"],
                "cpus": env["cpus"],
            }
    except Exception as exc:
        status = 1
        results["error"] = f"{type(exc).__name__}: {exc}"
        say(f"FAILED: {exc}")
        traceback.print_exc()
        if driver is not None:
            print(f"--- driver log tail ---\n{driver.log_tail()}", flush=True)
    finally:
        if driver is not None:
            driver.stop()
        try:
            if data is not None:
                sweep(base, data.mountpoint, run_dir / "state" / "nbd")
        finally:
            if qsd is not None:  # after the NBD devices are gone, before the data fs goes
                qsd.stop()
            if data is not None:
                data.close()
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    if args.merge and status == 0:
        results = merged(args.out, results, args.phases)
    results["summary"] = summarise(results)
    results["notes"] = notes(results)
    text = json.dumps(results, indent=2) + "\n"
    if status != 0:
        # a failed run never replaces the results of a good one: print them instead
        print(f"--- results of the failed run ({args.out} left as it was) ---\n{text}", flush=True)
        return status
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    say(f"wrote {args.out}")
    print(json.dumps(results["summary"], indent=2), flush=True)
    return status


def merged(path: Path, fresh: dict[str, Any], phases: Sequence[str]) -> dict[str, Any]:
    """``--only``: the results file as it was, with the sections of ``phases`` (and their
    config) taken from this run; without a readable file, this run's results alone."""
    try:
        old: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        say(f"--only: {path} not readable ({exc}); writing this run's results alone")
        return fresh
    out = dict(old)
    for phase in phases:
        for key in PHASE_KEYS.get(phase, (phase,)):
            if key in fresh:
                out[key] = fresh[key]
    config = dict(old.get("config", {}))
    for key in ("integrity_sizes", "integrity_cycles"):
        if "integrity" in phases:
            config[key] = fresh["config"][key]
    config["phases"] = sorted(set(config.get("phases", [])) | set(phases), key=PHASES.index)
    config.setdefault("merged_runs", []).append(
        {"date": fresh["date"], "phases": list(phases), "kernel": fresh["environment"]["kernel"]}
    )
    out["config"] = config
    return out


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    if results["environment"]["emulated"]:
        out.append(
            "Run under software emulation (QEMU TCG): absolute times are 10-50x real "
            "hardware; compare ratios only. On hardware cryptsetup calibrates argon2id to "
            "its default --iter-time (2000 ms per unlock); under emulation even the minimum "
            "cost (see datapath_baselines.conventional.keyslot_kdf) takes longer than that, "
            "so the conventional flow's KDF is inflated like every other CPU-bound step."
        )
    out.append(
        "Ratios compare p50 publish latencies (the summary's cycle_* keys compare "
        "publish+unpublish)."
    )
    out.append(
        "Baselines create the sparse file in-process without the driver's fsync, and "
        "skip the driver's journal, checks and chmod: they are the cheapest possible."
    )
    out.append(
        "Conventional: the backing file is 16 MiB larger to hold the on-device LUKS2 "
        "header; mkfs is a plain `mkfs.ext4 -F -q` (see mkfs_default)."
    )
    out.append(
        "The driver serves Prometheus metrics on 127.0.0.1 (step times are scraped "
        "from luks_ephemeral_step_seconds); its RSS includes that HTTP server."
    )
    if results["config"].get("driver_qsd_socket"):
        out.append(
            "The driver ran with --qsd-socket (as with the chart's default qcow2.enabled), "
            "pointing at a qemu-storage-daemon the bench ran as its own daemon; loop volumes "
            "never talk to it (their teardown skips the NBD step)."
        )
    integ = results.get("integrity")
    if integ:
        when = integ.get("measured", {}).get("date")
        out.append(
            "Integrity: integrity=hmac-sha256 ext4 volumes are formatted without the "
            "dm-integrity wipe (--integrity-no-wipe) and made with eager metadata "
            "(lazy_itable_init=0, lazy_journal_init=0); p50 of "
            f"{integ.get('cycles')} publishes per size, interleaved"
            + (f", measured {when}" if when and when != results.get("date") else "")
            + "; the step times are each publish's own."
        )
    foot = results.get("footprint")
    if foot:
        q = foot.get("qcow2")
        if q:
            out.append(
                "Footprint: one volume per backing, loop first (the driver's first publish "
                "since it started), then qcow2; each publish and unpublish time is one sample. "
                "qcow2 allocation is st_blocks of the image file, as for loop's sparse file."
            )
        else:
            out.append(f"Footprint: backing=qcow2 {foot.get('qcow2_note')}")
    return out


if __name__ == "__main__":
    sys.exit(main())
