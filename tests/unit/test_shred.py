"""The emergency shred on the fake host, over the real gRPC servicers and the real admin socket:
every key goes, the node is sealed (UNAVAILABLE), kubelet's unpublish and unstage still clean
up, a repeat is harmless, the seal survives a restart, and the CLI works with and without a
running driver."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from csi import admin, operator
from csi.admin import AdminServer, AdminUnavailable
from csi.backings.base import IN_GUEST, INCOMPLETE, NO_KEY, WIPED
from csi.journal import Record
from csi.metrics import Metrics
from csi.seal import SEAL_FILE, Seal
from csi.shred import Shredder
from tests.unit.harness import Harness, fails

MiB = 1024**2
FSCRYPT = {"backing": "fscrypt", "size": "64Mi"}


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(mode="all")
    yield harness
    harness.close()


def shredder(h: Harness, **kwargs: object) -> Shredder:
    return Shredder(h.volumes, **kwargs)  # type: ignore[arg-type]


def outcomes(report: object) -> dict[str, str]:
    return {r.volume_id: r.outcome for r in report.results}  # type: ignore[attr-defined]


def test_shred_all_wipes_every_key_seals_and_unpublish_still_cleans(h: Harness) -> None:
    h.publish("pod-a")
    h.publish("pod-b", attributes=FSCRYPT)
    pv = h.provision(size=64 * MiB)
    h.k.stage(pv)
    h.k.publish_pvc(pv, "pod-c")
    a, b = h.names("pod-a"), h.names("pod-b")
    report = shredder(h).shred_all(trigger="cli")
    assert outcomes(report) == {a.volume_id: WIPED, b.volume_id: WIPED, pv.volume_id: WIPED}
    assert report.complete and report.sealed
    assert a.mapping in h.host.wiped and a.mapping not in h.host.keyring
    assert h.volumes.names(pv.volume_id).mapping in h.host.wiped
    assert all(not ring for ring in h.host.fscrypt_keys.values())  # fscrypt key removed
    assert "shredded 3 of 3 volumes" in report.summary and "node sealed" in report.summary
    # sealed: no new volume, no new stage or bind, and the message says how to lift it
    details = fails(lambda: h.publish("pod-d"), grpc.StatusCode.UNAVAILABLE)
    assert "sealed by an emergency shred" in details and "unseal" in details
    fails(lambda: h.k.publish_pvc(pv, "pod-e"), grpc.StatusCode.UNAVAILABLE)
    assert not any(h.names("pod-d").mapping == m for m in h.host.mappings)
    # the volume's health says what happened
    health = h.volumes.health(a, h.record(a.volume_id))
    assert health.abnormal and "emergency shred" in health.message
    # kubelet's clean-up still works on shredded volumes
    h.unpublish("pod-a")
    h.unpublish("pod-b")
    h.k.unpublish_pvc(pv, "pod-c")
    h.k.unstage(pv)
    h.provisioner.delete(pv.volume_id)
    assert h.leftovers() == []


def test_a_repeated_shred_is_harmless_and_says_nothing_was_left(h: Harness) -> None:
    h.publish("pod-a")
    first = shredder(h).shred_all(trigger="cli")
    again = shredder(h).shred_all(trigger="cli")
    assert list(outcomes(first).values()) == [WIPED]
    assert list(outcomes(again).values()) == [NO_KEY] and again.complete


def test_an_open_fscrypt_file_makes_the_shred_incomplete_never_done(h: Harness) -> None:
    h.publish("pod-a", attributes=FSCRYPT)
    names = h.names("pod-a")
    fscrypt = h.volumes.backings["fscrypt"]
    path = fscrypt.directory(names)  # type: ignore[attr-defined]
    h.host.fscrypt_busy.add(h.host.projects[path])
    report = shredder(h).shred_all(trigger="cli")
    assert outcomes(report) == {names.volume_id: INCOMPLETE}
    assert not report.complete and "1 incomplete" in report.summary
    assert "in use" in report.results[0].detail
    h.host.fscrypt_busy.clear()  # the files were closed: a repeat finishes the removal
    assert outcomes(shredder(h).shred_all(trigger="cli")) == {names.volume_id: NO_KEY}


def test_a_kata_guest_key_is_reported_out_of_reach(h: Harness) -> None:
    h.publish("pod-a", attributes={"size": "64Mi", "kata": "guest"})
    report = shredder(h).shred_all(trigger="cli")
    result = report.results[0]
    assert result.outcome == IN_GUEST and "VM" in result.detail
    assert report.complete  # nothing on this host holds it


def test_mappings_no_record_names_are_wiped_too(h: Harness) -> None:
    h.publish("pod-a")
    names = h.names("pod-a")
    record_file = os.path.join(h.config.state_dir, "volumes", f"{names.digest}.json")
    with open(record_file, "w") as f:
        f.write("{not json")  # an unreadable record: its mapping has no readable record
    report = shredder(h).shred_all(trigger="cli")
    assert names.mapping in h.host.wiped
    assert [(r.volume_id, r.outcome) for r in report.results] == [(names.mapping, WIPED)]


def test_one_volume_shred_leaves_the_node_unsealed(h: Harness) -> None:
    h.publish("pod-a")
    h.publish("pod-b")
    report = shredder(h).shred_volume(h.volume_id("pod-a"))
    assert outcomes(report) == {h.volume_id("pod-a"): WIPED} and not report.sealed
    assert h.names("pod-b").mapping not in h.host.wiped
    h.publish("pod-c")  # not sealed
    with pytest.raises(Exception, match="not on this node"):
        shredder(h).shred_volume("csi-0000")


def test_the_seal_survives_a_restart_and_unseal_lifts_it(h: Harness) -> None:
    shredder(h).shred_all(trigger="cli")
    h.restart()
    fails(lambda: h.publish("pod-a"), grpc.StatusCode.UNAVAILABLE)
    assert Shredder(h.volumes).unseal(trigger="cli") is True
    assert Shredder(h.volumes).unseal(trigger="cli") is False
    h.publish("pod-a")
    h.restart()
    assert h.record(h.volume_id("pod-a")) is not None and not h.volumes.seal.is_sealed()


def test_an_unreadable_seal_file_keeps_the_node_sealed(tmp_path: Path) -> None:
    (tmp_path / SEAL_FILE).write_text("garbage")
    seal = Seal(str(tmp_path))
    assert seal.is_sealed() and seal.state().trigger == "unknown"  # type: ignore[union-attr]
    (tmp_path / SEAL_FILE).write_bytes(b"{" + b" " * (300 * 1024) + b"}")
    assert Seal(str(tmp_path)).is_sealed()
    seal = Seal(str(tmp_path / "fresh"))
    seal.seal("annotation", "x" * 1000)
    state = Seal(str(tmp_path / "fresh")).state()
    assert state is not None and state.trigger == "annotation" and len(state.annotation) == 256
    mode = stat.S_IMODE(os.stat(tmp_path / "fresh" / SEAL_FILE).st_mode)
    assert mode == 0o600


def test_operations_running_during_the_shred_are_waited_for_then_wiped(h: Harness) -> None:
    """A publish that got past the seal check before the seal: the second pass wipes what it
    made once it has finished."""
    release = threading.Event()
    entered = threading.Event()
    original = h.host.crypt_open

    def slow_open(*args: object, **kwargs: object) -> None:
        entered.set()  # the first pass finds no mapping yet
        release.wait(10)
        original(*args, **kwargs)  # type: ignore[arg-type]

    h.host.crypt_open = slow_open  # type: ignore[method-assign]
    publishing = threading.Thread(target=lambda: h.publish("pod-a"))
    publishing.start()
    assert entered.wait(10)
    threading.Timer(0.3, release.set).start()
    report = shredder(h, settle=10.0).shred_all(trigger="cli")
    publishing.join(10)
    assert release.is_set()  # the shred waited for the publish to end
    assert h.names("pod-a").mapping in h.host.wiped
    assert outcomes(report) == {h.volume_id("pod-a"): WIPED}


def test_metrics_count_outcomes_time_and_the_seal(h: Harness) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "d")
    metrics.watch_seal(h.volumes.seal.is_sealed)
    h.publish("pod-a")
    h.publish("pod-b", attributes=FSCRYPT)
    fscrypt = h.volumes.backings["fscrypt"]
    path = fscrypt.directory(h.names("pod-b"))  # type: ignore[attr-defined]
    h.host.fscrypt_busy.add(h.host.projects[path])
    assert registry.get_sample_value("luks_ephemeral_sealed") == 0
    Shredder(h.volumes, metrics).shred_all(trigger="cli")
    assert registry.get_sample_value("luks_ephemeral_sealed") == 1
    assert registry.get_sample_value("luks_ephemeral_shred_seconds_count") == 1
    assert registry.get_sample_value("luks_ephemeral_shred_volumes_total",
                                     {"outcome": "wiped"}) == 1  # fmt: skip
    assert registry.get_sample_value("luks_ephemeral_shred_volumes_total",
                                     {"outcome": "incomplete"}) == 1  # fmt: skip
    assert registry.get_sample_value("luks_ephemeral_shred_incomplete_keys") == 1
    h.volumes.seal.unseal()
    assert registry.get_sample_value("luks_ephemeral_sealed") == 0


# --- the admin socket and the CLI ------------------------------------------------------------
def test_the_admin_socket_is_root_only_and_answers_shred_and_unseal(h: Harness) -> None:
    h.publish("pod-a")
    server = AdminServer(h.config.state_dir, operator.handlers(Shredder(h.volumes)))
    server.start()
    try:
        mode = stat.S_IMODE(os.stat(admin.socket_path(h.config.state_dir)).st_mode)
        assert mode == 0o600
        answer = admin.call(h.config.state_dir, {"command": "shred", "volume": None})
        assert answer["report"]["complete"] and answer["report"]["sealed"]
        assert answer["report"]["volumes"][0]["outcome"] == WIPED
        assert admin.call(h.config.state_dir, {"command": "status"})["sealed"] is True
        assert admin.call(h.config.state_dir, {"command": "unseal"}) == {"unsealed": True}
        bad = admin.call(h.config.state_dir, {"command": "shred", "volume": "../x"})
        assert bad["error"] == "INVALID_ARGUMENT"
        assert admin.call(h.config.state_dir, {"command": "rm"})["error"] == "INVALID_ARGUMENT"
        if os.getuid() == 0:
            assert _as_nobody(h.config.state_dir)
    finally:
        server.stop()
    with pytest.raises(AdminUnavailable):
        admin.call(h.config.state_dir, {"command": "status"})


NOBODY_CLIENT = r"""
import json, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except PermissionError:
    sys.exit(0)
sock.sendall(json.dumps({"command": "status"}).encode() + b"\n")
data = sock.recv(65536)
sys.exit(0 if not data or json.loads(data).get("error") == "PERMISSION_DENIED" else 1)
"""
SYSTEM_PYTHON = "/usr/bin/python3"  # one uid 65534 may run (the venv's may live under /root)


def _as_nobody(state_dir: str) -> bool:
    """A client process running as uid 65534 must be refused (file mode or peer check). The
    uid is dropped by setpriv(1) after exec, not in a fork of this process: gRPC's fork
    handlers crash a child forked while its threads run (SIGSEGV, seen here)."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs setpriv (util-linux) and {SYSTEM_PYTHON} to run a client as 65534")
    argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-I",
            "-c", NOBODY_CLIENT, admin.socket_path(state_dir)]  # fmt: skip
    proc = subprocess.run(argv, cwd="/", capture_output=True, timeout=60, check=False)
    assert proc.returncode in (0, 1), proc.stderr.decode()[-2000:]
    return proc.returncode == 0


def test_an_oversized_or_garbled_request_is_refused(h: Harness) -> None:
    server = AdminServer(h.config.state_dir, operator.handlers(Shredder(h.volumes)))
    server.start()
    try:
        import socket

        for payload in (b"x" * 5000 + b"\n", b"[1]\n", b"nope\n"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(admin.socket_path(h.config.state_dir))
                s.sendall(payload)
                answer = json.loads(s.makefile().readline())
            assert answer["error"] == "INVALID_ARGUMENT"
    finally:
        server.stop()


def test_the_cli_acts_alone_when_no_driver_runs(
    h: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    h.publish("pod-a")
    h.stop()
    code = operator.run(h.config, {"command": "shred", "volume": None}, h.host, as_json=False)
    out = capsys.readouterr().out
    assert code == 0
    assert h.volume_id("pod-a") in out and "wiped" in out and "node sealed" in out
    assert h.names("pod-a").mapping in h.host.wiped
    assert Seal(h.config.state_dir).is_sealed()
    assert operator.run(h.config, {"command": "unseal"}, h.host, as_json=True) == 0
    assert json.loads(capsys.readouterr().out) == {"unsealed": True}


def test_the_cli_exit_code_says_when_a_key_could_not_be_wiped(
    h: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    h.publish("pod-a", attributes=FSCRYPT)
    fscrypt = h.volumes.backings["fscrypt"]
    h.host.fscrypt_busy.add(h.host.projects[fscrypt.directory(h.names("pod-a"))])  # type: ignore[attr-defined]
    h.stop()
    code = operator.run(h.config, {"command": "shred", "volume": None}, h.host, as_json=False)
    assert code == operator.EXIT_INCOMPLETE
    assert "incomplete" in capsys.readouterr().out


def test_a_record_is_untouched_by_the_shred(h: Harness) -> None:
    """Nothing is deleted by the shred itself: records stay for kubelet's clean-up."""
    h.publish("pod-a")
    before = h.record(h.volume_id("pod-a"))
    shredder(h).shred_all(trigger="cli")
    after = h.record(h.volume_id("pod-a"))
    assert isinstance(after, Record) and after.to_json() == before.to_json()
    assert h.host.exists(h.names("pod-a").backing)


def test_an_operation_still_running_after_the_wait_makes_the_shred_fail_loudly(
    h: Harness,
) -> None:
    release = threading.Event()
    entered = threading.Event()
    original = h.host.crypt_open

    def stuck_open(*args: object, **kwargs: object) -> None:
        entered.set()
        release.wait(10)
        original(*args, **kwargs)  # type: ignore[arg-type]

    h.host.crypt_open = stuck_open  # type: ignore[method-assign]
    publishing = threading.Thread(target=lambda: h.publish("pod-a"))
    publishing.start()
    try:
        assert entered.wait(10)
        report = shredder(h, settle=0.2).shred_all(trigger="cli")
    finally:
        release.set()
        publishing.join(10)
    result = next(r for r in report.results if r.volume_id == h.volume_id("pod-a"))
    assert result.outcome == "failed" and "run the shred again" in result.detail
    assert not report.complete
    again = shredder(h).shred_all(trigger="cli")  # the publish is done: now its key goes
    assert outcomes(again) == {h.volume_id("pod-a"): WIPED}
