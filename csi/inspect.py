"""Inspection: a volume's stats and health (NodeGetVolumeStats) and the admin's list."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from csi.errors import DriverError, InvalidArgument, NotFound
from csi.exposures import BindDevice
from csi.host import FsStats
from csi.journal import PUBLISHED, STAGED, Names, Record

if TYPE_CHECKING:
    from csi.volumes import Volumes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeHealth:
    abnormal: bool
    message: str


@dataclass(frozen=True)
class VolumeStats:
    usage: FsStats | None
    health: VolumeHealth
    block_bytes: int | None = None  # a block volume has a size but no filesystem usage


@dataclass(frozen=True)
class VolumeInfo:
    record: Record
    names: Names
    allocated_bytes: int
    device: str | None  # the backing's own device (loop or NBD), if any
    opened: str | None  # what the backing hands over (mapper device, directory), if prepared
    mounted: bool


def paths_of(record: Record) -> list[str]:
    """Where the volume is visible: its inline target, or its staging path and targets."""
    if not record.provisioned:
        return [record.target_path]
    return [p for p in (record.staging_path, *record.targets) if p]


class Inspector:
    def __init__(self, volumes: Volumes) -> None:
        self.volumes = volumes
        self.host = volumes.host

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        self.volumes.check_volume_id(volume_id)
        if not volume_path:
            raise InvalidArgument("volume_path is required")
        record = self.volumes.journal.load(volume_id)
        if record is None or record.state not in (PUBLISHED, STAGED):
            raise NotFound(f"volume {volume_id} is not published on this node")
        if volume_path not in paths_of(record):
            raise NotFound(f"volume {volume_id} is not published at {volume_path}")
        names = self.volumes.names(volume_id)
        backing = self.volumes.backing_of(record.spec)
        health = self.health(names, record, volume_path)
        if record.spec.kata != "off":  # its filesystem lives in the guest: the disk's allocation
            allocated, total = backing.allocated(names), record.spec.size
            return VolumeStats(FsStats(total, max(0, total - allocated), allocated, 0, 0, 0),
                               health)  # fmt: skip
        if record.spec.access_type == "block":
            size = self.host.device_size(backing.source(names)) if not health.abnormal else None
            return VolumeStats(None, health, size)
        mounted = backing.shown_at(names, volume_path)
        return VolumeStats(backing.usage(names, volume_path) if mounted else None, health)

    def health(self, names: Names, record: Record, path: str = "") -> VolumeHealth:
        path = path or self.volumes.primary_path(record)
        backing = self.volumes.backing_of(record.spec)
        problems = backing.health(names, record.spec)
        if self.volumes.seal.was_shredded(record.volume_id):
            problems.insert(0, "its key was wiped by an emergency shred: reads and writes fail; "
                               "delete the pod (its data is gone)")  # fmt: skip
        if backing.find(names) is None:
            pass  # nothing can be exposed without it: the backing said why
        elif record.spec.kata != "off":
            if path != record.staging_path and not self._handed_off(names, record, path):
                problems.append(f"volume is not handed to a Kata VM at {path}")
        elif record.spec.access_type == "block":
            bound = path == record.staging_path or BindDevice(
                self.host, [], backing.shown_at).is_exposed(names, path)  # fmt: skip
            if not bound:  # a block volume is staged by opening it; targets are binds
                problems.append(f"device is not bound at {path}")
        elif not backing.shown_at(names, path):
            problems.append(f"filesystem is not mounted at {path}")
        elif (errors := backing.filesystem_errors(names)) > 0:
            problems.append(f"filesystem has recorded {errors} errors")
        if problems:
            return VolumeHealth(True, "; ".join(problems))
        if record.spec.kata != "off":
            return VolumeHealth(False, "volume is healthy; its filesystem lives in the Kata VM, "
                                "so usage is the disk's allocation on the node")  # fmt: skip
        return VolumeHealth(False, "volume is healthy")

    def _handed_off(self, names: Names, record: Record, path: str) -> bool:
        spec = record.spec
        return self.volumes.hand_off(names, spec, spec.mount_flags,
                                     readonly=spec.readonly).is_exposed(names, path)  # fmt: skip

    def _mounted(self, names: Names, record: Record) -> bool:
        if record.spec.kata != "off" and not record.provisioned:
            return self._handed_off(names, record, record.target_path)
        if record.provisioned and (record.spec.access_type == "block" or record.spec.kata != "off"):
            return self.volumes.backing_of(record.spec).find(names) is not None  # staged = open
        backing = self.volumes.backing_of(record.spec)
        return backing.shown_at(names, self.volumes.primary_path(record))

    def list(self) -> list[VolumeInfo]:
        result = []
        for record in self.volumes.journal.all():
            names = self.volumes.names(record.volume_id)
            backing = self.volumes.backing_of(record.spec)
            try:
                result.append(
                    VolumeInfo(
                        record=record,
                        names=names,
                        allocated_bytes=backing.allocated(names),
                        device=backing.attached(names),
                        opened=backing.find(names),
                        mounted=self._mounted(names, record),
                    )
                )
            except DriverError as exc:  # one volume the host cannot inspect hides no other
                log.warning("cannot inspect volume %s: %s", record.volume_id, exc)
        return result
