"""Volume capabilities as a plain value the lifecycle understands, and the rules they follow.

The servicers turn every VolumeCapability a request carries (CreateVolume,
ValidateVolumeCapabilities, NodeStageVolume, NodePublishVolume, NodeExpandVolume) into a
``Capability`` through csi.wire, so one rule set decides what the driver supports: node-local
access modes only, ``mount`` with ext4/xfs and the safe mount flags, or raw ``block``. This module
knows nothing of protobuf: the lifecycle imports it without the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from csi.errors import InvalidArgument
from csi.params import DEFAULT_FS

MOUNT = "mount"
BLOCK = "block"


@dataclass(frozen=True)
class Capability:
    access_type: str  # MOUNT or BLOCK
    fs_type: str = DEFAULT_FS  # meaningful for MOUNT only
    mount_flags: tuple[str, ...] = ()
    mount_group: str = ""
    read_only: bool = False  # the access mode allows reading only


def check_one_kind(capabilities: Sequence[Capability]) -> None:
    """The capabilities one new volume must support: all of one access type and one fs type."""
    if len({c.access_type for c in capabilities}) > 1:
        raise InvalidArgument(
            "volume_capabilities mix block and filesystem access: a volume is one or the other"
        )
    if len({c.fs_type for c in capabilities if c.access_type == MOUNT}) > 1:
        raise InvalidArgument("volume_capabilities ask for more than one fs type")
