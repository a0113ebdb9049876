"""Protobuf messages to the plain values the core understands; used by the servicers only.

The lifecycle, capacity and cluster modules take ``Capability`` (csi.capability) and never see a
message: every conversion from a CSI request lives here, next to the servicers that call it.
"""

from __future__ import annotations

from csi.capability import BLOCK, MOUNT, Capability, check_one_kind
from csi.errors import InvalidArgument
from csi.params import validate_fs_type, validate_mount_flags, validate_mount_group
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
    check_one_kind(result)
    return result
