"""Hostile parameter values through the real gRPC server: refused at once, with the right code,
with a short message, while the driver keeps answering everyone else."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi.logs import JsonFormatter
from csi.pods import PodRef
from csi.proto import csi_pb2 as pb
from csi.tools.kubelet import InlineVolume
from tests.unit.harness import Harness, code_of
from tests.unit.metrics_harness import MetricsHarness

Mode = pb.VolumeCapability.AccessMode.Mode
MILLION_DIGITS = "9" * 10**6
LONG = "A" * 10_000  # 10k characters of CO input
GENEROUS = 5.0  # seconds: a bound for a test on a shared machine, not a speed goal
MAX_MESSAGE = 300


class Events:
    """A notifier that records what the pod's owner would read in ``kubectl describe pod``."""

    def __init__(self) -> None:
        self.posted: list[tuple[PodRef, str, str]] = []

    def __call__(self, pod: PodRef, reason: str, message: str) -> None:
        self.posted.append((pod, reason, message))


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def mh(events: Events) -> Iterator[MetricsHarness]:
    h = MetricsHarness(notify=events)
    yield h
    h.close()


def request_for(harness: Harness, pod: str = "pod-a", **kwargs: Any) -> pb.NodePublishVolumeRequest:
    """The publish kubelet would send for an inline volume, its parent directory made."""
    assert harness.kubelet is not None
    kwargs.setdefault("attributes", {"size": "64Mi"})
    request: pb.NodePublishVolumeRequest = harness.kubelet.publish_request(
        InlineVolume(pod, "scratch", **kwargs)
    )
    os.makedirs(os.path.dirname(request.target_path), exist_ok=True)
    return request


def details(error: grpc.RpcError) -> str:
    return str(error.details())


def refusal(harness: Harness, request: pb.NodePublishVolumeRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        harness.node.NodePublishVolume(request, timeout=60)
    return err.value


# --- a million digits ----------------------------------------------------------------------


def test_a_million_digit_size_is_refused_at_once_and_others_are_still_answered(
    harness: Harness,
) -> None:
    """Parsing it used to hold the GIL for ~30 s per attempt: the whole driver froze."""
    requests = [request_for(harness, f"pod-{i}", attributes={"size": MILLION_DIGITS})
                for i in range(3)]  # fmt: skip
    start = time.monotonic()
    calls = [harness.node.NodePublishVolume.future(r, timeout=30) for r in requests]
    time.sleep(0.2)  # the three are on the server now
    harness.identity.Probe(pb.ProbeRequest(), timeout=GENEROUS)
    harness.node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=GENEROUS)
    for call in calls:
        error = call.exception(timeout=60)
        assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT, error
        assert len(details(error)) < MAX_MESSAGE
    assert time.monotonic() - start < GENEROUS
    assert harness.leftovers() == []


@pytest.mark.parametrize(
    "size", ["9" * 400 + "Gi", "9" * (10**6 + 1) + "Gi"], ids=["400-digits", "million-digits"]
)
def test_a_huge_size_is_refused_as_the_callers_mistake(harness: Harness, size: str) -> None:
    """Never INTERNAL (a million digits and Gi overflowed the decimal context)."""
    error = refusal(harness, request_for(harness, attributes={"size": size}))
    assert code_of(error) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
    assert "size" in details(error) and len(details(error)) < MAX_MESSAGE, details(error)


@pytest.mark.parametrize(
    "size", ["9" * 400 + "Gi", "9" * (10**6 + 1) + "Gi"], ids=["400-digits", "million-digits"]
)
def test_a_huge_size_in_a_storage_class_is_refused_as_the_callers_mistake(
    h: Harness, size: str
) -> None:
    request = h.provisioner.create_request("pvc-1", h.config.node_id, parameters={"size": size})
    with pytest.raises(grpc.RpcError) as err:
        h.controller.CreateVolume(request, timeout=60)
    assert code_of(err.value) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
    assert len(details(err.value)) < MAX_MESSAGE, details(err.value)


# --- 10k characters ------------------------------------------------------------------------


HOSTILE: dict[str, dict[str, Any]] = {
    "size": {"attributes": {"size": LONG}},
    "choice": {"attributes": {"backing": LONG}},
    "unknown-key": {"attributes": {LONG: "1"}},
    "co-key": {"attributes": {"csi.storage.k8s.io/serviceAccount.name": LONG}},
    "fs-type": {"fs_type": LONG},
    "mount-flag": {"mount_flags": [LONG]},
    "mount-flags": {"mount_flags": ["noatime"] * 1000},
}


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the log lines say, and the error each RPC log line carries."""
    return [f"{r.getMessage()} {getattr(r, 'fields', {}).get('error', '')}" for r in caplog.records]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_long_value_is_quoted_short_in_status_log_and_event(
    mh: MetricsHarness, events: Events, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    with caplog.at_level(logging.INFO):
        error = refusal(mh, request_for(mh, **HOSTILE[case]))
    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT
    message = details(error)
    assert len(message) < MAX_MESSAGE, message
    assert "A" * 100 not in message
    assert [r for r in caplog.records if r.name == "csi.rpc"], "the RPC was not logged"
    for line in logged(caplog):
        assert "A" * 100 not in line and len(line) < 2 * MAX_MESSAGE, line
    assert [(reason, text) for _, reason, text in events.posted] == [
        ("InvalidVolumeParameter", message)
    ]
    assert mh.leftovers() == []


def test_the_rpc_log_line_does_not_repeat_a_10k_value(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        refusal(harness, request_for(harness, attributes={"backing": LONG}))
    formatter = JsonFormatter()
    assert not any(LONG in formatter.format(r) for r in caplog.records)


# --- enums proto3 does not know ------------------------------------------------------------


def test_an_unknown_access_mode_is_invalid_argument_not_internal(harness: Harness) -> None:
    request = request_for(harness)
    request.volume_capability.access_mode.mode = 99  # type: ignore[assignment]
    error = refusal(harness, request)
    assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT, details(error)
    assert "access mode 99 is not supported" in details(error)


def test_a_pod_name_no_pod_could_have_gets_no_event() -> None:
    """kubelet's pod keys are bounded like Kubernetes names; a longer one names no pod, so no
    event (and no API warning) repeats it."""
    from csi.pods import pod_of

    keys = {"csi.storage.k8s.io/pod.namespace": "default", "csi.storage.k8s.io/pod.uid": "u"}
    assert pod_of({**keys, "csi.storage.k8s.io/pod.name": "web-0"}) is not None
    assert pod_of({**keys, "csi.storage.k8s.io/pod.name": "x" * 10_000}) is None
