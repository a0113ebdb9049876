"""The Node annotation trigger of an emergency shred: the logic alone (``handle``), then the
watch thread with the real KubeApi against the local API server stand-in over HTTP."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from csi.config import Config
from csi.kube import MAX_WATCH_LINE, KubeApi, KubeError, NodeEvent, WatchExpired
from csi.shredwatch import (
    ANNOTATION,
    MAX_SHOWN,
    MAX_STATE_BYTES,
    STATE_FILE,
    ClosableWatch,
    NodeShredWatch,
)
from tests.unit.metrics_harness import FakeApiServer

NODE = "node-1"
SUMMARY = "shredded 3 of 3 volumes in 0.41 s; node sealed"
FAST = (0.05, 0.2)  # backoff in tests: first and longest wait


# fakes ---------------------------------------------------------------------------------
@dataclass
class Report:
    summary: str = SUMMARY
    complete: bool = True


@dataclass
class FakeShredder:
    """Seals on shred, as the real one does; counts every call."""

    sealed: str | None = None
    shreds: list[str] = field(default_factory=list)  # the annotation value of each shred_all
    unseals: int = 0
    fail: bool = False
    complete: bool = True

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def shred_all(self, *, trigger: str, annotation: str) -> Report:
        assert trigger == "annotation"
        with self.lock:
            if self.fail:
                raise OSError("dmsetup is gone")
            self.shreds.append(annotation)
            self.sealed = trigger
        return Report(complete=self.complete)

    def unseal(self, *, trigger: str) -> bool:
        assert trigger == "annotation"
        with self.lock:
            self.unseals += 1
            was, self.sealed = self.sealed, None
        return was is not None

    def sealed_by(self) -> str | None:
        return self.sealed


@dataclass
class FakeNodeApi:
    """Only events: ``handle`` never reads or watches."""

    posted: list[tuple[str, str, str]] = field(default_factory=list)
    fail: bool = False

    def node_annotations(self, name: str) -> tuple[dict[str, str], str]:
        raise AssertionError("handle() must not read the node")

    def watch_node(self, name: str, resource_version: str, timeout_seconds: int) -> ClosableWatch:
        raise AssertionError("handle() must not watch the node")

    def node_event(self, reason: str, message: str, type: str = "Warning") -> None:
        if self.fail:
            raise KubeError("create event: API server answered 503 Service Unavailable")
        self.posted.append((reason, message, type))


def shred(value: str) -> dict[str, str]:
    return {ANNOTATION: value, "node.alpha.kubernetes.io/ttl": "0"}


@pytest.fixture
def shredder() -> FakeShredder:
    return FakeShredder()


@pytest.fixture
def fake_api() -> FakeNodeApi:
    return FakeNodeApi()


@pytest.fixture
def logic(fake_api: FakeNodeApi, shredder: FakeShredder, tmp_path: Path) -> NodeShredWatch:
    return NodeShredWatch(fake_api, shredder, NODE, str(tmp_path))


# handle(): the logic ---------------------------------------------------------------------
def test_a_new_value_shreds_once_and_posts_the_summary(
    logic: NodeShredWatch, shredder: FakeShredder, fake_api: FakeNodeApi
) -> None:
    assert logic.handle(shred("1733130000")) == "shred"
    assert shredder.shreds == ["1733130000"]
    assert fake_api.posted == [("EmergencyShred", SUMMARY, "Warning")]
    for _ in range(3):  # every later node update carries the same value
        assert logic.handle(shred("1733130000")) is None
    assert shredder.shreds == ["1733130000"]
    assert len(fake_api.posted) == 1
    assert logic.handle(shred("1733130099")) == "shred"  # a new value is a new request
    assert shredder.shreds == ["1733130000", "1733130099"]


def test_nothing_to_do_without_the_annotation(
    logic: NodeShredWatch, shredder: FakeShredder, fake_api: FakeNodeApi, tmp_path: Path
) -> None:
    assert logic.handle({}) is None
    assert logic.handle({"other": "x"}) is None
    assert shredder.shreds == [] and shredder.unseals == 0 and fake_api.posted == []
    assert not (tmp_path / STATE_FILE).exists()


def test_the_same_value_after_a_restart_does_not_shred_again(
    logic: NodeShredWatch, shredder: FakeShredder, fake_api: FakeNodeApi, tmp_path: Path
) -> None:
    logic.handle(shred("v1"))
    state = tmp_path / STATE_FILE
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["value"] == "v1"
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temp file left behind
    restarted = NodeShredWatch(fake_api, shredder, NODE, str(tmp_path))
    assert restarted.handle(shred("v1")) is None
    assert shredder.shreds == ["v1"]
    assert restarted.handle(shred("v2")) == "shred"
    assert shredder.shreds == ["v1", "v2"]
    again = NodeShredWatch(fake_api, shredder, NODE, str(tmp_path))
    assert again.handle(shred("v2")) is None


def test_removal_unseals_a_seal_from_the_annotation(
    logic: NodeShredWatch, shredder: FakeShredder, fake_api: FakeNodeApi, tmp_path: Path
) -> None:
    logic.handle(shred("v1"))
    assert shredder.sealed == "annotation"
    assert logic.handle({}) == "unseal"
    assert shredder.sealed is None and shredder.unseals == 1
    reason, message, type_ = fake_api.posted[-1]
    assert (reason, type_) == ("Unsealed", "Normal")
    assert ANNOTATION in message and "unsealed" in message
    assert not (tmp_path / STATE_FILE).exists()  # forgotten
    assert logic.handle({}) is None  # not sealed any more: nothing to do, no second event
    assert shredder.unseals == 1 and len(fake_api.posted) == 2
    # forgotten, so the same value again is a new request, also after a restart
    restarted = NodeShredWatch(fake_api, shredder, NODE, str(tmp_path))
    assert restarted.handle(shred("v1")) == "shred"
    assert shredder.shreds == ["v1", "v1"]


def test_an_empty_value_counts_as_removed(logic: NodeShredWatch, shredder: FakeShredder) -> None:
    logic.handle(shred("v1"))
    assert logic.handle(shred("")) == "unseal"
    assert shredder.sealed is None and shredder.shreds == ["v1"]


@pytest.mark.parametrize("trigger", ["cli", "unknown"])
def test_removal_leaves_another_seal_alone(
    logic: NodeShredWatch, shredder: FakeShredder, fake_api: FakeNodeApi, trigger: str
) -> None:
    logic.handle(shred("v1"))
    shredder.sealed = trigger  # e.g. `luks-ephemeral-csi shred --all` sealed it again since
    assert logic.handle({}) is None
    assert shredder.sealed == trigger and shredder.unseals == 0
    assert [p[0] for p in fake_api.posted] == ["EmergencyShred"]


def test_an_event_failure_changes_nothing(
    fake_api: FakeNodeApi, shredder: FakeShredder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_api.fail = True
    logic = NodeShredWatch(fake_api, shredder, NODE, str(tmp_path))
    assert logic.handle(shred("v1")) == "shred"
    assert logic.handle(shred("v1")) is None  # remembered all the same
    assert logic.handle({}) == "unseal"
    assert shredder.shreds == ["v1"] and shredder.unseals == 1
    assert any("cannot post event EmergencyShred" in r.getMessage() for r in caplog.records)
    assert any("cannot post event Unsealed" in r.getMessage() for r in caplog.records)


def test_a_notify_callable_replaces_the_api_events(
    fake_api: FakeNodeApi, shredder: FakeShredder, tmp_path: Path
) -> None:
    seen: list[tuple[str, str, str]] = []
    logic = NodeShredWatch(fake_api, shredder, NODE, str(tmp_path),
                           notify=lambda *args: seen.append(args))  # fmt: skip
    logic.handle(shred("v1"))
    assert seen == [("EmergencyShred", SUMMARY, "Warning")] and fake_api.posted == []


def test_a_failed_shred_is_reported_and_retried(
    logic: NodeShredWatch, shredder: FakeShredder, fake_api: FakeNodeApi
) -> None:
    shredder.fail = True
    assert logic.handle(shred("v1")) is None
    [(reason, message, type_)] = fake_api.posted
    assert (reason, type_) == ("EmergencyShred", "Warning")
    assert message.startswith("emergency shred failed: OSError: dmsetup is gone")
    shredder.fail = False
    assert logic.handle(shred("v1")) == "shred"  # not remembered: the next look tries again
    assert shredder.shreds == ["v1"]


def test_an_incomplete_shred_is_logged_as_an_error_and_remembered(
    logic: NodeShredWatch, shredder: FakeShredder, caplog: pytest.LogCaptureFixture
) -> None:
    shredder.complete = False
    assert logic.handle(shred("v1")) == "shred"
    assert any(r.levelno == logging.ERROR and "INCOMPLETE" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert logic.handle(shred("v1")) is None


def test_a_long_value_is_a_request_shown_truncated_and_compared_whole(
    logic: NodeShredWatch, shredder: FakeShredder, tmp_path: Path
) -> None:
    long_a = "x" * 300 + "a" * 10_000
    long_b = "x" * 300 + "b" * 10_000  # the same first 300 characters
    assert logic.handle(shred(long_a)) == "shred"
    assert logic.handle(shred(long_b)) == "shred"
    assert logic.handle(shred(long_b)) is None
    assert all(len(shown) <= MAX_SHOWN for shown in shredder.shreds)
    assert shredder.shreds[0].startswith("x" * 200) and shredder.shreds[0].endswith("...")
    assert (tmp_path / STATE_FILE).stat().st_size <= MAX_STATE_BYTES
    restarted = NodeShredWatch(FakeNodeApi(), shredder, NODE, str(tmp_path))
    assert restarted.handle(shred(long_b)) is None
    assert restarted.handle(shred(long_a)) == "shred"


def test_a_value_with_newlines_is_shown_on_one_line(
    logic: NodeShredWatch, shredder: FakeShredder
) -> None:
    logic.handle(shred("a\nb"))
    assert shredder.shreds == ["a\\nb"]


@pytest.mark.parametrize(
    "content",
    [b"", b"not json", b'{"sha256": 7}', b'{"value": "v1"}', b"{" + b" " * MAX_STATE_BYTES + b"}"],
    ids=["empty", "not-json", "not-a-digest", "no-digest", "oversize"],
)
def test_an_unreadable_state_file_counts_as_nothing_handled(
    fake_api: FakeNodeApi, shredder: FakeShredder, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, content: bytes,
) -> None:  # fmt: skip
    (tmp_path / STATE_FILE).write_bytes(content)
    logic = NodeShredWatch(fake_api, shredder, NODE, str(tmp_path))
    assert logic.handle(shred("v1")) == "shred"  # err on the side the operator asked for
    assert any(STATE_FILE in r.getMessage() for r in caplog.records)
    assert json.loads((tmp_path / STATE_FILE).read_text())["value"] == "v1"  # replaced


def test_an_oversize_valid_state_file_is_not_trusted(
    logic: NodeShredWatch, shredder: FakeShredder, fake_api: FakeNodeApi, tmp_path: Path
) -> None:
    logic.handle(shred("v1"))
    state = tmp_path / STATE_FILE
    good = json.loads(state.read_text())
    state.write_text(json.dumps({**good, "pad": "p" * MAX_STATE_BYTES}))
    assert NodeShredWatch(fake_api, shredder, NODE, str(tmp_path)).handle(shred("v1")) == "shred"


def test_a_state_dir_that_cannot_be_written_still_shreds(
    fake_api: FakeNodeApi, shredder: FakeShredder, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    logic = NodeShredWatch(fake_api, shredder, NODE, str(tmp_path / "missing"))
    assert logic.handle(shred("v1")) == "shred"
    assert logic.handle(shred("v1")) is None  # remembered in memory for this process
    assert any("cannot record" in r.getMessage() for r in caplog.records)
    assert fake_api.posted == [("EmergencyShred", SUMMARY, "Warning")]


# KubeApi: node reads, watches and events over HTTP ---------------------------------------
@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.add_node(NODE, {"kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/c.sock"})
    server.add_node("node-2")
    yield server
    server.close()


@pytest.fixture
def api(api_server: FakeApiServer) -> Iterator[KubeApi]:
    api = KubeApi.connect(Config(kube_api_url=api_server.url, node_id=NODE), {})
    assert api is not None
    yield api
    api.close()


def test_node_annotations_reads_this_node(api_server: FakeApiServer, api: KubeApi) -> None:
    api_server.set_node_annotation(NODE, ANNOTATION, "v1")
    annotations, version = api.node_annotations(NODE)
    assert annotations[ANNOTATION] == "v1"
    assert version == api_server.nodes[NODE]["metadata"]["resourceVersion"]
    [request] = api_server.node_reads()
    assert request.path == f"/api/v1/nodes/{NODE}"


@pytest.mark.parametrize(
    "metadata",
    [{"annotations": ["a"]}, {"annotations": {"a": 1}}, {"resourceVersion": 5}, None],
    ids=["list", "not-a-string", "version-number", "no-metadata"],
)
def test_node_annotations_refuses_a_malformed_node(
    api_server: FakeApiServer, api: KubeApi, metadata: dict[str, Any] | None
) -> None:
    node = api_server.nodes[NODE]
    if metadata is None:
        del node["metadata"]
    else:
        node["metadata"].update(metadata)
    with pytest.raises(KubeError, match="read node: unexpected response"):
        api.node_annotations(NODE)


def test_node_annotations_errors_are_kube_errors(api_server: FakeApiServer, api: KubeApi) -> None:
    with pytest.raises(KubeError, match="404"):
        api.node_annotations("no-such-node")
    api_server.nodes_status = 403
    with pytest.raises(KubeError, match="403"):
        api.node_annotations(NODE)
    api_server.nodes_status, api_server.down = 200, True
    with pytest.raises(KubeError, match="read node"):
        api.node_annotations(NODE)


def collect(watch: Iterator[NodeEvent], into: list[NodeEvent]) -> Callable[[], None]:
    """Read ``watch`` in a thread; returns a join. Errors land in ``into`` as ("raised", ...)."""

    def run() -> None:
        try:
            for event in watch:
                into.append(event)
        except KubeError as exc:
            into.append(("raised", {type(exc).__name__: str(exc)}, ""))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return lambda: thread.join(10)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_watch_node_streams_this_nodes_changes(api_server: FakeApiServer, api: KubeApi) -> None:
    _, version = api.node_annotations(NODE)
    api_server.set_node_annotation(NODE, ANNOTATION, "early")  # between read and watch: replayed
    watch = api.watch_node(NODE, version, 30)
    seen: list[NodeEvent] = []
    join = collect(watch, seen)
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.set_node_annotation("node-2", ANNOTATION, "not-ours")
    api_server.bookmark(NODE)
    api_server.set_node_annotation(NODE, ANNOTATION, None)
    wait_for("three events", lambda: len(seen) == 3)
    api_server.end_watches()
    join()
    (t1, a1, v1), (t2, a2, v2), (t3, a3, v3) = seen
    assert (t1, a1[ANNOTATION]) == ("MODIFIED", "early")
    assert (t2, a2) == ("BOOKMARK", {})
    assert t3 == "MODIFIED" and ANNOTATION not in a3
    assert int(version) < int(v1) < int(v2) < int(v3)
    [request] = api_server.node_watches()
    assert request.query == {
        "fieldSelector": [f"metadata.name={NODE}"], "watch": ["true"],
        "resourceVersion": [version], "timeoutSeconds": ["30"],
        "allowWatchBookmarks": ["true"],
    }  # fmt: skip


def test_watch_node_ends_at_its_timeout(api_server: FakeApiServer, api: KubeApi) -> None:
    started = time.monotonic()
    _, version = api.node_annotations(NODE)
    assert list(api.watch_node(NODE, version, 1)) == []
    assert 0.9 <= time.monotonic() - started < 5


def test_watch_node_raises_watch_expired_on_410(api_server: FakeApiServer, api: KubeApi) -> None:
    _, version = api.node_annotations(NODE)
    seen: list[NodeEvent] = []
    join = collect(api.watch_node(NODE, version, 30), seen)
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.expire_watches()
    join()
    assert seen == [("raised", {"WatchExpired": seen[0][1]["WatchExpired"]}, "")]
    assert "410" in seen[0][1]["WatchExpired"]
    # the node has not changed: a fresh read gives the same, now too old, resourceVersion
    _, fresh = api.node_annotations(NODE)
    assert fresh == version
    with pytest.raises(WatchExpired):
        list(api.watch_node(NODE, fresh, 30))
    # from now (no resourceVersion): the current state first, as ADDED
    api_server.set_node_annotation(NODE, ANNOTATION, "v1")
    [(kind, annotations, _)] = list(api.watch_node(NODE, "", 1))
    assert (kind, annotations[ANNOTATION]) == ("ADDED", "v1")
    assert "resourceVersion" not in api_server.node_watches()[-1].query


@pytest.mark.parametrize(
    "data, error",
    [(b"{not json\n", "not JSON"), (b"x" * (MAX_WATCH_LINE + 1), "longer than"),
     (b'{"type": "MODIFIED"}\n', "unexpected watch event"),
     (b'{"type": "ERROR", "object": {"code": 500, "message": "boom"}}\n', "error event 500"),
     (b'{"type": "MODIFIED", "object": {"metadata": {"annotations": "x"}}}\n', "unexpected")],
    ids=["not-json", "oversize", "no-object", "error-500", "bad-annotations"],
)  # fmt: skip
def test_watch_node_refuses_a_bad_line(
    api_server: FakeApiServer, api: KubeApi, data: bytes, error: str
) -> None:
    _, version = api.node_annotations(NODE)
    seen: list[NodeEvent] = []
    join = collect(api.watch_node(NODE, version, 30), seen)
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.send_raw(NODE, data)
    join()
    [(kind, detail, _)] = seen
    assert kind == "raised" and error in detail["KubeError"], detail


def test_watch_node_close_from_another_thread_ends_a_blocked_read(
    api_server: FakeApiServer, api: KubeApi
) -> None:
    _, version = api.node_annotations(NODE)
    watch = api.watch_node(NODE, version, 60)
    seen: list[NodeEvent] = []
    join = collect(watch, seen)
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    started = time.monotonic()
    watch.close()
    join()
    assert time.monotonic() - started < 2 and seen == []


def test_watch_node_errors_are_kube_errors(api_server: FakeApiServer, api: KubeApi) -> None:
    api_server.nodes_status = 500
    with pytest.raises(KubeError, match="500") as err:
        api.watch_node(NODE, "1", 5)
    assert not isinstance(err.value, WatchExpired)
    api_server.nodes_status, api_server.down = 200, True
    with pytest.raises(KubeError, match="watch node"):
        api.watch_node(NODE, "1", 5)


def test_node_event_is_about_the_node(api_server: FakeApiServer, api: KubeApi) -> None:
    api.node_event("EmergencyShred", SUMMARY)
    api.node_event("Unsealed", "x" * 5000, "Normal")
    [request, second] = [r for r in api_server.requests if r.method == "POST"]
    assert request.path == "/api/v1/namespaces/default/events"
    event = request.body
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Node", "name": NODE,
                                       "uid": NODE}  # fmt: skip
    assert (event["reason"], event["message"], event["type"]) == ("EmergencyShred", SUMMARY,
                                                                  "Warning")  # fmt: skip
    assert event["metadata"] == {"generateName": f"{NODE}.", "namespace": "default"}
    assert event["source"] == {"component": "luks-ephemeral.csi.io", "host": NODE}
    assert second.body["type"] == "Normal" and len(second.body["message"]) == 1024


# the watch thread, end to end --------------------------------------------------------------
@pytest.fixture
def watcher(api: KubeApi, shredder: FakeShredder, tmp_path: Path) -> Iterator[NodeShredWatch]:
    w = NodeShredWatch(api, shredder, NODE, str(tmp_path), watch_seconds=30, backoff=FAST)
    yield w
    w.stop(5)


def events_of(api_server: FakeApiServer, reason: str) -> list[dict[str, Any]]:
    return [e for e in api_server.events() if e["reason"] == reason]


def test_the_thread_shreds_on_an_annotation_set_after_start_and_unseals_on_removal(
    api_server: FakeApiServer, watcher: NodeShredWatch, shredder: FakeShredder
) -> None:
    watcher.start()
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    assert shredder.shreds == []
    api_server.set_node_annotation(NODE, ANNOTATION, "1733130000")
    wait_for("the shred event", lambda: bool(events_of(api_server, "EmergencyShred")))
    assert shredder.shreds == ["1733130000"]
    [event] = events_of(api_server, "EmergencyShred")
    assert (event["message"], event["type"]) == (SUMMARY, "Warning")
    assert event["involvedObject"]["kind"] == "Node" and event["involvedObject"]["name"] == NODE
    api_server.set_node_annotation(NODE, "unrelated", "change")  # same value: no second shred
    api_server.set_node_annotation(NODE, ANNOTATION, None)
    wait_for("the unseal event", lambda: bool(events_of(api_server, "Unsealed")))
    assert shredder.sealed is None and shredder.shreds == ["1733130000"]
    assert events_of(api_server, "Unsealed")[0]["type"] == "Normal"
    # one read, one watch from its resourceVersion: no polling
    [read] = api_server.node_reads()
    [watch] = api_server.node_watches()
    assert watch.query["resourceVersion"] == ["101"]  # node-1's, as the read gave it
    assert read.path == f"/api/v1/nodes/{NODE}"


def test_an_annotation_present_at_start_shreds_once_across_restarts(
    api_server: FakeApiServer, api: KubeApi, shredder: FakeShredder, tmp_path: Path
) -> None:
    api_server.set_node_annotation(NODE, ANNOTATION, "v1")
    for _ in range(2):  # a driver restart: a new watcher on the same state dir
        w = NodeShredWatch(api, shredder, NODE, str(tmp_path), watch_seconds=30, backoff=FAST)
        w.start()
        wait_for("the watch", lambda: api_server.open_watches() >= 1)
        w.stop(5)
    assert shredder.shreds == ["v1"]
    assert len(events_of(api_server, "EmergencyShred")) == 1


def test_bookmarks_and_a_deleted_node_do_not_unseal(
    api_server: FakeApiServer, watcher: NodeShredWatch, shredder: FakeShredder
) -> None:
    api_server.set_node_annotation(NODE, ANNOTATION, "v1")
    watcher.start()
    wait_for("the shred", lambda: shredder.shreds == ["v1"])
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.bookmark(NODE)
    api_server.delete_node(NODE)
    api_server.set_node_annotation("node-2", ANNOTATION, None)  # a marker after both
    time.sleep(0.3)  # nothing may happen; give it the chance to go wrong
    assert shredder.sealed == "annotation" and shredder.unseals == 0


def test_a_410_makes_it_read_the_node_again(
    api_server: FakeApiServer, watcher: NodeShredWatch, shredder: FakeShredder
) -> None:
    watcher.start()
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.expire_watches()
    wait_for("a second read", lambda: len(api_server.node_reads()) == 2)
    wait_for("a second watch", lambda: api_server.open_watches() == 1
             and len(api_server.node_watches()) == 2)  # fmt: skip
    first, second = api_server.node_watches()
    # the node's own resourceVersion is as old as its last change, so as expired as before:
    # the watch starts from now, with the node's state first
    assert first.query["resourceVersion"] == ["101"]
    assert "resourceVersion" not in second.query
    api_server.set_node_annotation(NODE, ANNOTATION, "after-410")
    wait_for("the shred", lambda: shredder.shreds == ["after-410"])


def test_a_normal_end_of_the_watch_reads_the_node_again(
    api_server: FakeApiServer, watcher: NodeShredWatch, shredder: FakeShredder
) -> None:
    watcher.start()
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    time.sleep(1.1)  # a session shorter than a second counts as a failure (no busy loop)
    api_server.end_watches()
    wait_for("a second read", lambda: len(api_server.node_reads()) == 2)
    wait_for("a second watch", lambda: api_server.open_watches() == 1)
    api_server.set_node_annotation(NODE, ANNOTATION, "v1")
    wait_for("the shred", lambda: shredder.shreds == ["v1"])


@pytest.mark.parametrize("outage", ["connection", "status-503"])
def test_api_down_then_up_recovers_with_backoff(
    api_server: FakeApiServer, watcher: NodeShredWatch, shredder: FakeShredder, outage: str
) -> None:
    if outage == "connection":
        api_server.down = True
    else:
        api_server.nodes_status = 503
    watcher.start()
    wait_for("a few attempts", lambda: len(api_server.node_reads()) >= 3)
    api_server.set_node_annotation(NODE, ANNOTATION, "while-down")
    time.sleep(1.0)
    attempts = len(api_server.node_reads())
    # backoff 0.05 s doubling to 0.2 s: about 8 attempts a second (twice that in requests,
    # with the client's one retry), never a busy loop
    assert attempts < 40, attempts
    assert shredder.shreds == []
    api_server.down, api_server.nodes_status = False, 200
    wait_for("the shred after recovery", lambda: shredder.shreds == ["while-down"])
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.set_node_annotation(NODE, ANNOTATION, "after")
    wait_for("a shred through the watch", lambda: shredder.shreds == ["while-down", "after"])


def test_a_bad_watch_line_is_survived(
    api_server: FakeApiServer, watcher: NodeShredWatch, shredder: FakeShredder
) -> None:
    watcher.start()
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.send_raw(NODE, b"{not json\n")
    wait_for("a second read", lambda: len(api_server.node_reads()) == 2)
    wait_for("a second watch", lambda: api_server.open_watches() == 1)
    api_server.set_node_annotation(NODE, ANNOTATION, "v1")
    wait_for("the shred", lambda: shredder.shreds == ["v1"])


def test_a_bug_in_the_shredder_does_not_end_the_thread(
    api_server: FakeApiServer, watcher: NodeShredWatch, shredder: FakeShredder
) -> None:
    def broken() -> str | None:
        raise RuntimeError("a bug")

    shredder.sealed_by = broken  # type: ignore[method-assign]
    watcher.start()  # the first read's handle() raises (annotation absent: asks sealed_by)
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    api_server.set_node_annotation(NODE, ANNOTATION, "v1")
    wait_for("the shred", lambda: shredder.shreds == ["v1"])
    assert watcher._thread is not None and watcher._thread.is_alive()


def test_stop_returns_promptly_from_a_blocked_watch(
    api_server: FakeApiServer, api: KubeApi, shredder: FakeShredder, tmp_path: Path
) -> None:
    w = NodeShredWatch(api, shredder, NODE, str(tmp_path), watch_seconds=600, backoff=FAST)
    w.start()
    wait_for("the watch", lambda: api_server.open_watches() == 1)
    thread = w._thread
    assert thread is not None
    started = time.monotonic()
    w.stop(10)
    assert time.monotonic() - started < 2
    assert not thread.is_alive()
    reads = len(api_server.node_reads())
    api_server.set_node_annotation(NODE, ANNOTATION, "after-stop")
    time.sleep(0.3)
    assert shredder.shreds == [] and len(api_server.node_reads()) == reads


def test_stop_returns_promptly_while_backing_off(
    api_server: FakeApiServer, api: KubeApi, shredder: FakeShredder, tmp_path: Path
) -> None:
    api_server.nodes_status = 500
    w = NodeShredWatch(api, shredder, NODE, str(tmp_path), backoff=(30.0, 30.0))
    w.start()
    wait_for("the first attempt", lambda: len(api_server.node_reads()) >= 1)
    thread = w._thread
    assert thread is not None
    started = time.monotonic()
    w.stop(10)
    assert time.monotonic() - started < 2 and not thread.is_alive()


def test_state_file_is_private_to_root(tmp_path: Path, shredder: FakeShredder) -> None:
    old = os.umask(0)
    try:
        NodeShredWatch(FakeNodeApi(), shredder, NODE, str(tmp_path)).handle(shred("v1"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / STATE_FILE).stat().st_mode) == 0o600
