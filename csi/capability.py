"""Volume capabilities from the CO, validated into a plain value the lifecycle understands.

The servicers use this for every request that carries a VolumeCapability (CreateVolume,
ValidateVolumeCapabilities, NodeStageVolume, NodePublishVolume, NodeExpandVolume), so one rule
set decides what the driver supports: node-local access modes only, ``mount`` with ext4/xfs and
the safe mount flags, or raw ``block``.
"""

from __future__ import annotations

from dataclasses import dataclass

from csi.errors import InvalidArgument
from csi.params import DEFAULT_FS, validate_fs_type, validate_mount_flags, validate_mount_group
from csi.proto import csi_pb2 as pb

Mode = pb.VolumeCapability.AccessMode.Mode
SINGLE_NODE_MODES = frozenset(
    {
        Mode.SINGLE_NODE_WRITER,
        Mode.SINGLE_NODE_READER_ONLY,
        Mode.SINGLE_NODE_SINGLE_WRITER,
        Mode.SINGLE_NODE_MULTI_WRITER,
    }
)
MOUNT = "mount"
BLOCK = "block"


@dataclass(frozen=True)
class Capability:
    access_type: str  # MOUNT or BLOCK
    fs_type: str = DEFAULT_FS  # meaningful for MOUNT only
    mount_flags: tuple[str, ...] = ()
    mount_group: str = ""
    read_only: bool = False  # the access mode allows reading only


def mode_name(mode: int) -> str:
    """The access mode's name, or its number: proto3 keeps enum values it does not know, and
    ``Mode.Name`` raises on them (which would end the RPC as INTERNAL)."""
    try:
        return str(Mode.Name(mode))
    except ValueError:
        return str(mode)


def check_access_mode(capability: pb.VolumeCapability) -> None:
    mode = capability.access_mode.mode
    if mode not in SINGLE_NODE_MODES:
        raise InvalidArgument(
            f"access mode {mode_name(mode)} is not supported: volumes are local to one node "
            "(use a SINGLE_NODE_* mode)"
        )


def capability_of(capability: pb.VolumeCapability) -> Capability:
    """Validate one capability; InvalidArgument says what to change."""
    check_access_mode(capability)
    read_only = capability.access_mode.mode == Mode.SINGLE_NODE_READER_ONLY
    if capability.HasField("block"):
        return Capability(BLOCK, read_only=read_only)
    if not capability.HasField("mount"):
        raise InvalidArgument("volume_capability must set the mount or the block access type")
    mount = capability.mount
    return Capability(
        MOUNT,
        fs_type=validate_fs_type(mount.fs_type),
        mount_flags=validate_mount_flags(list(mount.mount_flags)),
        mount_group=validate_mount_group(mount.volume_mount_group),
        read_only=read_only,
    )


def required_capability(request: object, field: str = "volume_capability") -> Capability:
    """The request's single capability, which must be there."""
    if not request.HasField(field):  # type: ignore[attr-defined]
        raise InvalidArgument(f"{field} is required")
    return capability_of(getattr(request, field))


def capabilities_of(capabilities: list[pb.VolumeCapability]) -> list[Capability]:
    """All capabilities a new volume must support (at least one, all of one access type)."""
    if not capabilities:
        raise InvalidArgument("volume_capabilities is required: name at least one")
    result = [capability_of(c) for c in capabilities]
    if len({c.access_type for c in result}) > 1:
        raise InvalidArgument(
            "volume_capabilities mix block and filesystem access: a volume is one or the other"
        )
    if len({c.fs_type for c in result if c.access_type == MOUNT}) > 1:
        raise InvalidArgument("volume_capabilities ask for more than one fs type")
    return result
