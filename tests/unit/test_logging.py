"""RPC log lines, request sanitising, the JSON formatter, and no key material in any log."""

from __future__ import annotations

import base64
import json
import logging
import sys
from typing import Any

import grpc
import pytest

from csi import logs
from csi.proto import csi_pb2 as pb
from csi.tools.kubelet import InlineVolume
from tests.unit.harness import Harness, code_of

SECRET = "s3cr3t-Pa55w0rd-value"


def rpc_records(caplog: pytest.LogCaptureFixture, method: str | None = None) -> list[Any]:
    """The RPC log records (those with structured fields), optionally of one method."""
    found = []
    for record in caplog.records:
        fields = getattr(record, "fields", None)
        if record.name != "csi.rpc" or not isinstance(fields, dict):
            continue
        if method is None or fields.get("method") == method:
            found.append(record)
    return found


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    assert isinstance(fields, dict)
    return fields


def publish_request(harness: Harness, **kwargs: Any) -> pb.NodePublishVolumeRequest:
    assert harness.kubelet is not None
    request: pb.NodePublishVolumeRequest = harness.kubelet.publish_request(
        InlineVolume("pod-a", "scratch", **kwargs)
    )
    return request


# --- the RPC log line ---------------------------------------------------------------------


def test_publish_logs_one_rpc_line(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="csi.rpc")
    request = harness.publish(attributes={"size": "64Mi"})
    records = rpc_records(caplog, "NodePublishVolume")
    assert len(records) == 1
    record = records[0]
    fields = fields_of(record)
    assert fields["method"] == "NodePublishVolume"
    assert fields["volume_id"] == request.volume_id
    assert fields["code"] == "OK"
    assert isinstance(fields["duration_ms"], float) and 0 <= fields["duration_ms"] < 30_000
    assert record.levelno == logging.INFO
    assert record.getMessage() == "rpc NodePublishVolume OK"
    assert fields["request"]["volume_context"]["size"] == "64Mi"
    assert "error" not in fields


def test_rpc_without_volume_id_logs_none(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csi.rpc")
    harness.node.NodeGetInfo(pb.NodeGetInfoRequest())
    harness.identity.Probe(pb.ProbeRequest())
    methods = [fields_of(r)["method"] for r in rpc_records(caplog)]
    assert methods == ["NodeGetInfo", "Probe"]
    assert all(fields_of(r)["volume_id"] is None for r in rpc_records(caplog))


def test_failing_rpc_logs_its_code(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="csi.rpc")
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(attributes={"sise": "1Gi"})
    assert code_of(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    (record,) = rpc_records(caplog, "NodePublishVolume")
    fields = fields_of(record)
    assert fields["code"] == "INVALID_ARGUMENT"
    assert "sise" in fields["error"]
    assert record.levelno == logging.WARNING
    assert record.getMessage() == "rpc NodePublishVolume INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda h: h.node.NodeGetVolumeStats(
            pb.NodeGetVolumeStatsRequest(volume_id="nope", volume_path="/x")), "NOT_FOUND"),
        (lambda h: h.node.NodeStageVolume(pb.NodeStageVolumeRequest(volume_id="v")),
         "INVALID_ARGUMENT"),
    ],
)  # fmt: skip
def test_other_failure_codes_are_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture, call: Any, code: str
) -> None:
    caplog.set_level(logging.INFO, logger="csi.rpc")
    with pytest.raises(grpc.RpcError):
        call(harness)
    records = rpc_records(caplog)
    assert len(records) == 1
    assert fields_of(records[0])["code"] == code


def test_rpc_log_strips_secrets(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    request = publish_request(harness, attributes={"size": "64Mi"})
    request.secrets["password"] = SECRET
    harness.node.NodePublishVolume(request, timeout=30)
    (record,) = rpc_records(caplog, "NodePublishVolume")
    assert fields_of(record)["request"]["secrets"] == logs.STRIPPED
    for r in caplog.records:
        assert SECRET not in logs.JsonFormatter().format(r)
        assert SECRET not in repr(r.__dict__)


# --- sanitize -----------------------------------------------------------------------------


def test_sanitize_replaces_secrets() -> None:
    request = pb.NodePublishVolumeRequest(
        volume_id="vol-1",
        target_path="/var/lib/kubelet/pods/x/mount",
        secrets={"password": SECRET, "token": SECRET + "-2"},
        volume_context={"size": "1Gi"},
        volume_capability=pb.VolumeCapability(
            mount=pb.VolumeCapability.MountVolume(fs_type="ext4", mount_flags=["noatime"])
        ),
    )
    out = logs.sanitize(request)
    assert out["secrets"] == logs.STRIPPED
    assert out["volume_id"] == "vol-1"
    assert out["volume_context"] == {"size": "1Gi"}
    assert out["volume_capability"]["mount"] == {"fs_type": "ext4", "mount_flags": ["noatime"]}
    text = json.dumps(out)
    assert SECRET not in text
    assert "password" not in text  # not even the secret's name


def test_sanitize_other_secret_bearing_requests() -> None:
    stage = pb.NodeStageVolumeRequest(volume_id="v", secrets={"k": SECRET})
    create = pb.CreateVolumeRequest(name="pvc", secrets={"k": SECRET}, parameters={"size": "1Gi"})
    for message in (stage, create):
        out = logs.sanitize(message)
        assert out["secrets"] == logs.STRIPPED
        assert SECRET not in json.dumps(out)
    assert logs.sanitize(create)["parameters"] == {"size": "1Gi"}


def test_sanitize_without_secrets_keeps_everything() -> None:
    request = pb.NodeUnpublishVolumeRequest(volume_id="v", target_path="/t")
    assert logs.sanitize(request) == {"volume_id": "v", "target_path": "/t"}


# --- JsonFormatter ------------------------------------------------------------------------


def test_json_formatter_one_object_per_line() -> None:
    formatter = logs.JsonFormatter()
    record = logging.makeLogRecord({
        "name": "csi.rpc", "levelno": logging.WARNING, "levelname": "WARNING",
        "msg": "two\nlines %s", "args": ("and \"quotes\"",),
        "fields": {"method": "NodePublishVolume", "duration_ms": 1.5, "obj": object()},
    })  # fmt: skip
    line = formatter.format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["msg"] == 'two\nlines and "quotes"'
    assert entry["level"] == "warning"
    assert entry["logger"] == "csi.rpc"
    assert entry["method"] == "NodePublishVolume"
    assert entry["duration_ms"] == 1.5
    assert entry["obj"].startswith("<object object")
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]


def test_json_formatter_exception_stays_on_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "exc_info": sys.exc_info()})
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert "ValueError: boom" in entry["exception"]


def test_setup_json_writes_json_lines(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logs.setup("json", "DEBUG")
        logging.getLogger("csi.test").info("hello %s", "world", extra={"fields": {"n": 1}})
        logging.getLogger("csi.test").debug("second")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    lines = capsys.readouterr().err.strip().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [e["msg"] for e in entries] == ["hello world", "second"]
    assert entries[0]["n"] == 1


# --- no key material anywhere in the logs -------------------------------------------------


def key_forms(key: bytes) -> list[str]:
    return [
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        repr(key)[2:-1],
        key.decode("latin-1"),
    ]


def leaks(records: list[logging.LogRecord], keys: list[bytes]) -> list[str]:
    """Every (key form, log text) pair where key material shows up in a record."""
    formatter = logs.JsonFormatter()
    found: list[str] = []
    for record in records:
        texts = [record.getMessage(), formatter.format(record), repr(record.__dict__)]
        for key in keys:
            for form in key_forms(key):
                found.extend(text for text in texts if form in text)
    return found


def test_leak_hunt_would_find_a_logged_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = bytes(range(64))
    logging.getLogger("csi.test").info("k=%s", key.hex())
    logging.getLogger("csi.test").info("x", extra={"fields": {"k": key}})
    assert len(leaks(caplog.records, [key])) >= 2


def test_volume_key_never_logged(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    harness.publish(pod="pod-a", attributes={"size": "64Mi"})
    harness.publish(pod="pod-a", attributes={"size": "64Mi"})  # idempotent repeat
    harness.publish(pod="pod-b", attributes={"size": "64Mi", "integrity": "hmac-sha256"})
    harness.host.fail("crypt_open")  # a failure after the key existed
    with pytest.raises(grpc.RpcError) as err:
        harness.publish(pod="pod-c", attributes={"size": "64Mi"})
    assert code_of(err.value) == grpc.StatusCode.INTERNAL
    harness.host.fail("mkfs", RuntimeError("unexpected"))  # logged with a traceback
    with pytest.raises(grpc.RpcError):
        harness.publish(pod="pod-d", attributes={"size": "64Mi"})
    harness.unpublish("pod-a")
    harness.unpublish("pod-b")
    keys = harness.host.seen_keys
    assert len(keys) == 4 and all(len(k) == 64 for k in keys)
    assert len(rpc_records(caplog)) == 7
    assert any(r.exc_info for r in caplog.records)  # the traceback was captured too
    assert leaks(caplog.records, keys) == []
    assert harness.leftovers() == []
