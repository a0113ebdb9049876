"""Qcow2Nbd, the real class, with a scripted qemu-storage-daemon monitor, a sysfs tree in a temp
dir and the commands it runs recorded instead of run: claims, device choice, ownership."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi.errors import ResourceExhausted
from csi.host import nbd
from csi.host.nbd import Qcow2Nbd, node_name
from csi.host.runner import CommandFailed
from tests.unit.test_qmp import Monitor

EXPORT = "luks-eph-" + "ab" * 16


class Qsd:
    """Just enough of qemu-storage-daemon's block layer to answer the driver's commands."""

    def __init__(self) -> None:
        self.nodes: dict[str, str] = {}  # node -> file
        self.exports: dict[str, str] = {}  # export -> node

    def __call__(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        name, args = command["execute"], command.get("arguments", {})
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


def test_a_failed_connect_leaves_no_claim(env: tuple[Qcow2Nbd, Qsd, Kernel]) -> None:
    q, _, kernel = env
    kernel.pid_file("/dev/nbd0").write_text("777")  # in use by another program
    kernel.refuse_connect = True
    with pytest.raises(CommandFailed):
        q.attach("/data/a.img", EXPORT)
    assert q.find(EXPORT) is None and EXPORT not in q._claimed()
    q.detach(EXPORT)
    assert not any(c[:2] == ["nbd-client", "-d"] for c in kernel.calls)


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
