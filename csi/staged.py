"""Provisioned (PVC) volumes on the node: stage, publish into pods, unpublish, unstage, expand.

CreateVolume (provision.py) only reserves capacity. NodeStageVolume creates the backing file,
formats it with a fresh key, opens the mapping and, for a filesystem volume, makes the filesystem
and mounts it at the staging path. NodePublishVolume bind-mounts the staging path (or, for a block
volume, the decrypted device node) into each pod's target; NodeUnpublishVolume removes one such
bind; NodeUnstageVolume tears everything down and deletes the backing file (the data is
crypto-shredded: the key existed only in the kernel), leaving the reservation for DeleteVolume.

Same rules as inline volumes: every step checks whether it is already done; the journal record is
written before the work it describes, so start-up can roll a crash back; a busy volume is never
closed. No grpc and no subprocess here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from csi.capability import BLOCK, MOUNT, Capability
from csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from csi.exposures import BindDevice, BindDirectory, Exposure, Unrecorded
from csi.ids import node_of
from csi.inspect import paths_of
from csi.journal import RESERVED, STAGED, STAGING, UNSTAGING, Names, Record
from csi.params import VolumeSpec, check_combination, parse_attributes, size_from_range
from csi.steps import BIND_STEPS, EXPAND_STEPS, STAGE_STEPS
from csi.volumes import Volumes

log = logging.getLogger(__name__)

__all__ = ["BIND_STEPS", "EXPAND_STEPS", "STAGE_STEPS", "StagedVolumes"]


@dataclass(frozen=True)
class StageRequest:
    volume_id: str
    staging_path: str
    capability: Capability
    context: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetRequest:
    volume_id: str
    staging_path: str
    target_path: str
    capability: Capability
    readonly: bool = False


@dataclass(frozen=True)
class ExpandRequest:
    volume_id: str
    volume_path: str
    required: int
    limit: int


def staged_spec(spec: VolumeSpec, capability: Capability) -> VolumeSpec:
    """The record's shape with how the node uses it: access type, fs type, flags, group."""
    return dataclasses.replace(
        spec,
        access_type=capability.access_type,
        fs_type=capability.fs_type if capability.access_type == MOUNT else spec.fs_type,
        mount_flags=capability.mount_flags if capability.access_type == MOUNT else (),
        mount_group=capability.mount_group,
    )


def target_options(request: TargetRequest) -> list[str]:
    """Options of one pod's bind: ro or rw, always nosuid, plus the per-mount flags; nodev too
    for a filesystem. A block target is a device node, and nodev would make it unopenable;
    read-only access to a raw device is the container runtime's to enforce (device cgroup)."""
    flags = request.capability.mount_flags
    readonly = request.readonly or request.capability.read_only or "ro" in flags
    mode = "ro" if readonly else "rw"
    if request.capability.access_type == BLOCK:
        return [mode, "nosuid"]
    extra = [f for f in flags if f not in ("ro", "rw", "nosuid", "nodev")]
    return [mode, "nosuid", "nodev", *extra]


class StagedVolumes:
    """The node side of provisioned volumes, on top of the shared lifecycle core."""

    def __init__(self, core: Volumes) -> None:
        self.core = core
        self.host = core.host
        self.journal = core.journal

    # stage -------------------------------------------------------------------------------
    def stage(self, request: StageRequest) -> None:
        self.core.check_provisioned_id(request.volume_id)
        self.core.check_target(request.staging_path, "staging_target_path")
        with self.core.locks.hold(request.volume_id):
            self.core.seal.check(f"stage of volume {request.volume_id}")
            record = self.journal.load(request.volume_id) or self._reserve_again(request)
            if record.state == STAGED:
                self._restage(record, request)
                return
            if record.state in (STAGING, UNSTAGING):  # an earlier attempt died half-way
                self.core.release_staged(record)
            self._stage(record, request)

    def _reserve_again(self, request: StageRequest) -> Record:
        """No record: the node rebooted (tmpfs is empty) or the record was lost. The volume's
        data is gone either way; reserve it again from the PV's context and start fresh."""
        node = node_of(request.volume_id)
        me = self.core.config.node_id
        if node != me:
            raise NotFound(f"volume {request.volume_id} lives on node {node}, not on {me}")
        config = self.core.config
        fields = parse_attributes(request.context, min_size=config.min_size,
                                  max_size=config.max_size)  # fmt: skip
        spec = staged_spec(VolumeSpec(**fields), request.capability)
        check_combination(spec)
        log.warning("volume %s has no journal record on this node (a reboot?); reserving it "
                    "again from its volume context, with no data", request.volume_id)  # fmt: skip
        record = Record(volume_id=request.volume_id, state=RESERVED, spec=spec, target_path="",
                        name=request.volume_id, created_at=time.time())  # fmt: skip
        self.core.reserve(record)
        return record

    def _stage(self, record: Record, request: StageRequest) -> None:
        spec = staged_spec(record.spec, request.capability)
        if record.grow_to > spec.size:  # grown by ControllerExpandVolume while not staged
            spec = dataclasses.replace(spec, size=record.grow_to)
        check_combination(spec)
        self.core.check_backing_available(spec)
        record.spec, record.grow_to = spec, 0
        record.state, record.staging_path, record.targets = STAGING, request.staging_path, {}
        self.journal.write(record)  # intent first: start-up rolls a crash back from here
        names = self.core.names(record.volume_id)
        try:
            self.core.prepare(names, record, keyring=False)
            if spec.access_type == MOUNT:
                with self.core.timed_step("mount"):
                    self.core.expose_primary(names, record)
            with self.core.timed_step("record"):
                record.state = STAGED
                self.journal.write(record)
        except Exception:
            log.warning("stage of %s failed; rolling it back", record.volume_id, exc_info=True)
            self._rollback(record)
            raise

    def _rollback(self, record: Record) -> None:
        try:
            self.core.release_staged(record)
        except Exception:
            log.exception("rollback of %s left objects behind; start-up will retry",
                          record.volume_id)  # fmt: skip

    def _restage(self, record: Record, request: StageRequest) -> None:
        """Staged already: OK if compatible and healthy (remount a lost staging mount)."""
        if record.staging_path != request.staging_path:
            raise AlreadyExists(
                f"volume {record.volume_id} is already staged at {record.staging_path}"
            )
        wanted = staged_spec(record.spec, request.capability)
        if (wanted.access_type, wanted.fs_type, wanted.mount_flags) != (
            record.spec.access_type, record.spec.fs_type, record.spec.mount_flags
        ):
            raise AlreadyExists(
                f"volume {record.volume_id} is already staged with a different capability "
                f"({record.spec.access_type}, {record.spec.fs_type})"
            )
        names = self.core.names(record.volume_id)
        self._check_prepared(names, record)
        self.core.expose_primary(names, record)  # a lost staging mount is mounted again

    def _check_prepared(self, names: Names, record: Record) -> None:
        if self.core.backing_of(record.spec).find(names) is None:
            raise FailedPrecondition(
                f"volume {record.volume_id} lost its key, so its data is gone; "
                "unstage it (delete its pods) to get a fresh volume"
            )

    # publish -----------------------------------------------------------------------------
    def publish(self, request: TargetRequest) -> None:
        self.core.check_provisioned_id(request.volume_id)
        self.core.check_target(request.staging_path, "staging_target_path")
        self.core.check_target(request.target_path)
        with self.core.locks.hold(request.volume_id):
            self.core.seal.check(f"publish of volume {request.volume_id}")
            record = self._staged(request.volume_id, request.staging_path)
            if request.capability.access_type != record.spec.access_type:
                raise InvalidArgument(
                    f"volume {request.volume_id} is staged for {record.spec.access_type} access; "
                    f"it cannot be published for {request.capability.access_type} access"
                )
            options = target_options(request)
            known = record.targets.get(request.target_path)
            if known is not None and known != options:
                raise AlreadyExists(
                    f"volume {request.volume_id} is already published at {request.target_path} "
                    f"with other options ({','.join(known)})"
                )
            if known is None and record.spec.kata != "off" and record.targets:
                raise FailedPrecondition(
                    f"volume {request.volume_id} is already handed to a Kata VM at "
                    f"{', '.join(sorted(record.targets))}: two VMs on one disk would corrupt it; "
                    "a kata volume has one pod at a time"
                )
            if known is None:
                record.targets[request.target_path] = options
                self.journal.write(record)  # intent first: unstage refuses while it is listed
            try:
                with self.core.timed_step("bind"):
                    self._bind(record, request.target_path, options)
            except Exception:
                self._unbind_quietly(record, request.target_path)
                raise

    def _staged(self, volume_id: str, staging_path: str) -> Record:
        record = self.journal.load(volume_id)
        if record is None or record.state != STAGED:
            raise FailedPrecondition(
                f"volume {volume_id} is not staged on this node; NodeStageVolume must come first"
            )
        if record.staging_path != staging_path:
            raise FailedPrecondition(
                f"volume {volume_id} is staged at {record.staging_path}, not at {staging_path}"
            )
        return record

    def _exposure(self, record: Record, options: list[str]) -> Exposure:
        """A pod's target: the staging directory bound there, the device node of a block volume
        bound onto a file, or a Kata hand-off."""
        if record.spec.kata != "off":
            names = self.core.names(record.volume_id)
            flags = [o for o in options if o not in ("nosuid", "nodev")]
            return self.core.hand_off(names, record.spec, flags, readonly="ro" in options)
        shows = self.core.backing_of(record.spec).shown_at
        if record.spec.access_type == BLOCK:
            return BindDevice(self.host, options, shows)
        return BindDirectory(self.host, options, shows)

    def _bind(self, record: Record, target: str, options: list[str]) -> None:
        names = self.core.names(record.volume_id)
        exposure = self._exposure(record, options)
        if exposure.is_exposed(names, target):
            return
        if record.spec.access_type == BLOCK or record.spec.kata != "off":
            if record.spec.kata != "off":  # never hand a VM a disk that is not prepared
                self._check_prepared(names, record)
            exposure.expose(names, self.core.backing_of(record.spec).source(names), target)
            return
        # never bind an unmounted staging dir: the pod would write plaintext to the node's
        # root disk. Mount it again if the volume is still prepared; refuse if it is not.
        self._check_prepared(names, record)
        self.core.expose_primary(names, record)
        exposure.expose(names, record.staging_path, target)

    def _unbind_quietly(self, record: Record, target: str) -> None:
        try:
            self._unbind(record, target)
            record.targets.pop(target, None)
            self.journal.write(record)
        except Exception:
            log.exception("could not undo the failed publish of %s at %s", record.volume_id,
                          target)  # fmt: skip

    def _unbind(self, record: Record, target: str) -> None:
        names = self.core.names(record.volume_id)
        if record.spec.kata != "off":  # the pod's VM must have let go of the disk first
            self.core.backing_of(record.spec).check_releasable(names)
        exposure = self._exposure(record, record.targets.get(target, []))
        exposure.unexpose(names, target)
        exposure.remove(target)

    # unpublish ---------------------------------------------------------------------------
    def unpublish(self, volume_id: str, target: str) -> None:
        self.core.check_provisioned_id(volume_id)
        self.core.check_target(target)
        with self.core.locks.hold(volume_id):
            record = self.journal.load(volume_id)
            if record is None or target not in record.targets:
                # nothing recorded there: release only a bind of ours (a filesystem, or the
                # device node of a block volume), decided by device number
                names = self.core.names(volume_id)
                unknown = Unrecorded(self.host, self.core.shown_by_any)
                handed = self.core.take_back_hand_off(names, target)
                if unknown.unexpose(names, target) or handed:
                    unknown.remove(target)
                return
            with self.core.timed_step("unmount"):
                self._unbind(record, target)
            del record.targets[target]
            self.journal.write(record)

    # unstage -----------------------------------------------------------------------------
    def unstage(self, volume_id: str, staging_path: str) -> None:
        self.core.check_provisioned_id(volume_id)
        self.core.check_target(staging_path, "staging_target_path")
        with self.core.locks.hold(volume_id):
            record = self.journal.load(volume_id)
            names = self.core.names(volume_id)
            if record is None:  # nothing recorded: release what the kernel may still hold
                self.core.release_prepared(names, None, staging_path)
                return
            if record.state == RESERVED:
                return
            if record.staging_path != staging_path:
                raise NotFound(
                    f"volume {volume_id} is staged at {record.staging_path}, not at {staging_path}"
                )
            if record.targets:
                raise FailedPrecondition(
                    f"volume {record.volume_id} is still published at "
                    f"{', '.join(sorted(record.targets))}; unpublish it first"
                )
            self.core.check_releasable(names, record, staging_path)  # busy: nothing changed
            record.state = UNSTAGING
            self.journal.write(record)
            self.core.release_staged(record)

    # expand ------------------------------------------------------------------------------
    def expand(self, request: ExpandRequest) -> int:
        """Grow a staged volume online: reserve, backing file, loop, mapping, filesystem.

        Each step is a no-op when already done, so a retry after a crash finishes the job; a
        half-grown volume is always consistent (the filesystem is never larger than its device).
        Returns the volume's size.
        """
        self.core.check_provisioned_id(request.volume_id)
        if not request.volume_path:
            raise InvalidArgument("volume_path is required")
        with self.core.locks.hold(request.volume_id):
            record = self.journal.load(request.volume_id)
            if record is None:
                raise NotFound(f"volume {request.volume_id} is not on this node")
            if record.state != STAGED:
                raise FailedPrecondition(
                    f"volume {request.volume_id} is not staged on this node ({record.state})"
                )
            # kubelet names a filesystem volume by its staging path; for a block volume it passes
            # a device path of its own, which this driver does not use
            mounted = record.spec.access_type == MOUNT
            if mounted and request.volume_path not in paths_of(record):
                raise NotFound(
                    f"volume {request.volume_id} is not staged or published at "
                    f"{request.volume_path}"
                )
            self.core.backing_of(record.spec).check_growable(record.spec)
            config = self.core.config
            size = size_from_range(request.required, request.limit, default=record.spec.size,
                                   min_size=config.min_size, max_size=config.max_size)  # fmt: skip
            if size <= record.spec.size:
                return record.spec.size
            self._grow(record, size)
            return size

    def _grow(self, record: Record, size: int) -> None:
        spec = record.spec
        names = self.core.names(record.volume_id)
        with self.core.timed_step("reserve_growth"):
            if record.grow_to < size:
                record.grow_to = size
                self.core.reserve(record, new_volume=False)
        backing = self.core.backing_of(spec)
        backing.grow(names, spec, size)
        if spec.access_type == MOUNT:
            with self.core.timed_step("grow_fs"):
                backing.grow_filesystem(names, spec, record.staging_path)
        with self.core.timed_step("record"):
            record.spec = dataclasses.replace(spec, size=size)
            record.grow_to = 0
            self.journal.write(record)
