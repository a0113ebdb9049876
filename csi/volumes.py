"""The volume lifecycle: one state machine for inline and provisioned volumes.

A volume is *reserved* (its record charges the node's capacity), then *prepared* by its backing
(created, attached, formatted with a fresh key, opened; a filesystem is made on it), then
*exposed*: first at its primary path (an inline volume's target, a PVC's staging path; a block
PVC has none), then, for a PVC, bound into each pod's target. Teardown walks back the same way
with one rollback and one release for both kinds. An inline publish is reserve + prepare +
expose in one call (no extra bind mount); an inline record goes from CREATING to PUBLISHED, a
PVC's from RESERVED through STAGING to STAGED and back through UNSTAGING (the on-disk names stay
those of earlier versions, so a driver rolled back still reads its journal).

No grpc and no subprocess here: requests arrive as plain dataclasses, the OS is reached only
through the host protocols and the backings, and failures are domain errors. Every step first
checks whether it is already done, so any operation can be repeated after a crash at any point.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from csi import backings
from csi.backings import Backing, Context
from csi.backings.luks import Luks
from csi.capacity import Capacity, Usage
from csi.config import Config
from csi.errors import (
    AlreadyExists,
    Busy,
    DriverError,
    FailedPrecondition,
    InvalidArgument,
)
from csi.exposures import Exposure, KataHandOff, Unrecorded, kata_volume
from csi.gate import NodeGate
from csi.host import DirectVolumes, Host, NodeHost
from csi.ids import check_provisioned_id, check_volume_id, is_provisioned_id
from csi.inspect import Inspector, VolumeHealth, VolumeInfo, VolumeStats
from csi.journal import (
    CREATING,
    PUBLISHED,
    RESERVED,
    STAGED,
    UNSTAGING,
    Journal,
    Names,
    Record,
)
from csi.keys import KeySource, random_key
from csi.params import VolumeSpec, quoted
from csi.reconcile import Reconciler, ReconcileReport
from csi.seal import Seal
from csi.steps import PUBLISH_STEPS

__all__ = ["PUBLISH_STEPS", "Events", "PublishRequest", "ReconcileReport", "StepHook", "Usage",
           "VolumeHealth", "VolumeInfo", "VolumeStats", "Volumes",
           "is_provisioned_id"]  # fmt: skip

log = logging.getLogger(__name__)

StepHook = Callable[[str], None]
# states in which a volume is complete: a teardown that cannot finish restores it to this
COMPLETE = (PUBLISHED, STAGED, UNSTAGING)


class Events:
    """What the lifecycle reports as it works; metrics subclass it, the default ignores it."""

    def step(self, name: str, seconds: float, ok: bool) -> None:
        """A lifecycle step finished (ok) or raised."""

    def shredded(self) -> None:
        """A volume's backing file and header were deleted: its data is gone for good."""

    def orphan_removed(self, reason: str) -> None:
        """Start-up removed an object no record accounts for."""

    def record_set_aside(self, path: str) -> None:
        """An unreadable journal record was renamed out of the way (kept, never deleted)."""


@dataclass(frozen=True)
class PublishRequest:
    volume_id: str
    target_path: str
    spec: VolumeSpec
    pod: dict[str, str] = field(default_factory=dict)


class Volumes:
    """Publishes and tears down volumes on this node; thread-safe behind the node gate."""

    def __init__(
        self,
        config: Config,
        host: NodeHost,
        journal: Journal | None = None,
        *,
        key_source: KeySource = random_key,
        after_step: StepHook | None = None,
        events: Events | None = None,
    ) -> None:
        self.config = config
        self.host: Host = host  # the generic part: loops and NBD are the backings' own
        self.journal = journal or Journal(config.state_dir)
        self.after_step = after_step or (lambda step: None)
        self.events = events or Events()
        self.journal.on_set_aside = self.events.record_set_aside
        self.locks = NodeGate()
        self.seal = Seal(config.state_dir)  # after an emergency shred: no new volumes
        self.kata: DirectVolumes = host  # Kata's direct-assigned volumes (kata=guest|host)
        context = Context(host, key_source, self.timed_step, config.data_dir, config.state_dir,
                          config.kata_direct_volume_root)  # fmt: skip
        self.backings = backings.build(context)
        self.capacity = Capacity(config, host, self.journal, self.allocated)
        self.luks = Luks(context)  # the dm-crypt layer the LUKS backings share

    # validation --------------------------------------------------------------------------
    def names(self, volume_id: str) -> Names:
        return Names.of(volume_id, self.config.data_dir, self.config.state_dir)

    check_volume_id = staticmethod(check_volume_id)
    check_provisioned_id = staticmethod(check_provisioned_id)

    def check_target(self, target: str, what: str = "target_path") -> None:
        """The target must lie under the kubelet root, with no '..' and no symlink escape."""
        if not target:
            raise InvalidArgument(f"{what} is required")
        root = self.config.kubelet_root.rstrip("/")
        if not target.startswith("/") or os.path.normpath(target) != target or "\0" in target:
            raise InvalidArgument(
                f"{what} {quoted(target, 200)} must be an absolute, normalised path "
                "(no '..', '//' or "
                "trailing '/')"
            )
        if not target.startswith(root + "/"):
            raise InvalidArgument(
                f"{what} {quoted(target, 200)} is outside the kubelet root {root}"
            )
        real_root = self.host.realpath(root)
        real_parent = self.host.realpath(os.path.dirname(target))
        if real_parent != real_root and not real_parent.startswith(real_root + "/"):
            raise InvalidArgument(
                f"{what} {quoted(target, 200)} escapes the kubelet root through a symlink"
            )
        if self.host.is_symlink(target):
            raise InvalidArgument(
                f"{what} {quoted(target, 200)} is a symlink; refusing to mount over it"
            )

    # steps -------------------------------------------------------------------------------
    @contextmanager
    def timed_step(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.events.step(name, time.monotonic() - start, ok)
        self.after_step(name)

    # capacity ----------------------------------------------------------------------------
    def reserve(self, record: Record, *, new_volume: bool = True) -> None:
        self.capacity.reserve(record, new_volume=new_volume)

    def room(self) -> int:
        return self.capacity.room()

    def usage(self) -> Usage:
        return self.capacity.usage()

    # the shared lifecycle ------------------------------------------------------------------
    def backing_of(self, spec: VolumeSpec) -> Backing:
        return self.backings[backings.instance_name(spec)]

    def check_backing_available(self, spec: VolumeSpec) -> None:
        """Refuse a backing up front where it cannot work, before anything is reserved or made."""
        if reason := self.backing_of(spec).unavailable():
            raise FailedPrecondition(
                f"cannot make volumes with backing={spec.backing} on this node: {reason}"
            )

    def allocated(self, record: Record) -> int:
        """Bytes the volume of ``record`` takes on the node's disk now (its backing says)."""
        return self.backing_of(record.spec).allocated(self.names(record.volume_id))

    def prepare(self, names: Names, record: Record, *, keyring: bool) -> str:
        """The backing prepares the volume (each of its steps only if not done yet: a
        filesystem volume of a device backing always gets a fresh filesystem) and the record
        learns what the journal keeps of it. Returns what the pod gets."""
        backing = self.backing_of(record.spec)
        source = backing.prepare(names, record.spec, keyring=keyring)
        record.details = backing.details(names)
        return source

    def primary_path(self, record: Record) -> str:
        """Where the volume is exposed first: an inline target, a PVC's staging path."""
        return record.staging_path if record.provisioned else record.target_path

    def primary_exposure(self, record: Record) -> Exposure | None:
        """How the volume is exposed at its primary path (None: a staged block volume is only
        opened; its pods get the device node)."""
        spec = record.spec
        if spec.access_type != "mount":
            return None
        if spec.kata != "off":  # handed to each pod's VM at its target; a PVC stages no mount
            if record.provisioned:
                return None
            names = self.names(record.volume_id)
            return self.hand_off(names, spec, spec.mount_flags, readonly=spec.readonly)
        flags = spec.mount_flags
        if record.provisioned:  # a staging mount is always rw: each pod's bind says ro or rw
            flags = tuple(f for f in flags if f not in ("ro", "rw"))
        readonly = spec.readonly and not record.provisioned
        return self.backing_of(spec).filesystem_exposure(spec, flags, readonly=readonly)

    def hand_off(self, names: Names, spec: VolumeSpec, flags: tuple[str, ...] | list[str], *,
                 readonly: bool) -> KataHandOff:  # fmt: skip
        """How a kata=guest|host volume reaches the Kata VM at a target."""
        volume = kata_volume(spec.kata, self.backing_of(spec).source(names), spec.fs_type, flags,
                             readonly=readonly, group=spec.mount_group)  # fmt: skip
        return KataHandOff(self.host, self.kata, self.config.kata_direct_volume_root, volume)

    def take_back_hand_off(self, names: Names, path: str) -> bool:
        """A Kata hand-off at ``path`` that names a device of this volume, with no record to
        say how it was made: take back its mountInfo.json and its guard, unless a VM still
        holds the device (Busy). True if there was one."""
        root = self.config.kata_direct_volume_root
        found = self.kata.direct_volume_read(root, path) if path else None
        if found is None or found.device not in (names.backing, names.mapper_device):
            return False
        if found.device == names.backing:
            holders = self.kata.file_users(names.backing)
        else:
            holders = [str(use) for use in self.host.mapping_users(names.mapping)]
        if holders:
            raise Busy(
                f"volume {names.volume_id} is handed to a Kata VM at {path} and its disk is "
                f"still in use ({', '.join(holders)}); left alone"
            )
        self.kata.direct_volume_remove(root, path)
        if self.kata.is_guarded(path):
            self.host.umount(path)
        return True

    def expose_primary(self, names: Names, record: Record) -> None:
        exposure = self.primary_exposure(record)
        path = self.primary_path(record)
        if exposure is not None and not exposure.is_exposed(names, path):
            exposure.expose(names, self.backing_of(record.spec).source(names), path)

    def release_prepared(self, names: Names, record: Record | None, primary: str) -> None:
        """Unexpose the primary path, then release the backing (close wipes the key, detach,
        delete); each only if still needed.

        Whether the volume can be released is decided before the primary path is unmounted:
        anything else the kernel says holds it (another mount, a bound device node, an open)
        refuses the whole teardown. A holder only the release itself finds (a container's bind
        of the path in its own mount namespace) makes us expose the primary path again, so a
        pod never gets a plain directory on the node's disk in place of its volume."""
        if record is None:  # nothing says what it is: a VM may hold it, a hand-off name it
            if holders := self.kata.file_users(names.backing):
                raise Busy(
                    f"volume {names.volume_id} has no record but its backing file is open "
                    f"({', '.join(holders)}): a Kata VM may still use it; nothing was changed"
                )
            self.take_back_hand_off(names, primary)
        chosen = self._backings_for(names, record)
        for backing in chosen:
            backing.before_release(names)
        exposure = self._exposure_for(record, chosen[0])
        ours = self._check(names, chosen[0], exposure, primary)
        if record is not None or ours:
            with self.timed_step("unmount"):
                # a recorded exposure undoes whatever part of it is there (each checks that
                # it is its own): a hand-off whose mountInfo.json is gone still has a guard
                if exposure is not None and (ours or record is not None):
                    exposure.unexpose(names, primary)
        try:
            shredded = chosen[0].release(names)
        except DriverError:
            # an inline target this teardown unmounted, or a PVC's staging path whatever
            # unmounted it (a crash after the unmount of an unstage): expose it again
            if record is not None and record.state in COMPLETE and (ours or record.provisioned):
                self._restore_primary(names, record)
            raise
        if shredded:
            self.events.shredded()
        for other in chosen[1:]:  # no record: whatever else may still hold a device of it
            other.detach(names)

    def check_releasable(self, names: Names, record: Record | None, primary: str) -> bool:
        """Busy, changing nothing, unless the only holder of the volume is its exposure at
        ``primary`` (which a release unexposes first); True if it is exposed there."""
        owner = self._backings_for(names, record)[0]
        return self._check(names, owner, self._exposure_for(record, owner), primary)

    def shown_by_any(self, names: Names, path: str) -> bool:
        """Whether the mount at ``path`` shows the volume, for a volume no record describes."""
        return any(backing.shown_at(names, path) for backing in self.backings.values())

    def _exposure_for(self, record: Record | None, owner: Backing) -> Exposure | None:
        return self.primary_exposure(record) if record else Unrecorded(self.host, owner.shown_at)

    @staticmethod
    def _check(names: Names, backing: Backing, exposure: Exposure | None, primary: str) -> bool:
        ours = exposure is not None and exposure.is_exposed(names, primary)
        backing.check_releasable(names, ignore=primary if ours else "")
        return ours

    def release_unknown(self, names: Names) -> None:
        """Release whatever the kernel still holds of a volume no record describes."""
        self.release_prepared(names, None, "")

    def _backings_for(self, names: Names, record: Record | None) -> list[Backing]:
        """The record's backing; with no record, the one that holds a device of the volume
        first (it releases), then every other (each detaches what it may still hold)."""
        if record is not None:
            return [self.backing_of(record.spec)]
        every = list(self.backings.values())
        owner = next((b for b in every if b.attached(names)), every[0])
        return [owner, *(b for b in every if b is not owner)]

    def _restore_primary(self, names: Names, record: Record) -> None:
        """The volume could not be released: expose its primary path again if it lost it, so
        the pod (or the pods' binds) and a retry find the volume as it was."""
        if self.backing_of(record.spec).find(names) is None:
            return
        exposure = self.primary_exposure(record)
        path = self.primary_path(record)
        if exposure is None or not path or exposure.is_exposed(names, path):
            return
        try:
            exposure.expose(names, self.backing_of(record.spec).source(names), path)
            log.warning("volume %s is still in use elsewhere; exposed it at %s again",
                        record.volume_id, path)  # fmt: skip
        except Exception:
            log.exception("could not expose volume %s at %s again", record.volume_id, path)

    # inline: publish -----------------------------------------------------------------------
    def publish(self, request: PublishRequest) -> None:
        self.check_volume_id(request.volume_id)
        if is_provisioned_id(request.volume_id):
            raise InvalidArgument(
                f"volume {request.volume_id} is a provisioned volume: it must be staged, not "
                "published as an inline ephemeral volume"
            )
        self.check_target(request.target_path)
        with self.locks.hold(request.volume_id):
            self.seal.check(f"publish of volume {request.volume_id}")
            record = self.journal.load(request.volume_id)
            if record is not None and record.state == PUBLISHED:
                self._republish(record, request)
                return
            names = self.names(request.volume_id)
            if record is not None:  # an earlier attempt died half-way: start clean
                self.teardown(names, record.target_path, record)
            elif self._adopt(names, request):
                return
            self._create(request)

    def _republish(self, record: Record, request: PublishRequest) -> None:
        """Same request again: OK if identical and healthy; ALREADY_EXISTS if incompatible."""
        if record.target_path != request.target_path:
            raise AlreadyExists(
                f"volume {request.volume_id} is already published at {record.target_path}; "
                "an ephemeral volume has exactly one target"
            )
        if record.spec != request.spec:
            raise AlreadyExists(
                f"volume {request.volume_id} is already published with different capability, "
                "readonly flag or parameters"
            )
        names = self.names(request.volume_id)
        exposure = self.primary_exposure(record)
        if exposure is None or exposure.is_exposed(names, request.target_path):
            return
        backing = self.backing_of(record.spec)
        if backing.find(names) is None:
            raise FailedPrecondition(
                f"volume {request.volume_id} lost its key, so its data is gone; "
                "delete the pod to get a fresh volume"
            )
        exposure.expose(names, backing.source(names), request.target_path)

    def _adopt(self, names: Names, request: PublishRequest) -> bool:
        """No record, yet the kernel still has the volume (the journal was lost without a
        reboot). Exposed at this very target: it is the pod's live volume; record it again and
        answer OK. Anything else of it in use: refuse, touching nothing. Unused leftovers are
        released so that everything the new attempt's rollback may undo is its own."""
        backing = self.backing_of(request.spec)
        if backing.find(names) is None:
            return False  # a backing file or device without a key holds no data: reused
        record = Record(volume_id=request.volume_id, state=PUBLISHED, spec=request.spec,
                        target_path=request.target_path, pod=dict(request.pod),
                        created_at=time.time(), step="adopted")  # fmt: skip
        exposure = self.primary_exposure(record)
        if exposure is not None and exposure.is_exposed(names, request.target_path):
            log.warning("volume %s has no journal record but is mounted at %s: adopting it",
                        request.volume_id, request.target_path)  # fmt: skip
            self.capacity.write(record)
            return True
        if uses := backing.in_use(names):
            raise FailedPrecondition(
                f"volume {request.volume_id} has no journal record on this node but its "
                f"mapping is in use ({', '.join(uses)}); refusing to touch it"
            )
        log.warning("volume %s has an open mapping and no record; removing it first",
                    names.volume_id)  # fmt: skip
        self.release_unknown(names)
        return False

    def _create(self, request: PublishRequest) -> None:
        names = self.names(request.volume_id)
        spec = request.spec
        record = Record(
            volume_id=request.volume_id,
            state=CREATING,
            spec=spec,
            target_path=request.target_path,
            pod=dict(request.pod),
            created_at=time.time(),
        )
        self.check_backing_available(spec)
        try:
            with self.timed_step("reserve"):
                self.reserve(record)
            self.prepare(names, record, keyring=True)
            with self.timed_step("mount"):
                self.expose_primary(names, record)
            with self.timed_step("record"):
                record.state = PUBLISHED
                record.step = "published"
                self.journal.write(record)
        except DriverError:
            self._rollback(names, request.target_path, record)
            raise
        except Exception:
            log.exception("publish of %s failed unexpectedly", request.volume_id)
            self._rollback(names, request.target_path, record)
            raise

    # inline: unpublish ---------------------------------------------------------------------
    def unpublish(self, volume_id: str, target_path: str) -> None:
        self.check_volume_id(volume_id)
        self.check_target(target_path)
        with self.locks.hold(volume_id):
            names = self.names(volume_id)
            record = self.journal.load(volume_id)
            if record is not None and record.target_path != target_path:
                # not this volume's target: release only a mount of ours there, if any
                shows = self.backing_of(record.spec).shown_at
                Unrecorded(self.host, shows).unexpose(names, target_path)
                return
            self.teardown(names, target_path, record)

    def _rollback(self, names: Names, target: str, record: Record) -> None:
        try:
            self.teardown(names, target, record)
        except Exception:
            log.exception(
                "rollback of %s left objects behind; start-up will retry", names.volume_id
            )

    def teardown(self, names: Names, target: str, record: Record | None) -> None:
        """Release the volume exposed at ``target``, then forget it and remove the target."""
        self.release_prepared(names, record, target)
        with self.timed_step("forget"):
            self.journal.delete(names.volume_id)
            if target and not self.host.is_mountpoint(target):  # another mount is not ours
                self.host.remove_dir(target)

    # provisioned: back to reserved -----------------------------------------------------------
    def release_staged(self, record: Record) -> None:
        """Take a provisioned volume back to RESERVED: unexpose its staging path, release the
        backing. Its record, and so its reservation, stays until DeleteVolume. A release that
        cannot finish leaves the volume STAGED, its staging path mounted again."""
        names = self.names(record.volume_id)
        try:
            self.release_prepared(names, record, record.staging_path)
        except DriverError:
            if record.state == UNSTAGING and self.backing_of(record.spec).find(names):
                record.state = STAGED  # as usable as before the unstage was asked for
                self.journal.write(record)
            raise
        record.state = RESERVED
        record.staging_path = ""
        record.targets = {}
        record.step = ""
        self.journal.write(record)

    # inspection and start-up -----------------------------------------------------------------
    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        return Inspector(self).stats(volume_id, volume_path)

    def health(self, names: Names, record: Record, path: str = "") -> VolumeHealth:
        return Inspector(self).health(names, record, path)

    def list(self) -> list[VolumeInfo]:
        return Inspector(self).list()

    def reconcile(self) -> ReconcileReport:
        return Reconciler(self).reconcile()

