"""Run qemu-storage-daemon the way the chart's ``qsd`` sidecar does, outside Kubernetes.

For the real-kernel tests, the benchmark and anyone trying ``backing=qcow2`` by hand: a daemon of
its own (never a child that dies with the driver) with a QMP monitor on ``<dir>/qmp.sock``; the
driver, given ``--qsd-socket <dir>/qmp.sock``, makes it serve NBD on ``<dir>/nbd.sock``.

    python -m csi.tools.qsd start /run/lec-qsd    # prints the socket to pass as --qsd-socket
    python -m csi.tools.qsd stop /run/lec-qsd
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from csi.host.qmp import Qmp


class QemuStorageDaemon:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.socket = directory / "qmp.sock"
        self.pidfile = directory / "qsd.pid"

    def start(self, timeout: float = 60.0) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        subprocess.run(
            ["qemu-storage-daemon", "--chardev",
             f"socket,id=qmp,path={self.socket},server=on,wait=off", "--monitor", "chardev=qmp",
             "--daemonize", "--pidfile", str(self.pidfile)],
            check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip
        deadline = time.monotonic() + timeout  # --daemonize returns once set up: a formality
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon made no socket at {self.socket}")
            time.sleep(0.1)

    def pid(self) -> int | None:
        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def exports(self) -> list[str]:
        with Qmp(str(self.socket)) as qmp:
            return [e["id"] for e in qmp.execute("query-block-exports")]

    def nodes(self) -> list[str]:
        with Qmp(str(self.socket)) as qmp:
            return [n["node-name"] for n in qmp.execute("query-named-block-nodes", flat=True)]

    def stop(self, remove: bool = True) -> None:
        """SIGTERM (SIGKILL if it lingers); a daemon already gone is fine."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 30
                while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                    time.sleep(0.1)
                if os.path.exists(f"/proc/{pid}"):
                    os.kill(pid, signal.SIGKILL)
        if remove:
            for path in (self.socket, self.pidfile, self.dir / "nbd.sock"):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.dir.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m csi.tools.qsd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("dir", type=Path, help="directory for qmp.sock, nbd.sock and the pidfile")
    args = parser.parse_args(argv)
    daemon = QemuStorageDaemon(args.dir.resolve())
    if args.action == "start":
        daemon.start()
        print(daemon.socket)
    else:
        daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
