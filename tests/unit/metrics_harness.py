"""A Harness with metrics and a pod notifier wired in as ``serve()`` wires them, a metrics scraper
over real HTTP, and a local stand-in for the Kubernetes API server."""

from __future__ import annotations

import json
import queue
import re
import select
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from csi.__main__ import build_server
from csi.config import DEFAULT_DRIVER_NAME
from csi.metrics import Metrics, MetricsServer
from csi.metrics import serve as serve_metrics
from csi.pods import Notify, no_notify
from csi.proto import csi_pb2_grpc
from csi.tools.kubelet import Kubelet, Provisioner
from csi.volumes import Volumes
from tests.unit.harness import Harness

Labels = dict[str, str]


class MetricsHarness(Harness):
    """Volumes report to ``metrics``, RPCs to ``metrics.rpc``; one registry across restarts.

    ``/metrics`` is served over HTTP on 127.0.0.1 on a free port, as ``--metrics-address``.
    """

    def __init__(self, mode: str = "node", notify: Notify = no_notify, **overrides: Any) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry, overrides.get("driver_name", DEFAULT_DRIVER_NAME))
        self.metrics.watch_usage(lambda: self.volumes.usage())
        self.notify = notify
        self.metrics_server: MetricsServer = serve_metrics(self.registry, "127.0.0.1:0")
        super().__init__(mode, **overrides)

    def start(self) -> None:
        self.volumes = Volumes(self.config, self.host, key_source=self.key_source,
                               after_step=self.after_step, events=self.metrics)  # fmt: skip
        self.last_report = self.volumes.reconcile()
        self.server = build_server(self.config, self.volumes, self.metrics, self.notify)
        self.server.start()
        self.kubelet = Kubelet(self.config.endpoint, self.config.kubelet_root, timeout=30)
        self.kubelet.wait_ready(10)
        self.node = self.kubelet.node
        self.identity = self.kubelet.identity
        self.controller = csi_pb2_grpc.ControllerStub(self.kubelet.channel)
        self.provisioner = Provisioner(self.kubelet.channel, self.config.driver_name, timeout=30)

    def close(self) -> None:
        super().close()
        self.metrics_server.stop()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_server.port}/metrics"

    def scrape(self) -> Scrape:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            assert response.status == 200
            text: str = response.read().decode()
        return Scrape(text)


class Scrape:
    """One scrape, parsed with prometheus_client's own text parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, Labels, float]] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def find(self, name: str, **labels: str) -> list[tuple[Labels, float]]:
        return [(lab, value) for n, lab, value in self.samples
                if n == name and all(lab.get(k) == v for k, v in labels.items())]  # fmt: skip

    def value(self, name: str, **labels: str) -> float:
        """The one sample with these labels; missing counts as an error, not as 0."""
        found = self.find(name, **labels)
        assert len(found) == 1, f"{name}{labels}: expected one sample, found {found}"
        return found[0][1]

    def get(self, name: str, default: float = 0.0, **labels: str) -> float:
        found = self.find(name, **labels)
        return found[0][1] if found else default


# --- a stand-in for the Kubernetes API server ---------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any = None


@dataclass
class FakeApiServer:
    """Serves ``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>``, accepts
    ``POST /api/v1/namespaces/<ns>/events``, and serves nodes: ``GET /api/v1/nodes/<name>`` and
    the watch ``GET /api/v1/nodes?watch=1&fieldSelector=metadata.name=<name>`` (a chunked stream
    of JSON lines, as the real API server sends it); records every request.

    Node changes (``set_node_annotation``) get increasing resourceVersions, and a watch from
    resourceVersion N first replays every change after N, as the API server's watch cache does;
    a watch with no resourceVersion starts with the node's state as an ADDED event.
    ``expire_watches()`` sends an ERROR 410 event to every open watch (and to any later watch
    from a resourceVersion older than the newest one at that moment, as a compaction would);
    ``end_watches()`` ends them normally; ``down = True`` drops every connection without an
    answer. A plain list of nodes is refused (403): the driver's
    RBAC grants none.
    """

    pods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # node -> pod objects
    pods_status: int = 200
    events_status: int = 201
    nodes_status: int = 200
    down: bool = False
    requests: list[Request] = field(default_factory=list)
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> Node object

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.resource_version = 100
        self.expired_before = 0  # a watch from an older resourceVersion gets 410 at once
        self._history: list[tuple[int, str, dict[str, Any]]] = []  # rv, node, watch event
        self._watchers: list[tuple[str, queue.Queue[bytes | None]]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.end_watches()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def add_pod(self, node: str, uid: str, name: str = "demo", namespace: str = "default") -> None:
        self.pods.setdefault(node, []).append(
            {"metadata": {"name": name, "namespace": namespace, "uid": uid},
             "spec": {"nodeName": node}, "status": {"phase": "Running"}}
        )  # fmt: skip

    def remove_pod(self, uid: str) -> None:
        for items in self.pods.values():
            items[:] = [p for p in items if p["metadata"]["uid"] != uid]

    # nodes -----------------------------------------------------------------------------
    def add_node(self, name: str, annotations: dict[str, str] | None = None) -> None:
        with self._lock:
            self.resource_version += 1
            node = {"kind": "Node", "apiVersion": "v1",
                    "metadata": {"name": name, "uid": f"uid-{name}",
                                 "resourceVersion": str(self.resource_version),
                                 "annotations": dict(annotations or {})},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]}}  # fmt: skip
            self.nodes[name] = node
            self._publish(name, "ADDED", node)

    def set_node_annotation(self, name: str, key: str, value: str | None) -> None:
        """Set (or, with None, remove) an annotation: a MODIFIED event to the node's watches."""
        with self._lock:
            node = self.nodes[name]
            annotations = node["metadata"].setdefault("annotations", {})
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
            self.resource_version += 1
            node["metadata"]["resourceVersion"] = str(self.resource_version)
            self._publish(name, "MODIFIED", node)

    def delete_node(self, name: str) -> None:
        with self._lock:
            node = self.nodes.pop(name)
            self.resource_version += 1
            node["metadata"]["resourceVersion"] = str(self.resource_version)
            self._publish(name, "DELETED", node)

    def bookmark(self, name: str) -> None:
        with self._lock:
            self.resource_version += 1
            obj = {"kind": "Node", "apiVersion": "v1",
                   "metadata": {"resourceVersion": str(self.resource_version)}}  # fmt: skip
            self._send(name, {"type": "BOOKMARK", "object": obj})

    def send_raw(self, name: str, data: bytes) -> None:
        """Bytes as they are (a broken or oversize line) to the node's open watches."""
        with self._lock:
            for watched, q in self._watchers:
                if watched == name:
                    q.put(data)

    def expire_watches(self) -> None:
        """ERROR 410 Gone to every open watch, as when its resourceVersion is compacted away."""
        with self._lock:
            self.expired_before = self.resource_version
            for _, q in self._watchers:
                q.put(self._line(self._gone()))
                q.put(None)

    def end_watches(self) -> None:
        """End every open watch normally, as at its timeoutSeconds."""
        with self._lock:
            for _, q in self._watchers:
                q.put(None)

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watchers)

    def _publish(self, name: str, kind: str, node: dict[str, Any]) -> None:
        event = {"type": kind, "object": json.loads(json.dumps(node))}
        self._history.append((self.resource_version, name, event))
        self._send(name, event)

    def _send(self, name: str, event: dict[str, Any]) -> None:
        for watched, q in self._watchers:
            if watched == name:
                q.put(self._line(event))

    @staticmethod
    def _line(event: dict[str, Any]) -> bytes:
        return json.dumps(event).encode() + b"\n"

    @staticmethod
    def _gone() -> dict[str, Any]:
        return {"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410}}  # fmt: skip

    def _watch(self, name: str, since: str) -> queue.Queue[bytes | None]:
        """From ``since`` (a resourceVersion): the changes after it; from "" (unset): the
        node's current state as a synthetic ADDED event, then the changes from now."""
        q: queue.Queue[bytes | None] = queue.Queue()
        with self._lock:
            if not since:
                node = self.nodes.get(name)
                if node is not None:
                    q.put(self._line({"type": "ADDED", "object": node}))
            elif int(since) < self.expired_before:
                q.put(self._line(self._gone()))
                q.put(None)
                return q
            else:
                for rv, watched, event in self._history:
                    if watched == name and rv > int(since):
                        q.put(self._line(event))
            self._watchers.append((name, q))
        return q

    def _unwatch(self, q: queue.Queue[bytes | None]) -> None:
        with self._lock:
            self._watchers = [(n, w) for n, w in self._watchers if w is not q]

    # what was asked ----------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.requests if r.method == "POST"]

    def pod_lists(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path == "/api/v1/pods"]

    def node_reads(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests
                    if r.method == "GET" and r.path.startswith("/api/v1/nodes/")]  # fmt: skip

    def node_watches(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path == "/api/v1/nodes"]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _failure(self, status: int) -> dict[str, Any]:
                return {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "stand-in failure", "code": status}  # fmt: skip

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                api._record(Request("GET", url.path, query))
                if api.down:
                    self.close_connection = True  # no answer at all: as a dead API server
                    return
                if url.path.startswith("/api/v1/nodes"):
                    self._nodes(url.path, query)
                    return
                if url.path != "/api/v1/pods":
                    self._reply(404, self._failure(404))
                    return
                if api.pods_status != 200:
                    self._reply(api.pods_status, self._failure(api.pods_status))
                    return
                selector = query.get("fieldSelector", [""])[0]
                node = selector.removeprefix("spec.nodeName=") if selector else None
                items = [p for n, ps in api.pods.items() if node in (None, n) for p in ps]
                pod_list = {"kind": "PodList", "apiVersion": "v1",
                            "metadata": {"resourceVersion": "42"}, "items": items}  # fmt: skip
                self._reply(200, pod_list)

            def _nodes(self, path: str, query: dict[str, list[str]]) -> None:
                if api.nodes_status != 200:
                    self._reply(api.nodes_status, self._failure(api.nodes_status))
                    return
                match = re.fullmatch(r"/api/v1/nodes/([^/]+)", path)
                if match:
                    with api._lock:
                        node = api.nodes.get(match.group(1))
                        body = json.loads(json.dumps(node)) if node is not None else None
                    if body is None:
                        self._reply(404, self._failure(404))
                    else:
                        self._reply(200, body)
                    return
                selector = query.get("fieldSelector", [""])[0]
                if path != "/api/v1/nodes" or query.get("watch") not in (["1"], ["true"]):
                    self._reply(403, self._failure(403))  # no list of nodes: no RBAC for it
                    return
                if not selector.startswith("metadata.name="):
                    self._reply(400, self._failure(400))
                    return
                since = query.get("resourceVersion", [""])[0]
                timeout = float(query.get("timeoutSeconds", ["1800"])[0])
                self._stream(selector.removeprefix("metadata.name="), since, timeout)

            def _stream(self, name: str, since: str, timeout: float) -> None:
                q = api._watch(name, since)
                self.protocol_version = "HTTP/1.1"  # chunked transfer needs it
                self.close_connection = True
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                deadline = time.monotonic() + timeout
                try:
                    while (left := deadline - time.monotonic()) > 0:
                        try:
                            data = q.get(timeout=min(left, 0.05))
                        except queue.Empty:
                            if self._client_gone():
                                return
                            continue
                        if data is None:
                            break
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass  # the client went away
                finally:
                    api._unwatch(q)

            def _client_gone(self) -> bool:
                """A watch client sends nothing after its request: readable means closed."""
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    return False
                try:
                    return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
                except OSError:
                    return True

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                api._record(Request("POST", url.path, parse_qs(url.query), body))
                if api.down:
                    self.close_connection = True
                    return
                if not re.fullmatch(r"/api/v1/namespaces/[^/]+/events", url.path):
                    self._reply(404, self._failure(404))
                    return
                if api.events_status >= 300:
                    self._reply(api.events_status, self._failure(api.events_status))
                    return
                created = dict(body)
                created["metadata"] = {**body.get("metadata", {}), "name": "ev-1"}
                self._reply(api.events_status, created)

        return Handler
