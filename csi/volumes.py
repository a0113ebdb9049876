"""The volume lifecycle and the start-up reconciler.

No grpc and no subprocess here: requests arrive as plain dataclasses, the OS is reached only
through a ``Host``, and failures are domain errors. Every step first checks whether it is already
done, so any operation can be repeated after a crash at any point.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from csi.config import Config
from csi.errors import (
    AlreadyExists,
    Busy,
    DriverError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi.gate import NodeGate
from csi.host import FsStats, LuksFormat, NodeHost
from csi.journal import (
    CREATING,
    HALF_DONE,
    MAPPING_PREFIX,
    PUBLISHED,
    RESERVED,
    STAGED,
    UNSTAGING,
    Journal,
    Names,
    Record,
)
from csi.keys import PASSPHRASE_BYTES, KeySource, random_key
from csi.params import VolumeSpec, format_bytes, quoted

log = logging.getLogger(__name__)

VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A provisioned volume's id is "<node>/<32 hex of the CO's name>": it says which node holds the
# volume. The node part is a Kubernetes node name (a DNS subdomain); no filesystem or dm name is
# ever made from an id, only from its hash (see journal.Names), so the "/" cannot reach a path.
NODE_NAME = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
# A volume that can never grow says why in its id (".qcow2", ".integrity"): ControllerExpandVolume
# runs where no journal can tell, and must refuse up front what the node would refuse.
FIXED_REASONS = {
    "qcow2": "qcow2 volumes cannot grow: the kernel NBD client does not learn a new export size "
    "while connected; use backing=loop for volumes that must grow",
    "integrity": "volumes with integrity cannot grow: the dm-integrity layer under the mapping "
    "keeps its size; create a new volume of the size you need",
}
PROVISIONED_ID = re.compile(
    rf"^(?P<node>{NODE_NAME})/(?P<hash>[0-9a-f]{{32}})(?:\.(?P<fixed>qcow2|integrity))?$"
)
MAX_VOLUME_ID = 128  # bytes, the CSI spec's limit for a string field
BACKING_FILE = re.compile(r"^([0-9a-f]{32})\.img$")
HEADER_FILE = re.compile(r"^([0-9a-f]{32})\.hdr$")

PUBLISH_STEPS = ("reserve", "create_backing", "attach", "format", "open", "mkfs", "mount",
                 "record")  # fmt: skip
StepHook = Callable[[str], None]


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
    loop_device: str | None
    mapping_open: bool
    mounted: bool


@dataclass(frozen=True)
class Usage:
    budget: int
    reserved: int
    provisioned: int
    allocated: int
    data_dir_free: int
    volumes: dict[tuple[str, str], int]


@dataclass
class ReconcileReport:
    rolled_back: list[str] = field(default_factory=list)
    orphans_removed: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def count(self, reason: str, events: Events) -> None:
        self.orphans_removed[reason] = self.orphans_removed.get(reason, 0) + 1
        events.orphan_removed(reason)


def is_provisioned_id(volume_id: str) -> bool:
    """Provisioned (PVC) volume ids carry their node; inline ids (kubelet's) never have a '/'."""
    return "/" in volume_id


def node_of(volume_id: str) -> str | None:
    match = PROVISIONED_ID.fullmatch(volume_id)
    return match.group("node") if match and len(volume_id) <= MAX_VOLUME_ID else None


def fixed_reason(spec: VolumeSpec) -> str:
    """Why a volume of this shape can never grow ("" when it can)."""
    if spec.backing == "qcow2":
        return "qcow2"
    return "integrity" if spec.integrity != "none" else ""


def provisioned_id(node: str, name: str, spec: VolumeSpec | None = None) -> str:
    """The id of the volume the CO calls ``name`` on ``node``: the same for the same name and
    shape; a shape that cannot grow adds its reason."""
    volume_id = f"{node}/{hashlib.sha256(name.encode()).hexdigest()[:32]}"
    if spec is not None and (reason := fixed_reason(spec)):
        volume_id += f".{reason}"
    if node_of(volume_id) != node:
        raise FailedPrecondition(
            f"this node's id {node[:100]!r} cannot be carried in a volume id: it must be a "
            f"Kubernetes node name (lower-case DNS subdomain) of at most {MAX_VOLUME_ID - 43} "
            "characters"
        )
    return volume_id


def sibling_ids(node: str, name: str) -> list[str]:
    """Every id ``name`` could have on ``node``, one per growth class."""
    base = provisioned_id(node, name)
    return [base, *(f"{base}.{reason}" for reason in FIXED_REASONS)]


def check_growable_id(volume_id: str) -> None:
    """INVALID_ARGUMENT for an id that says its volume can never grow."""
    match = PROVISIONED_ID.fullmatch(volume_id)
    if match and match.group("fixed"):
        raise InvalidArgument(FIXED_REASONS[match.group("fixed")])


def key_bits(spec: VolumeSpec) -> int:
    """Cipher key size for --key-size: AES-256-XTS needs 512 bits, Adiantum 256.

    With --integrity, cryptsetup adds the HMAC key (256 bits for hmac-sha256) on top of this
    by itself; passing the sum is refused ("Key size in XTS mode must be 256 or 512 bits").
    """
    return 512 if spec.cipher == "aes-xts-plain64" else 256


def needs_integrity_wipe(spec: VolumeSpec) -> bool:
    """dm-integrity fails reads of sectors whose tags were never written. A block volume's
    reader may read anything, so its device is wiped at format time (cost O(size)); a
    filesystem made eagerly (``eager_mkfs``: the blocks mkfs writes in part and the probed
    regions are zeroed first, then all metadata is written) only reads what was written, so
    it skips the wipe."""
    return spec.integrity != "none" and spec.access_type != "mount"


def eager_mkfs(spec: VolumeSpec) -> bool:
    """Integrity filesystems write their metadata at mkfs time (nothing read is unwritten)."""
    return spec.integrity != "none"


class Volumes:
    """Publishes and tears down volumes on this node; thread-safe with per-volume locks."""

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
        self.host = host
        self.journal = journal or Journal(config.state_dir)
        self.key_source = key_source
        self.after_step = after_step or (lambda step: None)
        self.events = events or Events()
        self.journal.on_set_aside = self.events.record_set_aside
        self.locks = NodeGate()
        self._capacity = threading.Lock()

    # validation --------------------------------------------------------------------------
    def names(self, volume_id: str) -> Names:
        return Names.of(volume_id, self.config.data_dir, self.config.state_dir)

    @staticmethod
    def check_volume_id(volume_id: str) -> None:
        """An inline volume id (kubelet's ``csi-<hash>``) or a provisioned one (``node/hash``)."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if is_provisioned_id(volume_id):
            Volumes.check_provisioned_id(volume_id)
        elif not VOLUME_ID.fullmatch(volume_id):
            raise InvalidArgument(
                f"volume_id {volume_id[:140]!r} is not valid: use 1-128 characters "
                "[A-Za-z0-9._-], starting with a letter or digit (no path separators)"
            )

    @staticmethod
    def check_provisioned_id(volume_id: str) -> None:
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        if node_of(volume_id) is None:
            raise InvalidArgument(
                f"volume_id {volume_id[:140]!r} is not a volume this driver provisioned: "
                "expected <node name>/<32 hex digits>[.qcow2|.integrity], at most 128 characters"
            )

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

    # publish -----------------------------------------------------------------------------
    def publish(self, request: PublishRequest) -> None:
        self.check_volume_id(request.volume_id)
        if is_provisioned_id(request.volume_id):
            raise InvalidArgument(
                f"volume {request.volume_id} is a provisioned volume: it must be staged, not "
                "published as an inline ephemeral volume"
            )
        self.check_target(request.target_path)
        with self.locks.hold(request.volume_id):
            record = self.journal.load(request.volume_id)
            if record is not None and record.state == PUBLISHED:
                self._republish(record, request)
                return
            names = self.names(request.volume_id)
            if record is not None:  # an earlier attempt died half-way: start clean
                self._teardown(names, record.target_path, record)
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
        if self.host.mount_source(request.target_path) == names.mapper_device:
            return
        if not self.host.crypt_exists(names.mapping):
            raise FailedPrecondition(
                f"volume {request.volume_id} lost its encrypted mapping, so its data is gone; "
                "delete the pod to get a fresh volume"
            )
        self._mount(names, request)

    def _adopt(self, names: Names, request: PublishRequest) -> bool:
        """No record, yet the kernel still has the volume (the journal was lost without a
        reboot). Mounted at this very target: it is the pod's live volume; record it again and
        answer OK. Anything else of it in use: refuse, touching nothing. Unused leftovers are
        cleaned up so that everything the new attempt's rollback may undo is its own."""
        if not self.host.crypt_exists(names.mapping):
            return False  # a backing file or loop device without a key holds no data: reused
        if self.host.is_mounted_from(request.target_path, names.mapping):
            log.warning("volume %s has no journal record but is mounted at %s: adopting it",
                        request.volume_id, request.target_path)  # fmt: skip
            record = Record(volume_id=request.volume_id, state=PUBLISHED, spec=request.spec,
                            target_path=request.target_path, pod=dict(request.pod),
                            created_at=time.time(), step="adopted")  # fmt: skip
            with self._capacity:
                self.journal.write(record)
            return True
        if uses := self.host.mapping_users(names.mapping):
            raise FailedPrecondition(
                f"volume {request.volume_id} has no journal record on this node but its mapping "
                f"is in use ({', '.join(map(str, uses))}); refusing to touch it"
            )
        self._clean_leftovers(names)
        return False

    def _clean_leftovers(self, names: Names) -> None:
        """Remove an unused mapping no record describes, and what it sits on, so that the new
        attempt's rollback only ever closes a mapping it opened itself."""
        log.warning("volume %s has an open mapping and no record; removing it first",
                    names.volume_id)  # fmt: skip
        self.release(names)

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
            self.open_volume(names, spec, keyring=True)
            with self.timed_step("mkfs"):  # always: never trust what is on the device
                self.host.mkfs(names.mapper_device, spec.fs_type, eager=eager_mkfs(spec))
            with self.timed_step("mount"):
                self._mount(names, request)
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

    def open_volume(self, names: Names, spec: VolumeSpec, *, keyring: bool) -> None:
        """Create the backing file, attach it, format it with a fresh key and open the mapping;
        each step only if not done yet. ``keyring=False`` (provisioned volumes) keeps the key in
        the dm-crypt table, which is what lets ``cryptsetup resize`` grow it later."""
        with self.timed_step("create_backing"):
            if not self.host.exists(names.backing):
                if spec.backing == "qcow2":
                    self.host.qcow2_create(names.backing, spec.backing_bytes, spec.preallocate)
                else:
                    self.host.create_backing(names.backing, spec.backing_bytes, spec.preallocate)
        with self.timed_step("attach"):
            device = self.attach(names, spec)
        if not self.host.crypt_exists(names.mapping):
            self._format_and_open(names, spec, device, keyring)

    def attach(self, names: Names, spec: VolumeSpec) -> str:
        """The backing file as a block device: a loop device, or for qcow2 an NBD device
        connected to qemu-storage-daemon's export of the image (named like the mapping)."""
        if spec.backing == "qcow2":
            return self.host.nbd_find(names.mapping) or self.host.nbd_attach(
                names.backing, names.mapping
            )
        return self.host.loop_find(names.backing) or self.host.loop_attach(names.backing)

    def device_of(self, names: Names) -> str | None:
        """The block device the backing file is attached as now, if any."""
        return self.host.loop_find(names.backing) or self.host.nbd_find(names.mapping)

    def check_backing_available(self, spec: VolumeSpec) -> None:
        """Refuse qcow2 up front where it cannot work, before anything is reserved or made."""
        if spec.backing == "qcow2" and (reason := self.host.qcow2_unavailable()):
            raise FailedPrecondition(f"cannot make a qcow2 volume on this node: {reason}")

    def _format_and_open(self, names: Names, spec: VolumeSpec, device: str, keyring: bool) -> None:
        """Format with a fresh key and open it; the key is zeroed when this returns."""
        header = self.header_of(names, spec)
        options = LuksFormat(spec.cipher, key_bits(spec), spec.integrity, header,
                             wipe=needs_integrity_wipe(spec))  # fmt: skip
        with self.key_source(PASSPHRASE_BYTES) as key:
            with self.timed_step("format"):
                self.host.luks_format(device, key, options)
            with self.timed_step("open"):
                self.host.crypt_open(device, names.mapping, key, header, keyring=keyring)

    @staticmethod
    def header_of(names: Names, spec: VolumeSpec) -> str | None:
        return names.header if spec.header == "detached" else None

    def _mount(self, names: Names, request: PublishRequest) -> None:
        spec = request.spec
        self.host.make_dir(request.target_path)
        options = ["nosuid", "nodev", *(f for f in spec.mount_flags if f not in ("ro", "rw"))]
        readonly = spec.readonly or "ro" in spec.mount_flags
        if not readonly:
            # fix the root's owner/mode on a writable mount first, then remount as asked
            self.host.mount(
                names.mapper_device, request.target_path, spec.fs_type, ["rw", *options]
            )
            self.host.set_volume_root(
                request.target_path, int(spec.mount_group) if spec.mount_group else None
            )
        else:
            self.host.mount(
                names.mapper_device, request.target_path, spec.fs_type, ["ro", *options]
            )

    def reserve(self, record: Record, *, new_volume: bool = True) -> None:
        """Count the volume at its full charge against the node's limits (the volume count, the
        admin's budget, and the data dir's free space minus what sparse volumes may still
        claim), then write its record atomically. Also used to grow a reservation."""
        need = record.charge
        with self._capacity:
            others = [r for r in self.journal.all() if r.volume_id != record.volume_id]
            if new_volume and len(others) >= self.config.max_volumes:
                raise ResourceExhausted(
                    f"this node already has {len(others)} volumes, its limit "
                    f"(--max-volumes={self.config.max_volumes})"
                )
            reserved = sum(r.charge for r in others)
            budget = self.config.capacity
            if budget and reserved + need > budget:
                raise ResourceExhausted(
                    f"volume of {format_bytes(need)} does not fit in this node's budget: "
                    f"{format_bytes(max(0, budget - reserved))} of {format_bytes(budget)} left; "
                    "ask for a smaller size or schedule the pod elsewhere"
                )
            promised = sum(self._unallocated(r) for r in others)
            free = self.host.free_bytes(self.config.data_dir)
            if self._unallocated(record) + promised > free:
                raise ResourceExhausted(
                    f"volume of {format_bytes(need)} does not fit in the data dir "
                    f"{self.config.data_dir}: {free // 2**20} MiB free, "
                    f"{promised // 2**20} MiB already promised to other volumes"
                )
            self.journal.write(record)

    def room(self) -> int:
        """Bytes the charge of one more volume may take now (0 at the volume limit)."""
        with self._capacity:
            records = self.journal.all()
            if len(records) >= self.config.max_volumes:
                return 0
            free = self.host.free_bytes(self.config.data_dir)
            room = free - sum(self._unallocated(r) for r in records)
            if self.config.capacity:
                room = min(room, self.config.capacity - sum(r.charge for r in records))
            return max(0, room)

    def _unallocated(self, record: Record) -> int:
        """Bytes a sparse volume may still claim from the data dir's free space."""
        allocated = self.host.allocated_bytes(self.names(record.volume_id).backing)
        return max(0, record.charge - allocated)

    # unpublish ---------------------------------------------------------------------------
    def unpublish(self, volume_id: str, target_path: str) -> None:
        self.check_volume_id(volume_id)
        self.check_target(target_path)
        with self.locks.hold(volume_id):
            names = self.names(volume_id)
            record = self.journal.load(volume_id)
            if record is not None and record.target_path != target_path:
                # not this volume's target: release only a mount of ours there, if any
                if self.host.is_mounted_from(target_path, names.mapping):
                    self.host.umount(target_path)
                return
            self._teardown(names, target_path, record)

    def _rollback(self, names: Names, target: str, record: Record) -> None:
        try:
            self._teardown(names, target, record)
        except Exception:
            log.exception(
                "rollback of %s left objects behind; start-up will retry", names.volume_id
            )

    def _teardown(self, names: Names, target: str, record: Record | None) -> None:
        """Unmount, close (wiping the key), detach, delete; each step only if still needed.

        Whether the mapping can be closed is decided before the target is unmounted: anything
        else the kernel says holds it (another mount, a bound device node, an open) refuses the
        whole teardown. A holder only the close itself finds (a container's bind of the target
        in its own mount namespace) makes us mount the target again, so the pod never gets a
        plain directory on the node's disk in place of its volume."""
        backing = record.spec.backing if record else None
        if backing != "loop":
            self.drop_dead_nbd(names)
        ours = bool(target) and self.host.is_mounted_from(target, names.mapping)
        self.check_closable(names, ignore=target if ours else "")
        with self.timed_step("unmount"):
            if ours:
                self.host.umount(target)
        try:
            self.release(names, backing)
        except DriverError:
            if ours and record is not None and record.state == PUBLISHED:
                self._restore_target(names, record)
            raise
        with self.timed_step("forget"):
            self.journal.delete(names.volume_id)
            if target and not self.host.is_mountpoint(target):  # another mount is not ours
                self.host.remove_dir(target)

    def check_closable(self, names: Names, ignore: str = "") -> None:
        """Busy unless the only user of the mapping is a mount at ``ignore`` (which the caller is
        about to unmount)."""
        uses = [u for u in self.host.mapping_users(names.mapping)
                if not (u.kind == "mounted" and u.where == ignore)]  # fmt: skip
        if uses:
            raise Busy(
                f"mapping of volume {names.volume_id} is still in use "
                f"({', '.join(map(str, uses))}); nothing was torn down, retry later"
            )

    def _restore_target(self, names: Names, record: Record) -> None:
        """Mount a live volume at its target again after a teardown that could not finish."""
        if not self.host.crypt_exists(names.mapping):
            return
        try:
            request = PublishRequest(record.volume_id, record.target_path, record.spec,
                                     record.pod)  # fmt: skip
            self._mount(names, request)
            log.warning("volume %s is still in use elsewhere; mounted it at %s again",
                        record.volume_id, record.target_path)  # fmt: skip
        except Exception:
            log.exception("could not mount volume %s at %s again", record.volume_id,
                          record.target_path)  # fmt: skip

    def drop_dead_nbd(self, names: Names) -> None:
        """A qcow2 volume whose export qemu-storage-daemon lost (it restarted) can never do
        I/O again, and with no NBD timeout its in-flight requests never end: unmount would hang.
        Disconnecting the device first fails them, so teardown can go on."""
        if self.host.nbd_find(names.mapping) and not self.host.nbd_export_alive(names.mapping):
            log.warning("volume %s lost its NBD export; disconnecting its device before "
                        "teardown", names.volume_id)  # fmt: skip
            self.host.nbd_detach(names.mapping)

    def release_staged(self, record: Record) -> None:
        """Take a provisioned volume back to RESERVED: unmount its staging path, close (wiping
        the key), detach, delete. Its record, and so its reservation, stays until DeleteVolume."""
        names = self.names(record.volume_id)
        if record.spec.backing != "loop":
            self.drop_dead_nbd(names)
        staging = record.staging_path
        try:
            ours = bool(staging) and self.host.is_mounted_from(staging, names.mapping)
            self.check_closable(names, ignore=staging if ours else "")
            with self.timed_step("unmount"):
                if ours:
                    self.host.umount(staging)  # the staging dir itself belongs to the CO
            self.release(names, record.spec.backing)
        except DriverError:
            self._restore_staging(names, record)
            if record.state == UNSTAGING and self.host.crypt_exists(names.mapping):
                record.state = STAGED  # as usable as before the unstage was asked for
                self.journal.write(record)
            raise
        record.state = RESERVED
        record.staging_path = ""
        record.targets = {}
        record.step = ""
        self.journal.write(record)

    def _restore_staging(self, names: Names, record: Record) -> None:
        """The mapping could not be closed: mount the staging path again if it lost its mount,
        so the pods' binds and a retry find the volume as it was."""
        if not self.host.crypt_exists(names.mapping) or record.spec.access_type != "mount":
            return
        staging = record.staging_path
        if not staging or self.host.is_mounted_from(staging, names.mapping):
            return
        try:
            self.mount_staging(names, record)
            log.warning("volume %s is still in use; mounted its staging path %s again",
                        record.volume_id, staging)  # fmt: skip
        except Exception:
            log.exception("could not mount volume %s at %s again", record.volume_id, staging)

    def mount_staging(self, names: Names, record: Record) -> None:
        spec = record.spec
        self.host.make_dir(record.staging_path)
        flags = [f for f in spec.mount_flags if f not in ("ro", "rw")]
        self.host.mount(names.mapper_device, record.staging_path, spec.fs_type,
                        ["rw", "nosuid", "nodev", *flags])  # fmt: skip
        group = int(spec.mount_group) if spec.mount_group else None
        self.host.set_volume_root(record.staging_path, group)

    def release(self, names: Names, backing: str | None = None) -> None:
        """Close, detach and delete whatever of the volume still exists; refuse while mounted.
        ``backing`` None (no record says) checks for both a loop device and an NBD export."""
        with self.timed_step("close"):
            self.check_closable(names)
            self.host.crypt_close(names.mapping)
        with self.timed_step("detach"):
            device = self.host.loop_find(names.backing)
            if device:
                self.remove_temporary_mappings(device)
                self.host.loop_detach(device)
            if backing != "loop":  # a loop volume never had an export: skip qsd's round trip
                self.host.nbd_detach(names.mapping)
        with self.timed_step("delete"):
            existed = self.host.exists(names.backing)
            self.host.remove_file(names.backing)
            self.host.remove_file(names.header)
        if existed:
            self.events.shredded()

    def remove_temporary_mappings(self, device: str) -> None:
        """cryptsetup killed mid-format leaves its temporary mapping on our device: without
        removing it the device can never detach (and its deleted file keeps its space)."""
        for name in self.host.temporary_mappings_on(device):
            log.warning("removing cryptsetup's leftover mapping %s on %s", name, device)
            self.host.remove_temporary_mapping(name)

    # stats -------------------------------------------------------------------------------
    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        self.check_volume_id(volume_id)
        if not volume_path:
            raise InvalidArgument("volume_path is required")
        record = self.journal.load(volume_id)
        if record is None or record.state not in (PUBLISHED, STAGED):
            raise NotFound(f"volume {volume_id} is not published on this node")
        if volume_path not in self.paths_of(record):
            raise NotFound(f"volume {volume_id} is not published at {volume_path}")
        names = self.names(volume_id)
        health = self.health(names, record, volume_path)
        if record.spec.access_type == "block":
            size = self.host.device_size(names.mapper_device) if not health.abnormal else None
            return VolumeStats(None, health, size)
        mounted = self.host.mount_source(volume_path) == names.mapper_device
        return VolumeStats(self.host.fs_stats(volume_path) if mounted else None, health)

    @staticmethod
    def paths_of(record: Record) -> list[str]:
        """Where the volume is visible: its inline target, or its staging path and targets."""
        if not record.provisioned:
            return [record.target_path]
        return [p for p in (record.staging_path, *record.targets) if p]

    def _mounted(self, names: Names, record: Record) -> bool:
        if record.provisioned and record.spec.access_type == "block":
            return self.host.crypt_exists(names.mapping)  # staged = open; nothing to mount
        path = record.staging_path if record.provisioned else record.target_path
        return self.host.mount_source(path) == names.mapper_device

    def health(self, names: Names, record: Record, path: str = "") -> VolumeHealth:
        path = path or (record.staging_path if record.provisioned else record.target_path)
        problems = []
        if not self.host.exists(names.backing):
            problems.append(f"backing file {names.backing} is gone")
        elif record.spec.backing == "qcow2":
            if self.host.nbd_find(names.mapping) is None:
                problems.append("NBD device is disconnected")
            elif not self.host.nbd_export_alive(names.mapping):
                problems.append("qemu-storage-daemon no longer serves the image or does not "
                                "answer (restarted or hung?)")
        elif self.host.loop_find(names.backing) is None:
            problems.append("loop device is detached")
        if not self.host.crypt_exists(names.mapping):
            problems.append(f"mapping {names.mapping} is closed")
        elif record.spec.access_type == "block":
            bound = path == record.staging_path or self.host.is_mountpoint(path)
            if not bound:  # a block volume is staged by opening it; targets are binds
                problems.append(f"device is not bound at {path}")
        elif self.host.mount_source(path) != names.mapper_device:
            problems.append(f"filesystem is not mounted at {path}")
        elif (errors := self.host.fs_error_count(names.mapper_device)) > 0:
            problems.append(f"filesystem has recorded {errors} errors")
        if problems:
            return VolumeHealth(True, "; ".join(problems))
        return VolumeHealth(False, "volume is healthy")

    def usage(self) -> Usage:
        """Budget, reservations and real disk use, for metrics and GetCapacity."""
        records = self.journal.all()
        counts: dict[tuple[str, str], int] = {}
        for r in records:
            key = (r.spec.backing, r.spec.access_type)
            counts[key] = counts.get(key, 0) + 1
        return Usage(
            budget=self.config.capacity,
            reserved=sum(r.charge for r in records),
            provisioned=sum(r.spec.size for r in records),
            allocated=sum(self.host.allocated_bytes(self.names(r.volume_id).backing)
                          for r in records),
            data_dir_free=self.host.free_bytes(self.config.data_dir),
            volumes=counts,
        )  # fmt: skip

    # admin view --------------------------------------------------------------------------
    def list(self) -> list[VolumeInfo]:
        result = []
        for record in self.journal.all():
            names = self.names(record.volume_id)
            try:
                result.append(
                    VolumeInfo(
                        record=record,
                        names=names,
                        allocated_bytes=self.host.allocated_bytes(names.backing),
                        loop_device=self.device_of(names),
                        mapping_open=self.host.crypt_exists(names.mapping),
                        mounted=self._mounted(names, record),
                    )
                )
            except DriverError as exc:  # one volume the host cannot inspect hides no other
                log.warning("cannot inspect volume %s: %s", record.volume_id, exc)
        return result

    # start-up ----------------------------------------------------------------------------
    def reconcile(self) -> ReconcileReport:
        """Roll back half-done work and remove objects no record accounts for.

        A half-done inline publish is torn down and forgotten (kubelet retries it); a half-done
        stage or unstage of a provisioned volume goes back to RESERVED, keeping the capacity
        that CreateVolume reserved (kubelet retries the stage, or the CO deletes the volume).
        """
        report = ReconcileReport()
        self.journal.remove_partial_writes()
        known: set[str] = set()
        for record in self.journal.all():
            names = self.names(record.volume_id)
            if record.state not in HALF_DONE:
                known.add(names.digest)
                continue
            try:
                with self.locks.hold(record.volume_id):
                    if record.provisioned:
                        self.release_staged(record)
                        known.add(names.digest)
                    else:
                        self._teardown(names, record.target_path, record)
                report.rolled_back.append(record.volume_id)
            except Exception as exc:  # one bad volume never stops start-up for the others
                if not isinstance(exc, DriverError):
                    log.exception("start-up could not roll back volume %s", record.volume_id)
                known.add(names.digest)
                report.failures.append(f"{record.volume_id}: {exc}")
        # a record that cannot be read still names its objects: they are never orphans
        for digest in sorted(self.journal.unreadable_digests()):
            known.add(digest)
            report.failures.append(f"journal record {digest}.json is unreadable and was set "
                                   "aside; its volume's objects are left alone")  # fmt: skip
        try:
            self._remove_orphans(known, report)
        except DriverError as exc:
            report.failures.append(f"orphan check stopped: {exc}")
        return report

    def _remove_orphans(self, known: set[str], report: ReconcileReport) -> None:
        data_dir = self.config.data_dir
        for name in self.host.list_dir(data_dir):
            match = BACKING_FILE.match(name)
            if not match or match.group(1) in known:
                continue
            mapping = MAPPING_PREFIX + match.group(1)
            path = os.path.join(data_dir, name)
            try:
                if uses := self.host.mapping_users(mapping):
                    report.failures.append(
                        f"{name}: no record but its mapping is in use "
                        f"({', '.join(map(str, uses))}); left alone"
                    )
                    known.add(match.group(1))  # keep its header too: unpublish will need nothing
                    continue
                self.host.crypt_close(mapping)
                device = self.host.loop_find(path)
                if device:
                    self.remove_temporary_mappings(device)
                    self.host.loop_detach(device)
                self.host.nbd_detach(mapping)
                self.host.remove_file(path)
                report.count("backing_without_record", self.events)
            except DriverError as exc:
                report.failures.append(f"{name}: {exc}")
        for mapping in self.host.crypt_names(MAPPING_PREFIX):
            digest = mapping[len(MAPPING_PREFIX) :]
            if digest in known:
                continue
            try:
                if self.host.mapping_users(mapping):
                    known.add(digest)
                    report.failures.append(f"{mapping}: no record but in use; left alone")
                    continue
                self.host.crypt_close(mapping)
                report.count("mapping_without_record", self.events)
            except DriverError as exc:
                report.failures.append(f"{mapping}: {exc}")
        for device, backing in self.host.loops_in(data_dir).items():
            match = BACKING_FILE.match(os.path.basename(backing))
            if not match or match.group(1) in known:
                continue
            try:
                self.remove_temporary_mappings(device)
                self.host.loop_detach(device)  # its file was deleted while a mapping held it
                report.count("loop_without_record", self.events)
            except DriverError as exc:
                report.failures.append(f"{device}: {exc}")
        try:
            exports = self.host.nbd_exports()
        except DriverError as exc:  # a hung qsd must not keep the driver (and loop volumes) down
            report.failures.append(f"qcow2 exports not checked: {exc}")
            exports = []
        for export in exports:
            digest = export.removeprefix(MAPPING_PREFIX)
            if digest in known:
                continue
            try:
                if self.host.mapping_users(export):
                    report.failures.append(f"{export}: no record but in use; left alone")
                    continue
                self.host.crypt_close(export)  # its image was deleted while the export held it
                self.host.nbd_detach(export)
                report.count("export_without_record", self.events)
            except DriverError as exc:
                report.failures.append(f"{export}: {exc}")
        header_dir = os.path.join(self.config.state_dir, "headers")
        for name in self.host.list_dir(header_dir):
            match = HEADER_FILE.match(name)
            if match and match.group(1) not in known:
                try:
                    self.host.remove_file(os.path.join(header_dir, name))
                    report.count("header_without_record", self.events)
                except DriverError as exc:
                    report.failures.append(f"{name}: {exc}")
