"""A minimal QMP client: JSON lines over qemu-storage-daemon's monitor socket.

QMP is a few JSON messages (greeting, ``qmp_capabilities``, then one reply per command with
asynchronous events in between); a client library would add more than these lines do.

The daemon is a separate process that may hang, be busy or answer garbage, and every volume
operation that talks to it waits for it: so every wait here is bounded (connect, and each reply
as a whole, not each ``recv``), no message may grow past ``max_message`` bytes, and anything
that is not a well-formed QMP message is a typed error (``QmpProtocolError``), never a
``KeyError`` or ``JSONDecodeError`` escaping to the caller.
"""

from __future__ import annotations

import json
import socket
import time
from types import TracebackType
from typing import Any

from csi.errors import FailedPrecondition, Internal, Unavailable

CONNECT_TIMEOUT = 2.0  # connecting to a local unix socket takes microseconds when qsd is alive
REPLY_TIMEOUT = 5.0  # qsd answers every command the driver sends within milliseconds
MAX_MESSAGE = 1024 * 1024  # our largest reply (query-named-block-nodes) is a few KiB per node
MAX_EVENTS = 64  # events kept for the caller; older ones are dropped
RECV_CHUNK = 65536


class QmpError(Internal):
    """qemu-storage-daemon answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"qemu-storage-daemon refused {command}: {desc}")


class QmpTimeout(Unavailable):
    """qemu-storage-daemon did not answer in time (hung or busy); retrying may succeed."""


class QmpProtocolError(Internal):
    """qemu-storage-daemon sent something that is not the QMP message expected."""


class Qmp:
    """One monitor session; use as a context manager.

    ``connect_timeout`` bounds the socket connect; ``timeout`` bounds each reply as a whole
    (the greeting, and each command from sending it to its result, events included), however
    slowly the daemon trickles bytes. A session that timed out or read garbage is closed: the
    stream can no longer be trusted to line up replies with commands.
    """

    def __init__(
        self,
        path: str,
        timeout: float = REPLY_TIMEOUT,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_message = max_message
        self.events: list[dict[str, Any]] = []
        self._sock: socket.socket | None = None
        self._buffer = b""

    def __enter__(self) -> Qmp:
        return self if self._sock is not None else self.connect()

    def connect(self) -> Qmp:
        """Connect and negotiate; FAILED_PRECONDITION when the daemon is not there."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # e.g. out of file descriptors
            raise Internal(f"qemu-storage-daemon monitor {self.path}: {exc}") from None
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise FailedPrecondition(
                f"qemu-storage-daemon is not reachable at {self.path} ({exc.strerror}); "
                "backing=qcow2 needs it running beside the driver (the chart's qsd sidecar, "
                "value qcow2.enabled)"
            ) from None
        except TimeoutError:
            sock.close()
            raise QmpTimeout(
                f"qemu-storage-daemon monitor {self.path} did not accept a connection within "
                f"{self.connect_timeout:g}s"
            ) from None
        except OSError as exc:  # there, but not answering (busy, hung): not "absent"
            sock.close()
            raise Internal(f"qemu-storage-daemon monitor {self.path}: {exc}") from None
        self._sock = sock
        self._buffer = b""
        try:
            greeting = self._read(time.monotonic() + self.timeout, "the greeting")
            if "QMP" not in greeting:
                raise QmpProtocolError(
                    f"qemu-storage-daemon monitor {self.path} did not greet with QMP: "
                    f"{_excerpt(greeting)}"
                )
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = b""

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _read(self, deadline: float, what: str) -> dict[str, Any]:
        """One message, by ``deadline`` (time.monotonic()); at most ``max_message`` bytes."""
        assert self._sock is not None
        searched = 0
        while (end := self._buffer.find(b"\n", searched)) < 0:
            if len(self._buffer) > self.max_message:
                raise QmpProtocolError(
                    f"qemu-storage-daemon monitor {self.path} sent a message longer than "
                    f"{self.max_message} bytes"
                )
            searched = len(self._buffer)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(what)
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(RECV_CHUNK)
            except TimeoutError:
                raise self._timeout(what) from None
            except OSError as exc:
                raise Internal(f"qemu-storage-daemon monitor {self.path}: {exc}") from None
            if not chunk:
                raise Internal(f"qemu-storage-daemon closed its monitor {self.path}")
            self._buffer += chunk
        if end > self.max_message:
            raise QmpProtocolError(
                f"qemu-storage-daemon monitor {self.path} sent a message longer than "
                f"{self.max_message} bytes"
            )
        line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, nesting
            raise QmpProtocolError(
                f"qemu-storage-daemon monitor {self.path} sent something that is not JSON "
                f"while we waited for {what}: {line[:200]!r}"
            ) from None
        if not isinstance(message, dict):
            raise QmpProtocolError(
                f"qemu-storage-daemon monitor {self.path} sent a JSON {type(message).__name__}, "
                f"not a QMP message, while we waited for {what}"
            )
        return message

    def _timeout(self, what: str) -> QmpTimeout:
        return QmpTimeout(
            f"qemu-storage-daemon monitor {self.path} sent no {what} within {self.timeout:g}s "
            "(hung or busy); retry later"
        )

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command and return its result; events seen meanwhile are kept in ``events``.

        QmpError when the daemon refuses the command (the session stays usable); QmpTimeout,
        QmpProtocolError or Internal (the session is closed) when it does not answer properly.
        """
        if self._sock is None:
            raise Internal(f"qemu-storage-daemon monitor {self.path}: session is closed")
        try:
            return self._execute(command, arguments)
        except QmpError:
            raise
        except BaseException:
            self.close()
            raise

    def _execute(self, command: str, arguments: dict[str, Any]) -> Any:
        assert self._sock is not None
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        deadline = time.monotonic() + self.timeout
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except TimeoutError:
            raise self._timeout(f"room for {command}") from None
        except OSError as exc:
            raise Internal(f"qemu-storage-daemon monitor {self.path}: {exc}") from None
        what = f"reply to {command}"
        while True:
            reply = self._read(deadline, what)
            if "event" in reply:
                self.events = [*self.events[-(MAX_EVENTS - 1) :], reply]
            elif "error" in reply:
                error = reply["error"]
                if not isinstance(error, dict):
                    raise QmpProtocolError(
                        f"qemu-storage-daemon sent a malformed error for {command}: "
                        f"{_excerpt(reply)}"
                    )
                raise QmpError(command, _text(error.get("class", "")), _text(error.get("desc", "")))
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


def records(
    result: Any, command: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """A query's result as a list of objects whose ``required`` (and, where present,
    ``optional``) fields are strings: anything else is a QmpProtocolError, not a KeyError."""
    if not isinstance(result, list):
        raise QmpProtocolError(f"qemu-storage-daemon's {command} returned no list: "
                               f"{_excerpt(result)}")  # fmt: skip
    rows = []
    for item in result:
        if not isinstance(item, dict):
            raise QmpProtocolError(f"qemu-storage-daemon's {command} listed a non-object: "
                                   f"{_excerpt(item)}")  # fmt: skip
        row = {}
        for key in (*required, *optional):
            value = item.get(key)
            if value is None and key in optional:
                continue
            if not isinstance(value, str):
                raise QmpProtocolError(f"qemu-storage-daemon's {command} gave {key!r} as "
                                       f"{_excerpt(value)}, not a string")  # fmt: skip
            row[key] = value
        rows.append(row)
    return rows


def _text(value: Any) -> str:
    """A field of an error reply, as a bounded string whatever its JSON type."""
    return value[:1000] if isinstance(value, str) else _excerpt(value)


def _excerpt(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text[:200]
