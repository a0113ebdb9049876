"""Journal records (atomic writes on tmpfs), names derived from volume ids, per-volume locks."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from csi.errors import Aborted, Internal
from csi.journal import (
    CREATING,
    MAPPING_PREFIX,
    PUBLISHED,
    Journal,
    Names,
    Record,
    VolumeLocks,
    volume_digest,
)
from csi.params import VolumeSpec

MiB = 1024**2


def make_record(volume_id: str = "vol-1", state: str = PUBLISHED) -> Record:
    return Record(
        volume_id=volume_id,
        state=state,
        spec=VolumeSpec(size=64 * MiB, header="attached", mount_flags=("noatime", "discard")),
        target_path="/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/scratch/mount",
        pod={"name": "web-0", "namespace": "shop", "uid": "uid"},
        created_at=1700000000.25,
        step="published",
    )


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    return Journal(str(tmp_path / "state"))


def journal_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "volumes"


# atomic writes -----------------------------------------------------------------------------
def test_write_round_trips_with_mode_0600_and_no_temp_file(
    journal: Journal, tmp_path: Path
) -> None:
    record = make_record()
    journal.write(record)
    files = sorted(os.listdir(journal_dir(tmp_path)))
    assert files == [f"{volume_digest('vol-1')}.json"]
    path = journal_dir(tmp_path) / files[0]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = journal.load("vol-1")
    assert loaded == record
    assert loaded is not record
    assert loaded.spec.mount_flags == ("noatime", "discard")  # a tuple again, not a list
    data = json.loads(path.read_text())
    assert data["state"] == PUBLISHED
    assert data["spec"]["size"] == 64 * MiB


def test_directories_are_private(journal: Journal, tmp_path: Path) -> None:
    for sub in ("volumes", "headers"):
        mode = stat.S_IMODE((tmp_path / "state" / sub).stat().st_mode)
        assert mode & 0o077 == 0, oct(mode)


def test_rewrite_replaces_the_record(journal: Journal, tmp_path: Path) -> None:
    journal.write(make_record(state=CREATING))
    journal.write(make_record(state=PUBLISHED))
    assert len(os.listdir(journal_dir(tmp_path))) == 1
    loaded = journal.load("vol-1")
    assert loaded is not None
    assert loaded.state == PUBLISHED


def test_load_unknown_is_none_and_delete_is_idempotent(journal: Journal, tmp_path: Path) -> None:
    assert journal.load("nope") is None
    journal.write(make_record())
    journal.delete("vol-1")
    journal.delete("vol-1")
    assert journal.load("vol-1") is None
    assert os.listdir(journal_dir(tmp_path)) == []


def test_all_lists_records_and_startup_removes_crashed_temp_files(
    journal: Journal, tmp_path: Path
) -> None:
    journal.write(make_record("vol-b"))
    journal.write(make_record("vol-a", state=CREATING))
    directory = journal_dir(tmp_path)
    crashed = directory / f"{volume_digest('vol-c')}.json.tmp.12345"
    crashed.write_bytes(b'{"half": ')  # a write that died before its rename
    (directory / "notes.txt").write_text("not a record")

    records = journal.all()
    assert sorted((r.volume_id, r.state) for r in records) == [
        ("vol-a", CREATING),
        ("vol-b", PUBLISHED),
    ]
    assert crashed.exists(), "all() runs at any time: a temp file may be a write in progress"
    journal.remove_partial_writes()  # start-up
    assert not crashed.exists()
    assert (directory / "notes.txt").exists()  # only its own temp files are cleaned


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[]", b"42", b"null", b'"text"', b"\xff\xfe\x00",
     b'{"volume_id": "vol-1"}', b'{"volume_id": "vol-1", "state": "published", "spec": {}, '
     b'"target_path": "/t"}'],
)  # fmt: skip
def test_unreadable_record_is_internal(journal: Journal, tmp_path: Path, content: bytes) -> None:
    path = journal_dir(tmp_path) / f"{volume_digest('vol-1')}.json"
    path.write_bytes(content)
    with pytest.raises(Internal) as err:
        journal.load("vol-1")
    assert str(path) in str(err.value)
    assert "unreadable" in str(err.value)
    with pytest.raises(Internal):
        journal.all()


def test_record_with_unknown_field_is_internal(journal: Journal, tmp_path: Path) -> None:
    data = make_record().to_json()
    data["key"] = "should never be here"
    path = journal_dir(tmp_path) / f"{volume_digest('vol-1')}.json"
    path.write_text(json.dumps(data))
    with pytest.raises(Internal):
        journal.load("vol-1")


def test_record_json_has_no_key_fields(journal: Journal, tmp_path: Path) -> None:
    journal.write(make_record())
    (path,) = journal_dir(tmp_path).iterdir()
    data = json.loads(path.read_text())
    assert set(data) == {"volume_id", "state", "spec", "target_path", "pod", "created_at", "step",
                         "name", "claim", "staging_path", "targets", "grow_to"}  # fmt: skip
    assert not any("key" in k or "secret" in k or "pass" in k for k in data["spec"])


def test_all_during_a_write_does_not_break_that_write(
    journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    listed: list[int] = []

    def fsync(fd: int) -> None:
        if not listed and ".tmp." in os.readlink(f"/proc/self/fd/{fd}"):
            listed.append(len(journal.all()))  # another thread lists the journal right now
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    journal.write(make_record())
    assert listed == [0]
    assert journal.load("vol-1") == make_record()


# names -------------------------------------------------------------------------------------
def test_names_derive_deterministically_from_the_volume_id() -> None:
    a = Names.of("csi-abc", "/data", "/run/state")
    assert a == Names.of("csi-abc", "/data", "/run/state")
    digest = hashlib.sha256(b"csi-abc").hexdigest()[:32]
    assert a.digest == digest == volume_digest("csi-abc")
    assert a.mapping == MAPPING_PREFIX + digest
    assert a.backing == f"/data/{digest}.img"
    assert a.header == f"/run/state/headers/{digest}.hdr"
    assert a.mapper_device == f"/dev/mapper/{MAPPING_PREFIX}{digest}"
    assert len(a.mapping) < 128  # device-mapper name limit


def test_names_differ_between_volume_ids() -> None:
    ids = ["csi-abc", "csi-abd", "CSI-ABC", "a", "a" * 128, "vol.1", "vol_1", "vol-1"]
    names = [Names.of(i, "/data", "/state") for i in ids]
    for attr in ("digest", "mapping", "backing", "header"):
        values = [getattr(n, attr) for n in names]
        assert len(set(values)) == len(ids), attr


def test_names_never_contain_the_raw_volume_id() -> None:
    hostile = "..%2F..%2Fetc"
    n = Names.of(hostile, "/data", "/state")
    assert hostile not in n.backing + n.header + n.mapping
    assert os.path.dirname(n.backing) == "/data"
    assert os.path.dirname(n.header) == "/state/headers"


# locks -------------------------------------------------------------------------------------
def test_second_hold_of_the_same_volume_is_aborted() -> None:
    locks = VolumeLocks()
    with locks.hold("vol-1"):
        with pytest.raises(Aborted) as err:
            with locks.hold("vol-1"):
                pytest.fail("the second hold must not be entered")
        assert "vol-1" in str(err.value)
        with locks.hold("vol-2"):  # another volume is independent
            pass
    with locks.hold("vol-1"):  # released on exit
        pass


def test_hold_from_another_thread_is_aborted_not_blocked() -> None:
    locks = VolumeLocks()
    outcome: list[BaseException | None] = []

    def other() -> None:
        try:
            with locks.hold("vol-1"):
                outcome.append(None)
        except Aborted as exc:
            outcome.append(exc)

    with locks.hold("vol-1"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(5)
        assert not thread.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], Aborted)


def test_lock_is_released_after_an_exception() -> None:
    locks = VolumeLocks()
    with pytest.raises(RuntimeError), locks.hold("vol-1"):
        raise RuntimeError("boom")
    with locks.hold("vol-1"):
        with pytest.raises(Aborted):
            with locks.hold("vol-1"):
                pass
    with pytest.raises(KeyboardInterrupt), locks.hold("vol-1"):
        raise KeyboardInterrupt  # even a BaseException releases it
    with locks.hold("vol-1"):
        pass
