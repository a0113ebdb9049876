"""A minimal QMP client: JSON lines over qemu-storage-daemon's monitor socket.

QMP is a few JSON messages (greeting, ``qmp_capabilities``, then one reply per command with
asynchronous events in between); a client library would add more than these lines do.
"""

from __future__ import annotations

import json
import socket
import time
from types import TracebackType
from typing import Any

from csi.errors import FailedPrecondition, Internal


class QmpError(Internal):
    """qemu-storage-daemon answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"qemu-storage-daemon refused {command}: {desc}")


class Qmp:
    """One monitor session; use as a context manager."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> Qmp:
        return self if self._sock is not None else self.connect()

    def connect(self) -> Qmp:
        """Connect and negotiate; FAILED_PRECONDITION when the daemon is not there."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise FailedPrecondition(
                f"qemu-storage-daemon is not reachable at {self.path} ({exc.strerror}); "
                "backing=qcow2 needs it running beside the driver (the chart's qsd sidecar, "
                "value qcow2.enabled)"
            ) from None
        except OSError as exc:  # there, but not answering (busy, hung): not "absent"
            sock.close()
            raise Internal(f"qemu-storage-daemon monitor {self.path}: {exc}") from None
        self._sock = sock
        try:
            self._read()  # greeting
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except OSError as exc:
                raise Internal(f"qemu-storage-daemon monitor {self.path}: {exc}") from None
            if not chunk:
                raise Internal(f"qemu-storage-daemon closed its monitor {self.path}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its result; events seen meanwhile are kept in ``events``."""
        assert self._sock is not None
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                error = reply["error"]
                raise QmpError(command, error.get("class", ""), error.get("desc", ""))
            elif "return" in reply:
                return reply["return"]

    def wait_until(self, done: Any, what: str, timeout: float = 10.0) -> None:
        """Poll ``done()`` (which may run commands) until true; qemu finishes some work
        asynchronously, e.g. an export goes away only after its clients have."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise Internal(f"qemu-storage-daemon: {what} did not happen within {timeout:g}s")
            time.sleep(0.05)
