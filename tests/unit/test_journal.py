"""Journal records (atomic writes on tmpfs), names derived from volume ids, per-volume locks."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from csi.backings.luks import MAPPING_PREFIX
from csi.errors import DriverError, FailedPrecondition, Internal, ResourceExhausted
from csi.journal import (
    CREATING,
    PUBLISHED,
    STAGED,
    Journal,
    Names,
    Record,
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


# compatibility across versions ---------------------------------------------------------------
# Records exactly as this version writes them (json.dumps(record.to_json(), sort_keys=True)):
# older and newer drivers must keep reading these, and this driver must keep reading them.
TODAY_INLINE = (
    '{"claim": "", "created_at": 1700000000.25, "grow_to": 0, "name": "", "pod": {"name": '
    '"web-0", "namespace": "shop", "uid": "uid"}, "spec": {"access_type": "mount", "backing": '
    '"loop", "cipher": "aes-xts-plain64", "fs_type": "ext4", "header": "attached", "integrity": '
    '"none", "mount_flags": ["noatime", "discard"], "mount_group": "", "preallocate": false, '
    '"readonly": false, "size": 67108864}, "staging_path": "", "state": "published", "step": '
    '"published", "target_path": "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/scratch/'
    'mount", "targets": {}, "volume_id": "vol-1"}'
)
PVC_ID = "node-a/0123456789abcdef0123456789abcdef"
TODAY_PVC = (
    '{"claim": "shop/data", "created_at": 1700000001.5, "grow_to": 0, "name": "pvc-1", "pod": '
    '{}, "spec": {"access_type": "mount", "backing": "qcow2", "cipher": "aes-xts-plain64", '
    '"fs_type": "xfs", "header": "detached", "integrity": "none", "mount_flags": [], '
    '"mount_group": "2000", "preallocate": false, "readonly": false, "size": 1073741824}, '
    '"staging_path": "/var/lib/kubelet/plugins/kubernetes.io/csi/luks-ephemeral.csi.io/abc/'
    'globalmount", "state": "staged", "step": "staged", "target_path": "", "targets": {"/var/'
    'lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pvc-1/mount": ["ro"]}, "volume_id": '
    '"node-a/0123456789abcdef0123456789abcdef"}'
)
PVC_TARGET = "/var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pvc-1/mount"
# An older driver's record: only the required fields.
OLDER = (
    '{"spec": {"size": 67108864}, "state": "creating", "target_path": "/t", "volume_id": "v-old"}'
)
MAX_RECORD_BYTES = 64 * 1024  # the contract: no record file above this is read


def record_path(tmp_path: Path, volume_id: str) -> Path:
    return journal_dir(tmp_path) / f"{volume_digest(volume_id)}.json"


def put(tmp_path: Path, volume_id: str, content: bytes | str) -> Path:
    path = record_path(tmp_path, volume_id)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def aside_dir(tmp_path: Path) -> Path:
    return journal_dir(tmp_path) / "unreadable"


def newer(base: str, **top: object) -> str:
    """``base`` as a newer driver might write it: more fields at top level and in spec."""
    data = json.loads(base)
    data.update(top)
    data["spec"]["future_spec_knob"] = {"level": 3}
    return json.dumps(data, sort_keys=True)


def test_records_of_this_older_and_newer_versions_load(journal: Journal, tmp_path: Path) -> None:
    put(tmp_path, "vol-1", TODAY_INLINE)
    put(tmp_path, PVC_ID, TODAY_PVC)
    put(tmp_path, "v-old", OLDER)
    put(tmp_path, "vol-new", newer(TODAY_INLINE, volume_id="vol-new", future_field=[1, "x"]))

    assert journal.load("vol-1") == make_record()
    pvc = journal.load(PVC_ID)
    assert pvc is not None
    assert (pvc.state, pvc.name, pvc.claim, pvc.targets) == (STAGED, "pvc-1", "shop/data",
                                                             {PVC_TARGET: ["ro"]})  # fmt: skip
    assert pvc.spec == VolumeSpec(size=1024**3, backing="qcow2", fs_type="xfs", mount_group="2000")
    old = journal.load("v-old")  # missing optional fields take their defaults
    assert old == Record(volume_id="v-old", state=CREATING, spec=VolumeSpec(size=64 * MiB),
                         target_path="/t")  # fmt: skip
    assert (old.pod, old.targets, old.grow_to, old.extra, old.spec_extra) == ({}, {}, 0, {}, {})
    new = journal.load("vol-new")
    assert new is not None
    assert new.spec == make_record().spec  # the unknown spec field does not change the shape
    assert new.extra == {"future_field": [1, "x"]}
    assert new.spec_extra == {"future_spec_knob": {"level": 3}}
    assert sorted(r.volume_id for r in journal.all()) == sorted(["vol-1", PVC_ID, "v-old",
                                                                 "vol-new"])  # fmt: skip
    # and this version still writes today's format, byte for byte
    journal.write(make_record())
    assert record_path(tmp_path, "vol-1").read_text() == TODAY_INLINE
    assert journal.unreadable_digests() == set()


def test_a_rewrite_keeps_a_newer_drivers_fields(journal: Journal, tmp_path: Path) -> None:
    put(tmp_path, "vol-1", newer(TODAY_INLINE, future_field={"a": [1, 2]}))
    record = journal.load("vol-1")
    assert record is not None
    record.state = CREATING  # an older driver changes what it knows and writes the record back
    journal.write(record)
    data = json.loads(record_path(tmp_path, "vol-1").read_text())
    assert data["future_field"] == {"a": [1, 2]}
    assert data["spec"]["future_spec_knob"] == {"level": 3}
    assert data["state"] == CREATING
    assert journal.load("vol-1") == record


BAD_RECORDS: dict[str, bytes | str] = {
    "not json": b"{not json",
    "empty": b"",
    "array": b"[]",
    "number": b"42",
    "null": b"null",
    "string": b'"text"',
    "not utf-8": b"\xff\xfe\x00",
    "NaN": TODAY_INLINE.replace("1700000000.25", "NaN"),
    "deep": b"[" * 100_000 + b"]" * 100_000,  # a RecursionError, not a crash
    "missing state": b'{"volume_id": "vol-1"}',
    "empty spec": b'{"volume_id": "vol-1", "state": "published", "spec": {}, "target_path": "/t"}',
    "spec not an object": TODAY_INLINE.replace('"spec": {', '"spec": [{').replace(
        '"size": 67108864}', '"size": 67108864}]'
    ),
    "volume_id int": TODAY_INLINE.replace('"vol-1"', "7"),
    "unknown state": TODAY_INLINE.replace('"state": "published"', '"state": "expanding"'),
    "state int": TODAY_INLINE.replace('"state": "published"', '"state": 3'),
    "size string": TODAY_INLINE.replace("67108864", '"64Mi"'),
    "size zero": TODAY_INLINE.replace("67108864", "0"),
    "size negative": TODAY_INLINE.replace("67108864", "-1"),
    "size bool": TODAY_INLINE.replace("67108864", "true"),
    "size float": TODAY_INLINE.replace("67108864", "67108864.5"),
    "readonly string": TODAY_INLINE.replace('"readonly": false', '"readonly": "no"'),
    "mount_flags string": TODAY_INLINE.replace('["noatime", "discard"]', '"noatime"'),
    "pod list": TODAY_INLINE.replace(
        '{"name": "web-0", "namespace": "shop", "uid": "uid"}', '["web-0"]'
    ),
    "targets values": TODAY_INLINE.replace('"targets": {}', '"targets": {"/t": "ro"}'),
    "grow_to negative": TODAY_INLINE.replace('"grow_to": 0', '"grow_to": -5'),
    "another volume": TODAY_INLINE.replace('"vol-1"', '"vol-2"'),  # digest does not match
    "too big": TODAY_INLINE + " " * (MAX_RECORD_BYTES - len(TODAY_INLINE) + 1),
}


@pytest.mark.parametrize("content", BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_unreadable_record_is_set_aside_and_fails_only_its_volume(
    journal: Journal, tmp_path: Path, content: bytes | str
) -> None:
    path = put(tmp_path, "vol-1", content)
    raw = path.read_bytes()
    journal.write(make_record("vol-2"))
    digest = volume_digest("vol-1")

    with pytest.raises(FailedPrecondition) as err:
        journal.load("vol-1")
    aside = aside_dir(tmp_path) / f"{digest}.json"
    message = str(err.value)
    assert f"journal record {path} of volume vol-1 is unreadable" in message
    assert f"set aside as {aside}" in message
    assert "kept" in message
    assert err.value.set_aside_as == str(aside)  # type: ignore[attr-defined]
    assert not path.exists()
    assert aside.read_bytes() == raw  # moved, never rewritten or deleted
    assert stat.S_IMODE(aside_dir(tmp_path).stat().st_mode) == 0o700
    assert [r.volume_id for r in journal.all()] == ["vol-2"]  # the other volume is unharmed
    assert journal.unreadable_digests() == {digest}


def test_the_size_bound_is_64_kib_exactly(journal: Journal, tmp_path: Path) -> None:
    put(tmp_path, "vol-1", TODAY_INLINE + " " * (MAX_RECORD_BYTES - len(TODAY_INLINE)))
    assert journal.load("vol-1") == make_record()
    big = TODAY_INLINE.replace("vol-1", "vol-2")
    put(tmp_path, "vol-2", big + " " * (MAX_RECORD_BYTES + 1 - len(big)))
    with pytest.raises(FailedPrecondition) as err:
        journal.load("vol-2")
    assert f"more than a record's {MAX_RECORD_BYTES}" in str(err.value)


def test_write_refuses_a_record_it_could_not_read_back(journal: Journal, tmp_path: Path) -> None:
    record = make_record()
    record.targets = {f"/var/lib/kubelet/pods/{i:04}/" + "x" * 100: ["ro"] for i in range(600)}
    with pytest.raises(ResourceExhausted) as err:
        journal.write(record)
    assert "vol-1" in str(err.value)
    assert str(MAX_RECORD_BYTES) in str(err.value)
    assert os.listdir(journal_dir(tmp_path)) == []


def test_one_bad_record_does_not_stop_listing_and_is_logged_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[str] = []
    journal = Journal(str(tmp_path / "state"), on_set_aside=reported.append)
    journal.write(make_record("vol-a"))
    journal.write(make_record("vol-c", state=CREATING))
    secret = "CONTENT-THAT-MUST-NOT-BE-LOGGED"
    bad = put(tmp_path, "vol-b", '{"volume_id": "vol-b", "state": "' + secret + '", "spec": 1')
    stray = journal_dir(tmp_path) / "notes.json"  # not even named after a digest
    stray.write_text(secret)

    with caplog.at_level(logging.WARNING, logger="csi.journal"):
        records = journal.all()
    assert sorted(r.volume_id for r in records) == ["vol-a", "vol-c"]
    digest = volume_digest("vol-b")
    assert sorted(reported) == sorted([str(aside_dir(tmp_path) / f"{digest}.json"),
                                       str(aside_dir(tmp_path) / "notes.json")])  # fmt: skip
    assert journal.unreadable_digests() == {digest}  # only names that are digests
    assert not bad.exists() and not stray.exists()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any(str(bad) in r.getMessage() and "set it aside" in r.getMessage() for r in warnings)
    assert secret not in caplog.text
    assert journal.all() == records  # nothing more to set aside: listed again, same result
    assert len(reported) == 2


def test_callback_set_later_is_used_and_its_failure_does_not_break_listing(
    journal: Journal, tmp_path: Path
) -> None:
    calls: list[str] = []

    def broken(path: str) -> None:
        calls.append(path)
        raise RuntimeError("metrics are down")

    journal.on_set_aside = broken
    put(tmp_path, "vol-1", b"{")
    assert journal.all() == []
    assert calls == [str(aside_dir(tmp_path) / f"{volume_digest('vol-1')}.json")]


def test_a_set_aside_digest_keeps_failing_until_the_admin_removes_it(
    journal: Journal, tmp_path: Path
) -> None:
    put(tmp_path, "vol-1", b"{")
    assert journal.all() == []
    aside = aside_dir(tmp_path) / f"{volume_digest('vol-1')}.json"
    for _ in range(2):  # no live record any more: still not "no such volume"
        with pytest.raises(FailedPrecondition) as err:
            journal.load("vol-1")
        assert f"set aside as {aside}" in str(err.value)
        assert f"delete {aside}" in str(err.value)
    assert journal.load("vol-2") is None  # other volumes are unaffected
    aside.unlink()  # the admin gave the volume up
    assert journal.load("vol-1") is None
    assert journal.unreadable_digests() == set()


def test_set_aside_never_overwrites_an_earlier_one(journal: Journal, tmp_path: Path) -> None:
    digest = volume_digest("vol-1")
    put(tmp_path, "vol-1", b"first")
    assert journal.all() == []
    put(tmp_path, "vol-1", b"second")
    assert journal.all() == []
    assert sorted(os.listdir(aside_dir(tmp_path))) == [f"{digest}.json", f"{digest}.json.1"]
    assert (aside_dir(tmp_path) / f"{digest}.json").read_bytes() == b"first"
    assert (aside_dir(tmp_path) / f"{digest}.json.1").read_bytes() == b"second"
    assert journal.unreadable_digests() == {digest}
    (aside_dir(tmp_path) / f"{digest}.json").unlink()
    with pytest.raises(FailedPrecondition):  # one set-aside file is left: still failing
        journal.load("vol-1")


def test_symlink_directory_and_fifo_are_set_aside_not_followed(
    journal: Journal, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text(TODAY_INLINE)
    os.symlink(elsewhere, record_path(tmp_path, "vol-1"))
    os.mkdir(record_path(tmp_path, "vol-2"))
    os.mkfifo(record_path(tmp_path, "vol-3"))  # reading it would block start-up for ever
    assert journal.all() == []
    assert journal.unreadable_digests() == {volume_digest(v) for v in ("vol-1", "vol-2", "vol-3")}
    assert os.path.islink(aside_dir(tmp_path) / f"{volume_digest('vol-1')}.json")
    assert elsewhere.read_text() == TODAY_INLINE  # the link's target is not touched


def test_record_replaced_while_it_was_read_is_read_again_not_set_aside(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csi.journal as journal_module

    put(tmp_path, "vol-1", b"{half")
    real_parse = journal_module._parse_file
    calls: list[int] = []

    def parse_then_race(fd: int, seen: os.stat_result, digest: str) -> Record:
        calls.append(fd)
        if len(calls) == 1:
            journal.write(make_record())  # another thread replaces the record right now
        return real_parse(fd, seen, digest)

    monkeypatch.setattr(journal_module, "_parse_file", parse_then_race)
    assert journal.load("vol-1") == make_record()
    assert len(calls) == 2
    assert not aside_dir(tmp_path).exists()


def test_unreadable_record_that_cannot_be_moved_stays_and_its_digest_is_protected(
    journal: Journal, tmp_path: Path
) -> None:
    aside_dir(tmp_path).write_text("in the way")  # so the set-aside directory cannot be made
    path = put(tmp_path, "vol-1", b"{")
    journal.write(make_record("vol-2"))
    assert [r.volume_id for r in journal.all()] == ["vol-2"]
    assert journal.unreadable_digests() == {volume_digest("vol-1")}
    with pytest.raises(FailedPrecondition) as err:
        journal.load("vol-1")
    assert "could not be set aside" in str(err.value)
    assert err.value.set_aside_as is None  # type: ignore[attr-defined]
    assert path.read_bytes() == b"{"  # still there, never deleted
    aside_dir(tmp_path).unlink()
    with pytest.raises(FailedPrecondition):
        journal.load("vol-1")  # now it can be moved
    assert not path.exists()
    assert journal.unreadable_digests() == {volume_digest("vol-1")}


def test_an_os_error_about_no_one_file_raises_and_sets_nothing_aside(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal.write(make_record())
    real_open = os.open

    def no_fds(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if str(path).endswith(".json"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_fds)
    with pytest.raises(Internal) as err:  # leaving the record out could make it look orphaned
        journal.all()
    assert "Too many open files" in str(err.value)
    monkeypatch.undo()
    assert journal.load("vol-1") == make_record()
    assert journal.unreadable_digests() == set()


# writes that the disk does not take whole --------------------------------------------------
def _is_temp(fd: int) -> bool:
    return ".tmp." in os.readlink(f"/proc/self/fd/{fd}")


def test_short_writes_are_continued(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    sizes: list[int] = []

    def short(fd: int, data: bytes) -> int:
        if not _is_temp(fd):
            return real_write(fd, data)
        sizes.append(real_write(fd, bytes(data[:7])))
        return sizes[-1]

    monkeypatch.setattr(os, "write", short)
    journal.write(make_record())
    assert len(sizes) > 10
    assert journal.load("vol-1") == make_record()


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [(errno.ENOSPC, ResourceExhausted, "is full"), (errno.EIO, Internal, "Input/output error")],
)
def test_failed_write_is_typed_removes_its_temp_file_and_keeps_the_old_record(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    error: int, kind: type[Exception], words: str,
) -> None:  # fmt: skip
    journal.write(make_record(state=CREATING))
    real_write = os.write

    def fails_after_a_bit(fd: int, data: bytes) -> int:
        if not _is_temp(fd):
            return real_write(fd, data)
        if len(data) < 50:
            raise OSError(error, os.strerror(error))
        return real_write(fd, bytes(data[:40]))

    monkeypatch.setattr(os, "write", fails_after_a_bit)
    with pytest.raises(kind) as err:
        journal.write(make_record(state=PUBLISHED))
    assert isinstance(err.value, DriverError)
    assert "journal record of volume vol-1" in str(err.value)
    assert words in str(err.value)
    assert str(journal_dir(tmp_path)) in str(err.value)
    assert os.listdir(journal_dir(tmp_path)) == [f"{volume_digest('vol-1')}.json"]
    loaded = journal.load("vol-1")
    assert loaded is not None and loaded.state == CREATING


def test_failed_fsync_is_internal_and_removes_the_temp_file(
    journal: Journal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if _is_temp(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(Internal):
        journal.write(make_record())
    assert os.listdir(journal_dir(tmp_path)) == []


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
