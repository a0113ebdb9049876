"""The driver's only window on the Kubernetes API: list this node's pods, post events on pods.

Least privilege: ``list`` on pods (always with ``fieldSelector=spec.nodeName=<node>``) and
``create`` on events. Responses are read as plain JSON (``_preload_content=False``), so a field the
generated models do not know, or a required field a stand-in leaves out, cannot break us.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client takes seconds to import: load it only when API access is on
    from kubernetes import client as k8s

from csi import __version__
from csi.config import Config
from csi.pods import PodRef

log = logging.getLogger(__name__)

OFF_MESSAGE = "cluster integration off: no API access (orphan reaper and pod events disabled)"
LIST_TIMEOUT = (5.0, 15.0)  # connect, read (seconds)
EVENT_TIMEOUT = (3.0, 5.0)  # short: events are posted while a refused RPC waits for its answer
MAX_MESSAGE = 1024  # what `kubectl describe` shows comfortably; events.k8s.io caps notes at 1 kB
# A static pod's uid (what kubelet passes us as csi.storage.k8s.io/pod.uid) is its config hash;
# its mirror pod in the API server has a uid of its own and carries the hash in these.
STATIC_POD_ANNOTATIONS = ("kubernetes.io/config.hash", "kubernetes.io/config.mirror")


class KubeError(Exception):
    """The API server could not be reached, or refused or failed the request."""


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
        from kubernetes import client as k8s

        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        body = k8s.CoreV1Event(
            metadata=k8s.V1ObjectMeta(generate_name=f"{pod_name}.", namespace=namespace),
            involved_object=k8s.V1ObjectReference(
                api_version="v1", kind="Pod", namespace=namespace, name=pod_name,
                uid=pod_uid or None,
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
        from kubernetes import client as k8s

        try:
            response = request()
            try:
                raw = response.data
            finally:
                response.release_conn()
        except k8s.ApiException as exc:
            raise KubeError(f"{what}: API server answered {exc.status} {exc.reason}") from None
        except Exception as exc:  # urllib3 connection, TLS and timeout errors, among others
            raise KubeError(f"{what}: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise KubeError(f"{what}: the API server's answer is not JSON") from None


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
