"""Per-volume journal records on tmpfs, written atomically, plus per-volume locks.

A record says which volume exists on this node and whether its publish finished. It never holds
key material. Object names (mapping, backing file, header) derive from a hash of the volume id, so
the record does not need to store them and a lost record cannot hide an object from the driver.

Records are read leniently across driver versions: fields this version does not know (a newer
driver's, e.g. after a rollback) are kept and written back unchanged, and missing optional fields
take their defaults. A record that still cannot be read (bad JSON, wrong types, a volume id that
does not belong to its file name, too big) is *set aside*: moved to ``volumes/unreadable/`` under
its own file name, logged and counted, never deleted, so one bad file cannot stop start-up or any
other volume, and the digest in its name tells the lifecycle which objects to leave alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from csi.backings.luks import MAPPING_PREFIX
from csi.errors import DriverError, FailedPrecondition, Internal, ResourceExhausted
from csi.params import VolumeSpec
from csi.statefiles import write_all

log = logging.getLogger(__name__)

# Inline volumes: CREATING while NodePublishVolume works, PUBLISHED once it is done.
CREATING = "creating"
PUBLISHED = "published"
# Provisioned (PVC) volumes: CreateVolume RESERVES capacity; NodeStageVolume goes through STAGING
# to STAGED (backing, mapping and, for filesystems, the staging mount exist); NodeUnstageVolume
# goes through UNSTAGING back to RESERVED; DeleteVolume forgets the record.
RESERVED = "reserved"
STAGING = "staging"
STAGED = "staged"
UNSTAGING = "unstaging"
STATES = (CREATING, PUBLISHED, RESERVED, STAGING, STAGED, UNSTAGING)
# States a crash can leave behind that start-up must finish or roll back.
HALF_DONE = (CREATING, STAGING, UNSTAGING)

MAX_RECORD_BYTES = 64 * 1024  # a record is a few hundred bytes; bigger is not one of ours
UNREADABLE_DIR = "unreadable"  # under <state>/volumes: set-aside records, never deleted
# a set-aside record keeps its file name; a second one of the same digest gets ".1", ".2", ...
SET_ASIDE_NAME = re.compile(r"^([0-9a-f]{32})\.json(?:\.[0-9]+)?$")
_READ_ATTEMPTS = 3  # a record replaced between reading it and setting it aside is read again


def volume_digest(volume_id: str) -> str:
    """Stable short name for a volume: safe in paths and dm names, unique in practice."""
    return hashlib.sha256(volume_id.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Names:
    """Where a volume's objects live; derived only from the volume id and the config dirs."""

    volume_id: str
    digest: str
    mapping: str
    backing: str
    header: str

    @classmethod
    def of(cls, volume_id: str, data_dir: str, state_dir: str) -> Names:
        digest = volume_digest(volume_id)
        return cls(
            volume_id=volume_id,
            digest=digest,
            mapping=MAPPING_PREFIX + digest,
            backing=os.path.join(data_dir, f"{digest}.img"),
            header=os.path.join(state_dir, "headers", f"{digest}.hdr"),
        )

    @classmethod
    def of_digest(cls, digest: str, data_dir: str, state_dir: str) -> Names:
        """The names of a volume known only by its digest (an object no record accounts for)."""
        return cls(
            volume_id=f"(no record, digest {digest})",
            digest=digest,
            mapping=MAPPING_PREFIX + digest,
            backing=os.path.join(data_dir, f"{digest}.img"),
            header=os.path.join(state_dir, "headers", f"{digest}.hdr"),
        )

    @property
    def mapper_device(self) -> str:
        return f"/dev/mapper/{self.mapping}"


class BadRecord(ValueError):
    """Why a record cannot be read, in words safe to log: never the record's content."""


class RecordUnreadable(FailedPrecondition):
    """A volume's journal record cannot be read; it was set aside (never deleted), and the
    volume fails with this error until an admin repairs or removes the set-aside file."""

    def __init__(self, message: str, *, path: str, set_aside_as: str | None) -> None:
        super().__init__(message)
        self.path = path
        self.set_aside_as = set_aside_as  # None: it could not be moved and is still at ``path``


@dataclass
class Record:
    volume_id: str
    state: str
    spec: VolumeSpec
    target_path: str  # inline: the one target; provisioned volumes use ``targets``
    pod: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0
    step: str = ""
    # provisioned (PVC) volumes only
    name: str = ""  # the CO's name in CreateVolume: set means "provisioned"
    claim: str = ""  # namespace/name of the PVC, when the provisioner passes it
    staging_path: str = ""
    targets: dict[str, list[str]] = field(default_factory=dict)  # target -> mount options
    grow_to: int = 0  # size an expansion in progress has reserved (0: none)
    details: dict[str, str] = field(default_factory=dict)  # the backing's: never a secret
    # Fields of the record and of its spec that this version does not know (written by a newer
    # driver): not used here, written back as they were, so a rollback does not lose them.
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    spec_extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def provisioned(self) -> bool:
        return bool(self.name)

    @property
    def charge(self) -> int:
        """Bytes this volume holds against the node: its full size (or the size an expansion is
        growing it to) plus an attached header's area and qcow2 tables, whether or not a block
        is written yet."""
        return max(self.spec.size, self.grow_to) + self.spec.disk_bytes - self.spec.size

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["extra"], data["spec_extra"]
        if not self.details:  # a LUKS volume's record stays exactly as earlier versions wrote it
            del data["details"]
        data["spec"] = {**self.spec_extra, **self.spec.to_json()}
        return {**self.extra, **data}

    @classmethod
    def from_json(cls, data: Any) -> Record:
        """A record from its JSON (any version's); BadRecord says why it cannot be one."""
        _check_fields("the record", data, _RECORD_FIELDS)
        _check_fields("its spec", data["spec"], _SPEC_FIELDS)
        if data["state"] not in STATES:
            raise BadRecord(f"its state {_short(data['state'])} is not one of {', '.join(STATES)}")
        if data["spec"]["size"] <= 0:
            raise BadRecord("its spec.size is not a positive number of bytes")
        if data.get("grow_to", 0) < 0:
            raise BadRecord("its grow_to is negative")
        known = {k: v for k, v in data.items() if k in _RECORD_FIELDS and k != "spec"}
        spec = data["spec"]
        return cls(
            **known,
            spec=VolumeSpec.from_json({k: v for k, v in spec.items() if k in _SPEC_FIELDS}),
            extra={k: v for k, v in data.items() if k not in _RECORD_FIELDS},
            spec_extra={k: v for k, v in spec.items() if k not in _SPEC_FIELDS},
        )


# Field checks, derived from the dataclasses' annotations ------------------------------------
_Schema = dict[str, tuple[Any, bool]]  # JSON field -> (type it must have, required)


def _schema(cls: type, skip: tuple[str, ...] = (), **override: Any) -> _Schema:
    hints = get_type_hints(cls)
    schema: _Schema = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        hint = override.get(f.name, hints[f.name])
        _supported(hint, f"{cls.__name__}.{f.name}")
        schema[f.name] = (hint, f.default is MISSING and f.default_factory is MISSING)
    return schema


def _supported(hint: Any, where: str) -> None:
    """Fail at import, not on a node, when a new field has a type the checks below lack."""
    if hint in (Any, bool, int, float, str):
        return
    if get_origin(hint) in (list, tuple, dict):
        for arg in get_args(hint):
            if arg is not Ellipsis:
                _supported(arg, where)
        return
    raise TypeError(f"journal: no JSON type check for {where}: {hint!r}")


def _conforms(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (list, tuple):  # JSON has arrays only; a tuple[T, ...] is written as one
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()
        )
    return False  # pragma: no cover - _supported refuses such a hint at import


def _check_fields(where: str, data: Any, schema: _Schema) -> None:
    if not isinstance(data, dict):
        raise BadRecord(f"{where} is not a JSON object")
    for name, (hint, required) in schema.items():
        if name not in data:
            if required:
                raise BadRecord(f"{where} has no field {name!r}")
        elif not _conforms(data[name], hint):
            raise BadRecord(
                f"{where} has field {name!r} of the wrong type (not {_type_name(hint)})"
            )


def _type_name(hint: Any) -> str:
    if get_origin(hint) is tuple:
        return f"list[{_type_name(get_args(hint)[0])}]"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_RECORD_FIELDS = _schema(Record, skip=("extra", "spec_extra"), spec=dict[str, Any])
_SPEC_FIELDS = _schema(VolumeSpec)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_record(raw: bytes, digest: str) -> Record:
    """The record in ``raw``, read from the file of ``digest``; BadRecord says why not."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRecord("it is not UTF-8 text") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BadRecord(f"it is not JSON ({exc.msg} at {where})") from None
    except (ValueError, RecursionError):
        raise BadRecord("it is not JSON this driver can parse") from None
    try:
        record = Record.from_json(data)
    except BadRecord:
        raise
    except (TypeError, ValueError, KeyError) as exc:  # pragma: no cover - the checks come first
        raise BadRecord(f"it does not fit this driver's record ({type(exc).__name__})") from None
    if volume_digest(record.volume_id) != digest:
        raise BadRecord(
            f"its volume_id {_short(record.volume_id)} does not belong to this file name"
        )
    return record


def _unreadable(path: str, reason: str | None, aside: str | None, volume_id: str | None) -> str:
    """What a person reads about an unreadable record; ``reason`` None: set aside earlier."""
    volume = f" of volume {volume_id}" if volume_id else ""
    if aside is None:
        return (
            f"journal record {path}{volume} is unreadable ({reason}) and could not be set aside; "
            "the volume's backing file, mapping and header are kept: move the record into "
            f"{os.path.join(os.path.dirname(path), UNREADABLE_DIR)} by hand"
        )
    if reason is None:
        what = f"journal record{volume} was set aside as {aside} because it was unreadable"
    else:
        what = (
            f"journal record {path}{volume} is unreadable ({reason}) and was set aside as {aside}"
        )
    return (
        f"{what}; the volume's backing file, mapping and header are kept. Repair the record and "
        f"move it back to {path}, or delete {aside} and restart the driver so that start-up "
        "removes the volume's leftovers; until then this volume fails"
    )


class Journal:
    """Records under ``<state_dir>/volumes``: one JSON file per volume, atomic replace.

    ``on_set_aside`` (a constructor argument or attribute) is called with the new path of every
    record set aside; metrics count them through it.
    """

    def __init__(
        self, state_dir: str, *, on_set_aside: Callable[[str], None] | None = None
    ) -> None:
        self.dir = os.path.join(state_dir, "volumes")
        self.unreadable_dir = os.path.join(self.dir, UNREADABLE_DIR)
        self.on_set_aside = on_set_aside
        # digest -> path of an unreadable record that could not be moved out of the way
        self._stuck: dict[str, str] = {}
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(state_dir, "headers"), mode=0o700, exist_ok=True)

    def _path(self, volume_id: str) -> str:
        return os.path.join(self.dir, f"{volume_digest(volume_id)}.json")

    # writing -----------------------------------------------------------------------------
    def write(self, record: Record) -> None:
        path = self._path(record.volume_id)
        data = json.dumps(record.to_json(), sort_keys=True).encode()
        if len(data) > MAX_RECORD_BYTES:
            raise ResourceExhausted(
                f"the journal record of volume {record.volume_id} would take {len(data)} bytes, "
                f"more than the {MAX_RECORD_BYTES} a record may hold; nothing was written"
            )
        tmp = f"{path}.tmp.{threading.get_ident()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _write_failed(record.volume_id, path, exc) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The journal directory, flock'ed: renames in it (a write's, a set-aside's) exclude each
        other across threads and processes (the ``volumes`` admin command reads it too)."""
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            yield dir_fd
        finally:
            os.close(dir_fd)  # releases the lock

    def _rename(self, src: str, dst: str) -> None:
        with self._locked() as dir_fd:
            os.replace(src, dst)
            fcntl.flock(dir_fd, fcntl.LOCK_UN)
            os.fsync(dir_fd)

    def delete(self, volume_id: str) -> None:
        with self._locked(), contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id))

    def remove_partial_writes(self) -> None:
        """Delete temp files of writes that crashed before their rename (start-up only: at run
        time such a file may belong to a write in progress)."""
        for name in os.listdir(self.dir):
            if ".tmp." in name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))

    # reading -----------------------------------------------------------------------------
    def load(self, volume_id: str) -> Record | None:
        """The volume's record, or None if it has none. RecordUnreadable (FAILED_PRECONDITION)
        if its record is unreadable, now (it is set aside first) or before (a set-aside file of
        its digest exists): a fresh volume over the live one's objects would be worse."""
        digest = volume_digest(volume_id)
        path = self._path(volume_id)
        aside = self._set_aside_of(digest)
        if aside is not None:
            raise RecordUnreadable(
                _unreadable(path, None, aside, volume_id),
                path=path, set_aside_as=aside,
            )  # fmt: skip
        return self._read(path, digest, volume_id)

    def all(self) -> list[Record]:
        """Every readable record. An unreadable one is set aside (see unreadable_digests) and
        left out; only an OS error that is not about one file (e.g. EMFILE) raises Internal."""
        records = []
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".json"):
                continue
            try:
                record = self._read(os.path.join(self.dir, name), name.removesuffix(".json"))
            except RecordUnreadable:
                continue  # logged and counted; its digest is in unreadable_digests()
            if record is not None:
                records.append(record)
        return records

    def unreadable_digests(self) -> set[str]:
        """Digests of the records set aside (from their file names in ``volumes/unreadable``)
        and of unreadable ones that could not be moved: their volumes' objects are not orphans.
        Call it after ``all()``, which sets aside what it cannot read."""
        try:
            names = os.listdir(self.unreadable_dir)
        except (FileNotFoundError, NotADirectoryError):
            names = []
        digests = {m.group(1) for name in names if (m := SET_ASIDE_NAME.match(name))}
        return digests | {d for d in self._stuck if SET_ASIDE_NAME.match(f"{d}.json")}

    def _set_aside_of(self, digest: str) -> str | None:
        try:
            names = sorted(os.listdir(self.unreadable_dir))
        except (FileNotFoundError, NotADirectoryError):
            return None
        for name in names:
            match = SET_ASIDE_NAME.match(name)
            if match and match.group(1) == digest:
                return os.path.join(self.unreadable_dir, name)
        return None

    def _read(self, path: str, digest: str, volume_id: str | None = None) -> Record | None:
        for _attempt in range(_READ_ATTEMPTS):
            fd = -1
            try:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENXIO):
                        raise
                    # ELOOP: a symbolic link (never followed); ENXIO: a socket
                    seen, reason = os.lstat(path), "it is not a regular file"
                else:
                    seen = os.fstat(fd)
                    try:
                        record = _parse_file(fd, seen, digest)
                        self._stuck.pop(digest, None)
                        return record
                    except BadRecord as bad:
                        reason = str(bad)
                # the file stays open while it is set aside: its inode cannot be reused meanwhile
                self._set_aside(path, seen, digest, reason, volume_id)
                # returned: a write replaced the file since it was read; read the new one
            except FileNotFoundError:
                self._stuck.pop(digest, None)
                return None
            except OSError as exc:
                raise Internal(f"cannot read journal record {path}: {exc.strerror}") from None
            finally:
                if fd >= 0:
                    os.close(fd)
        raise Internal(f"journal record {path} kept changing while it was read; retry")

    def _set_aside(
        self, path: str, seen: os.stat_result, digest: str, reason: str, volume_id: str | None
    ) -> None:
        """Move an unreadable record into ``volumes/unreadable`` and raise RecordUnreadable;
        return, moving nothing, if ``path`` is no longer the file ``seen`` that was read."""
        try:
            with self._locked():
                try:
                    now = os.lstat(path)
                except FileNotFoundError:
                    return
                if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino):
                    return
                os.makedirs(self.unreadable_dir, mode=0o700, exist_ok=True)
                aside = self._free_name(os.path.basename(path))
                os.rename(path, aside)
        except OSError as exc:
            self._stuck[digest] = path
            log.error("journal record %s is unreadable (%s) and could not be set aside (%s); "
                      "its volume's objects are kept", path, reason, exc.strerror)  # fmt: skip
            message = _unreadable(path, reason, None, volume_id)
            raise RecordUnreadable(message, path=path, set_aside_as=None) from None
        self._stuck.pop(digest, None)
        for directory in (self.dir, self.unreadable_dir):
            with contextlib.suppress(OSError):  # tmpfs: nothing to make durable
                _fsync_dir(directory)
        log.warning("journal record %s is unreadable (%s); set it aside as %s, keeping its "
                    "volume's objects", path, reason, aside)  # fmt: skip
        if self.on_set_aside is not None:
            try:
                self.on_set_aside(aside)
            except Exception:
                log.exception("on_set_aside callback failed for %s", aside)
        message = _unreadable(path, reason, aside, volume_id)
        raise RecordUnreadable(message, path=path, set_aside_as=aside)

    def _free_name(self, name: str) -> str:
        """A name in ``volumes/unreadable`` that no earlier set-aside record holds."""
        candidate = os.path.join(self.unreadable_dir, name)
        n = 0
        while os.path.lexists(candidate):
            n += 1
            candidate = os.path.join(self.unreadable_dir, f"{name}.{n}")
        return candidate


def _parse_file(fd: int, seen: os.stat_result, digest: str) -> Record:
    if not stat.S_ISREG(seen.st_mode):
        raise BadRecord("it is not a regular file")
    if seen.st_size > MAX_RECORD_BYTES:
        raise BadRecord(f"it is {seen.st_size} bytes, more than a record's {MAX_RECORD_BYTES}")
    raw = _read_at_most(fd, MAX_RECORD_BYTES + 1)
    if len(raw) > MAX_RECORD_BYTES:  # grew since fstat
        raise BadRecord(f"it is more than a record's {MAX_RECORD_BYTES} bytes")
    return parse_record(raw, digest)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _fsync_dir(path: str) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_failed(volume_id: str, path: str, exc: OSError) -> DriverError:
    where = os.path.dirname(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(
            f"cannot write the journal record of volume {volume_id}: the state dir {where} is "
            f"full ({exc.strerror}); free space there or give its tmpfs more room, then retry"
        )
    return Internal(
        f"cannot write the journal record of volume {volume_id} to {where}: {exc.strerror}; "
        "nothing was written"
    )
