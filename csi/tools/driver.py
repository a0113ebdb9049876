"""Run the real driver process (``python -m csi node|all ...``) outside Kubernetes.

The one launcher of the real-kernel tests, ``make demo`` and ``make bench`` (as
``csi.tools.qsd`` is for qemu-storage-daemon): it builds the command line from what the caller
names (mode, endpoint directory, state, data and kubelet dirs, node id, extra flags), starts
the process with its output in a log file, waits for its unix socket, and stops it (SIGTERM,
then SIGKILL if it lingers). ``connect`` gives a kubelet-shaped client (csi.tools.kubelet).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from csi.journal import Names
from csi.tools.kubelet import Kubelet

REPO = Path(__file__).resolve().parents[2]
RSS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


class DriverFailed(RuntimeError):
    """The driver exited at start-up or made no socket in time; the message has its log tail."""


@dataclass(eq=False, kw_only=True)
class Driver:
    """One driver process: ``start``, ``connect``, ``stop`` (or ``kill``), and ``start`` again.

    The socket is ``<run_dir>/csi.sock`` (a unix socket cannot live on 9p, so put ``run_dir``
    under /run); ``extra_args`` go after the common flags (``--min-size``, ``--log-level``,
    ``--metrics-address``, ``--qsd-socket`` ...).
    """

    run_dir: Path
    state_dir: Path
    data_dir: Path
    kubelet_root: Path
    log_path: Path
    node_id: str
    mode: str = "node"
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    kubelet: Kubelet | None = field(default=None, init=False, repr=False)

    @property
    def socket(self) -> Path:
        return self.run_dir / "csi.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "csi", self.mode, "--endpoint", self.endpoint,
                "--node-id", self.node_id, "--state-dir", str(self.state_dir),
                "--data-dir", str(self.data_dir), "--kubelet-root", str(self.kubelet_root),
                *self.extra_args]  # fmt: skip

    def start(self, env: Mapping[str, str] | None = None, timeout: float = 600.0) -> None:
        """Start the process (``env`` on top of this one's environment) and wait up to
        ``timeout`` seconds (python start-up under emulation is slow) for its socket."""
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)  # a SIGKILLed driver leaves its socket behind
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO,
                env={**os.environ, **(env or {})},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise DriverFailed(f"driver exited at start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DriverFailed(f"driver made no socket in {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def connect(self, timeout: float, ready_timeout: float) -> Kubelet:
        """A kubelet-shaped client (``timeout`` per call), once Probe says ready."""
        if self.kubelet is not None:
            self.kubelet.close()
        self.kubelet = Kubelet(self.endpoint, str(self.kubelet_root), timeout=timeout)
        self.kubelet.wait_ready(ready_timeout)
        return self.kubelet

    @property
    def k(self) -> Kubelet:
        if self.kubelet is None:
            raise DriverFailed("driver not connected")
        return self.kubelet

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DriverFailed("driver not started")
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def names(self, pod: str, name: str = "scratch") -> Names:
        """The driver's names (backing file, header, mapping) for a pod's inline volume."""
        return Names.of(Kubelet.volume_id(pod, name), str(self.data_dir), str(self.state_dir))

    def rss(self) -> dict[str, int]:
        """The process's resident memory (bytes) and thread count, from /proc/PID/status."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in RSS_KEYS:
                    out[key] = int(value.split()[0]) * 1024
                elif key == "Threads":
                    out[key] = int(value.split()[0])
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _close_client(self) -> None:
        if self.kubelet is not None:
            self.kubelet.close()
            self.kubelet = None

    def stop(self, timeout: float = 90.0) -> int | None:
        """SIGTERM (in-flight RPCs finish, the socket is removed); SIGKILL after ``timeout``.
        The client is closed after the exit (an RPC in flight on it may finish). Returns the
        exit status, or None if the process was never started."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._close_client()
        return None if self.proc is None else self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, like an OOM kill or a crashed container."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._close_client()

    def wait_exit(self, timeout: float = 120.0) -> int:
        if self.proc is None:
            raise DriverFailed("driver not started")
        return self.proc.wait(timeout)
