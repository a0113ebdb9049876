"""The admin socket: how ``luks-ephemeral-csi shred|unseal`` on the node reaches the driver.

A unix socket in the state dir (``admin.sock``, mode 0600 in a 0700 directory), and the peer
must be root by its kernel credentials (SO_PEERCRED), so only root on the node (or in the
driver's container) can shred or unseal. One JSON request per connection, one JSON answer,
both bounded; no key ever crosses it, only volume ids and outcomes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from csi.errors import DriverError, InvalidArgument, status_code_name

log = logging.getLogger(__name__)

SOCKET_NAME = "admin.sock"
MAX_REQUEST = 4096
MAX_ANSWER = 4 * 1024**2
REQUEST_TIMEOUT = 5.0  # seconds a client gets to send its request
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class AdminUnavailable(Exception):
    """No driver answers on the admin socket (none runs, or it is not ours to reach)."""


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class AdminServer:
    """Serves ``handlers[request["command"]]`` on the admin socket, one thread per client."""

    def __init__(self, state_dir: str, handlers: dict[str, Handler]) -> None:
        self.path = socket_path(state_dir)
        self.handlers = handlers
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a stale one: we hold the state-dir lock, so it is ours
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="admin", daemon=True)
        self._thread.start()
        log.info("admin socket on %s (root only)", self.path)

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="admin-client",
                             daemon=True).start()  # fmt: skip

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if peer_uid(conn) != 0:
                    answer: dict[str, Any] = {"error": "PERMISSION_DENIED",
                                              "message": "only root may use the admin socket"}
                else:
                    answer = self.answer(_read_request(conn))
            except InvalidArgument as exc:
                answer = {"error": "INVALID_ARGUMENT", "message": str(exc)}
            except OSError as exc:
                log.warning("admin client: %s", exc)
                return
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        return dispatch(self.handlers, request)


def dispatch(handlers: dict[str, Handler], request: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request, errors included (the CLI acting alone answers the same way)."""
    command = request.get("command")
    handler = handlers.get(command) if isinstance(command, str) else None
    if handler is None:
        return {"error": "INVALID_ARGUMENT",
                "message": f"unknown command; known: {', '.join(sorted(handlers))}"}
    try:
        return handler(request)
    except DriverError as exc:
        return {"error": status_code_name(exc), "message": str(exc)}
    except Exception as exc:
        log.exception("admin command %s failed", command)
        return {"error": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}


def _read_request(conn: socket.socket) -> dict[str, Any]:
    conn.settimeout(REQUEST_TIMEOUT)
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(MAX_REQUEST + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise InvalidArgument(f"request longer than {MAX_REQUEST} bytes")
    try:
        request = json.loads(data)
    except ValueError:
        raise InvalidArgument("request is not JSON") from None
    if not isinstance(request, dict):
        raise InvalidArgument("request is not a JSON object")
    return request


def call(state_dir: str, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """Send one request to the running driver; AdminUnavailable if none answers."""
    path = socket_path(state_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AdminUnavailable(f"no driver answers on {path}: {exc.strerror}") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while len(data) <= MAX_ANSWER:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        answer = json.loads(data)
    except ValueError:
        raise AdminUnavailable(f"the driver on {path} gave no answer") from None
    if not isinstance(answer, dict):
        raise AdminUnavailable(f"the driver on {path} gave a malformed answer")
    return answer
