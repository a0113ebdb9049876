"""The QMP client against a scripted monitor on a real unix socket: greeting, negotiation,
events between replies, errors, and a daemon that is not there."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from csi.errors import FailedPrecondition, Internal
from csi.host.qmp import Qmp, QmpError

Reply = Callable[[dict[str, Any]], list[dict[str, Any]]]


class Monitor:
    """Accepts one client per connection; answers each command with ``reply(command)``."""

    def __init__(self, reply: Reply) -> None:
        self.dir = tempfile.mkdtemp(prefix="lec-qmp-")
        self.path = os.path.join(self.dir, "qmp.sock")
        self.reply = reply
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
            with conn, conn.makefile("rwb") as f:
                f.write(b'{"QMP": {"version": {}, "capabilities": ["oob"]}}\r\n')
                f.flush()
                for line in f:
                    command = json.loads(line)
                    self.received.append(command)
                    for message in self.reply(command):
                        f.write(json.dumps(message).encode() + b"\r\n")
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


def test_a_silent_daemon_is_an_internal_error_not_a_hang() -> None:
    m = Monitor(lambda command: [])
    try:
        qmp = Qmp(m.path, timeout=0.5)
        with pytest.raises(Internal):
            qmp.connect()  # no reply to qmp_capabilities: the read times out
    finally:
        m.close()


def test_wait_until_gives_up_with_what_it_waited_for(monitor: Monitor) -> None:
    with Qmp(monitor.path) as qmp, pytest.raises(Internal) as err:
        qmp.wait_until(lambda: False, "removal of export e", timeout=0.1)
    assert "removal of export e" in str(err.value)
