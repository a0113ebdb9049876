"""The orphan reaper against a local API server stand-in, over real RPCs and the fake host."""

from __future__ import annotations

import argparse
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.__main__ import run
from csi.config import Config, add_flags, from_args
from csi.errors import InvalidArgument
from csi.host.fake import FakeHost
from csi.kube import OFF_MESSAGE, KubeApi
from csi.reaper import OrphanReaper
from csi.tools.kubelet import InlineVolume, Kubelet
from tests.unit.metrics_harness import FakeApiServer, MetricsHarness, Scrape

NODE = "node-1"
GRACE = 300.0
DRIVER_POD = "uid-driver"  # the driver's own DaemonSet pod is always on the node


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.add_pod(NODE, DRIVER_POD, name="luks-ephemeral-csi-node-x", namespace="kube-system")
    server.add_pod("node-2", "uid-elsewhere")
    yield server
    server.close()


@pytest.fixture
def mh() -> Iterator[MetricsHarness]:
    h = MetricsHarness()
    yield h
    h.close()


@pytest.fixture
def api(api_server: FakeApiServer) -> Iterator[KubeApi]:
    api = KubeApi.connect(Config(kube_api_url=api_server.url, node_id=NODE), {})
    assert api is not None
    yield api
    api.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def reaper(mh: MetricsHarness, api: KubeApi, clock: Clock) -> OrphanReaper:
    return OrphanReaper(mh.volumes, api, NODE, GRACE, clock)


def pod_gone(mh: MetricsHarness) -> float:
    return mh.scrape().value("luks_ephemeral_orphans_removed_total", reason="pod_gone")


def test_does_not_reap_within_grace_then_reaps_after(
    mh: MetricsHarness, api_server: FakeApiServer, reaper: OrphanReaper, clock: Clock
) -> None:
    api_server.add_pod(NODE, "uid-a")
    mh.publish("uid-a", attributes={"size": "64Mi"})
    mh.publish("uid-b", attributes={"size": "64Mi"})  # its pod is gone already
    assert reaper.run_once() == []
    assert set(reaper.missing) == {mh.volume_id("uid-b")}
    clock.now += GRACE  # exactly the grace period: not longer
    assert reaper.run_once() == []
    assert pod_gone(mh) == 0
    clock.now += 1
    assert reaper.run_once() == [mh.volume_id("uid-b")]
    assert pod_gone(mh) == 1
    assert reaper.missing == {}
    # uid-a is untouched; uid-b is gone without a trace
    assert mh.volumes.journal.load(mh.volume_id("uid-a")) is not None
    mh.unpublish("uid-a")
    assert mh.leftovers() == []
    assert mh.scrape().value("luks_ephemeral_shredded_total") == 2


def test_reaped_volume_leaves_nothing_behind(
    mh: MetricsHarness, reaper: OrphanReaper, clock: Clock
) -> None:
    mh.publish("uid-b", attributes={"size": "64Mi"})
    assert reaper.run_once() == []
    clock.now += GRACE + 1
    assert reaper.run_once() == [mh.volume_id("uid-b")]
    assert mh.leftovers() == []
    # kubelet's late unpublish of the same volume still succeeds
    mh.unpublish("uid-b")
    assert reaper.run_once() == []


def test_never_reaps_when_the_api_fails(
    mh: MetricsHarness, api_server: FakeApiServer, reaper: OrphanReaper, clock: Clock
) -> None:
    mh.publish("uid-b", attributes={"size": "64Mi"})
    assert reaper.run_once() == []  # marked
    api_server.pods_status = 500
    for _ in range(5):
        clock.now += GRACE * 10
        assert reaper.run_once() == []
    assert mh.volumes.journal.load(mh.volume_id("uid-b")) is not None
    assert mh.host.mounts
    assert pod_gone(mh) == 0
    assert len(api_server.pod_lists()) == 6


def test_never_reaps_when_the_api_is_unreachable(
    mh: MetricsHarness, reaper: OrphanReaper, clock: Clock, api_server: FakeApiServer
) -> None:
    mh.publish("uid-b", attributes={"size": "64Mi"})
    assert reaper.run_once() == []
    api_server.close()
    clock.now += GRACE * 10
    assert reaper.run_once() == []
    assert mh.volumes.journal.load(mh.volume_id("uid-b")) is not None


def test_never_reaps_when_no_pod_at_all_is_listed_on_the_node(
    mh: MetricsHarness, api_server: FakeApiServer, api: KubeApi, clock: Clock
) -> None:
    """A --node-id that is not the Kubernetes node name lists nothing: reap nothing."""
    mh.publish("uid-b", attributes={"size": "64Mi"})
    reaper = OrphanReaper(mh.volumes, api, "not-the-node-name", GRACE, clock)
    for _ in range(3):
        assert reaper.run_once() == []
        clock.now += GRACE * 10
    assert mh.volumes.journal.load(mh.volume_id("uid-b")) is not None


def test_a_pod_that_reappears_clears_the_mark(
    mh: MetricsHarness, api_server: FakeApiServer, reaper: OrphanReaper, clock: Clock
) -> None:
    mh.publish("uid-b", attributes={"size": "64Mi"})
    assert reaper.run_once() == []  # t=0: missing, marked
    clock.now += 200
    api_server.add_pod(NODE, "uid-b")  # e.g. a stale API cache caught up
    assert reaper.run_once() == []  # t=200: present, mark cleared
    assert reaper.missing == {}
    api_server.remove_pod("uid-b")
    clock.now += 200
    assert reaper.run_once() == []  # t=400: missing again, a fresh mark
    clock.now += 200
    assert reaper.run_once() == []  # t=600: only 200 s since the fresh mark
    clock.now += GRACE
    assert reaper.run_once() == [mh.volume_id("uid-b")]


def test_lists_only_this_nodes_pods(
    mh: MetricsHarness, api_server: FakeApiServer, reaper: OrphanReaper
) -> None:
    reaper.run_once()
    [request] = api_server.pod_lists()
    assert request.path == "/api/v1/pods"  # cluster scope, narrowed by the field selector
    assert request.query["fieldSelector"] == [f"spec.nodeName={NODE}"]


def test_a_pod_on_another_node_does_not_save_the_volume(
    mh: MetricsHarness, api_server: FakeApiServer, reaper: OrphanReaper, clock: Clock
) -> None:
    mh.publish("uid-elsewhere", attributes={"size": "64Mi"})
    assert reaper.run_once() == []
    clock.now += GRACE + 1
    assert reaper.run_once() == [mh.volume_id("uid-elsewhere")]


STATIC_HASH = "6f1a0c3e9b2d4e5f8a7b6c5d4e3f2a1b"  # what kubelet passes as the static pod's uid
MIRROR_ANNOTATIONS = ("kubernetes.io/config.hash", "kubernetes.io/config.mirror")


def add_mirror_pod(
    server: FakeApiServer, static_uid: str, annotations: tuple[str, ...] = MIRROR_ANNOTATIONS
) -> None:
    """A static pod as the API server shows it: a mirror pod under a uid of its own, with the
    static pod's config hash in its annotations, as kubelet creates it."""
    server.add_pod(NODE, "uid-of-the-mirror-pod", name=f"etcd-{NODE}", namespace="kube-system")
    metadata = server.pods[NODE][-1]["metadata"]
    metadata["annotations"] = {key: static_uid for key in annotations}
    metadata["annotations"]["kubernetes.io/config.source"] = "file"


@pytest.mark.parametrize(
    "annotations", [MIRROR_ANNOTATIONS, MIRROR_ANNOTATIONS[:1], MIRROR_ANNOTATIONS[1:]]
)
def test_a_static_pods_volume_is_never_reaped(
    mh: MetricsHarness,
    api_server: FakeApiServer,
    reaper: OrphanReaper,
    clock: Clock,
    annotations: tuple[str, ...],
) -> None:
    add_mirror_pod(api_server, STATIC_HASH, annotations)
    mh.publish(STATIC_HASH, attributes={"size": "64Mi"})
    mh.publish("uid-gone", attributes={"size": "64Mi"})
    assert reaper.run_once() == []
    assert set(reaper.missing) == {mh.volume_id("uid-gone")}  # the static pod's is not marked
    clock.now += GRACE + 1
    assert reaper.run_once() == [mh.volume_id("uid-gone")]  # a pod really gone still goes
    for _ in range(3):
        clock.now += GRACE * 10
        assert reaper.run_once() == []
    assert mh.volumes.journal.load(mh.volume_id(STATIC_HASH)) is not None
    assert pod_gone(mh) == 1
    api_server.remove_pod("uid-of-the-mirror-pod")  # its manifest was taken off the node
    assert reaper.run_once() == []
    clock.now += GRACE + 1
    assert reaper.run_once() == [mh.volume_id(STATIC_HASH)]


def test_lists_uids_and_static_pods_config_hashes(api_server: FakeApiServer, api: KubeApi) -> None:
    add_mirror_pod(api_server, STATIC_HASH)
    assert api.pods_on_node(NODE) == {DRIVER_POD, "uid-of-the-mirror-pod", STATIC_HASH}


def test_never_reaps_when_a_pods_annotations_are_malformed(
    mh: MetricsHarness, api_server: FakeApiServer, reaper: OrphanReaper, clock: Clock
) -> None:
    api_server.add_pod(NODE, "uid-odd")
    api_server.pods[NODE][-1]["metadata"]["annotations"] = ["not", "a", "map"]
    mh.publish("uid-b", attributes={"size": "64Mi"})
    for _ in range(3):
        assert reaper.run_once() == []
        clock.now += GRACE * 10
    assert mh.volumes.journal.load(mh.volume_id("uid-b")) is not None


def test_a_busy_volume_is_retried_next_round(
    mh: MetricsHarness, reaper: OrphanReaper, clock: Clock
) -> None:
    mh.publish("uid-b", attributes={"size": "64Mi"})
    reaper.run_once()
    clock.now += GRACE + 1
    mh.host.busy.add(mh.target("uid-b"))  # a process still holds files on it
    assert reaper.run_once() == []
    assert mh.volume_id("uid-b") in reaper.missing
    assert pod_gone(mh) == 0
    mh.host.busy.clear()
    assert reaper.run_once() == [mh.volume_id("uid-b")]
    assert mh.leftovers() == []


def test_volumes_without_a_pod_uid_are_never_reaped(
    mh: MetricsHarness, reaper: OrphanReaper, clock: Clock
) -> None:
    request = mh.publish_request("uid-b", attributes={"size": "64Mi"})
    del request.volume_context["csi.storage.k8s.io/pod.uid"]
    mh.node.NodePublishVolume(request, timeout=30)
    reaper.run_once()
    clock.now += GRACE * 10
    assert reaper.run_once() == []
    assert mh.volumes.journal.load(mh.volume_id("uid-b")) is not None


def test_reaper_survives_a_restart_of_the_driver(
    mh: MetricsHarness, api: KubeApi, clock: Clock
) -> None:
    """Marks live in memory: after a restart the grace period starts again (safe side)."""
    mh.publish("uid-b", attributes={"size": "64Mi"})
    OrphanReaper(mh.volumes, api, NODE, GRACE, clock).run_once()
    mh.restart()
    clock.now += GRACE + 1
    reaper = OrphanReaper(mh.volumes, api, NODE, GRACE, clock)
    assert reaper.run_once() == []
    clock.now += GRACE + 1
    assert reaper.run_once() == [mh.volume_id("uid-b")]


def test_background_loop_reaps_and_stops(mh: MetricsHarness, api: KubeApi) -> None:
    mh.publish("uid-b", attributes={"size": "64Mi"})
    reaper = OrphanReaper(mh.volumes, api, NODE, grace_seconds=0.0)
    reaper.start(interval=0.05)
    try:
        deadline = time.monotonic() + 10
        while mh.volumes.journal.load(mh.volume_id("uid-b")) is not None:
            assert time.monotonic() < deadline, "the loop never reaped the orphan"
            time.sleep(0.02)
    finally:
        reaper.stop()
    assert reaper._thread is None
    assert mh.leftovers() == []
    assert pod_gone(mh) == 1


# --- wiring: run() as serve() runs it, and the flags ----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_run_starts_the_reaper_with_api_access_and_stops_it(
    api_server: FakeApiServer, tmp_path: Path
) -> None:
    kubelet_root = str(tmp_path / "kubelet")
    port = free_port()
    config = Config(
        endpoint=f"unix://{tmp_path}/csi.sock", node_id=NODE, state_dir=str(tmp_path / "state"),
        data_dir=str(tmp_path / "data"), kubelet_root=kubelet_root, min_size=16 * 1024**2,
        metrics_address=f"127.0.0.1:{port}", kube_api_url=api_server.url,
        reaper_grace=0.0, reaper_interval=0.05,
    )  # fmt: skip
    host = FakeHost()
    host.dirs.add(kubelet_root)
    stop = threading.Event()
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run(config, stop, host, {})))
    thread.start()
    kubelet = Kubelet(config.endpoint, kubelet_root, timeout=30)
    try:
        kubelet.wait_ready(10)
        deadline = time.monotonic() + 10  # the reaper starts right after the server serves
        while not any(t.name == "orphan-reaper" for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the reaper never started"
            time.sleep(0.02)
        kubelet.publish(InlineVolume("uid-b", "scratch", attributes={"size": "64Mi"}))
        with pytest.raises(grpc.RpcError):
            kubelet.publish(InlineVolume("uid-c", "scratch", attributes={"colour": "x"}))
        deadline = time.monotonic() + 10
        while host.files or host.mounts:  # the reaper tears uid-b's volume down
            assert time.monotonic() < deadline, "the reaper never ran"
            time.sleep(0.02)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            scrape = Scrape(r.read().decode())
        assert scrape.value("luks_ephemeral_orphans_removed_total", reason="pod_gone") == 1
        assert scrape.value("csi_plugin_operations_seconds_count",
                            method_name="NodePublishVolume",
                            grpc_status_code="INVALID_ARGUMENT") == 1  # fmt: skip
        assert [e["reason"] for e in api_server.events()] == ["InvalidVolumeParameter"]
    finally:
        kubelet.close()
        stop.set()  # what SIGTERM does
        thread.join(60)
    assert result == [0]
    assert not any(t.name == "orphan-reaper" for t in threading.enumerate())


def test_run_without_api_access_starts_no_reaper(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubelet_root = str(tmp_path / "kubelet")
    config = Config(endpoint=f"unix://{tmp_path}/csi.sock", node_id=NODE,
                    state_dir=str(tmp_path / "state"), data_dir=str(tmp_path / "data"),
                    kubelet_root=kubelet_root, metrics_address="")  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=run, args=(config, stop, FakeHost(), {}))
    with caplog.at_level(logging.INFO):
        thread.start()
        kubelet = Kubelet(config.endpoint, kubelet_root, timeout=30)
        try:
            kubelet.wait_ready(10)
            assert not any(t.name == "orphan-reaper" for t in threading.enumerate())
        finally:
            kubelet.close()
            stop.set()
            thread.join(60)
    assert [r.getMessage() for r in caplog.records].count(OFF_MESSAGE) == 1


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(argv))


def test_reaper_flags_defaults_env_and_flags() -> None:
    config = from_args("node", parse(), environ={})
    assert (config.reaper_grace, config.reaper_interval, config.kube_api_url) == (300, 60, "")
    env = {"REAPER_GRACE": "5m", "REAPER_INTERVAL": "30s", "KUBE_API_URL": "http://h:8001/"}
    config = from_args("node", parse(), environ=env)
    assert (config.reaper_grace, config.reaper_interval) == (300, 30)
    assert config.kube_api_url == "http://h:8001"
    args = parse("--reaper-grace", "1h", "--reaper-interval", "90",
                 "--kube-api-url", "https://api:6443")  # fmt: skip
    config = from_args("node", args, environ=env)
    assert (config.reaper_grace, config.reaper_interval) == (3600, 90)
    assert config.kube_api_url == "https://api:6443"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--reaper-grace", "soon"), "--reaper-grace"),
        (("--reaper-grace", "-1"), "at least 0"),
        (("--reaper-interval", "0"), "at least 1"),
        (("--reaper-interval", "nan"), "--reaper-interval"),
        (("--kube-api-url", "api:6443"), "http://"),
    ],
)
def test_bad_reaper_flags_are_refused(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_args("node", parse(*argv), environ={})


def test_kube_api_url_is_a_hidden_flag() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    text = parser.format_help()
    assert "--kube-api-url" not in text
    assert "--reaper-grace" in text and "REAPER_GRACE" in text
