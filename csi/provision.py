"""The controller side of provisioned volumes: reserve, release, report capacity, grow.

Distributed provisioning: every node runs the driver in ``all`` mode beside a csi-provisioner
started with ``--node-deployment``, so each controller serves exactly one node, its own. The
StorageClass binds with WaitForFirstConsumer: the scheduler picks a node (using the capacity that
GetCapacity reports for that node), and that node's provisioner calls CreateVolume here with the
node in ``accessibility_requirements``. CreateVolume writes a RESERVED journal record: the
volume's full size now counts against the node's budget and free space; nothing is written to
disk until NodeStageVolume. The volume id is ``<node>/<hash of the CO's name>``, so any later call
knows where the volume lives, and the same name always maps to the same volume.

No grpc and no subprocess here.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from csi.capability import MOUNT, Capability
from csi.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from csi.ids import check_growable_id, node_of, provisioned_id, sibling_ids
from csi.journal import RESERVED, STAGED, Record
from csi.params import (
    XFS_MIN_BYTES,
    VolumeSpec,
    check_combination,
    format_bytes,
    parse_attributes,
    size_from_range,
    volume_context,
)
from csi.volumes import Volumes

log = logging.getLogger(__name__)

MiB = 1024**2
CLAIM_NAME = "csi.storage.k8s.io/pvc/name"
CLAIM_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"
SHAPE_FIELDS = ("backing", "preallocate", "integrity", "header", "cipher")


@dataclass(frozen=True)
class CreateRequest:
    name: str
    capabilities: tuple[Capability, ...]
    parameters: dict[str, str] = field(default_factory=dict)
    required: int = 0
    limit: int = 0
    requisite: tuple[dict[str, str], ...] = ()
    preferred: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class Provisioned:
    volume_id: str
    size: int
    context: dict[str, str]
    topology: dict[str, str]


@dataclass(frozen=True)
class Capacity:
    available: int
    maximum: int | None
    minimum: int | None


@dataclass(frozen=True)
class Expanded:
    size: int
    node_expansion_required: bool


class Provisioner:
    """CreateVolume, DeleteVolume, GetCapacity and ControllerExpandVolume for this node."""

    def __init__(self, core: Volumes, topology_key: str) -> None:
        self.core = core
        self.config = core.config
        self.journal = core.journal
        self.topology_key = topology_key

    @property
    def segments(self) -> dict[str, str]:
        """This node's place in the topology, as NodeGetInfo reports it."""
        return {self.topology_key: self.config.node_id}

    def _is_here(self, segments: dict[str, str]) -> bool:
        """Whether a topology names this node (a key we do not know cannot be satisfied)."""
        return all(self.segments.get(key) == value for key, value in segments.items())

    # create ------------------------------------------------------------------------------
    def create(self, request: CreateRequest) -> Provisioned:
        if not request.name:
            raise InvalidArgument("name is required")
        self._check_topology(request)
        spec = self._spec(request)
        volume_id = provisioned_id(self.config.node_id, request.name, spec)
        self._check_no_sibling(volume_id, request.name)
        with self.core.locks.hold(volume_id):
            record = self.journal.load(volume_id)
            if record is not None:
                self._check_same(record, request, spec)
                return self._provisioned(record)
            self.core.check_backing_available(spec)
            record = Record(
                volume_id=volume_id, state=RESERVED, spec=spec, target_path="",
                name=request.name, claim=claim_of(request.parameters), created_at=time.time(),
            )  # fmt: skip
            self.core.reserve(record)
            log.info("reserved %s for volume %s (%s)", format_bytes(spec.size), volume_id,
                     request.name)  # fmt: skip
            return self._provisioned(record)

    def _check_no_sibling(self, volume_id: str, name: str) -> None:
        """The same name with a shape of another growth class has another id: still the same
        volume to the CO, so it is ALREADY_EXISTS, not a second volume."""
        for other in sibling_ids(self.config.node_id, name):
            if other != volume_id and self.journal.load(other) is not None:
                raise AlreadyExists(
                    f"volume {name} already exists as {other} with different parameters"
                )

    def _check_topology(self, request: CreateRequest) -> None:
        """A requisite topology must include this node: each controller serves only its own.
        The refusal is RESOURCE_EXHAUSTED, the CSI spec's code for "cannot be created in the
        requested topology". Without requirements the volume goes to this node."""
        if request.requisite and not any(self._is_here(t) for t in request.requisite):
            wanted = "; ".join(",".join(f"{k}={v}" for k, v in sorted(t.items()))
                               for t in request.requisite)  # fmt: skip
            raise ResourceExhausted(
                f"this controller provisions only on node {self.config.node_id} "
                f"({self.topology_key}={self.config.node_id}); the request needs {wanted}"
            )

    def _spec(self, request: CreateRequest) -> VolumeSpec:
        """The new volume's shape: parameters as inline attributes, size from the range."""
        config = self.config
        fields = parse_parameters(request.parameters, config.min_size, config.max_size)
        first = request.capabilities[0]
        floor = XFS_MIN_BYTES if first.access_type == MOUNT and first.fs_type == "xfs" else 0
        size = size_from_range(request.required, request.limit, default=fields.pop("size"),
                               min_size=config.min_size, max_size=config.max_size,
                               floor=floor)  # fmt: skip
        spec = VolumeSpec(size=size, **fields, access_type=first.access_type,
                          fs_type=first.fs_type)  # fmt: skip
        check_combination(spec)
        return spec

    def _check_same(self, record: Record, request: CreateRequest, spec: VolumeSpec) -> None:
        """The same name again: OK if the existing volume satisfies the request."""
        problems = []
        if record.name != request.name:
            problems.append("a different name")  # a hash collision: never in practice
        if shape(record.spec) != shape(spec):
            problems.append("different parameters")
        if record.spec.access_type != spec.access_type:
            problems.append(f"{record.spec.access_type} access")
        size = max(record.spec.size, record.grow_to)
        if size < request.required or (request.limit and size > request.limit):
            problems.append(f"size {format_bytes(size)}")
        if not request.required and not request.limit and size < spec.size:
            problems.append(f"size {format_bytes(size)}")
        if problems:
            raise AlreadyExists(
                f"volume {request.name} already exists as {record.volume_id} with "
                f"{', '.join(problems)}"
            )

    def _provisioned(self, record: Record) -> Provisioned:
        return Provisioned(record.volume_id, max(record.spec.size, record.grow_to),
                           volume_context(record.spec), self.segments)  # fmt: skip

    # delete ------------------------------------------------------------------------------
    def delete(self, volume_id: str) -> None:
        """Forget the volume and release its capacity; idempotent. Anything the node left
        (an aborted stage) is cleaned up; a staged or published volume is refused."""
        if not volume_id:
            raise InvalidArgument("volume_id is required")
        node = node_of(volume_id)
        if node is None:
            return  # not an id this driver ever returned: nothing of ours to delete
        if node != self.config.node_id:
            raise FailedPrecondition(
                f"volume {volume_id} lives on node {node}; only the driver on that node can "
                "delete it (is its csi-provisioner running with --node-deployment?)"
            )
        with self.core.locks.hold(volume_id):
            record = self.journal.load(volume_id)
            if record is not None and (record.state == STAGED or record.targets):
                where = ", ".join([record.staging_path, *record.targets])
                raise FailedPrecondition(
                    f"volume {volume_id} is still staged on this node at {where}; "
                    "the node must unstage it first"
                )
            if record is not None and record.state != RESERVED:
                self.core.release_staged(record)  # a stage or unstage that died half-way
            else:
                self.core.release_unknown(self.core.names(volume_id))
            self.journal.delete(volume_id)
            log.info("deleted volume %s", volume_id)

    # capacity ----------------------------------------------------------------------------
    def capacity(self, segments: dict[str, str] | None, parameters: dict[str, str]) -> Capacity:
        """What one more volume of these parameters may use on this node; 0 elsewhere."""
        if segments and not self._is_here(segments):
            return Capacity(0, None, None)
        config = self.config
        fields = parse_parameters(parameters, config.min_size, config.max_size)
        room = self.core.capacity.largest_volume(VolumeSpec(**fields))  # its backing's overhead
        available = room // MiB * MiB
        return Capacity(available, min(config.max_size, available), config.min_size)

    # expand ------------------------------------------------------------------------------
    def expand(self, volume_id: str, required: int, limit: int) -> Expanded:
        """Grow the reservation. A volume on this node that is not staged simply gets the new
        size (it is created at that size when staged); a staged one keeps the grown
        reservation until NodeExpandVolume grows its file, mapping and filesystem. A volume on
        another node is only checked: its node reserves the growth in NodeExpandVolume."""
        self.core.check_provisioned_id(volume_id)
        check_growable_id(volume_id)  # csi-resizer must not record a size the node refuses
        if not required:
            raise InvalidArgument("capacity_range.required_bytes is required")
        config = self.config
        size = size_from_range(required, limit, default=0, min_size=config.min_size,
                               max_size=config.max_size)  # fmt: skip
        if node_of(volume_id) != config.node_id:
            return Expanded(size, True)
        with self.core.locks.hold(volume_id):
            record = self.journal.load(volume_id)
            if record is None:
                raise NotFound(f"volume {volume_id} does not exist")
            self.core.backing_of(record.spec).check_growable(record.spec)
            if size <= record.spec.size:
                return Expanded(record.spec.size, False)
            if record.grow_to < size:
                record.grow_to = size
                self.core.reserve(record, new_volume=False)
            if record.state == RESERVED:  # nothing on the node yet: the new size is the size
                record.spec = dataclasses.replace(record.spec, size=size)
                record.grow_to = 0
                self.journal.write(record)
                return Expanded(size, False)
            return Expanded(size, True)

    # validate ----------------------------------------------------------------------------
    def validate(self, volume_id: str, context: dict[str, str], parameters: dict[str, str],
                 capabilities: list[Capability]) -> None:  # fmt: skip
        """Raise NotFound for an unknown volume; InvalidArgument for what it cannot do."""
        node = node_of(volume_id)
        if node is None:
            raise NotFound(f"volume {volume_id} is not a volume this driver provisioned")
        record = None
        if node == self.config.node_id:
            record = self.journal.load(volume_id)
            if record is None:
                raise NotFound(f"volume {volume_id} does not exist")
        config = self.config
        for what, values in (("parameters", parameters), ("volume_context", context)):
            try:
                parse_parameters(values, config.min_size, config.max_size)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{what}: {exc}") from None
        if record is not None and record.state == STAGED:
            used = record.spec.access_type
            if any(c.access_type != used for c in capabilities):
                raise InvalidArgument(f"volume {volume_id} is in use with {used} access")


def parse_parameters(parameters: dict[str, str], min_size: int, max_size: int) -> dict[str, Any]:
    """StorageClass parameters, by the same rules as inline attributes. A ``size`` given there
    must lie within the node's limits; the default one only applies when the request has no
    capacity range, and size_from_range checks the size actually chosen."""
    if "size" not in parameters:
        min_size, max_size = 0, 2**63
    return parse_attributes(parameters, min_size=min_size, max_size=max_size)


def shape(spec: VolumeSpec) -> tuple[object, ...]:
    """What the parameters fix about a volume (its size can change later)."""
    return tuple(getattr(spec, name) for name in SHAPE_FIELDS)


def claim_of(parameters: dict[str, str]) -> str:
    """namespace/name of the PVC, when csi-provisioner runs with --extra-create-metadata."""
    name = parameters.get(CLAIM_NAME, "")
    namespace = parameters.get(CLAIM_NAMESPACE, "")
    return f"{namespace}/{name}" if name else ""
