"""Volume parameters: parse and validate what the CO sends (inline attributes or SC parameters).

Everything here is pure: a request's raw maps go in, a frozen VolumeSpec or an InvalidArgument
naming the offending key comes out. Every value is from the CO and untrusted: its length is
bounded before anything parses it, and a message quotes at most a short prefix of it (the message
is also the log line and the pod's event).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation, localcontext
from typing import Any

from csi import backings
from csi.backings.luks import ATTACHED_HEADER_BYTES
from csi.errors import InvalidArgument, OutOfRange

MiB = 1024**2
ALIGN = MiB  # backing files are whole MiB: a multiple of the 4096-byte sector
XFS_MIN_BYTES = 300 * MiB  # mkfs.xfs refuses smaller filesystems

_SUFFIXES: dict[str, int] = {
    "": 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"^\+?(\d+(?:\.\d+)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
# Longer than any sane size (``1000000000000000000Ei`` is 21): keeps the exact arithmetic on at
# most ~30 digits, where a million digits would hold the GIL for half a minute.
MAX_QUANTITY_LENGTH = 32
MAX_KEY_LENGTH = 128  # the CSI spec's limit for a string
MAX_VALUE_LENGTH = 253  # the longest Kubernetes name (pod, service account), which kubelet passes
QUOTE_LENGTH = 32  # how much of a bad value a message repeats
MAX_MOUNT_FLAGS = 32  # entries of mount_flags
MAX_MOUNT_FLAGS_LENGTH = 1024  # their characters in all

CO_PREFIX = "csi.storage.k8s.io/"
# off: a volume of the node; guest: a raw disk handed to the pod's Kata VM, which makes and keeps
# the key; host: our decrypted device handed to the Kata VM (the host holds the key)
KATA_MODES = ("off", "guest", "host")
CHOICES: dict[str, tuple[str, ...]] = {
    "backing": backings.names(),
    "preallocate": ("true", "false"),
    "integrity": ("none", "hmac-sha256"),
    "header": ("detached", "attached"),
    "cipher": ("aes-xts-plain64", "xchacha12,aes-adiantum-plain64"),
    "kata": KATA_MODES,
}
DEFAULTS = {
    "size": "1Gi",
    "backing": backings.DEFAULT,
    "preallocate": "false",
    "integrity": "none",
    "header": "detached",
    "cipher": "aes-xts-plain64",
    "kata": "off",
}
FS_TYPES = ("ext4", "xfs")
DEFAULT_FS = "ext4"

# Mount flags a pod may ask for. nosuid,nodev are always added; suid/dev/exec-enabling or
# remount-style flags are refused so a pod cannot weaken the node's protections.
_SAFE_FLAGS = frozenset(
    {
        "noatime", "relatime", "strictatime", "nodiratime", "lazytime", "noexec",
        "sync", "dirsync", "discard", "nodiscard", "ro", "rw", "nosuid", "nodev",
    }
)  # fmt: skip
_SAFE_VALUED = re.compile(r"^(commit|data|barrier|inode64|logbsize|allocsize)=[A-Za-z0-9]{1,32}$")


def quoted(value: str, limit: int = QUOTE_LENGTH) -> str:
    """``repr`` of at most ``limit`` characters of ``value``, then ``...`` and its length if cut.

    For every message that repeats what the CO sent: a 10k-character value must not end whole in
    the status, the log line and the pod's event. Escapes (``\\x00``) can make a repr ten times
    longer than its text, so the prefix shrinks until the repr fits too.
    """
    prefix = value[:limit]
    text = repr(prefix)
    while len(text) > 2 * limit + 2:
        prefix = prefix[:-1]
        text = repr(prefix)
    if len(prefix) == len(value):
        return text
    return f"{text}... ({len(value)} characters)"


def parse_quantity(text: str) -> int:
    """A Kubernetes quantity as whole bytes, rounded up; e.g. ``512Mi``, ``10Gi``, ``1G``.

    The length is checked first: the grammar then allows at most ~30 digits, so the exact
    decimal arithmetic below is instant whatever the CO sent.
    """
    if len(text) > MAX_QUANTITY_LENGTH:
        raise InvalidArgument(
            f"{quoted(text)} is not a size: a Kubernetes quantity such as 512Mi, 10Gi or 1G has "
            f"at most {MAX_QUANTITY_LENGTH} characters"
        )
    match = _QUANTITY.match(text.strip())
    if not match:
        raise InvalidArgument(
            f"{quoted(text)} is not a size; use a Kubernetes quantity such as 512Mi, 10Gi or 1G"
        )
    number, suffix = match.group(1), match.group(2) or ""
    with localcontext() as exact:
        exact.prec = len(number) + 40  # enough digits that nothing is ever rounded
        try:
            value = Decimal(number) * _SUFFIXES[suffix]
        except InvalidOperation:  # pragma: no cover - regex already guards this
            raise InvalidArgument(f"{quoted(text)} is not a size") from None
        return int(value.to_integral_value(rounding=ROUND_CEILING))


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def format_bytes(n: int) -> str:
    for unit, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


@dataclass(frozen=True)
class VolumeSpec:
    """Everything that defines a volume's shape; two publishes are compatible iff equal."""

    size: int
    backing: str = backings.DEFAULT
    preallocate: bool = False
    integrity: str = "none"
    header: str = "detached"
    cipher: str = "aes-xts-plain64"
    fs_type: str = DEFAULT_FS
    access_type: str = "mount"  # mount | block
    mount_flags: tuple[str, ...] = ()
    readonly: bool = False
    mount_group: str = ""
    kata: str = "off"

    @property
    def backing_bytes(self) -> int:
        """Bytes of the backing file: the volume plus an attached header's area."""
        extra = ATTACHED_HEADER_BYTES if self.header == "attached" else 0
        return self.size + extra

    @property
    def disk_bytes(self) -> int:
        """Most bytes the backing can take on the node's disk once every block is written (its
        backing says: a qcow2 image adds its tables)."""
        return backings.kind(self.backing).disk_bytes(self)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mount_flags"] = list(self.mount_flags)
        if self.kata == "off":  # a record stays exactly as versions before Kata wrote it
            del data["kata"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeSpec:
        """The inverse of ``to_json``. Fields this version does not know (a newer driver's) are
        ignored and missing optional ones take their defaults; the journal checks types first."""
        data = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        data["mount_flags"] = tuple(data.get("mount_flags", ()))
        return cls(**data)


def check_lengths(attributes: dict[str, str]) -> None:
    """Refuse an over-long key or value before anything parses, stores or logs it."""
    for key, value in attributes.items():
        if len(key) > MAX_KEY_LENGTH:
            raise InvalidArgument(
                f"volume parameter {quoted(key)} is too long: a key has at most "
                f"{MAX_KEY_LENGTH} characters"
            )
        if len(value) > MAX_VALUE_LENGTH:
            raise InvalidArgument(
                f"parameter {quoted(key)}={quoted(value)} is too long: a value has at most "
                f"{MAX_VALUE_LENGTH} characters"
            )


def parse_attributes(attributes: dict[str, str], *, min_size: int, max_size: int) -> dict[str, Any]:
    """Validate volume attributes / SC parameters; return the typed fields of a VolumeSpec."""
    check_lengths(attributes)
    check_keys(attributes)
    values = {**DEFAULTS, **{k: v for k, v in attributes.items() if k in DEFAULTS}}
    for key, allowed in CHOICES.items():
        if values[key] not in allowed:
            raise InvalidArgument(
                f"parameter {key}={quoted(values[key])} is not supported; use one of "
                f"{', '.join(allowed)}"
            )
    return {
        "size": parse_size(values["size"], min_size=min_size, max_size=max_size),
        "backing": values["backing"],
        "preallocate": values["preallocate"] == "true",
        "integrity": values["integrity"],
        "header": values["header"],
        "cipher": values["cipher"],
        "kata": values["kata"],
    }


def check_keys(attributes: dict[str, str]) -> None:
    """Our keys and the CO's ``csi.storage.k8s.io/*`` ones only: a typo must not pass unseen."""
    unknown = sorted(k for k in attributes if k not in DEFAULTS and not k.startswith(CO_PREFIX))
    if unknown:
        raise InvalidArgument(
            f"unknown volume parameter {quoted(unknown[0])}; supported: "
            f"{', '.join(sorted(DEFAULTS))}"
        )


def parse_size(text: str, *, min_size: int, max_size: int) -> int:
    """The ``size`` parameter in whole MiB, within the node's limits."""
    try:
        size = round_up(parse_quantity(text))
    except InvalidArgument as exc:
        raise InvalidArgument(f"parameter size: {exc}") from None
    # from here on ``text`` is a well-formed quantity of at most MAX_QUANTITY_LENGTH characters
    if size < min_size:
        raise InvalidArgument(
            f"parameter size={text} is below this node's minimum {format_bytes(min_size)}"
        )
    if size > max_size:
        raise InvalidArgument(
            f"parameter size={text} is above this node's maximum {format_bytes(max_size)}"
        )
    return size


def _floor(n: int, align: int = ALIGN) -> int:
    return n // align * align


def size_from_range(
    required: int, limit: int, *, default: int, min_size: int, max_size: int, floor: int = 0
) -> int:
    """The size of a volume for a CSI capacity range, in whole MiB.

    ``required`` is a minimum (rounded up to MiB and raised to the node's minimum and to
    ``floor``, e.g. what xfs needs); without it ``default`` is used, trimmed to ``limit``. A range
    that no size within this node's limits can meet is OUT_OF_RANGE, as the CSI spec asks.
    """
    if required < 0 or limit < 0:
        raise InvalidArgument("capacity_range: required_bytes and limit_bytes must not be negative")
    if limit and required > limit:
        raise InvalidArgument(
            f"capacity_range: required_bytes {required} is larger than limit_bytes {limit}"
        )
    lowest = max(min_size, floor)
    if required:
        size = max(round_up(required), lowest)
    else:
        size = max(min(default, _floor(limit)) if limit else default, lowest)
    if limit and size > limit:
        raise OutOfRange(
            f"capacity_range: no size of whole MiB between {format_bytes(lowest)} (this node's "
            f"minimum for such a volume) and the limit of {limit} bytes"
        )
    if size > max_size:
        raise OutOfRange(
            f"capacity_range: {format_bytes(size)} is above this node's maximum volume size "
            f"{format_bytes(max_size)}"
        )
    return size


def volume_context(spec: VolumeSpec) -> dict[str, str]:
    """The validated parameters of a provisioned volume, in the same keys the CO sent.

    They travel in the PV's volume context and come back to NodeStageVolume, so a node that
    lost its journal (a reboot empties tmpfs) can reserve the volume again with the same shape.
    """
    return {
        "size": format_bytes(spec.size),
        "backing": spec.backing,
        "preallocate": "true" if spec.preallocate else "false",
        "integrity": spec.integrity,
        "header": spec.header,
        "cipher": spec.cipher,
        # only when asked: a driver rolled back to a version without Kata still stages the PV
        **({"kata": spec.kata} if spec.kata != "off" else {}),
    }


def validate_fs_type(fs_type: str) -> str:
    fs = fs_type or DEFAULT_FS
    if fs not in FS_TYPES:
        raise InvalidArgument(
            f"fs type {quoted(fs)} is not supported; use one of {', '.join(FS_TYPES)}"
        )
    return fs


def check_mount_flag_lengths(flags: list[str]) -> None:
    """Bound the flags before splitting them: a 4 MiB request of flags must not cost seconds."""
    total = sum(len(entry) for entry in flags)
    if len(flags) > MAX_MOUNT_FLAGS or total > MAX_MOUNT_FLAGS_LENGTH:
        raise InvalidArgument(
            f"mount_flags: {len(flags)} entries of {total} characters are too many: at most "
            f"{MAX_MOUNT_FLAGS} entries of {MAX_MOUNT_FLAGS_LENGTH} characters in all"
        )


def validate_mount_flags(flags: list[str]) -> tuple[str, ...]:
    """Split comma-joined flags, refuse unknown or privilege-raising ones, keep order, dedupe."""
    check_mount_flag_lengths(flags)
    result: dict[str, None] = {}
    for entry in flags:
        for flag in entry.split(","):
            flag = flag.strip()
            if not flag:
                continue
            if flag not in _SAFE_FLAGS and not _SAFE_VALUED.match(flag):
                raise InvalidArgument(
                    f"mount flag {quoted(flag)} is not allowed; allowed: "
                    f"{', '.join(sorted(_SAFE_FLAGS))}"
                )
            result[flag] = None
    return tuple(result)


def validate_mount_group(group: str) -> str:
    if group and not (re.fullmatch(r"[0-9]{1,10}", group) and int(group) < 2**32 - 1):
        raise InvalidArgument(
            f"volume_mount_group {quoted(group)} must be a numeric group id below 4294967295"
        )
    return group


def check_combination(spec: VolumeSpec) -> None:
    """Rules across parameters, with the reason a person needs to fix the request."""
    backings.kind(spec.backing).check_spec(spec)
    check_kata(spec)
    if spec.integrity != "none" and spec.cipher != "aes-xts-plain64":
        raise InvalidArgument(f"integrity={spec.integrity} works only with cipher=aes-xts-plain64")
    if spec.fs_type == "xfs" and spec.access_type == "mount" and spec.size < XFS_MIN_BYTES:
        raise InvalidArgument(
            f"xfs needs at least 300Mi; size={format_bytes(spec.size)} is too small: "
            "ask for size 300Mi or more, or use ext4"
        )


# what a volume handed to a Kata VM cannot be, and why
_KATA_GUEST_RULES: tuple[tuple[str, str], ...] = (
    ("integrity", "the guest's configuration decides whether it adds dm-integrity"),
    ("header", "the guest keeps the LUKS header in its memory"),
    ("cipher", "the guest's configuration decides the cipher"),
)


def check_kata(spec: VolumeSpec) -> None:
    """The rules of a Kata hand-off, with the reason a person needs to fix the request."""
    if spec.kata == "off":
        return
    if spec.kata not in backings.kind(spec.backing).KATA_MODES:
        able = [n for n in backings.names() if spec.kata in backings.kind(n).KATA_MODES]
        raise InvalidArgument(
            f"kata={spec.kata} cannot hand over a backing={spec.backing} volume: use "
            + " or ".join(f"backing={name}" for name in able)
        )
    if spec.access_type != "mount":
        raise InvalidArgument(
            f"kata={spec.kata} hands the VM a disk with a filesystem on it: block access is not "
            "supported; ask for a filesystem volume"
        )
    if spec.kata == "guest":
        if spec.fs_type != "ext4":
            raise InvalidArgument(
                "kata=guest: the Kata agent formats the disk itself, always as ext4; ask for "
                f"fs type ext4, not {spec.fs_type}"
            )
        for key, why in _KATA_GUEST_RULES:
            if getattr(spec, key) != DEFAULTS[key]:
                raise InvalidArgument(f"kata=guest: parameter {key} does not apply: {why}")
