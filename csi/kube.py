"""The driver's only window on the Kubernetes API: list this node's pods, read and watch this
node's annotations, post events on pods and on the node.

Least privilege: ``list`` on pods (always with ``fieldSelector=spec.nodeName=<node>``), ``get``
and ``watch`` on nodes (only this node: by name, and a watch with
``fieldSelector=metadata.name=<node>``; never a plain list, never a write), and ``create`` on
events. Responses are read as plain JSON (``_preload_content=False``), so a field the generated
models do not know, or a required field a stand-in leaves out, cannot break us; a watch is read
line by line, each line bounded.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client takes seconds to import: load it only when API access is on
    from kubernetes import client as k8s

from csi import __version__
from csi.config import Config
from csi.pods import PodRef

log = logging.getLogger(__name__)

OFF_MESSAGE = (
    "cluster integration off: no API access (orphan reaper, pod events and the node shred "
    "annotation disabled)"
)
LIST_TIMEOUT = (5.0, 15.0)  # connect, read (seconds)
WATCH_CONNECT_TIMEOUT = 5.0
# the server ends a watch at timeoutSeconds: a socket silent for this much longer is dead
WATCH_READ_SLACK = 30.0
# one watch event is one whole Node object: typically a few kB (images and conditions included);
# a longer line is not a Node we know, and is refused rather than buffered without end
MAX_WATCH_LINE = 1 << 20
WATCH_READ_SIZE = 64 * 1024  # bytes per read: a chunk larger than this is read in pieces
EVENT_TIMEOUT = (3.0, 5.0)  # short: events are posted while a refused RPC waits for its answer
MAX_MESSAGE = 1024  # what `kubectl describe` shows comfortably; events.k8s.io caps notes at 1 kB
# A static pod's uid (what kubelet passes us as csi.storage.k8s.io/pod.uid) is its config hash;
# its mirror pod in the API server has a uid of its own and carries the hash in these.
STATIC_POD_ANNOTATIONS = ("kubernetes.io/config.hash", "kubernetes.io/config.mirror")


class KubeError(Exception):
    """The API server could not be reached, or refused or failed the request."""


class WatchExpired(KubeError):
    """The watch's resourceVersion is too old (410 Gone): read the object again and watch from
    now (an object's own resourceVersion is as old as its last change, so it may be too old
    again)."""


NodeEvent = tuple[str, dict[str, str], str]  # (watch event type, annotations, resourceVersion)


class KubeApi:
    """A small typed wrapper over ``CoreV1Api``; every failure surfaces as ``KubeError``."""

    def __init__(self, api_client: k8s.ApiClient, driver_name: str, node_id: str) -> None:
        from kubernetes import client as k8s

        self.api_client = api_client
        self.core = k8s.CoreV1Api(api_client)
        self.driver_name = driver_name
        self.node_id = node_id

    @classmethod
    def connect(cls, config: Config, environ: Mapping[str, str]) -> KubeApi | None:
        """In-cluster credentials, or ``--kube-api-url`` (no credentials, dev/tests), or None.

        Returns None, and logs so once, when there is no API access: then the orphan reaper and
        pod events are off and the driver otherwise works as before.
        """
        if not (config.kube_api_url or environ.get("KUBERNETES_SERVICE_HOST")):
            log.warning(OFF_MESSAGE)
            return None
        from kubernetes import client as k8s
        from kubernetes.config.config_exception import ConfigException
        from kubernetes.config.incluster_config import (
            SERVICE_CERT_FILENAME,
            SERVICE_TOKEN_FILENAME,
            InClusterConfigLoader,
        )

        configuration = k8s.Configuration()
        if config.kube_api_url:
            configuration.host = config.kube_api_url
        else:
            try:
                loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
                    token_filename=SERVICE_TOKEN_FILENAME,
                    cert_filename=SERVICE_CERT_FILENAME,
                    environ=environ,
                )
                loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
            except ConfigException as exc:
                log.warning(OFF_MESSAGE, extra={"fields": {"reason": str(exc)}})
                return None
        configuration.retries = 1
        api_client = k8s.ApiClient(configuration)
        api_client.user_agent = f"luks-ephemeral-csi/{__version__}"
        log.info("cluster integration on: API server %s", configuration.host)
        return cls(api_client, config.driver_name, config.node_id)

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]

    def pods_on_node(self, node: str) -> set[str]:
        """Every id a live pod on ``node`` (any phase) goes by: uids, and static pods' hashes."""
        # resourceVersion=0 lets the API server answer from its watch cache (indexed by node)
        # instead of reading every pod of the cluster from etcd each round on every node; a few
        # seconds of staleness are harmless next to the reaper's grace period.
        data = self._call(
            "list pods",
            lambda: self.core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node}", resource_version="0",
                _preload_content=False, _request_timeout=LIST_TIMEOUT,
            ),
        )  # fmt: skip
        try:
            items = data["items"] or []
            return {alive for item in items for alive in alive_ids(item["metadata"])}
        except KeyError as exc:
            raise KubeError(f"list pods: unexpected response: missing {exc}") from None
        except (TypeError, AttributeError) as exc:  # e.g. annotations that are not a map
            raise KubeError(f"list pods: unexpected response: {exc}") from None

    def node_annotations(self, name: str) -> tuple[dict[str, str], str]:
        """The Node's annotations and its resourceVersion (to start a watch from)."""
        data = self._call(
            "read node",
            lambda: self.core.read_node(name, _preload_content=False,
                                        _request_timeout=LIST_TIMEOUT),
        )  # fmt: skip
        return node_metadata(data, "read node")

    def watch_node(self, name: str, resource_version: str, timeout_seconds: int) -> NodeWatch:
        """Changes to the Node ``name`` after ``resource_version``, for up to ``timeout_seconds``;
        with ``resource_version`` "" from now on, after the Node's current state as ADDED.

        A watch on the collection with ``fieldSelector=metadata.name=<name>`` (RBAC: ``watch`` on
        nodes; there is no watch of a single object by path). The result iterates over
        ``(type, annotations, resourceVersion)``: ADDED, MODIFIED, DELETED, and BOOKMARK (whose
        annotations are empty and mean nothing: it only moves the resourceVersion on). It raises
        ``WatchExpired`` on a 410, ``KubeError`` on anything else that goes wrong, and simply
        ends when the server ends the watch. ``close()`` may be called from another thread to
        end a blocked read at once.
        """
        what = "watch node"
        try:
            response = self.core.list_node(
                field_selector=f"metadata.name={name}", watch=True,
                resource_version=resource_version or None, timeout_seconds=timeout_seconds,
                allow_watch_bookmarks=True, _preload_content=False,
                _request_timeout=(WATCH_CONNECT_TIMEOUT, timeout_seconds + WATCH_READ_SLACK),
            )  # fmt: skip
        except Exception as exc:
            raise api_error(what, exc) from None
        return NodeWatch(response, what)

    def event(
        self,
        namespace: str,
        pod_name: str,
        pod_uid: str,
        reason: str,
        message: str,
        type: str = "Warning",
    ) -> None:
        """Post a core/v1 Event about the pod, as ``kubectl describe pod`` shows it."""
        self._post_event(namespace, "Pod", pod_name, pod_uid or None, reason, message, type)

    def node_event(self, reason: str, message: str, type: str = "Warning") -> None:
        """Post a core/v1 Event about this node, as ``kubectl describe node`` shows it: in
        namespace ``default`` with the node's name as uid, as kubelet posts its own."""
        self._post_event("default", "Node", self.node_id, self.node_id, reason, message, type)

    def _post_event(
        self,
        namespace: str,
        kind: str,
        name: str,
        uid: str | None,
        reason: str,
        message: str,
        type: str,
    ) -> None:
        """One builder for every Event we post, so pod and node events cannot drift apart."""
        from kubernetes import client as k8s

        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name=f"{name}.", namespace=namespace),
            involved_object=k8s.V1ObjectReference(
                api_version="v1", kind=kind, name=name, uid=uid,
                namespace=namespace if kind != "Node" else None,
            ),
            reason=reason,
            message=message,
            type=type,
            count=1,
            first_timestamp=now,
            last_timestamp=now,
            source=k8s.V1EventSource(component=self.driver_name, host=self.node_id),
            reporting_component=self.driver_name,
            reporting_instance=self.node_id,
        )  # fmt: skip
        self._call(
            "create event",
            lambda: self.core.create_namespaced_event(
                namespace, body, _preload_content=False, _request_timeout=EVENT_TIMEOUT
            ),
        )

    @staticmethod
    def _call(what: str, request: Callable[[], Any]) -> Any:
        try:
            response = request()
            try:
                raw = response.data
            finally:
                response.release_conn()
        except Exception as exc:
            raise api_error(what, exc) from None
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise KubeError(f"{what}: the API server's answer is not JSON") from None


def api_error(what: str, exc: Exception) -> KubeError:
    """The KubeError for a failed request: the API server's status, or the transport's error."""
    from kubernetes import client as k8s

    if isinstance(exc, k8s.ApiException):
        cls = WatchExpired if exc.status == 410 else KubeError
        return cls(f"{what}: API server answered {exc.status} {exc.reason}")
    # urllib3 connection, TLS and timeout errors, among others
    return KubeError(f"{what}: {type(exc).__name__}: {exc}")


def node_metadata(data: Any, what: str) -> tuple[dict[str, str], str]:
    """(annotations, resourceVersion) of a Node object; anything malformed is a KubeError."""
    try:
        metadata = data["metadata"]
        annotations = metadata.get("annotations") or {}
        version = metadata.get("resourceVersion") or ""
        if not isinstance(annotations, dict) or not isinstance(version, str):
            raise TypeError("annotations must be a map and resourceVersion a string")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise TypeError("annotations must map strings to strings")
    except KeyError as exc:
        raise KubeError(f"{what}: unexpected response: missing {exc}") from None
    except (TypeError, AttributeError) as exc:
        raise KubeError(f"{what}: unexpected response: {exc}") from None
    return dict(annotations), version


class NodeWatch(Iterator[NodeEvent]):
    """One watch response, read as JSON lines of at most ``MAX_WATCH_LINE`` bytes each."""

    def __init__(self, response: Any, what: str) -> None:
        self.response = response
        self.what = what
        self._buffer = b""
        self._chunks: Iterator[bytes] | None = None
        self._closed = threading.Event()

    def __next__(self) -> NodeEvent:
        line = self._next_line()
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
            if not isinstance(kind, str) or not isinstance(obj, dict):
                raise TypeError("type must be a string and object a map")
        except ValueError:
            self.close()
            raise KubeError(f"{self.what}: a watch event is not JSON") from None
        except (KeyError, TypeError) as exc:
            self.close()
            raise KubeError(f"{self.what}: unexpected watch event: {exc}") from None
        if kind == "ERROR":  # a Status object: 410 Gone when our resourceVersion is too old
            self.close()
            code, message = obj.get("code"), str(obj.get("message", ""))[:200]
            cls = WatchExpired if code == 410 else KubeError
            raise cls(f"{self.what}: API server sent an error event {code}: {message}")
        try:
            annotations, version = node_metadata(obj, self.what)
        except KubeError:
            self.close()
            raise
        return kind, ({} if kind == "BOOKMARK" else annotations), version

    def _next_line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
                if line.strip():
                    return line
                continue
            if len(self._buffer) > MAX_WATCH_LINE:
                self.close()
                raise KubeError(f"{self.what}: a watch event is longer than {MAX_WATCH_LINE} bytes")
            chunk = self._read()
            if chunk is None:
                self.close()
                if self._buffer.strip():
                    raise KubeError(f"{self.what}: the watch ended inside an event")
                raise StopIteration
            self._buffer += chunk

    def _read(self) -> bytes | None:
        """The next piece of the body, or None at its end (or after ``close()``)."""
        if self._closed.is_set():
            return None
        try:
            if self._chunks is None:
                self._chunks = iter(self.response.stream(WATCH_READ_SIZE, decode_content=True))
            return next(self._chunks)
        except StopIteration:
            return None
        except Exception as exc:
            if self._closed.is_set():
                return None  # closed from another thread: that is an end, not an error
            self.close()
            raise api_error(self.what, exc) from None

    def close(self) -> None:
        """End the watch; safe from any thread, and more than once."""
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.response.shutdown()  # wakes a read blocked in another thread
        except Exception:  # e.g. already released, or a response without a socket
            pass
        try:
            self.response.release_conn()
        except Exception:
            pass


def alive_ids(metadata: dict[str, Any]) -> set[str]:
    """The pod's uid and, for a mirror pod, the uid kubelet gives its static pod: without the
    latter, every inline volume of a static pod would look orphaned and be reaped."""
    annotations = metadata.get("annotations") or {}
    hashes = {str(annotations[k]) for k in STATIC_POD_ANNOTATIONS if annotations.get(k)}
    return {str(metadata["uid"]), *hashes}


class PodEvents:
    """A NodeServicer notifier: posts a pod Warning event, never raises.

    kubelet retries a refused publish with backoff, for as long as the pod exists; the same
    (pod, reason, message) is posted at most once per ``window`` seconds so the pod's event list
    stays readable and the API server is not flooded.
    """

    MAX_REMEMBERED = 4096

    def __init__(
        self, api: KubeApi, window: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.api = api
        self.window = window
        self.clock = clock
        self._posted: dict[tuple[str, str, str, str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, pod: PodRef, reason: str, message: str) -> None:
        key = (pod.uid, pod.namespace, pod.name, reason, message)
        now = self.clock()
        with self._lock:
            last = self._posted.get(key)
            if last is not None and now - last < self.window:
                return
            self._posted = {k: t for k, t in self._posted.items() if now - t < self.window}
            if len(self._posted) >= self.MAX_REMEMBERED:
                self._posted.clear()
            self._posted[key] = now
        try:
            self.api.event(pod.namespace, pod.name, pod.uid, reason, message)
        except Exception as exc:
            with self._lock:
                self._posted.pop(key, None)  # not posted: the next retry may try again
            log.warning(
                "cannot post event %s on pod %s/%s: %s", reason, pod.namespace, pod.name, exc
            )
