"""Metrics end to end: real RPCs through the gRPC server, scraped over HTTP, values checked."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from csi.errors import Internal
from csi.host.fake import FakeFile
from csi.journal import Journal, Record, volume_digest
from csi.metrics import Metrics, parse_address
from csi.metrics import serve as serve_metrics
from csi.steps import PUBLISH_STEPS, TEARDOWN_STEPS
from tests.unit.harness import code_of
from tests.unit.metrics_harness import MetricsHarness, Scrape

MiB = 1024**2
GiB = 1024**3
DRIVER = "luks-ephemeral.csi.io"
PUBLISH = "NodePublishVolume"
UNPUBLISH = "NodeUnpublishVolume"
OPS = "csi_plugin_operations_seconds_count"
SET_ASIDE = "luks_ephemeral_journal_records_set_aside_total"


@pytest.fixture
def mh() -> Iterator[MetricsHarness]:
    h = MetricsHarness(capacity=10 * GiB)
    yield h
    h.close()


def fails_with(call: object, code: grpc.StatusCode) -> None:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert code_of(err.value) == code, err.value.details()


def scenario(mh: MetricsHarness) -> None:
    """2 publishes + 1 refused publish (bad parameter) + 1 unpublish."""
    mh.publish("pod-a", attributes={"size": "64Mi"})
    mh.publish("pod-b", attributes={"size": "128Mi", "preallocate": "true"})
    fails_with(lambda: mh.publish("pod-c", attributes={"size": "64Mi", "colour": "blue"}),
               grpc.StatusCode.INVALID_ARGUMENT)  # fmt: skip
    mh.unpublish("pod-a")


def test_operations_are_counted_per_method_and_code(mh: MetricsHarness) -> None:
    scenario(mh)
    s = mh.scrape()
    assert s.value(OPS, driver_name=DRIVER, method_name=PUBLISH, grpc_status_code="OK") == 2
    assert s.value(OPS, driver_name=DRIVER, method_name=PUBLISH,
                   grpc_status_code="INVALID_ARGUMENT") == 1  # fmt: skip
    assert s.value(OPS, driver_name=DRIVER, method_name=UNPUBLISH, grpc_status_code="OK") == 1
    # nothing else was called, and every sample carries all three labels
    methods = {lab["method_name"] for lab, _ in s.find(OPS)}
    assert methods == {PUBLISH, UNPUBLISH}
    assert sum(v for _, v in s.find(OPS)) == 4
    assert s.value("csi_plugin_operations_seconds_sum", method_name=PUBLISH,
                   grpc_status_code="OK") > 0  # fmt: skip


def test_volume_and_capacity_gauges_follow_the_journal_and_the_disk(mh: MetricsHarness) -> None:
    scenario(mh)
    s = mh.scrape()
    assert s.value("luks_ephemeral_volumes", backing="loop", mode="mount") == 1
    assert s.value("luks_ephemeral_volumes", backing="qcow2", mode="mount") == 0
    assert s.value("luks_ephemeral_volumes", backing="loop", mode="block") == 0
    assert s.value("luks_ephemeral_provisioned_bytes") == 128 * MiB
    backing = mh.names("pod-b").backing
    assert mh.host.files[backing].allocated == 128 * MiB  # preallocated in the fake
    assert s.value("luks_ephemeral_allocated_bytes") == 128 * MiB
    assert s.value("luks_ephemeral_capacity_bytes", kind="budget") == 10 * GiB
    record = mh.volumes.journal.load(mh.volume_id("pod-b"))
    assert record is not None
    assert s.value("luks_ephemeral_capacity_bytes", kind="reserved") == record.spec.backing_bytes
    assert s.value("luks_ephemeral_capacity_bytes", kind="data_dir_free") == mh.host.free_bytes(
        mh.config.data_dir
    )


def test_gauges_are_read_at_scrape_time(mh: MetricsHarness) -> None:
    assert mh.scrape().value("luks_ephemeral_provisioned_bytes") == 0
    mh.publish("pod-a", attributes={"size": "64Mi"})
    assert mh.scrape().value("luks_ephemeral_provisioned_bytes") == 64 * MiB
    mh.host.files[mh.names("pod-a").backing].allocated = 5 * MiB  # the pod wrote 5 MiB
    assert mh.scrape().value("luks_ephemeral_allocated_bytes") == 5 * MiB
    mh.unpublish("pod-a")
    s = mh.scrape()
    assert s.value("luks_ephemeral_provisioned_bytes") == 0
    assert s.value("luks_ephemeral_volumes", backing="loop", mode="mount") == 0


def test_every_step_is_timed(mh: MetricsHarness) -> None:
    scenario(mh)
    s = mh.scrape()
    for step in PUBLISH_STEPS:  # the refused publish fails validation, before any step
        assert s.value("luks_ephemeral_step_seconds_count", step=step) == 2, step
    for step in TEARDOWN_STEPS:
        assert s.value("luks_ephemeral_step_seconds_count", step=step) == 1, step
    for step in (*PUBLISH_STEPS, *TEARDOWN_STEPS):
        assert s.value("luks_ephemeral_step_failures_total", step=step) == 0, step


def test_shredded_counts_deleted_backing_files(mh: MetricsHarness) -> None:
    scenario(mh)
    assert mh.scrape().value("luks_ephemeral_shredded_total") == 1
    mh.unpublish("pod-a")  # idempotent repeat: nothing left to shred
    assert mh.scrape().value("luks_ephemeral_shredded_total") == 1
    mh.unpublish("pod-b")
    assert mh.scrape().value("luks_ephemeral_shredded_total") == 2


def test_an_injected_mkfs_failure_is_counted(mh: MetricsHarness) -> None:
    mh.host.fail("mkfs")
    fails_with(lambda: mh.publish("pod-a", attributes={"size": "64Mi"}),
               grpc.StatusCode.INTERNAL)  # fmt: skip
    s = mh.scrape()
    assert s.value("luks_ephemeral_step_failures_total", step="mkfs") == 1
    assert s.value("luks_ephemeral_step_failures_total", step="mount") == 0
    assert s.value("luks_ephemeral_step_seconds_count", step="mkfs") == 1  # failures are timed
    assert s.get("luks_ephemeral_step_seconds_count", step="mount") == 0  # never reached
    assert s.value(OPS, method_name=PUBLISH, grpc_status_code="INTERNAL") == 1
    # the rollback deleted the formatted backing file: that volume's data is shredded too
    assert s.value("luks_ephemeral_shredded_total") == 1
    assert mh.leftovers() == []


def test_orphans_removed_at_restart_are_counted(mh: MetricsHarness) -> None:
    s = mh.scrape()
    for reason in ("backing_without_record", "mapping_without_record", "header_without_record",
                   "pod_gone"):  # fmt: skip
        assert s.value("luks_ephemeral_orphans_removed_total", reason=reason) == 0
    orphan = os.path.join(mh.config.data_dir, volume_digest("csi-gone") + ".img")
    mh.host.files[orphan] = FakeFile(64 * MiB, 64 * MiB)
    mh.restart()
    assert orphan not in mh.host.files
    s = mh.scrape()
    assert s.value("luks_ephemeral_orphans_removed_total", reason="backing_without_record") == 1
    assert s.value("luks_ephemeral_orphans_removed_total", reason="pod_gone") == 0


def test_no_key_material_in_metrics(mh: MetricsHarness) -> None:
    scenario(mh)
    text = mh.scrape().text
    assert mh.host.seen_keys
    for key in mh.host.seen_keys:
        assert key.hex() not in text
        assert key.hex().upper() not in text


def test_a_broken_journal_does_not_break_the_scrape(
    mh: MetricsHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    mh.publish("pod-a", attributes={"size": "64Mi"})

    def broken() -> list[Record]:
        raise Internal("cannot read journal record x: Too many open files")

    monkeypatch.setattr(mh.volumes.journal, "all", broken)
    s = mh.scrape()  # HTTP 200 still
    assert s.value(OPS, method_name=PUBLISH, grpc_status_code="OK") == 1
    assert s.find("luks_ephemeral_volumes") == []
    monkeypatch.undo()
    assert mh.scrape().value("luks_ephemeral_volumes", backing="loop", mode="mount") == 1


def test_an_unreadable_record_is_set_aside_counted_and_hides_no_gauge(mh: MetricsHarness) -> None:
    mh.publish("pod-a", attributes={"size": "64Mi"})
    journal = mh.volumes.journal
    journal.on_set_aside = mh.volumes.events.record_set_aside  # as the driver wires it
    assert mh.scrape().value(SET_ASIDE) == 0  # exported from the start
    path = os.path.join(journal.dir, volume_digest("csi-bad") + ".json")
    with open(path, "w") as f:
        f.write("{not json")
    s = mh.scrape()  # the scrape reads the journal, which sets the bad record aside
    assert s.value("luks_ephemeral_volumes", backing="loop", mode="mount") == 1
    assert not os.path.exists(path)
    assert journal.unreadable_digests() == {volume_digest("csi-bad")}
    # counters are collected before the gauges read the journal: the next scrape has it
    for _ in range(2):
        assert mh.scrape().value(SET_ASIDE) == 1  # counted once, not at every scrape


def test_record_set_aside_counts_each_record_once(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, DRIVER)
    total = "luks_ephemeral_journal_records_set_aside_total"
    assert registry.get_sample_value(total) == 0
    journal = Journal(str(tmp_path), on_set_aside=metrics.record_set_aside)
    for volume_id in ("vol-1", "vol-2"):
        (tmp_path / "volumes" / f"{volume_digest(volume_id)}.json").write_bytes(b"\xff")
    assert journal.all() == []
    assert journal.all() == []
    assert registry.get_sample_value(total) == 2
    metrics.record_set_aside("/some/other/path")
    assert registry.get_sample_value(total) == 3
    samples = [sample for family in registry.collect() for sample in family.samples]
    assert [sample.labels for sample in samples if sample.name == total] == [{}]  # no path label


def test_provisioned_volumes_are_counted_reserved_and_by_mode() -> None:
    mh = MetricsHarness(mode="all", capacity=1 * GiB)
    try:
        block = mh.provisioner.create("pvc-b", "node-1", 64 * MiB, block=True)
        mh.provisioner.create("pvc-m", "node-1", 32 * MiB)
        s = mh.scrape()  # reserved by CreateVolume: counted before anything is on disk
        assert s.value("luks_ephemeral_volumes", backing="loop", mode="block") == 1
        assert s.value("luks_ephemeral_volumes", backing="loop", mode="mount") == 1
        assert s.value("luks_ephemeral_capacity_bytes", kind="reserved") == 96 * MiB
        assert s.value("luks_ephemeral_provisioned_bytes") == 96 * MiB
        assert s.value("luks_ephemeral_allocated_bytes") == 0
        assert mh.kubelet is not None
        mh.kubelet.stage(block)
        mh.kubelet.publish_pvc(block, "pod-a")
        assert mh.kubelet.expand(block, 128 * MiB, "pod-a") == 128 * MiB
        s = mh.scrape()
        assert s.value("luks_ephemeral_capacity_bytes", kind="reserved") == 160 * MiB
        for step in ("create_backing", "attach", "format", "open", "bind", "grow_backing",
                     "refresh_loop", "resize_mapping"):  # fmt: skip
            assert s.value("luks_ephemeral_step_seconds_count", step=step) == 1, step
        assert s.value("luks_ephemeral_step_failures_total", step="grow_fs") == 0
        assert s.value(OPS, method_name="CreateVolume", grpc_status_code="OK") == 2
        assert s.value(OPS, method_name="NodeExpandVolume", grpc_status_code="OK") == 1
    finally:
        mh.close()


# --- units --------------------------------------------------------------------------------


def test_parse_address() -> None:
    assert parse_address(":9810") == ("0.0.0.0", 9810)
    assert parse_address("127.0.0.1:9811") == ("127.0.0.1", 9811)
    assert parse_address("[::1]:9812") == ("::1", 9812)


def test_metrics_are_registered_only_on_the_injected_registry() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, DRIVER)
    metrics.rpc("Probe", "OK", 0.01)
    server = serve_metrics(registry, "127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
            s = Scrape(r.read().decode())
    finally:
        server.stop()
    assert s.value(OPS, driver_name=DRIVER, method_name="Probe",
                   grpc_status_code="OK") == 1  # fmt: skip
    assert not s.find("python_gc_objects_collected_total")  # not the global default registry
    # a second registry is independent: nothing is module-level
    assert Metrics(CollectorRegistry(), DRIVER).registry is not registry
