"""The admin CLI (``luks-ephemeral-csi volumes``) and the test-only crash hook."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi.__main__ import CRASH_ENV, crash_hook, main
from csi.journal import CREATING, PUBLISHED, RESERVED, Journal, Record
from csi.params import VolumeSpec

MiB = 1024**2


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """main() installs its own root handler on the (captured) stderr: undo that afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    return [
        "--state-dir", str(tmp_path / "state"),
        "--data-dir", str(tmp_path / "data"),
        "--kubelet-root", str(tmp_path / "kubelet"),
        "--log-format", "text",
    ]  # fmt: skip


def write_record(tmp_path: Path, volume_id: str, size: int, state: str) -> None:
    Journal(str(tmp_path / "state")).write(
        Record(
            volume_id=volume_id,
            state=state,
            spec=VolumeSpec(size=size),
            target_path=str(tmp_path / "kubelet" / "pods" / "uid" / "mount"),
            pod={"namespace": "shop", "name": "web-0"},
        )
    )


def test_volumes_on_an_empty_node(dirs: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["volumes", *dirs]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[-1] == "(no volumes on this node)"
    assert lines[0].split() == ["volume_id", "pod", "state", "size", "allocated", "device",
                                "opened", "mount"]  # fmt: skip
    assert len(lines) == 2


def test_volumes_lists_journal_records(
    dirs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_record(tmp_path, "csi-volume-one", 512 * MiB, PUBLISHED)
    write_record(tmp_path, "csi-volume-two", 2 * 1024 * MiB, CREATING)
    assert main(["volumes", *dirs]) == 0
    out = capsys.readouterr().out
    assert "no volumes" not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"csi-volume-one", "csi-volume-two"}
    assert rows["csi-volume-one"][1:4] == ["shop/web-0", "published", "512Mi"]
    assert rows["csi-volume-two"][1:4] == ["shop/web-0", "creating", "2Gi"]
    # nothing of it exists on this host: no device, no mapping, not mounted
    assert rows["csi-volume-one"][5:] == ["-", "-", "-"]


def test_volumes_as_json(
    dirs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_record(tmp_path, "csi-volume-one", 64 * MiB, PUBLISHED)
    assert main(["volumes", *dirs, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{
        "volume_id": "csi-volume-one", "pod": "shop/web-0", "state": "published",
        "size": "64Mi", "allocated": 0, "device": "-", "opened": "-", "mount": "-",
    }]  # fmt: skip


def test_volumes_lists_a_reserved_pvc_by_its_claim(
    dirs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = Record(volume_id="node-1/" + "a" * 32, state=RESERVED,
                    spec=VolumeSpec(size=64 * MiB), target_path="", name="pvc-1",
                    claim="shop/data-web-0")  # fmt: skip
    Journal(str(tmp_path / "state")).write(record)
    assert main(["volumes", *dirs]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:4] == ["node-1/" + "a" * 32, "pvc:shop/data-web-0", "reserved", "64Mi"]


def test_volumes_with_a_bad_flag_exits_with_usage(
    dirs: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["volumes", *dirs, "--max-volumes", "many"])
    assert exit_info.value.code == 2
    assert "--max-volumes must be an integer" in capsys.readouterr().err


def test_crash_hook_is_off_without_the_env_var() -> None:
    assert crash_hook({}) is None
    assert crash_hook({CRASH_ENV: ""}) is None
    assert crash_hook({"SOMETHING_ELSE": "mount"}) is None


def test_crash_hook_ignores_other_steps() -> None:
    hook = crash_hook({CRASH_ENV: "mount"})
    assert hook is not None
    assert hook("reserve") is None  # not the named step: this process keeps running
    assert hook("mkfs") is None
