"""Process hardening: no core dumps (also for children), not dumpable, /proc/self still readable,
and the warning for a state dir that is not in memory. Real processes, read from the outside."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi import hardening

REPO = Path(__file__).resolve().parents[2]
UNPRIVILEGED = 65532  # the chart's controller uid
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switches to another uid")

# Runs the CLI as the chart's controller does, as an unprivileged uid. The interpreter lives
# where that uid cannot read, so the script imports what the CLI loads lazily, then drops root.
AS_CONTROLLER = f"""
import os, sys
import concurrent.futures.thread, encodings.idna
import csi.__main__
os.setgroups([])
os.setresgid({UNPRIVILEGED}, {UNPRIVILEGED}, {UNPRIVILEGED})
os.setresuid({UNPRIVILEGED}, {UNPRIVILEGED}, {UNPRIVILEGED})
sys.exit(csi.__main__.main(sys.argv[1:]))
"""

# Hardens itself, then reports what it can still read of /proc/self and what a child sees.
HARDENED = """
import json, subprocess, sys
from prometheus_client import CollectorRegistry, ProcessCollector
from csi import hardening
from csi.host.linux import read_mountinfo
before = hardening.dumpable()
hardening.harden_process()
registry = CollectorRegistry()
ProcessCollector(registry=registry)
child = subprocess.run(["cat", "/proc/self/limits"], capture_output=True, text=True, check=True)
print(json.dumps({
    "dumpable_before": before,
    "dumpable": hardening.dumpable(),
    "mounts": [point for point, _, _ in read_mountinfo()],
    "status_uid": __import__("os").stat("/proc/self/status").st_uid,
    "metrics": [m.name for m in registry.collect()],
    "open_fds": registry.get_sample_value("process_open_fds"),
    "child_limits": child.stdout,
}))
"""


def core_limits(limits_text: str) -> list[str]:
    """Soft and hard ``Max core file size`` of a /proc/<pid>/limits text."""
    line = next(x for x in limits_text.splitlines() if x.startswith("Max core file size"))
    return line[len("Max core file size") :].split()[:2]


def fs_name(path: str) -> str:
    """The filesystem type as coreutils names it: the test's own oracle, not our statfs."""
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def in_memory(path: str) -> bool:
    return fs_name(path) in ("tmpfs", "ramfs")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory the unprivileged uid can reach (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="lec-hardening-", dir="/tmp"))
    os.chmod(path, 0o755)
    os.chown(path, UNPRIVILEGED, UNPRIVILEGED)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_the_cli_runs_hardened_as_the_chart_runs_the_controller(shared_dir: Path) -> None:
    port = free_port()
    state, sock = shared_dir / "state", shared_dir / "csi.sock"
    log_path = shared_dir.with_suffix(".log")
    argv = [sys.executable, "-c", AS_CONTROLLER, "controller", "--state-dir", str(state),
            "--data-dir", str(shared_dir / "data"), "--kubelet-root", str(shared_dir / "k"),
            "--endpoint", f"unix://{sock}", "--metrics-address", f"127.0.0.1:{port}",
            "--log-format", "text"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert f"Uid:\t{UNPRIVILEGED}\t" in status
        # not dumpable: the kernel hands the process's /proc files to root, not to its uid
        assert os.stat(f"/proc/{proc.pid}/status").st_uid == 0
        assert os.stat(f"/proc/{proc.pid}/mountinfo").st_uid == 0
        assert core_limits(Path(f"/proc/{proc.pid}/limits").read_text()) == ["0", "0"]
        # ...and it still reads its own /proc/self: the process metrics are all there
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            scrape = response.read().decode()
        for name in ("process_open_fds", "process_max_fds", "process_resident_memory_bytes"):
            assert f"\n{name} " in scrape
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        output = log_path.read_text()
        log_path.unlink()
    assert "process hardened: core dumps off" in output
    warnings = output.count(f"state dir {state} is not on tmpfs or ramfs")
    assert warnings == (0 if in_memory(str(state)) else 1), output


def test_a_hardened_process_reads_proc_self_and_its_children_dump_no_core() -> None:
    done = subprocess.run([sys.executable, "-c", HARDENED], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dumpable_before"] is True
    assert report["dumpable"] is False
    assert "/" in report["mounts"]  # /proc/self/mountinfo, as the host layer reads it
    assert report["status_uid"] == 0
    assert {"process_open_fds", "process_max_fds", "process_cpu_seconds"} <= set(report["metrics"])
    assert report["open_fds"] > 0  # /proc/self/fd could be listed
    assert core_limits(report["child_limits"]) == ["0", "0"]  # inherited by cryptsetup & co


def non_memory_dir(tmp_path: Path) -> Path:
    for candidate in (tmp_path, REPO):
        if not in_memory(str(candidate)):
            return candidate
    pytest.skip("no directory on a disk filesystem here")


def test_fs_type_agrees_with_coreutils(tmp_path: Path) -> None:
    for path in (str(tmp_path), "/dev/shm", "/proc"):
        oracle = subprocess.run(["stat", "-f", "-c", "%t", path], capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
        assert hardening.fs_type(path) == int(oracle, 16), path
    assert hardening.IN_MEMORY == {0x01021994: "tmpfs", 0x858458F6: "ramfs"}


def test_a_state_dir_on_disk_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = str(non_memory_dir(tmp_path))
    with caplog.at_level(logging.INFO):
        assert hardening.warn_unless_in_memory(path) is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"state dir {path} is not on tmpfs or ramfs" in warnings[0].getMessage()


def test_a_state_dir_on_tmpfs_does_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not in_memory("/dev/shm"):
        pytest.skip("/dev/shm is not a tmpfs here")
    state = Path(tempfile.mkdtemp(prefix="lec-state-", dir="/dev/shm"))
    try:
        with caplog.at_level(logging.INFO):
            assert hardening.warn_unless_in_memory(str(state)) is True
    finally:
        state.rmdir()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_state_dir_that_cannot_be_checked_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "missing")
    with caplog.at_level(logging.INFO):
        assert hardening.warn_unless_in_memory(missing) is False
    assert f"cannot tell which filesystem state dir {missing} is on" in caplog.text
