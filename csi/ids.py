"""Volume ids: inline ones (kubelet's) and provisioned ones, which carry their node and, for a
shape that can never grow, the reason (so the controller can refuse an expansion up front)."""

from __future__ import annotations

import hashlib
import re

from csi import backings
from csi.errors import FailedPrecondition, InvalidArgument
from csi.params import VolumeSpec

VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# A provisioned volume's id is "<node>/<32 hex of the CO's name>": it says which node holds the
# volume. The node part is a Kubernetes node name (a DNS subdomain); no filesystem or dm name is
# ever made from an id, only from its hash (see journal.Names), so the "/" cannot reach a path.
NODE_NAME = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
# A volume that can never grow says why in its id (".qcow2", ".integrity"): ControllerExpandVolume
# runs where no journal can tell, and must refuse up front what the node would refuse.
FIXED_REASONS = backings.fixed_reasons()
PROVISIONED_ID = re.compile(
    rf"^(?P<node>{NODE_NAME})/(?P<hash>[0-9a-f]{{32}})"
    rf"(?:\.(?P<fixed>{'|'.join(map(re.escape, FIXED_REASONS))}))?$"
)
MAX_VOLUME_ID = 128  # bytes, the CSI spec's limit for a string field


def is_provisioned_id(volume_id: str) -> bool:
    """Provisioned (PVC) volume ids carry their node; inline ids (kubelet's) never have a '/'."""
    return "/" in volume_id


def node_of(volume_id: str) -> str | None:
    match = PROVISIONED_ID.fullmatch(volume_id)
    return match.group("node") if match and len(volume_id) <= MAX_VOLUME_ID else None


def fixed_reason(spec: VolumeSpec) -> str:
    """Why a volume of this shape can never grow ("" when it can)."""
    return backings.kind(spec.backing).fixed_reason(spec)


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


def check_volume_id(volume_id: str) -> None:
    """An inline volume id (kubelet's ``csi-<hash>``) or a provisioned one (``node/hash``)."""
    if not volume_id:
        raise InvalidArgument("volume_id is required")
    if is_provisioned_id(volume_id):
        check_provisioned_id(volume_id)
    elif not VOLUME_ID.fullmatch(volume_id):
        raise InvalidArgument(
            f"volume_id {volume_id[:140]!r} is not valid: use 1-128 characters "
            "[A-Za-z0-9._-], starting with a letter or digit (no path separators)"
        )


def check_provisioned_id(volume_id: str) -> None:
    if not volume_id:
        raise InvalidArgument("volume_id is required")
    if node_of(volume_id) is None:
        fixed = "|".join(f".{r}" for r in FIXED_REASONS)
        raise InvalidArgument(
            f"volume_id {volume_id[:140]!r} is not a volume this driver provisioned: "
            f"expected <node name>/<32 hex digits>[{fixed}], at most 128 characters"
        )
