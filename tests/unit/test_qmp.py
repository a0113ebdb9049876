"""The QMP client against a scripted monitor on a real unix socket: greeting, negotiation,
events between replies, errors, and a daemon that is not there."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from csi.errors import DriverError, FailedPrecondition, Internal, Unavailable
from csi.host.qmp import MAX_MESSAGE, Qmp, QmpError, QmpProtocolError, QmpTimeout

Reply = Callable[[dict[str, Any]], Iterable[dict[str, Any] | bytes]]
GREETING = b'{"QMP": {"version": {}, "capabilities": ["oob"]}}\r\n'


class Monitor:
    """Accepts one client per connection; answers each command with ``reply(command)``: JSON
    messages, or raw bytes sent as they are (garbage). ``greeting=None``: a hung daemon that
    accepts connections but never says a word."""

    def __init__(self, reply: Reply, greeting: bytes | None = GREETING) -> None:
        self.dir = tempfile.mkdtemp(prefix="lec-qmp-")
        self.path = os.path.join(self.dir, "qmp.sock")
        self.reply = reply
        self.greeting = greeting
        self.connections = 0
        self.received: list[dict[str, Any]] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            # the client may hang up mid-reply (it gave up on garbage or on waiting)
            with contextlib.suppress(OSError, ValueError), conn, conn.makefile("rwb") as f:
                if self.greeting is not None:
                    f.write(self.greeting)
                    f.flush()
                for line in f:
                    if self.greeting is None:
                        continue  # hung: reads, never answers
                    command = json.loads(line)
                    self.received.append(command)
                    for message in self.reply(command):
                        if not isinstance(message, bytes):
                            message = json.dumps(message).encode() + b"\r\n"
                        f.write(message)
                        f.flush()

    def close(self) -> None:
        self.server.close()


def answers(command: dict[str, Any]) -> list[dict[str, Any]]:
    name = command["execute"]
    if name == "qmp_capabilities":
        return [{"return": {}}]
    if name == "query-block-exports":
        return [{"event": "BLOCK_EXPORT_DELETED", "data": {"id": "x"}},
                {"return": [{"id": "luks-eph-1", "node-name": "q1"}]}]  # fmt: skip
    if name == "block-export-add":
        return [{"error": {"class": "GenericError", "desc": "Block export id 'e' is in use"}}]
    return [{"return": {}}]


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    m = Monitor(answers)
    yield m
    m.close()


def test_negotiates_then_returns_results_and_keeps_events(monitor: Monitor) -> None:
    with Qmp(monitor.path) as qmp:
        result = qmp.execute("query-block-exports")
        assert result == [{"id": "luks-eph-1", "node-name": "q1"}]
        assert [e["event"] for e in qmp.events] == ["BLOCK_EXPORT_DELETED"]
    assert [c["execute"] for c in monitor.received] == ["qmp_capabilities", "query-block-exports"]
    assert "arguments" not in monitor.received[1]


def test_arguments_are_sent_as_given(monitor: Monitor) -> None:
    with Qmp(monitor.path) as qmp:
        qmp.execute("blockdev-del", **{"node-name": "q1"})
    assert monitor.received[-1] == {"execute": "blockdev-del", "arguments": {"node-name": "q1"}}


def test_error_reply_raises_with_the_daemon_s_words(monitor: Monitor) -> None:
    with Qmp(monitor.path) as qmp, pytest.raises(QmpError) as err:
        qmp.execute("block-export-add", id="e")
    assert err.value.error_class == "GenericError"
    assert "in use" in str(err.value) and "block-export-add" in str(err.value)


def test_missing_daemon_is_failed_precondition_naming_the_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(FailedPrecondition) as err:
        Qmp(path).connect()
    assert path in str(err.value) and "qcow2" in str(err.value)


def within(seconds: float, call: Callable[[], Any]) -> BaseException | Any:
    """What ``call()`` returned or raised, failing the test if it took longer than ``seconds``
    (run in a thread: a call that hangs fails here instead of hanging the test run)."""
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still waiting after {seconds:g}s"
    return outcome[0]


def test_a_silent_daemon_is_unavailable_within_the_bounds_not_a_hang() -> None:
    assert Qmp("x").timeout <= 10 and Qmp("x").connect_timeout <= 5  # not 30 s
    m = Monitor(lambda command: [])  # greets, then never answers qmp_capabilities
    hung = Monitor(answers, greeting=None)  # accepts, never even greets
    try:
        for path in (m.path, hung.path):
            started = time.monotonic()
            error = within(5, Qmp(path, timeout=0.3, connect_timeout=0.3).connect)
            assert isinstance(error, QmpTimeout) and isinstance(error, Unavailable), error
            assert time.monotonic() - started < 2
    finally:
        m.close()
        hung.close()


def test_a_daemon_trickling_events_cannot_stretch_a_reply_past_its_timeout() -> None:
    def trickle(command: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if command["execute"] == "qmp_capabilities":
            yield {"return": {}}
            return
        for _ in range(200):  # an event every 50 ms, each well within the per-recv timeout
            time.sleep(0.05)
            yield {"event": "JOB_STATUS_CHANGE", "data": {}}

    m = Monitor(trickle)
    try:
        qmp = Qmp(m.path, timeout=0.5).connect()
        started = time.monotonic()
        error = within(5, lambda: qmp.execute("query-block-exports"))
        assert isinstance(error, QmpTimeout), error
        assert time.monotonic() - started < 2
        assert len(qmp.events) <= 64  # kept, but bounded
    finally:
        m.close()


GARBAGE: list[tuple[str, bytes]] = [
    ("not JSON", b"this is not json\r\n"),
    ("not UTF-8", b"\xff\xfe\x00{\r\n"),
    ("a JSON list", b"[1, 2, 3]\r\n"),
    ("a JSON string", b'"return"\r\n'),
    ("nested too deep", b"[" * 200_000 + b"\r\n"),
    ("an error that is no object", b'{"error": "GenericError"}\r\n'),
]


@pytest.mark.parametrize(("what", "garbage"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_from_the_daemon_is_a_typed_error(what: str, garbage: bytes) -> None:
    def reply(command: dict[str, Any]) -> list[dict[str, Any] | bytes]:
        return [{"return": {}}] if command["execute"] == "qmp_capabilities" else [garbage]

    m = Monitor(reply)
    try:
        with Qmp(m.path, timeout=2) as qmp:
            error = within(5, lambda: qmp.execute("query-block-exports"))
        assert isinstance(error, QmpProtocolError) and isinstance(error, Internal), error
    finally:
        m.close()


@pytest.mark.parametrize(
    "greeting", [b"hello\r\n", b'{"return": {}}\r\n', b'{"QMP": ' + b"[" * 100_000 + b"\r\n"]
)
def test_a_greeting_that_is_not_qmp_is_a_typed_error(greeting: bytes) -> None:
    m = Monitor(answers, greeting=greeting)
    try:
        error = within(5, Qmp(m.path, timeout=2).connect)
        assert isinstance(error, DriverError) and not isinstance(error, QmpTimeout), error
    finally:
        m.close()


def test_error_fields_of_the_wrong_type_still_give_strings() -> None:
    def reply(command: dict[str, Any]) -> list[dict[str, Any]]:
        if command["execute"] == "qmp_capabilities":
            return [{"return": {}}]
        return [{"error": {"class": 7, "desc": ["already running"]}}]

    m = Monitor(reply)
    try:
        with Qmp(m.path, timeout=2) as qmp, pytest.raises(QmpError) as err:
            qmp.execute("nbd-server-start")
        assert isinstance(err.value.error_class, str) and isinstance(err.value.desc, str)
    finally:
        m.close()


@pytest.mark.parametrize("newline", [True, False], ids=["long line", "endless line"])
def test_a_message_longer_than_the_bound_is_refused_not_buffered(newline: bool) -> None:
    assert MAX_MESSAGE == 1024 * 1024
    huge = b'{"return": "' + b"x" * (2 * MAX_MESSAGE) + b'"}'

    def reply(command: dict[str, Any]) -> Iterator[dict[str, Any] | bytes]:
        if command["execute"] == "qmp_capabilities":
            yield {"return": {}}
        elif newline:
            yield huge + b"\r\n"
        else:
            for _ in range(64):  # 16 MiB and counting, no end of line in sight
                yield b"y" * (256 * 1024)

    m = Monitor(reply)
    try:
        with Qmp(m.path, timeout=3) as qmp:
            error = within(6, lambda: qmp.execute("query-block-exports"))
            assert isinstance(error, QmpProtocolError), type(error)
            assert str(MAX_MESSAGE) in str(error)
    finally:
        m.close()


def test_wait_until_gives_up_with_what_it_waited_for(monitor: Monitor) -> None:
    with Qmp(monitor.path) as qmp, pytest.raises(Internal) as err:
        qmp.wait_until(lambda: False, "removal of export e", timeout=0.1)
    assert "removal of export e" in str(err.value)
