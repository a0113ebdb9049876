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
from csi.journal import RESERVED, STAGED, STAGING, UNSTAGING, Names, Record
from csi.params import VolumeSpec, check_combination, parse_attributes, size_from_range
from csi.volumes import Volumes, eager_mkfs, node_of

log = logging.getLogger(__name__)

STAGE_STEPS = ("create_backing", "attach", "format", "open", "mkfs", "mount", "record")
EXPAND_STEPS = ("reserve_growth", "grow_backing", "refresh_loop", "resize_mapping", "grow_fs",
                "record")  # fmt: skip
PUBLISH_STEPS = ("bind",)


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
            self.core.open_volume(names, spec, keyring=False)
            if spec.access_type == MOUNT:
                with self.core.timed_step("mkfs"):  # always: never trust what is on the device
                    self.host.mkfs(names.mapper_device, spec.fs_type, eager=eager_mkfs(spec))
                with self.core.timed_step("mount"):
                    self._mount_staging(names, record)
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

    def _mount_staging(self, names: Names, record: Record) -> None:
        self.core.mount_staging(names, record)

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
        if not self.host.crypt_exists(names.mapping):
            raise FailedPrecondition(
                f"volume {record.volume_id} lost its encrypted mapping, so its data is gone; "
                "unstage it (delete its pods) to get a fresh volume"
            )
        if record.spec.access_type == MOUNT:
            if self.host.mount_source(record.staging_path) != names.mapper_device:
                self._mount_staging(names, record)

    # publish -----------------------------------------------------------------------------
    def publish(self, request: TargetRequest) -> None:
        self.core.check_provisioned_id(request.volume_id)
        self.core.check_target(request.staging_path, "staging_target_path")
        self.core.check_target(request.target_path)
        with self.core.locks.hold(request.volume_id):
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

    def _bind(self, record: Record, target: str, options: list[str]) -> None:
        names = self.core.names(record.volume_id)
        if record.spec.access_type == BLOCK:
            if self.host.is_mountpoint(target):
                return
            self.host.make_file(target)
            self.host.bind_mount(names.mapper_device, target, options)
        else:
            if self.host.mount_source(target) == names.mapper_device:
                return
            self._check_staging_mounted(names, record)
            self.host.make_dir(target)
            self.host.bind_mount(record.staging_path, target, options)

    def _check_staging_mounted(self, names: Names, record: Record) -> None:
        """Never bind an unmounted staging dir: the pod would write plaintext to the node's
        root disk. Remount it if the mapping is still open; refuse if it is not."""
        if self.host.mount_source(record.staging_path) == names.mapper_device:
            return
        if not self.host.crypt_exists(names.mapping):
            raise FailedPrecondition(
                f"volume {record.volume_id} lost its encrypted mapping, so its data is gone; "
                "unstage it (delete its pods) to get a fresh volume"
            )
        self._mount_staging(names, record)

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
        if record.spec.access_type == BLOCK:
            if self.host.is_mountpoint(target):
                self.host.umount(target)
            self.host.remove_file(target)
        else:
            if self.host.mount_source(target) == names.mapper_device:
                self.host.umount(target)
            self.host.remove_dir(target)

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
                if self.host.is_mounted_from(target, names.mapping):
                    self.host.umount(target)
                    if self.host.is_dir(target):
                        self.host.remove_dir(target)
                    else:
                        self.host.remove_file(target)
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
                if self.host.mount_source(staging_path) == names.mapper_device:
                    self.host.umount(staging_path)
                self.core.release(names)
                return
            if record.state == RESERVED:
                return
            if record.staging_path != staging_path:
                raise NotFound(
                    f"volume {volume_id} is staged at {record.staging_path}, not at {staging_path}"
                )
            self._check_unused(record, names)
            self.core.check_closable(names, ignore=staging_path)  # before anything is undone
            if record.spec.access_type == MOUNT:
                with self.core.timed_step("unmount"):  # busy: nothing changed, kubelet retries
                    if self.host.mount_source(staging_path) == names.mapper_device:
                        self.host.umount(staging_path)
            record.state = UNSTAGING
            self.journal.write(record)
            self.core.release_staged(record)

    def _check_unused(self, record: Record, names: Names) -> None:
        if record.targets:
            raise FailedPrecondition(
                f"volume {record.volume_id} is still published at "
                f"{', '.join(sorted(record.targets))}; unpublish it first"
            )
        others = [p for p in self.host.mountpoints_of(names.mapper_device)
                  if p != record.staging_path]  # fmt: skip
        if others:
            raise FailedPrecondition(
                f"volume {record.volume_id} is still mounted at {', '.join(others)}; "
                "it stays staged"
            )

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
            if mounted and request.volume_path not in self.core.paths_of(record):
                raise NotFound(
                    f"volume {request.volume_id} is not staged or published at "
                    f"{request.volume_path}"
                )
            check_expandable(record.spec)
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
        grown = dataclasses.replace(spec, size=size)
        with self.core.timed_step("grow_backing"):
            self.host.grow_backing(names.backing, grown.backing_bytes, spec.preallocate)
        with self.core.timed_step("refresh_loop"):
            device = self.host.loop_find(names.backing)
            if device is None:
                raise FailedPrecondition(
                    f"volume {record.volume_id} lost its loop device; its data is gone"
                )
            self.host.loop_refresh(device)
        with self.core.timed_step("resize_mapping"):
            self.host.crypt_resize(names.mapping, self.core.header_of(names, spec))
        if spec.access_type == MOUNT:
            with self.core.timed_step("grow_fs"):
                self.host.fs_grow(names.mapper_device, record.staging_path, spec.fs_type)
        with self.core.timed_step("record"):
            record.spec = grown
            record.grow_to = 0
            self.journal.write(record)


def check_expandable(spec: VolumeSpec) -> None:
    """INVALID_ARGUMENT, not FAILED_PRECONDITION: to kubelet and csi-resizer the latter means
    "retry once the volume is not in use", which would never help here."""
    if spec.backing == "qcow2":
        raise InvalidArgument(
            "qcow2 volumes cannot grow: the kernel NBD client does not learn a new export size "
            "while connected; use backing=loop for volumes that must grow"
        )
    if spec.integrity != "none":
        raise InvalidArgument(
            f"volumes with integrity={spec.integrity} cannot grow: the dm-integrity layer under "
            "the mapping keeps its size; create a new volume of the size you need"
        )
