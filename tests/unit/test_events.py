"""Events on the pod for refusals its owner must act on, through a local API server stand-in."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi.__main__ import ClusterIntegration
from csi.config import Config
from csi.kube import OFF_MESSAGE, KubeApi, KubeError, PodEvents
from csi.pods import PodRef, no_notify
from csi.volumes import Volumes
from tests.unit.harness import code_of
from tests.unit.metrics_harness import FakeApiServer, MetricsHarness

MiB = 1024**2
DRIVER = "luks-ephemeral.csi.io"
IN_A_POD = os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


def connect(api_server: FakeApiServer, node_id: str = "node-1") -> KubeApi:
    api = KubeApi.connect(Config(kube_api_url=api_server.url, node_id=node_id), {})
    assert api is not None
    return api


@pytest.fixture
def events_harness(api_server: FakeApiServer) -> Iterator[MetricsHarness]:
    api = connect(api_server)
    h = MetricsHarness(notify=PodEvents(api), capacity=256 * MiB)
    yield h
    h.close()
    api.close()


def refused(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return code_of(err.value)


def test_bad_parameter_posts_a_warning_on_the_pod(
    events_harness: MetricsHarness, api_server: FakeApiServer
) -> None:
    h = events_harness
    code = refused(lambda: h.publish("uid-1", attributes={"size": "64Mi", "colour": "blue"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    [request] = [r for r in api_server.requests if r.method == "POST"]
    assert request.path == "/api/v1/namespaces/default/events"
    event = request.body
    assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "default",
                                       "name": "demo", "uid": "uid-1"}  # fmt: skip
    assert event["metadata"]["namespace"] == "default"
    assert event["metadata"]["generateName"] == "demo."
    assert event["reason"] == "InvalidVolumeParameter"
    assert event["type"] == "Warning"
    assert "colour" in event["message"]
    assert event["source"] == {"component": DRIVER, "host": "node-1"}
    assert event["reportingComponent"] == DRIVER
    assert event["reportingInstance"] == "node-1"
    assert event["count"] == 1
    assert event["firstTimestamp"] and event["lastTimestamp"]
    assert h.leftovers() == []


def test_capacity_exhaustion_posts_a_warning_on_the_pod(
    events_harness: MetricsHarness, api_server: FakeApiServer
) -> None:
    h = events_harness  # budget 256 MiB
    h.publish("uid-1", attributes={"size": "200Mi"})
    assert api_server.events() == []
    code = refused(lambda: h.publish("uid-2", attributes={"size": "100Mi"}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    [event] = api_server.events()
    assert event["reason"] == "CapacityExhausted"
    assert event["involvedObject"]["uid"] == "uid-2"
    assert event["involvedObject"]["name"] == "demo"
    assert event["involvedObject"]["namespace"] == "default"
    assert "budget" in event["message"]


def test_event_goes_to_the_pods_own_namespace(
    events_harness: MetricsHarness, api_server: FakeApiServer
) -> None:
    h = events_harness
    assert h.kubelet is not None
    request = h.publish_request("uid-9", attributes={"size": "2Ti"})
    request.volume_context["csi.storage.k8s.io/pod.namespace"] = "team-a"
    request.volume_context["csi.storage.k8s.io/pod.name"] = "trainer-0"
    with pytest.raises(grpc.RpcError) as err:
        h.node.NodePublishVolume(request, timeout=30)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT  # above --max-size
    [request_seen] = [r for r in api_server.requests if r.method == "POST"]
    assert request_seen.path == "/api/v1/namespaces/team-a/events"
    assert request_seen.body["involvedObject"]["name"] == "trainer-0"
    assert request_seen.body["involvedObject"]["namespace"] == "team-a"


def test_no_event_for_a_successful_publish(
    events_harness: MetricsHarness, api_server: FakeApiServer
) -> None:
    events_harness.publish("uid-1", attributes={"size": "64Mi"})
    events_harness.unpublish("uid-1")
    assert api_server.requests == []


def test_no_event_for_errors_the_pod_owner_cannot_fix(
    events_harness: MetricsHarness, api_server: FakeApiServer
) -> None:
    h = events_harness
    h.publish("uid-1", attributes={"size": "64Mi"})
    h.host.fail("mkfs")
    assert refused(lambda: h.publish("uid-2", attributes={"size": "64Mi"})) == (
        grpc.StatusCode.INTERNAL
    )
    request = h.publish_request("uid-3", attributes={"size": "64Mi"})
    request.target_path = "/etc/evil"  # kubelet's problem, not the pod's
    with pytest.raises(grpc.RpcError) as err:
        h.node.NodePublishVolume(request, timeout=30)
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    assert api_server.events() == []


def test_same_refusal_is_posted_once_per_window(
    events_harness: MetricsHarness, api_server: FakeApiServer
) -> None:
    h = events_harness
    for _ in range(3):  # kubelet retrying with backoff
        refused(lambda: h.publish("uid-1", attributes={"size": "64Mi", "colour": "blue"}))
    refused(lambda: h.publish("uid-2", attributes={"size": "64Mi", "colour": "blue"}))
    assert [e["involvedObject"]["uid"] for e in api_server.events()] == ["uid-1", "uid-2"]


def test_window_expiry_posts_again(api_server: FakeApiServer) -> None:
    now = [0.0]
    api = connect(api_server)
    notify = PodEvents(api, window=600, clock=lambda: now[0])
    pod = PodRef("default", "demo", "uid-1")
    notify(pod, "CapacityExhausted", "full")
    now[0] = 599
    notify(pod, "CapacityExhausted", "full")
    now[0] = 600
    notify(pod, "CapacityExhausted", "full")
    assert len(api_server.events()) == 2
    api.close()


@pytest.mark.parametrize("status", [500, 403, 409])
def test_failing_events_endpoint_does_not_change_the_rpc_result(
    events_harness: MetricsHarness, api_server: FakeApiServer, status: int
) -> None:
    api_server.events_status = status
    h = events_harness
    code = refused(lambda: h.publish("uid-1", attributes={"size": "64Mi", "colour": "blue"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    h.publish("uid-2", attributes={"size": "200Mi"})
    code = refused(lambda: h.publish("uid-3", attributes={"size": "100Mi"}))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(api_server.events()) == 2  # it tried
    # a failed post is not remembered as posted: kubelet's retry tries again
    refused(lambda: h.publish("uid-1", attributes={"size": "64Mi", "colour": "blue"}))
    assert len(api_server.events()) == 3


def test_unreachable_api_server_does_not_change_the_rpc_result() -> None:
    server = FakeApiServer()
    api = connect(server)
    server.close()  # nobody listens there any more
    h = MetricsHarness(notify=PodEvents(api))
    try:
        code = refused(lambda: h.publish("uid-1", attributes={"size": "64Mi", "colour": "x"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        h.close()
        api.close()


def test_a_raising_notifier_does_not_change_the_rpc_result() -> None:
    calls: list[tuple[PodRef, str, str]] = []

    def explode(pod: PodRef, reason: str, message: str) -> None:
        calls.append((pod, reason, message))
        raise RuntimeError("notifier bug")

    h = MetricsHarness(notify=explode)
    try:
        code = refused(lambda: h.publish("uid-1", attributes={"size": "64Mi", "colour": "x"}))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        h.publish("uid-2", attributes={"size": "64Mi"})  # and the server still works
    finally:
        h.close()
    assert [(p.uid, r) for p, r, _ in calls] == [("uid-1", "InvalidVolumeParameter")]


def test_api_errors_are_typed(api_server: FakeApiServer) -> None:
    api = connect(api_server)
    api_server.pods_status = 500
    with pytest.raises(KubeError, match="500"):
        api.pods_on_node("node-1")
    api_server.events_status = 500
    with pytest.raises(KubeError, match="500"):
        api.event("default", "demo", "uid-1", "CapacityExhausted", "full")
    api.close()


def test_long_messages_are_truncated(api_server: FakeApiServer) -> None:
    api = connect(api_server)
    api.event("default", "demo", "uid-1", "InvalidVolumeParameter", "x" * 5000)
    [event] = api_server.events()
    assert len(event["message"]) == 1024 and event["message"].endswith("...")
    api.close()


# --- without API access -------------------------------------------------------------------


def test_without_api_config_integration_is_off_and_says_so_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Any
) -> None:
    config = Config(state_dir=str(tmp_path / "state"), data_dir=str(tmp_path / "data"),
                    kubelet_root=str(tmp_path / "kubelet"))  # fmt: skip
    with caplog.at_level(logging.INFO):
        from csi.host.fake import FakeHost

        cluster = ClusterIntegration.connect(config, Volumes(config, FakeHost()), environ={})
        cluster.start(0.01)
        cluster.stop()
    assert cluster.api is None
    assert cluster.reaper is None
    assert cluster.notify is no_notify
    assert [r.getMessage() for r in caplog.records].count(OFF_MESSAGE) == 1


def test_refusals_without_api_access_log_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert KubeApi.connect(Config(), environ={}) is None
        h = MetricsHarness()
        try:
            for _ in range(3):
                refused(lambda: h.publish("uid-1", attributes={"size": "64Mi", "colour": "x"}))
        finally:
            h.close()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count(OFF_MESSAGE) == 1
    assert not any("event" in m.lower() for m in messages if m != OFF_MESSAGE)


@pytest.mark.skipif(IN_A_POD, reason="running inside a pod: in-cluster credentials exist")
def test_in_cluster_without_a_service_account_token_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with caplog.at_level(logging.INFO):
        assert KubeApi.connect(Config(), environ=environ) is None
    assert [r.getMessage() for r in caplog.records].count(OFF_MESSAGE) == 1


def test_kube_api_url_wins_over_in_cluster(api_server: FakeApiServer) -> None:
    environ = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    api = KubeApi.connect(Config(kube_api_url=api_server.url), environ=environ)
    assert api is not None
    api_server.add_pod("node-1", "uid-1")
    assert api.pods_on_node("node-1") == {"uid-1"}
    api.close()
