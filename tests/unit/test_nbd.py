"""Qcow2Nbd, the real class, with a scripted qemu-storage-daemon monitor, a sysfs tree in a temp
dir and the commands it runs recorded instead of run: claims, device choice, ownership."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from csi.errors import DriverError, Internal, ResourceExhausted, Unavailable
from csi.host import nbd
from csi.host.nbd import Qcow2Nbd, QmpBusy, node_name
from csi.host.runner import CommandFailed
from tests.unit.test_qmp import Monitor, answers, within

EXPORT = "luks-eph-" + "ab" * 16


class Qsd:
    """Just enough of qemu-storage-daemon's block layer to answer the driver's commands."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}  # node -> file
        self.exports: dict[str, str] = {}  # export -> node
        self.commands: list[str] = []

    def __call__(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        name, args = command["execute"], command.get("arguments", {})
        self.commands.append(name)
        if name == "query-named-block-nodes":
            return [{"return": [{"node-name": n, "file": f} for n, f in self.nodes.items()]}]
        if name == "query-block-exports":
            return [{"return": [{"id": e, "node-name": n} for e, n in self.exports.items()]}]
        if name == "blockdev-add":
            self.nodes[args["node-name"]] = args["file"]["filename"]
        elif name == "blockdev-del":
            del self.nodes[args["node-name"]]
        elif name == "block-export-add":
            self.exports[args["id"]] = args["node-name"]
        elif name == "block-export-del":
            del self.exports[args["id"]]
        return [{"return": {}}]


class Kernel:
    """/sys/block/nbd* in a temp dir; ``run`` connects and disconnects like nbd-client."""

    def __init__(self, sysfs: Path, devices: int = 3) -> None:
        self.sysfs = sysfs
        self.calls: list[list[str]] = []
        self.refuse_connect = False
        for i in range(devices):
            (sysfs / "block" / f"nbd{i}").mkdir(parents=True)

    def pid_file(self, device: str) -> Path:
        return self.sysfs / "block" / os.path.basename(device) / "pid"

    def run(self, argv: list[str], **_: Any) -> str:
        self.calls.append(list(argv))
        if argv[:2] == ["nbd-client", "-d"]:
            self.pid_file(argv[2]).unlink(missing_ok=True)
        elif argv[0] == "nbd-client":
            if self.refuse_connect:
                raise CommandFailed(argv, 1, "Failed to setup device, check dmesg")
            self.pid_file(argv[3]).write_text(str(4000 + len(self.calls)))
        return ""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Qcow2Nbd, Qsd, Kernel]]:
    qsd = Qsd()
    monitor = Monitor(qsd)
    kernel = Kernel(tmp_path / "sys")
    monkeypatch.setattr(nbd, "run", kernel.run)
    yield Qcow2Nbd(monitor.path, str(tmp_path / "claims"), sysfs=str(kernel.sysfs)), qsd, kernel
    monitor.close()


def test_attach_exports_claims_and_connects_then_detach_undoes_it(
    env: tuple[Qcow2Nbd, Qsd, Kernel],
) -> None:
    q, qsd, kernel = env
    device = q.attach("/data/a.img", EXPORT)
    assert device == "/dev/nbd0"
    assert qsd.nodes == {node_name(EXPORT): "/data/a.img"}
    assert qsd.exports == {EXPORT: node_name(EXPORT)}
    assert q.find(EXPORT) == device
    assert q.attach("/data/a.img", EXPORT) == device  # again: nothing new
    assert sum(c[0] == "nbd-client" for c in kernel.calls) == 1
    q.detach(EXPORT)
    assert kernel.calls[-1] == ["nbd-client", "-d", device]
    assert (qsd.nodes, qsd.exports, q.find(EXPORT), q.exports()) == ({}, {}, None, [])
    q.detach(EXPORT)  # again: nothing to do, no error


def test_a_device_taken_by_another_nbd_user_is_never_disconnected(
    env: tuple[Qcow2Nbd, Qsd, Kernel],
) -> None:
    q, _, kernel = env
    device = q.attach("/data/a.img", EXPORT)
    kernel.pid_file(device).unlink()  # our connection ended (qsd gone, say) ...
    kernel.pid_file(device).write_text("777")  # ... and someone else connected the device
    assert q.find(EXPORT) is None
    q.detach(EXPORT)
    assert ["nbd-client", "-d", device] not in kernel.calls
    assert kernel.pid_file(device).read_text() == "777"


def test_a_failed_connect_leaves_no_claim_on_a_device(env: tuple[Qcow2Nbd, Qsd, Kernel]) -> None:
    q, qsd, kernel = env
    kernel.pid_file("/dev/nbd0").write_text("777")  # in use by another program
    kernel.refuse_connect = True
    with pytest.raises(CommandFailed):
        q.attach("/data/a.img", EXPORT)
    assert q.find(EXPORT) is None and q._claimed()[EXPORT] == ("", "")  # the export's only
    q.detach(EXPORT)  # what rollback does: the export goes, no device is touched
    assert not any(c[:2] == ["nbd-client", "-d"] for c in kernel.calls)
    assert (qsd.exports, qsd.nodes, q._claimed()) == ({}, {}, {})


def test_device_choice_skips_connected_and_claimed_devices(
    env: tuple[Qcow2Nbd, Qsd, Kernel],
) -> None:
    q, _, kernel = env
    kernel.pid_file("/dev/nbd0").write_text("777")
    other = "luks-eph-" + "cd" * 16
    assert q.attach("/data/a.img", EXPORT) == "/dev/nbd1"
    assert q.attach("/data/b.img", other) == "/dev/nbd2"
    with pytest.raises(ResourceExhausted, match="nbds_max"):
        q.attach("/data/c.img", "luks-eph-" + "ef" * 16)


def test_a_half_written_claim_is_not_an_export(env: tuple[Qcow2Nbd, Qsd, Kernel]) -> None:
    q, _, _ = env
    q.attach("/data/a.img", EXPORT)
    Path(q.claims_dir, f".{EXPORT}.tmp").write_text("/dev/nbd1")  # a crash mid-write
    assert q.exports() == [EXPORT]


def test_a_stale_block_node_of_another_file_is_replaced(env: tuple[Qcow2Nbd, Qsd, Kernel]) -> None:
    q, qsd, _ = env
    qsd.nodes[node_name(EXPORT)] = "/data/deleted.img"
    q.attach("/data/a.img", EXPORT)
    assert qsd.nodes == {node_name(EXPORT): "/data/a.img"}


# ITEM 11a: a claim is trusted only with the connecting pid ------------------------------------
@pytest.mark.parametrize("claim", ["/dev/nbd1", "/dev/nbd1 "])
def test_a_claim_without_a_pid_never_disconnects_the_device(
    env: tuple[Qcow2Nbd, Qsd, Kernel], claim: str
) -> None:
    """The driver died between claiming nbd1 and recording who connected it; since then
    another NBD user connected nbd1. A restarted driver must leave that device alone."""
    q, qsd, kernel = env
    os.makedirs(q.claims_dir)
    Path(q.claims_dir, EXPORT).write_text(claim)
    kernel.pid_file("/dev/nbd1").write_text("777")
    qsd.exports[EXPORT] = node_name(EXPORT)  # the export was made before the crash
    assert q.find(EXPORT) is None
    q.detach(EXPORT)
    assert ["nbd-client", "-d", "/dev/nbd1"] not in kernel.calls
    assert kernel.pid_file("/dev/nbd1").read_text() == "777"
    assert (qsd.exports, q._claimed()) == ({}, {})  # the export and the claim still go
    assert q.attach("/data/a.img", EXPORT) == "/dev/nbd0"  # and a new attach picks a free one


# ITEM 3: a hung or busy qemu-storage-daemon ---------------------------------------------------
@pytest.fixture
def hung(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Qcow2Nbd, Monitor]]:
    """Qcow2Nbd (default timeouts) whose qemu-storage-daemon accepts but never answers."""
    monitor = Monitor(answers, greeting=None)
    kernel = Kernel(tmp_path / "sys")
    monkeypatch.setattr(nbd, "run", kernel.run)
    yield Qcow2Nbd(monitor.path, str(tmp_path / "claims"), sysfs=str(kernel.sysfs)), monitor
    monitor.close()


def test_an_unclaimed_export_is_answered_locally_without_qsd(
    hung: tuple[Qcow2Nbd, Monitor],
) -> None:
    """Record-less cleanup of a loop volume (or a repeated unpublish) never waits on qsd."""
    q, monitor = hung
    started = time.monotonic()
    assert within(2, lambda: q.detach(EXPORT)) is None
    assert within(2, lambda: q.find(EXPORT)) is None
    assert within(2, lambda: q.export_alive(EXPORT)) is False
    assert time.monotonic() - started < 1
    assert monitor.connections == 0


def test_only_exports_never_claimed_nor_listed_are_answered_without_qsd(
    env: tuple[Qcow2Nbd, Qsd, Kernel],
) -> None:
    """Answering locally must not leak exports: one made before the driver died mid-attach
    (claimed first), and one an older driver left without a claim (found by the listing)."""
    q, qsd, kernel = env
    q.detach("luks-eph-" + "ef" * 16)  # a loop volume's: never claimed, never listed
    assert qsd.commands == []
    for i in range(3):
        kernel.pid_file(f"/dev/nbd{i}").write_text("777")  # no free device: attach fails late
    with pytest.raises(ResourceExhausted):
        q.attach("/data/a.img", EXPORT)
    assert EXPORT in qsd.exports
    old = "luks-eph-" + "cd" * 16
    qsd.exports[old] = node_name(old)
    restarted = Qcow2Nbd(q.qmp_socket, q.claims_dir, sysfs=q.sysfs)
    restarted.detach(EXPORT)
    assert EXPORT not in qsd.exports and node_name(EXPORT) not in qsd.nodes
    assert restarted.exports() == [old]  # start-up reconcile lists it, then detaches it
    restarted.detach(old)
    assert qsd.exports == {}


def test_export_alive_with_a_hung_qsd_answers_within_its_bound(
    hung: tuple[Qcow2Nbd, Monitor],
) -> None:
    q, monitor = hung
    os.makedirs(q.claims_dir)
    Path(q.claims_dir, EXPORT).write_text("/dev/nbd0 4001")
    started = time.monotonic()
    alive = within(5, lambda: q.export_alive(EXPORT))
    assert time.monotonic() - started < q.alive_wait + 4 * q.alive_timeout + 0.5
    assert alive is False  # a daemon that does not answer serves nothing: abnormal
    connections = monitor.connections
    started = time.monotonic()
    assert within(1, lambda: q.export_alive(EXPORT)) is False  # backing off: no new attempt
    assert time.monotonic() - started < 0.1 and monitor.connections == connections


def test_stats_do_not_queue_behind_a_stuck_monitor_session(
    hung: tuple[Qcow2Nbd, Monitor],
) -> None:
    """Another request holds the one session (stuck on a hung qsd): export_alive gives up
    waiting for it after alive_wait and answers from what it knew (alive: never listed)."""
    q, _ = hung
    os.makedirs(q.claims_dir)
    Path(q.claims_dir, EXPORT).write_text("/dev/nbd0 4001")
    holder = threading.Thread(target=lambda: within(10, q.exports), daemon=True)
    holder.start()
    time.sleep(0.2)  # the listing holds the session, waiting for a greeting
    started = time.monotonic()
    assert within(3, lambda: q.export_alive(EXPORT)) is True
    assert time.monotonic() - started < q.alive_wait + 0.75


def test_a_caller_that_cannot_get_the_session_gets_unavailable_not_a_long_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = Monitor(answers, greeting=None)
    kernel = Kernel(tmp_path / "sys")
    monkeypatch.setattr(nbd, "run", kernel.run)
    q = Qcow2Nbd(monitor.path, str(tmp_path / "claims"), sysfs=str(kernel.sysfs),
                 connect_timeout=0.2, reply_timeout=1.5, session_wait=0.2)  # fmt: skip
    try:
        os.makedirs(q.claims_dir)
        Path(q.claims_dir, EXPORT).write_text("")  # claimed: detach must ask qsd
        holder = threading.Thread(target=lambda: within(10, q.exports), daemon=True)
        holder.start()
        time.sleep(0.3)
        started = time.monotonic()
        error = within(3, lambda: q.detach(EXPORT))
        assert isinstance(error, QmpBusy) and isinstance(error, Unavailable), error
        assert time.monotonic() - started < 1
        holder.join(10)
        error = within(5, lambda: q.detach(EXPORT))  # free, but hung: bounded by the timeout
        assert isinstance(error, Unavailable), error
        assert EXPORT in q._claimed()  # kept: a retry still removes the export
    finally:
        monitor.close()


def malformed(result: object) -> Callable[[dict[str, Any]], list[dict[str, Any] | bytes]]:
    def reply(command: dict[str, Any]) -> list[dict[str, Any] | bytes]:
        if command["execute"] == "query-block-exports":
            return [result] if isinstance(result, bytes) else [{"return": result}]
        return [{"return": {}}]

    return reply


@pytest.mark.parametrize(
    "result",
    [
        [{"name": "luks-eph-1"}],  # no id
        [{"id": 5}],  # not a string
        ["luks-eph-1"],  # not an object
        {"id": "luks-eph-1"},  # not a list
        b"{not json\r\n",
    ],
    ids=["missing key", "wrong type", "not an object", "not a list", "not JSON"],
)
def test_a_malformed_listing_is_a_driver_error_start_up_goes_on_from(
    tmp_path: Path, result: object
) -> None:
    monitor = Monitor(malformed(result))
    try:
        q = Qcow2Nbd(monitor.path, str(tmp_path / "claims"), sysfs=str(tmp_path))
        error = within(5, q.exports)
        assert isinstance(error, Internal) and isinstance(error, DriverError), error
        alive = within(5, lambda: q.export_alive("luks-eph-1"))
        assert alive is False  # never claimed, never listed: answered locally
    finally:
        monitor.close()
