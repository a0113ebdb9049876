"""Per-namespace limits: parsing the flags, enforcement for inline volumes and PVCs (and their
growth), the gRPC code and the pod's event, nothing left behind, and bounded metric labels."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from csi.config import Config, add_flags, from_args
from csi.errors import (
    InvalidArgument,
    NamespaceLimitExceeded,
    ResourceExhausted,
    status_code_name,
)
from csi.journal import CREATING, Record
from csi.kube import KubeApi, PodEvents
from csi.limits import (
    MAX_OVERRIDES_LENGTH,
    OTHER,
    Limit,
    NamespaceLimits,
    Used,
    check,
    namespace_of,
    parse_overrides,
    register_namespace_metrics,
    usage,
)
from csi.params import VolumeSpec
from tests.unit.harness import Harness, fails
from tests.unit.metrics_harness import FakeApiServer, MetricsHarness

MiB = 1024**2
GiB = 1024**3
SMALL = {"size": "64Mi"}
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def config(*argv: str, environ: dict[str, str] | None = None) -> Config:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return from_args("node", parser.parse_args(list(argv)), environ=environ or {})


def limits(max_bytes: int = 0, max_volumes: int = 0, **overrides: Limit) -> NamespaceLimits:
    return NamespaceLimits(Limit(max_bytes, max_volumes), tuple(sorted(overrides.items())))


def inline(volume_id: str, namespace: str | None, size: int = 64 * MiB) -> Record:
    pod = {"name": "demo", "uid": volume_id} | ({"namespace": namespace} if namespace else {})
    return Record(volume_id=volume_id, state=CREATING, spec=VolumeSpec(size=size),
                  target_path="/t", pod=pod)  # fmt: skip


def pvc(volume_id: str, claim: str, size: int = 64 * MiB) -> Record:
    return Record(volume_id=volume_id, state=CREATING, spec=VolumeSpec(size=size),
                  target_path="", name=f"pv-{volume_id}", claim=claim)  # fmt: skip


# --- configuration ------------------------------------------------------------------------
def test_no_limit_is_the_drivers_default() -> None:
    c = config()
    assert c.namespace_limits == NamespaceLimits() == Config().namespace_limits
    assert not c.namespace_limits.enabled
    records = [inline(f"v{i}", "team-a") for i in range(50)]
    check(c.namespace_limits, inline("new", "team-a", 1024**4), records, new_volume=True)


def test_flags_env_and_overrides() -> None:
    overrides = json.dumps({"team-a": {"bytes": "10Gi", "volumes": 4}, "ci": {"volumes": 64},
                            "batch": {"bytes": 0}, "raw": {"bytes": 1048576}})  # fmt: skip
    c = config("--namespace-max-bytes", "100Gi", "--namespace-limits", overrides,
               environ={"NAMESPACE_MAX_VOLUMES": "32", "NAMESPACE_MAX_BYTES": "1Gi"})
    nl = c.namespace_limits
    assert nl.default == Limit(100 * GiB, 32)  # the flag wins over the env var
    assert nl.of("team-a") == Limit(10 * GiB, 4)
    assert nl.of("ci") == Limit(100 * GiB, 64)  # a kind left out keeps the default share
    assert nl.of("batch") == Limit(0, 32)  # 0 lifts the byte limit for that namespace
    assert nl.of("raw") == Limit(MiB, 32)  # a plain number of bytes
    assert nl.of("anyone-else") == nl.default
    assert [name for name, _ in nl.overrides] == ["batch", "ci", "raw", "team-a"]
    assert nl.enabled
    hash(c)  # the config stays hashable (frozen)
    env = config(environ={"NAMESPACE_LIMITS": '{"x": {"volumes": 1}}'})
    assert env.namespace_limits.of("x") == Limit(0, 1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--namespace-max-bytes", "lots"), "--namespace-max-bytes"),
        (("--namespace-max-bytes=-1Gi",), "--namespace-max-bytes"),
        (("--namespace-max-volumes", "many"), "--namespace-max-volumes"),
        (("--namespace-max-volumes", "-1"), "--namespace-max-volumes must be 0"),
        (("--namespace-limits", "{team-a: 1}"), "not valid JSON"),
        (("--namespace-limits", '["team-a"]'), "must be a JSON object"),
        (("--namespace-limits", '{"Team-A": {"volumes": 1}}'), '"Team-A" is not a namespace'),
        (("--namespace-limits", '{"-a": {"volumes": 1}}'), "DNS-1123"),
        (("--namespace-limits", json.dumps({"a" * 64: {"volumes": 1}})), "DNS-1123"),
        (("--namespace-limits", '{"a.b": {"volumes": 1}}'), "DNS-1123"),
        (("--namespace-limits", '{"a": 4}'), "namespace a must map to an object"),
        (("--namespace-limits", '{"a": {"byte": "1Gi"}}'), 'unknown key "byte"'),
        (("--namespace-limits", '{"a": {"bytes": "lots"}}'), "namespace a: bytes: 'lots'"),
        (("--namespace-limits", '{"a": {"bytes": -5}}'), "0 or more"),
        (("--namespace-limits", '{"a": {"bytes": 1.5}}'), "bytes must be a quantity"),
        (("--namespace-limits", '{"a": {"volumes": "4"}}'), "volumes must be a whole number"),
        (("--namespace-limits", '{"a": {"volumes": true}}'), "volumes must be a whole number"),
        (("--namespace-limits", '{"a": {"volumes": -1}}'), "volumes must be a whole number"),
        (("--namespace-limits", '{"a": {}, "a": {"volumes": 1}}'), '"a" twice'),
    ],
)
def test_bad_values_are_refused_with_a_message_to_act_on(argv: tuple[str, ...],
                                                         message: str) -> None:  # fmt: skip
    with pytest.raises(InvalidArgument) as err:
        config(*argv)
    assert message in str(err.value)


def test_the_length_is_bounded_before_the_json_parser_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entry = '"team-%04d": {"volumes": 1}'
    text = "{" + ", ".join(entry % i for i in range(3000)) + "}"
    assert len(text) > MAX_OVERRIDES_LENGTH

    def no_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the JSON parser saw an over-long input")

    monkeypatch.setattr("csi.limits.json.loads", no_parse)
    with pytest.raises(InvalidArgument, match=f"more than the {MAX_OVERRIDES_LENGTH} accepted"):
        parse_overrides(text, Limit())
    monkeypatch.undo()
    fits = "{" + ", ".join(entry % i for i in range(2000)) + "}"
    assert len(fits) <= MAX_OVERRIDES_LENGTH
    assert len(parse_overrides(fits, Limit())) == 2000
    assert parse_overrides("", Limit()) == parse_overrides("  ", Limit()) == ()


# --- who is charged -----------------------------------------------------------------------
def test_the_namespace_a_record_is_charged_to() -> None:
    assert namespace_of(inline("v1", "team-a")) == "team-a"
    assert namespace_of(inline("v2", None)) == ""
    assert namespace_of(pvc("v3", "team-b/claim-1")) == "team-b"
    assert namespace_of(pvc("v4", "")) == ""  # no --extra-create-metadata
    assert namespace_of(pvc("v5", "/claim-1")) == ""
    records = [inline("v1", "team-a", 64 * MiB), inline("v2", None, GiB),
               pvc("v3", "team-a/c", 32 * MiB), pvc("v4", "")]  # fmt: skip
    assert usage(records) == {"team-a": Used(96 * MiB, 2)}


def test_a_volume_of_no_namespace_is_never_refused() -> None:
    nl = limits(max_bytes=MiB, max_volumes=1)
    others = [inline("v1", None), pvc("v2", "")]
    check(nl, inline("v3", None, GiB), others, new_volume=True)
    check(nl, pvc("v4", "", GiB), others, new_volume=True)


# --- enforcement over gRPC: inline volumes ------------------------------------------------
@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(mode="all", namespace_limits=limits(
        max_bytes=256 * MiB, max_volumes=2,
        roomy=Limit(0, 0), small=Limit(max_bytes=100 * MiB)))  # fmt: skip
    yield harness
    harness.close()


def test_inline_volume_count_limit(h: Harness) -> None:
    h.publish("a1", namespace="team-a", attributes=SMALL)
    h.publish("a2", namespace="team-a", attributes=SMALL)
    before = h.leftovers()
    details = fails(lambda: h.publish("a3", namespace="team-a", attributes=SMALL), EXHAUSTED)
    assert "namespace team-a already has 2 volumes on this node" in details
    assert "its limit of volumes is 2 (default share, --namespace-max-volumes)" in details
    assert "delete one of its volumes" in details and "--namespace-limits" in details
    assert h.leftovers() == before  # the refused volume made nothing and wrote no record
    assert h.record(h.volume_id("a3")) is None
    h.publish("b1", namespace="team-b", attributes=SMALL)  # another namespace has its own share
    for pod in ("r1", "r2", "r3"):  # an override without limits
        h.publish(pod, namespace="roomy", attributes=SMALL)
    h.unpublish("a1")
    h.publish("a3", namespace="team-a", attributes=SMALL)  # room again once one is gone


def test_inline_byte_limit_names_used_and_left(h: Harness) -> None:
    h.publish("s1", namespace="small", attributes=SMALL)
    details = fails(lambda: h.publish("s2", namespace="small", attributes=SMALL), EXHAUSTED)
    assert "namespace small would use 128Mi on this node with this volume (64Mi)" in details
    assert "over its limit of bytes, 100Mi (override)" in details
    assert "64Mi is used by its 1 other volumes, 36Mi left" in details
    assert "--namespace-max-bytes" not in details  # an override is not the default's flag
    assert h.record(h.volume_id("s2")) is None
    h.publish("s3", namespace="small", attributes={"size": "32Mi"})  # what is left still fits
    details = fails(lambda: h.publish("a1", namespace="team-a", attributes={"size": "300Mi"}),
                    EXHAUSTED)  # fmt: skip
    assert "limit of bytes, 256Mi (default share, --namespace-max-bytes)" in details


def test_node_limits_still_apply_beside_the_namespace_ones() -> None:
    h = Harness(capacity=128 * MiB, namespace_limits=limits(max_volumes=10))
    try:
        h.publish("a1", namespace="team-a", attributes=SMALL)
        h.publish("b1", namespace="team-b", attributes=SMALL)
        details = fails(lambda: h.publish("c1", namespace="team-c", attributes=SMALL), EXHAUSTED)
        assert "budget" in details and "namespace" not in details
    finally:
        h.close()


# --- enforcement: PVCs (CreateVolume) and growth -------------------------------------------
def claim(namespace: str) -> dict[str, str]:
    return {"csi.storage.k8s.io/pvc/namespace": namespace}


def test_create_volume_counts_the_claims_namespace_with_its_inline_volumes(h: Harness) -> None:
    h.publish("a1", namespace="team-a", attributes=SMALL)
    pv = h.provision("pvc-1", 64 * MiB, parameters=claim("team-a"))
    assert h.record(pv.volume_id).claim == "team-a/claim-pvc-1"
    before = h.leftovers()
    request = h.provisioner.create_request("pvc-2", h.config.node_id, 64 * MiB,
                                           parameters=claim("team-a"))  # fmt: skip
    details = fails(lambda: h.controller.CreateVolume(request, timeout=30), EXHAUSTED)
    assert "namespace team-a already has 2 volumes" in details
    assert h.leftovers() == before  # no record reserved
    h.provision("pvc-3", 64 * MiB, parameters=claim("team-b"))
    # a claim whose namespace the provisioner did not pass is charged to no namespace
    h.provision("pvc-4", 64 * MiB, parameters=claim(""))
    h.provision("pvc-5", 64 * MiB, parameters=claim(""))
    h.provision("pvc-6", 64 * MiB, parameters=claim(""))


def test_growth_checks_bytes_and_not_the_count(h: Harness) -> None:
    pv = h.provision("pvc-1", 64 * MiB, parameters=claim("team-a"))
    h.provision("pvc-2", 64 * MiB, parameters=claim("team-a"))  # the namespace's count is full
    h.k.stage(pv)
    assert h.k.expand(pv, 128 * MiB) == 128 * MiB  # growth does not count volumes
    details = fails(lambda: h.k.expand(pv, 256 * MiB), EXHAUSTED)  # 256 + 64 > 256Mi
    assert f"volume {pv.volume_id} grown" in details and "namespace team-a" in details
    assert "limit of bytes, 256Mi" in details
    record = h.record(pv.volume_id)
    assert (record.spec.size, record.grow_to, record.charge) == (128 * MiB, 0, 128 * MiB)
    assert h.host.files[h.volumes.names(pv.volume_id).backing].size == 128 * MiB
    assert h.k.expand(pv, 192 * MiB) == 192 * MiB  # exactly the limit fits


def test_controller_expand_of_a_reserved_volume_checks_the_namespace(h: Harness) -> None:
    pv = h.provision("pvc-1", 64 * MiB, parameters=claim("small"))
    details = fails(lambda: h.provisioner.expand(pv.volume_id, 128 * MiB), EXHAUSTED)
    assert "namespace small" in details
    assert h.record(pv.volume_id).charge == 64 * MiB
    assert h.provisioner.expand(pv.volume_id, 96 * MiB).capacity_bytes == 96 * MiB


# --- the error, its code and the pod's event ---------------------------------------------
def test_the_error_is_resource_exhausted() -> None:
    error = NamespaceLimitExceeded("full", namespace="team-a", limit="bytes")
    assert isinstance(error, ResourceExhausted)
    assert status_code_name(error) == "RESOURCE_EXHAUSTED"
    assert (error.namespace, error.limit) == ("team-a", "bytes")


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


def test_refusal_posts_a_namespace_limit_event_on_the_pod(api_server: FakeApiServer) -> None:
    api = KubeApi.connect(Config(kube_api_url=api_server.url, node_id="node-1"), {})
    assert api is not None
    h = MetricsHarness(notify=PodEvents(api), capacity=128 * MiB,
                       namespace_limits=limits(max_volumes=1))  # fmt: skip
    try:
        h.publish("uid-1", namespace="team-a", attributes=SMALL)
        fails(lambda: h.publish("uid-2", namespace="team-a", attributes=SMALL), EXHAUSTED)
        [event] = api_server.events()
        assert event["reason"] == "NamespaceLimitExceeded"  # not the base class's reason
        assert event["type"] == "Warning"
        assert event["involvedObject"]["namespace"] == "team-a"
        assert event["involvedObject"]["uid"] == "uid-2"
        assert "namespace team-a" in event["message"]
        h.publish("uid-3", namespace="team-b", attributes=SMALL)
        fails(lambda: h.publish("uid-4", namespace="team-c", attributes=SMALL), EXHAUSTED)
        assert api_server.events()[-1]["reason"] == "CapacityExhausted"  # the node's budget
    finally:
        h.close()
        api.close()


# --- metrics ------------------------------------------------------------------------------
def test_metrics_per_namespace_with_bounded_labels() -> None:
    h = MetricsHarness(namespace_limits=limits(
        max_bytes=GiB, max_volumes=2, kept=Limit(max_volumes=1)))  # fmt: skip
    try:
        register_namespace_metrics(h.registry, h.volumes.capacity, max_series=3)
        sizes = {"big": 256, "mid": 128, "low": 64, "tiny": 32}
        for namespace, mib in sizes.items():
            h.publish(f"{namespace}-1", namespace=namespace, attributes={"size": f"{mib}Mi"})
        h.publish("none-1", namespace="", attributes=SMALL)  # no namespace: not counted
        s = h.scrape()
        labels = {lab["namespace"] for lab, _ in s.find("luks_ephemeral_namespace_bytes")}
        # the override is always labelled, then the largest users, the rest summed
        assert labels == {"kept", "big", "mid", OTHER}
        assert s.value("luks_ephemeral_namespace_bytes", namespace="kept") == 0
        assert s.value("luks_ephemeral_namespace_bytes", namespace="big") == 256 * MiB
        assert s.value("luks_ephemeral_namespace_bytes", namespace=OTHER) == 96 * MiB
        assert s.value("luks_ephemeral_namespace_volumes", namespace=OTHER) == 2
        assert s.value("luks_ephemeral_namespace_limit_volumes", namespace="kept") == 1
        assert s.value("luks_ephemeral_namespace_limit_bytes", namespace="kept") == 0  # none
        assert s.value("luks_ephemeral_namespace_limit_bytes", namespace="_default") == GiB
        assert s.value("luks_ephemeral_namespace_refusals_total", namespace=OTHER,
                       limit="volumes") == 0  # fmt: skip

        h.publish("kept-1", namespace="kept", attributes=SMALL)
        fails(lambda: h.publish("kept-2", namespace="kept", attributes=SMALL), EXHAUSTED)
        h.publish("tiny-2", namespace="tiny", attributes=SMALL)
        fails(lambda: h.publish("tiny-3", namespace="tiny", attributes=SMALL), EXHAUSTED)
        fails(lambda: h.publish("low-2", namespace="low", attributes={"size": "2Gi"}), EXHAUSTED)
        fails(lambda: h.publish("mid-2", namespace="mid", attributes={"size": "2Gi"}), EXHAUSTED)
        s = h.scrape()
        refusals = {(lab["namespace"], lab["limit"]): v
                    for lab, v in s.find("luks_ephemeral_namespace_refusals_total")}  # fmt: skip
        # a refused namespace keeps its own series while there is room (3 here), later ones
        # are counted under _other
        assert refusals == {("kept", "volumes"): 1, ("tiny", "volumes"): 1, ("low", "bytes"): 1,
                            ("_other", "bytes"): 1, ("_other", "volumes"): 0}  # fmt: skip
        for name in ("bytes", "volumes", "limit_bytes", "limit_volumes"):
            found = s.find(f"luks_ephemeral_namespace_{name}")
            assert len(found) <= 3 + 1, (name, found)
        labels = {lab["namespace"] for lab, _ in s.find("luks_ephemeral_namespace_volumes")}
        assert labels == {"kept", "tiny", "low", OTHER}  # the refused keep theirs, not "big"
        total = sum(v for _, v in s.find("luks_ephemeral_namespace_volumes"))
        assert total == 6  # every volume of a namespace, once; the one of no namespace is not
    finally:
        h.close()
