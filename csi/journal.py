"""Per-volume journal records on tmpfs, written atomically, plus per-volume locks.

A record says which volume exists on this node and whether its publish finished. It never holds
key material. Object names (mapping, backing file, header) derive from a hash of the volume id, so
the record does not need to store them and a lost record cannot hide an object from the driver.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from csi.errors import Aborted, Internal
from csi.params import VolumeSpec

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
# States a crash can leave behind that start-up must finish or roll back.
HALF_DONE = (CREATING, STAGING, UNSTAGING)
MAPPING_PREFIX = "luks-eph-"


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

    @property
    def mapper_device(self) -> str:
        return f"/dev/mapper/{self.mapping}"


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
        data["spec"] = self.spec.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        data = dict(data)
        data["spec"] = VolumeSpec.from_json(data["spec"])
        return cls(**data)


class Journal:
    """Records under ``<state_dir>/volumes``: one JSON file per volume, atomic replace."""

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.join(state_dir, "volumes")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.join(state_dir, "headers"), mode=0o700, exist_ok=True)

    def _path(self, volume_id: str) -> str:
        return os.path.join(self.dir, f"{volume_digest(volume_id)}.json")

    def write(self, record: Record) -> None:
        path = self._path(record.volume_id)
        tmp = f"{path}.tmp.{threading.get_ident()}"
        data = json.dumps(record.to_json(), sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, volume_id: str) -> Record | None:
        return self._read(self._path(volume_id))

    def _read(self, path: str) -> Record | None:
        try:
            with open(path, "rb") as f:
                return Record.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            raise Internal(f"journal record {path} is unreadable: {exc}") from None

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(volume_id))

    def remove_partial_writes(self) -> None:
        """Delete temp files of writes that crashed before their rename (start-up only: at run
        time such a file may belong to a write in progress)."""
        for name in os.listdir(self.dir):
            if ".tmp." in name:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))

    def all(self) -> list[Record]:
        records = []
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            if name.endswith(".json"):
                record = self._read(path)
                if record is not None:
                    records.append(record)
        return records


class VolumeLocks:
    """One lock per volume id; a second caller gets ABORTED instead of waiting."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held: set[str] = set()

    @contextlib.contextmanager
    def hold(self, volume_id: str) -> Iterator[None]:
        with self._guard:
            if volume_id in self._held:
                raise Aborted(f"an operation on volume {volume_id} is already in progress; retry")
            self._held.add(volume_id)
        try:
            yield
        finally:
            with self._guard:
                self._held.discard(volume_id)
