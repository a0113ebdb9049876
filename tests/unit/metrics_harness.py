"""A Harness with metrics and a pod notifier wired in as ``serve()`` wires them, a metrics scraper
over real HTTP, and a local stand-in for the Kubernetes API server."""

from __future__ import annotations

import json
import re
import threading
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
    """Serves ``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`` and accepts
    ``POST /api/v1/namespaces/<ns>/events``; records every request."""

    pods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # node -> pod objects
    pods_status: int = 200
    events_status: int = 201
    requests: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
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

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.body for r in self.requests if r.method == "POST"]

    def pod_lists(self) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET"]

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

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                api._record(Request("POST", url.path, parse_qs(url.query), body))
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
