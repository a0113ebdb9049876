"""The LUKS2 layer the file backings share, and their common lifecycle.

A LUKS file backing keeps the volume's bytes in ``<data dir>/<digest>.img`` (its header, when
detached, in ``<state dir>/headers/<digest>.hdr``), makes them a block device its own way (a loop
device, an NBD device), formats that with a fresh random key (stdin only, zeroed after) and opens
the mapping ``luks-eph-<digest>``. The key exists only in the kernel: closing the mapping (or
suspending it, for the forced wipe) shreds the data.
"""

from __future__ import annotations

import logging
import os
import re
from abc import abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

from csi.backings.base import FAILED, Backing, Context, Orphan, Wiped
from csi.errors import Busy, DriverError
from csi.exposures import Exposure, MountFilesystem
from csi.host import LuksFormat
from csi.keys import PASSPHRASE_BYTES

if TYPE_CHECKING:
    from csi.journal import Names
    from csi.params import VolumeSpec

log = logging.getLogger(__name__)

MiB = 1024**2
ATTACHED_HEADER_BYTES = MiB  # our compact LUKS2 metadata + keyslots, aligned to 1 MiB
MAPPING_PREFIX = "luks-eph-"
BACKING_FILE = re.compile(r"^([0-9a-f]{32})\.img$")
HEADER_FILE = re.compile(r"^([0-9a-f]{32})\.hdr$")
INTEGRITY_FIXED = (
    "volumes with integrity cannot grow: the dm-integrity layer under the mapping keeps its "
    "size; create a new volume of the size you need"
)
KATA_FIXED = (
    "volumes handed to a Kata VM cannot grow: the filesystem lives in the guest, which does not "
    "learn a new disk size; create a new volume of the size you need"
)


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


def volume_names(digest: str, data_dir: str, state_dir: str) -> Names:
    from csi.journal import Names  # the journal imports this module: resolved when first used

    return Names.of_digest(digest, data_dir, state_dir)


def header_of(names: Names, spec: VolumeSpec) -> str | None:
    return names.header if spec.header == "detached" else None


class Luks:
    """Format, open, resize, close: the dm-crypt half of every LUKS backing."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.host = context.host
        self.step = context.step

    def format_and_open(self, names: Names, spec: VolumeSpec, device: str, keyring: bool) -> None:
        """Format with a fresh key and open it; the key is zeroed when this returns.
        ``keyring=False`` (provisioned volumes) keeps the key in the dm-crypt table, which is
        what lets ``cryptsetup resize`` grow it later."""
        header = header_of(names, spec)
        options = LuksFormat(spec.cipher, key_bits(spec), spec.integrity, header,
                             wipe=needs_integrity_wipe(spec))  # fmt: skip
        with self.context.key_source(PASSPHRASE_BYTES) as key:
            with self.step("format"):
                self.host.luks_format(device, key, options)
            with self.step("open"):
                self.host.crypt_open(device, names.mapping, key, header, keyring=keyring)

    def is_open(self, names: Names) -> bool:
        return self.host.crypt_exists(names.mapping)

    def users(self, names: Names, ignore: str = "") -> list[str]:
        """Who holds the mapping (mounts, binds, stacked devices, opens), from the kernel,
        leaving out a mount at ``ignore``."""
        return [str(u) for u in self.host.mapping_users(names.mapping)
                if not (u.kind == "mounted" and u.where == ignore)]  # fmt: skip

    def remove_temporary_mappings(self, device: str) -> None:
        """cryptsetup killed mid-format leaves its temporary mapping on our device: without
        removing it the device can never detach (and its deleted file keeps its space)."""
        for name in self.host.temporary_mappings_on(device):
            log.warning("removing cryptsetup's leftover mapping %s on %s", name, device)
            self.host.remove_temporary_mapping(name)

    def resize(self, names: Names, spec: VolumeSpec) -> None:
        with self.step("resize_mapping"):
            self.host.crypt_resize(names.mapping, header_of(names, spec))

    def wipe_keys(self, mappings: list[str]) -> dict[str, Wiped]:
        """The keys leave the kernel now, in use or not: each table becomes an error target
        (all in one go), so later I/O fails with EIO; keyed by mapping name."""
        if not mappings:
            return {}
        return {w.name: Wiped(w.outcome, w.detail) for w in self.host.crypt_wipe_keys(mappings)}

    def wipe_unrecorded(self, known: set[str]) -> dict[str, Wiped]:
        """Mappings of ours that no record names hold keys too: wipe them as well."""
        return self.wipe_keys([o.label for o in self.orphan_mappings(known)])

    # start-up ----------------------------------------------------------------------------
    def orphan_mappings(self, known: set[str]) -> list[Orphan]:
        return [Orphan("mapping_without_record", mapping, mapping[len(MAPPING_PREFIX):])
                for mapping in self.host.crypt_names(MAPPING_PREFIX)
                if mapping[len(MAPPING_PREFIX):] not in known]  # fmt: skip

    def remove_orphan_mapping(self, orphan: Orphan) -> None:
        if self.host.mapping_users(orphan.label):
            raise Busy(f"{orphan.label}: no record but in use; left alone")
        self.host.crypt_close(orphan.label)

    def orphan_files(self, known: set[str]) -> list[Orphan]:
        """Backing files no record knows."""
        data_dir = self.context.data_dir
        return [Orphan("backing_without_record", name, match.group(1))
                for name in self.host.list_dir(data_dir)
                if (match := BACKING_FILE.match(name)) and match.group(1) not in known]  # fmt: skip

    def remove_orphan_file(self, orphan: Orphan, backings: Iterable[Backing]) -> None:
        """Close its mapping unless in use, let every LUKS file backing detach what it holds of
        the file, then delete it (its header has a pass of its own)."""
        mapping = MAPPING_PREFIX + orphan.digest
        if uses := self.host.mapping_users(mapping):
            raise Busy(f"{orphan.label}: no record but its mapping is in use "
                       f"({', '.join(map(str, uses))}); left alone")  # fmt: skip
        names = volume_names(orphan.digest, self.context.data_dir, self.context.state_dir)
        if holders := self.host.file_users(names.backing):  # a Kata VM's disk, say
            raise Busy(f"{orphan.label}: no record but the file is open ({', '.join(holders)}); "
                       "left alone")  # fmt: skip
        self.host.crypt_close(mapping)
        for backing in backings:
            backing.detach(names)
        self.host.remove_file(names.backing)

    def orphan_headers(self, known: set[str]) -> list[Orphan]:
        header_dir = os.path.join(self.context.state_dir, "headers")
        return [Orphan("header_without_record", os.path.join(header_dir, name), match.group(1))
                for name in self.host.list_dir(header_dir)
                if (match := HEADER_FILE.match(name)) and match.group(1) not in known]  # fmt: skip

    def remove_orphan_header(self, orphan: Orphan) -> None:
        self.host.remove_file(orphan.label)


class LuksFileBacking(Backing):
    """LUKS2 over a file in the data dir, made a block device by the subclass."""

    FIXED_REASONS: ClassVar[dict[str, str]] = {"integrity": INTEGRITY_FIXED, "kata": KATA_FIXED}

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.host = context.host
        self.step = context.step
        self.luks = Luks(context)

    # how the subclass makes the file a device --------------------------------------------
    @abstractmethod
    def _create(self, path: str, size: int, preallocate: bool) -> None: ...

    @abstractmethod
    def _attach(self, names: Names) -> str: ...


    @abstractmethod
    def _device_health(self, names: Names) -> list[str]: ...

    # arithmetic --------------------------------------------------------------------------
    @classmethod
    def file_bytes(cls, spec: VolumeSpec) -> int:
        """Bytes of the backing file: the volume plus an attached header's area."""
        return spec.backing_bytes

    @classmethod
    def disk_bytes(cls, spec: VolumeSpec) -> int:
        return cls.file_bytes(spec)

    @classmethod
    def largest_fitting(cls, room: int, spec: VolumeSpec) -> int:
        return max(0, room - (ATTACHED_HEADER_BYTES if spec.header == "attached" else 0))

    @classmethod
    def fixed_reason(cls, spec: VolumeSpec) -> str:
        if spec.kata != "off":
            return "kata"
        return "integrity" if spec.integrity != "none" else ""

    # lifecycle ---------------------------------------------------------------------------
    def prepare(self, names: Names, spec: VolumeSpec, *, keyring: bool) -> str:
        """Create the file, attach it, format it with a fresh key and open the mapping; each
        step only if not done yet."""
        with self.step("create_backing"):
            if not self.host.exists(names.backing):
                self._create(names.backing, self.file_bytes(spec), spec.preallocate)
        with self.step("attach"):
            device = self._attach(names)
        if not self.luks.is_open(names):
            self.luks.format_and_open(names, spec, device, keyring)
        if spec.access_type == "mount":  # always a fresh filesystem: never trust the device
            with self.step("mkfs"):
                self.host.mkfs(names.mapper_device, spec.fs_type, eager=eager_mkfs(spec))
        return names.mapper_device

    def find(self, names: Names) -> str | None:
        return names.mapper_device if self.luks.is_open(names) else None

    def source(self, names: Names) -> str:
        return names.mapper_device

    def shown_at(self, names: Names, path: str) -> bool:
        return self.host.is_mounted_from(path, names.mapping)

    def filesystem_exposure(self, spec: VolumeSpec, flags: tuple[str, ...], *,
                            readonly: bool) -> Exposure:  # fmt: skip
        return MountFilesystem(self.host, spec.fs_type, flags, readonly=readonly,
                               group=spec.mount_group, shows=self.shown_at)  # fmt: skip

    def allocated(self, names: Names) -> int:
        return self.host.allocated_bytes(names.backing)

    def filesystem_errors(self, names: Names) -> int:
        return self.host.fs_error_count(names.mapper_device)

    def grow_filesystem(self, names: Names, spec: VolumeSpec, path: str) -> None:
        self.host.fs_grow(names.mapper_device, path, spec.fs_type)

    def health(self, names: Names, spec: VolumeSpec) -> list[str]:
        problems = []
        if not self.host.exists(names.backing):
            problems.append(f"backing file {names.backing} is gone")
        else:
            problems += self._device_health(names)
        if not self.luks.is_open(names):
            problems.append(f"mapping {names.mapping} is closed")
        return problems

    def in_use(self, names: Names, ignore: str = "") -> list[str]:
        return self.luks.users(names, ignore)

    def release(self, names: Names) -> bool:
        with self.step("close"):
            self.check_releasable(names)
            self.host.crypt_close(names.mapping)
        with self.step("detach"):
            self.detach(names)
        with self.step("delete"):
            existed = self.host.exists(names.backing)
            self.host.remove_file(names.backing)
            self.host.remove_file(names.header)
        return existed

    def wipe_key(self, names: Names, spec: VolumeSpec) -> Wiped:
        return self.wipe_keys([(names, spec)])[names.volume_id]

    def wipe_keys(self, volumes: list[tuple[Names, VolumeSpec]]) -> dict[str, Wiped]:
        try:
            by_mapping = self.luks.wipe_keys([names.mapping for names, _ in volumes])
        except DriverError as exc:
            return {names.volume_id: Wiped(FAILED, str(exc)) for names, _ in volumes}
        return {names.volume_id: by_mapping[names.mapping] for names, _ in volumes}

