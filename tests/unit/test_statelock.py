"""One driver per state dir: real processes on one temp state dir, and the CLI wiring.

A driver that finds the lock held must stop before it reads the journal: these tests plant a
half-done record, which a start-up reconcile would roll back, and check that it is still there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.__main__ import EXIT_LOCK_HELD, main, run
from csi.config import Config
from csi.host.fake import FakeHost
from csi.journal import CREATING, Journal, Record
from csi.params import VolumeSpec
from csi.statelock import STATE_LOCK_FILE, LockHeld, state_dir_lock

REPO = Path(__file__).resolve().parents[2]
MiB = 1024**2

# Takes the lock like a driver, says so, and holds it until its stdin closes. With an argument
# "child" it first starts a long-lived child (as a driver starts cryptsetup) that inherits every
# inheritable descriptor, and prints the child's pid.
HOLDER = """
import subprocess, sys
from csi.statelock import state_dir_lock
lock = state_dir_lock(sys.argv[1]).acquire()
if sys.argv[2:] == ["child"]:
    child = subprocess.Popen(["sleep", "60"], close_fds=False)
    print("child", child.pid, flush=True)
print("locked", flush=True)
sys.stdin.read()
"""


class Holder:
    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(state_dir), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        self.child_pid = 0
        for line in self.proc.stdout:
            if line.startswith("child "):
                self.child_pid = int(line.split()[1])
            if line.strip() == "locked":
                return
        raise AssertionError(f"holder exited before it took the lock: {self.proc.wait()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        if self.child_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child_pid, signal.SIGKILL)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.close()


def plant_half_done_record(state_dir: Path) -> None:
    Journal(str(state_dir)).write(Record(
        volume_id="csi-half-done", state=CREATING, spec=VolumeSpec(size=64 * MiB),
        target_path="/var/lib/kubelet/pods/uid/volumes/x/mount",
    ))  # fmt: skip


def half_done_record_is_there(state_dir: Path) -> bool:
    record = Journal(str(state_dir)).load("csi-half-done")
    return record is not None and record.state == CREATING


def cli(tmp_path: Path, mode: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "csi", mode,
            "--state-dir", str(tmp_path / "state"), "--data-dir", str(tmp_path / "data"),
            "--kubelet-root", str(tmp_path / "kubelet"), "--endpoint", f"unix://{tmp_path}/csi.sock",
            "--metrics-address=", "--log-format", "text", *extra]  # fmt: skip


def free(state_dir: Path) -> bool:
    try:
        state_dir_lock(str(state_dir)).acquire().release()
    except LockHeld:
        return False
    return True


@pytest.mark.parametrize("mode", ["node", "all", "controller"])
def test_a_second_driver_exits_naming_the_state_dir_and_the_holder(
    tmp_path: Path, holders: list[Holder], mode: str
) -> None:
    state = tmp_path / "state"
    plant_half_done_record(state)
    holders.append(holder := Holder(state))
    second = subprocess.run(cli(tmp_path, mode, "--state-lock-wait", "0"), cwd=REPO,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert second.returncode == EXIT_LOCK_HELD, second.stderr
    assert f"state dir {state} is in use by another luks-ephemeral-csi driver" in second.stderr
    assert f"pid {holder.pid} on host " in second.stderr
    assert "maxSurge" in second.stderr
    # it stopped before the journal and before the reconcile: nothing rolled back, no socket
    assert half_done_record_is_there(state)
    assert not (tmp_path / "csi.sock").exists()
    assert not (tmp_path / "data").exists()
    assert not free(state)  # the first one still holds it
    holder.exit()
    assert free(state)  # once the first one has exited, the lock is free


def test_a_waiting_driver_takes_over_when_the_first_one_exits(
    tmp_path: Path, holders: list[Holder]
) -> None:
    holders.append(holder := Holder(tmp_path / "state"))
    log_path = tmp_path / "second.log"
    with open(log_path, "wb") as log:
        second = subprocess.Popen(cli(tmp_path, "controller", "--state-lock-wait", "60"),
                                  cwd=REPO, stdout=log, stderr=log)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "waiting up to 60 s" not in log_path.read_text():
            assert second.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert f"pid {holder.pid} on host " in log_path.read_text()
        assert not (tmp_path / "csi.sock").exists()  # not serving while it waits
        holder.exit()
        while not (tmp_path / "csi.sock").exists():
            assert second.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        assert not free(tmp_path / "state")  # the second one holds it now
        assert (
            (tmp_path / "state" / STATE_LOCK_FILE)
            .read_text()
            .startswith(f'{{"pid": {second.pid}, ')
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log_path.read_text()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(30)
    assert free(tmp_path / "state")


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path, holders: list[Holder]) -> None:
    holders.append(holder := Holder(tmp_path / "state"))
    assert not free(tmp_path / "state")
    holder.kill()  # SIGKILL: no clean-up code runs, the kernel drops the lock
    assert (tmp_path / "state" / STATE_LOCK_FILE).exists()
    assert free(tmp_path / "state")


def test_a_child_that_outlives_the_driver_does_not_keep_the_lock(
    tmp_path: Path, holders: list[Holder]
) -> None:
    holders.append(holder := Holder(tmp_path / "state", "child"))
    assert holder.child_pid
    holder.kill()
    os.kill(holder.child_pid, 0)  # the child is still running...
    assert free(tmp_path / "state")  # ...and holds nothing: the descriptor was close-on-exec


def test_wait_gives_up_after_the_timeout_and_on_stop(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    first = state_dir_lock(state).acquire()  # another open file: conflicts in-process too
    try:
        started = time.monotonic()
        with pytest.raises(LockHeld, match=r"\(waited \d+ s\)") as info:
            state_dir_lock(state).acquire(wait=0.6)
        assert time.monotonic() - started >= 0.6
        assert f"pid {os.getpid()} on host " in str(info.value)
        stop = threading.Event()
        threading.Timer(0.3, stop.set).start()
        started = time.monotonic()
        with pytest.raises(LockHeld):
            state_dir_lock(state).acquire(wait=60, stop=stop)  # SIGTERM while waiting
        assert time.monotonic() - started < 30
    finally:
        first.release()
    second = state_dir_lock(state).acquire(wait=0)
    assert second.held
    second.release()
    assert not second.held


def test_run_takes_the_lock_before_the_start_up_reconcile(tmp_path: Path) -> None:
    state = tmp_path / "state"
    plant_half_done_record(state)
    config = Config(endpoint=f"unix://{tmp_path}/csi.sock", state_dir=str(state),
                    data_dir=str(tmp_path / "data"), kubelet_root=str(tmp_path / "kubelet"),
                    metrics_address="", state_lock_wait=0)  # fmt: skip
    host = FakeHost()
    other = state_dir_lock(str(state)).acquire()
    try:
        with pytest.raises(LockHeld):
            run(config, threading.Event(), host, {})
    finally:
        other.release()
    assert half_done_record_is_there(state)
    assert host.calls == []
    assert not (tmp_path / "csi.sock").exists()


def test_the_volumes_command_reads_the_journal_while_a_driver_holds_the_lock(
    tmp_path: Path, holders: list[Holder], capsys: pytest.CaptureFixture[str]
) -> None:
    """The admin listing is read-only and meant to run beside the serving driver."""
    import logging

    state = tmp_path / "state"
    plant_half_done_record(state)
    holders.append(Holder(state))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert main(["volumes", "--state-dir", str(state), "--data-dir", str(tmp_path / "data"),
                     "--kubelet-root", str(tmp_path / "kubelet")]) == 0  # fmt: skip
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert "csi-half-done" in capsys.readouterr().out
    assert not free(state)
