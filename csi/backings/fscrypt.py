"""fscrypt: a directory per volume under the kernel's own per-directory encryption (ext4).

Each volume is ``<data dir>/fscrypt/<digest>/``: its own project id (with PROJINHERIT) whose
hard limits are the volume's size, and a v2 policy under a fresh 64-byte key that lives only in
the filesystem's keyring. There is no block device and no mkfs: the pod gets a bind of the
directory. Removing the key (for all users) makes the kernel write back and evict everything it
protects; what is left on disk is ciphertext whose key is gone.

Where the directories live: the data dir's own filesystem when it is ext4 with encryption and
enforced project quotas; otherwise a pool the driver owns, ``<data dir>/fscrypt.pool`` (a sparse
ext4 image, mounted at ``<data dir>/fscrypt``), which stays mounted across driver restarts and is
mounted again at start-up after a reboot (its keys died with the old mount, so every directory
in it is then a locked leftover, deleted without its key).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from csi.backings.base import INCOMPLETE, NO_KEY, WIPED, Backing, Context, Orphan, Wiped
from csi.errors import Busy, DriverError, FailedPrecondition, InvalidArgument, ResourceExhausted
from csi.exposures import BindFilesystem, Exposure
from csi.host import KEY_ABSENT, KEY_PRESENT, FsStats
from csi.host.commands import BIND_FLAGS

if TYPE_CHECKING:
    from csi.journal import Names
    from csi.params import VolumeSpec

log = logging.getLogger(__name__)

POOL_DIR = "fscrypt"  # under the data dir: the volumes' parent (the pool's mount point)
POOL_IMAGE = "fscrypt.pool"  # under the data dir: the driver's own ext4 image, if it needs one
VOLUME_DIR = re.compile(r"^([0-9a-f]{32})$")
KEY_BYTES = 64  # FSCRYPT_MAX_KEY_SIZE: a v2 policy's master key
BYTES_PER_INODE = 16 * 1024  # mkfs.ext4's default ratio: a volume may have as many inodes
MIN_INODES = 1024
PROJECT_IDS = 2**31 - 2  # project ids 1 .. 2**31 - 1 (0 is "no project")
PROJECT_PROBES = 64  # ids tried after the one the digest names, if others hold it
RETRY_PROBE_SECONDS = 30.0  # a node that cannot make such volumes is asked again after this

# what a request may ask that an fscrypt volume cannot be, and why, in words for the requester
NOT_APPLICABLE: tuple[tuple[Callable[[VolumeSpec], bool], str], ...] = (
    (lambda s: s.access_type == "block",
     "an fscrypt volume is a directory, so it has no block mode; use backing=loop or qcow2 "
     "for a raw block volume"),
    (lambda s: s.integrity != "none",
     "fscrypt has no authenticated encryption: integrity applies only to the LUKS backings "
     "(loop, qcow2)"),
    (lambda s: s.header != "detached",
     "an fscrypt volume has no LUKS header: header applies only to the LUKS backings"),
    (lambda s: s.cipher != "aes-xts-plain64",
     "fscrypt volumes always use AES-256-XTS for contents and AES-256-CTS for names: cipher "
     "applies only to the LUKS backings"),
    (lambda s: s.preallocate,
     "a project quota limits an fscrypt volume but cannot reserve blocks for it: preallocate "
     "applies only to the LUKS backings"),
    (lambda s: s.access_type == "mount" and s.fs_type != "ext4",
     "fscrypt volumes live on the node's ext4: ask for fs type ext4, or use a LUKS backing "
     "for xfs"),
)  # fmt: skip


def inode_limit(size: int) -> int:
    return max(MIN_INODES, size // BYTES_PER_INODE)


class FscryptBacking(Backing):
    name: ClassVar[str] = "fscrypt"

    def __init__(self, context: Context) -> None:
        super().__init__(context)
        self.host = context.host
        self.step = context.step
        self.root = os.path.join(context.data_dir, POOL_DIR)
        self.image = os.path.join(context.data_dir, POOL_IMAGE)
        self._lock = threading.Lock()  # the probe, and a project id's choice and first use
        self._ready = False
        self._refused: tuple[float, str] | None = None  # when the last probe failed, and why

    # arithmetic --------------------------------------------------------------------------
    @classmethod
    def disk_bytes(cls, spec: VolumeSpec) -> int:
        return spec.size  # the quota's hard limit: file data and its metadata blocks

    @classmethod
    def largest_fitting(cls, room: int, spec: VolumeSpec) -> int:
        return max(0, room)

    @classmethod
    def check_spec(cls, spec: VolumeSpec) -> None:
        for applies, reason in NOT_APPLICABLE:
            if applies(spec):
                raise InvalidArgument(f"backing=fscrypt: {reason}")
        if unbindable := [f for f in spec.mount_flags if f not in BIND_FLAGS]:
            raise InvalidArgument(
                f"backing=fscrypt: mount flag {unbindable[0]} cannot apply to a bind of a "
                f"directory (only {', '.join(sorted(BIND_FLAGS))} do); drop it or use a LUKS "
                "backing"
            )

    # where the volumes live ----------------------------------------------------------------
    def directory(self, names: Names) -> str:
        return os.path.join(self.root, names.digest)

    def unavailable(self) -> str | None:
        with self._lock:
            if self._ready:
                return None
            if self._refused and time.monotonic() - self._refused[0] < RETRY_PROBE_SECONDS:
                return self._refused[1]
            reason = self._probe()
            if reason is None:
                self._ready, self._refused = True, None
                log.info("fscrypt volumes live in %s (%s)", self.root,
                         "the driver's pool" if self.host.exists(self.image) else "the data dir")
            else:
                self._refused = (time.monotonic(), reason)
            return reason

    def _probe(self) -> str | None:
        """The data dir's filesystem if it can hold such volumes (and no pool was made
        before); else the driver's own pool, made and mounted if need be."""
        data_dir = self.context.data_dir
        if not self.host.exists(self.image):
            native = self.host.fscrypt_unavailable(data_dir)
            if native is None:
                self.host.make_dir(self.root)
                return None
            log.info("the data dir cannot hold fscrypt volumes itself (%s); using a pool", native)
        try:
            # sparse, and as big as the filesystem that holds it: capacity, which counts the
            # data dir's free space, can then never promise more than the pool holds
            size = self.host.fs_stats(data_dir).total_bytes
            self.host.fscrypt_pool(self.image, self.root, size)
        except DriverError as exc:
            return f"the driver's ext4 pool {self.image} cannot be used: {exc}"
        return self.host.fscrypt_unavailable(self.root)

    def _require(self) -> None:
        if reason := self.unavailable():
            raise FailedPrecondition(
                f"cannot make volumes with backing=fscrypt on this node: {reason}"
            )

    # prepare -------------------------------------------------------------------------------
    def prepare(self, names: Names, spec: VolumeSpec, *, keyring: bool) -> str:
        """Directory with its project, quota, key and policy; each step only if not done yet
        (a directory whose key is gone is a leftover: made again)."""
        del keyring  # the key is in the filesystem's keyring whatever the caller asks
        self._require()
        path = self.directory(names)
        with self.step("make_dir"):
            self._make_dir(path, spec.size)
        with self.step("add_key"):
            if self.host.fscrypt_policy_of(path) is None:
                with self.context.key_source(KEY_BYTES) as key:
                    identifier = self.host.fscrypt_add_key(self.root, key)
                try:
                    self.host.fscrypt_set_policy(path, identifier)
                except BaseException:  # no policy will name the key: it must not stay behind
                    self.host.fscrypt_remove_key(self.root, identifier)
                    raise
        return path

    def _make_dir(self, path: str, size: int) -> None:
        """The volume's directory with its own project id and that project's limits. What an
        earlier attempt left is emptied first, unless anything still uses it: a directory
        with its key present may be a live volume whose record was lost."""
        project = 0
        if self.host.exists(path):
            if uses := self._users(path):
                raise FailedPrecondition(
                    f"directory {path} of this volume already exists and is in use "
                    f"({', '.join(uses)}), though no record says it is prepared (a lost "
                    "journal?); refusing to touch it"
                )
            project = self.host.dir_project(path)
            identifier = self.host.fscrypt_policy_of(path)
            if identifier is not None and not self._key_present(identifier):
                self.host.remove_tree(path)  # locked: a policy cannot be taken off again
            else:
                self.host.clear_dir(path)  # never trust what an earlier attempt left
        with self._lock:  # the limits mark the id taken before another volume looks for one
            project = project or self._free_project(os.path.basename(path))
            self.host.make_project_dir(path, project)
            self.host.quota_set(self.root, project, size, inode_limit(size))

    def _free_project(self, digest: str) -> int:
        """The id the digest names, or the next one no file and no limit uses yet."""
        first = int(digest[:8], 16) % PROJECT_IDS
        for offset in range(PROJECT_PROBES):
            project = (first + offset) % PROJECT_IDS + 1
            quota = self.host.quota_get(self.root, project)
            if not (quota.inodes_used or quota.bytes_used or quota.bytes_limit
                    or quota.inodes_limit):  # fmt: skip
                return project
        raise ResourceExhausted(
            f"no free project id near {first + 1} in {self.root}: {PROJECT_PROBES} in a row "
            "are used"
        )

    def _key_present(self, identifier: str) -> bool:
        return self.host.fscrypt_key_status(self.root, identifier) == KEY_PRESENT

    # what the lifecycle asks -----------------------------------------------------------
    def find(self, names: Names) -> str | None:
        path = self.directory(names)
        if not self.host.is_dir(path):
            return None
        identifier = self.host.fscrypt_policy_of(path)
        return path if identifier is not None and self._key_present(identifier) else None

    def attached(self, names: Names) -> str | None:
        path = self.directory(names)
        return path if self.host.is_dir(path) else None

    def source(self, names: Names) -> str:
        return self.directory(names)

    def shown_at(self, names: Names, path: str) -> bool:
        return self.host.is_bound_from(path, self.directory(names))

    def filesystem_exposure(self, spec: VolumeSpec, flags: tuple[str, ...], *,
                            readonly: bool) -> Exposure:  # fmt: skip
        return BindFilesystem(self.host, spec.fs_type, flags, readonly=readonly,
                              group=spec.mount_group, shows=self.shown_at)  # fmt: skip

    def details(self, names: Names) -> dict[str, str]:
        path = self.directory(names)
        identifier = self.host.fscrypt_policy_of(path) or ""
        return {"key_identifier": identifier, "project": str(self.host.dir_project(path))}

    def health(self, names: Names, spec: VolumeSpec) -> list[str]:
        path = self.directory(names)
        if not self.host.is_dir(path):
            return [f"directory {path} is gone"]
        problems = []
        identifier = self.host.fscrypt_policy_of(path)
        if identifier is None:
            problems.append(f"directory {path} is not encrypted")
        elif not self._key_present(identifier):
            problems.append("its key is absent, so its data is gone")
        project = self.host.dir_project(path)
        quota = self.host.quota_get(self.root, project) if project else None
        if quota is None or not quota.bytes_limit:
            problems.append("its quota is missing")
        elif quota.bytes_limit < spec.size:
            problems.append(f"its quota ({quota.bytes_limit} bytes) is below its size")
        return problems

    def usage(self, names: Names, path: str) -> FsStats:
        """From the project's quota: its limits are the volume's size and inode count."""
        quota = self.host.quota_get(self.root, self.host.dir_project(self.directory(names)))
        return FsStats(
            total_bytes=quota.bytes_limit,
            available_bytes=max(0, quota.bytes_limit - quota.bytes_used),
            used_bytes=quota.bytes_used,
            total_inodes=quota.inodes_limit,
            free_inodes=max(0, quota.inodes_limit - quota.inodes_used),
            used_inodes=quota.inodes_used,
        )

    def allocated(self, names: Names) -> int:
        path = self.directory(names)
        try:
            project = self.host.dir_project(path) if self.host.is_dir(path) else 0
            return self.host.quota_get(self.root, project).bytes_used if project else 0
        except DriverError:
            if self.host.is_dir(path):
                raise
            return 0  # its own teardown removed it meanwhile (capacity asks without its lock)

    def grow(self, names: Names, spec: VolumeSpec, size: int) -> None:
        """Raise the quota: the volume is bigger at once, online."""
        self.check_growable(spec)
        with self.step("grow_backing"):
            path = self.directory(names)
            project = self.host.dir_project(path) if self.host.is_dir(path) else 0
            if not project:
                raise FailedPrecondition(
                    f"volume {names.volume_id} lost its directory; its data is gone"
                )
            self.host.quota_set(self.root, project, size, inode_limit(size))

    # release ---------------------------------------------------------------------------
    def in_use(self, names: Names, ignore: str = "") -> list[str]:
        return self._users(self.directory(names), ignore)

    def _users(self, path: str, ignore: str = "") -> list[str]:
        """Mounts that show the directory (other than at ``ignore``), and processes holding
        one of its files open: from mountinfo and /proc, by device and project id."""
        if not self.host.is_dir(path):
            return []
        uses = [f"mounted at {point}" for point in self.host.dir_mounts(path) if point != ignore]
        project = self.host.dir_project(path)
        if project:
            uses += [f"open by {who}" for who in self.host.files_open_in(self.root, project)]
        return uses

    def check_releasable(self, names: Names, ignore: str = "") -> None:
        if uses := self.in_use(names, ignore):
            raise Busy(
                f"volume {names.volume_id} is still in use ({', '.join(uses)}); nothing was "
                "torn down, its key is still present; retry later"
            )

    def release(self, names: Names) -> bool:
        return self._remove(self.directory(names), names.volume_id,
                            lambda: self.check_releasable(names))  # fmt: skip

    def _remove(self, path: str, what: str, check: Callable[[], None]) -> bool:
        """Delete the tree while its key is there (removing a key with live inodes would sync
        the whole filesystem), remove the key for all users and require it absent, then the
        empty directory and the quota. A key the kernel could not remove completely (a file
        opened meanwhile) is an error and the directory stays, naming the key for a retry."""
        if not self.host.is_dir(path):
            return False
        with self.step("close"):
            check()  # Busy, changing nothing, while anything holds it
            identifier = self.host.fscrypt_policy_of(path)
            project = self.host.dir_project(path)
            self.host.clear_dir(path)
            if identifier is not None:
                self._remove_key(identifier, what)
        with self.step("delete"):
            if project:  # first: once the directory is gone nothing names the project
                self.host.quota_set(self.root, project, 0, 0)
            self.host.remove_tree(path)
        return True

    def _remove_key(self, identifier: str, what: str) -> None:
        removal = self.host.fscrypt_remove_key(self.root, identifier)
        if removal.status != KEY_ABSENT:
            busy = ("files of it are still open (their per-file keys stay until they are "
                    "closed)" if removal.files_busy else "other users still hold it")  # fmt: skip
            raise FailedPrecondition(
                f"the key of volume {what} is {removal.status.replace('_', ' ')}, not absent: "
                f"{busy}; retry once the processes holding them have exited"
            )

    def detach(self, names: Names) -> None:
        del names  # no device of its own

    def wipe_key(self, names: Names, spec: VolumeSpec) -> Wiped:
        """Remove the key now, even under a live bind: new opens fail with ENOKEY; files
        still open, and the directory its bind mount pins, keep their per-file keys until
        released (reported as incomplete; unpublish finishes the removal)."""
        del spec
        return self._wipe_dir(self.directory(names))

    def _wipe_dir(self, path: str) -> Wiped:
        identifier = self.host.fscrypt_policy_of(path) if self.host.is_dir(path) else None
        if identifier is None:
            return Wiped(NO_KEY, "no encrypted directory")
        present = self._key_present(identifier)
        removal = self.host.fscrypt_remove_key(self.root, identifier)
        if removal.status == KEY_ABSENT:
            return Wiped(WIPED if present else NO_KEY,
                         "key removed for all users" if present else "key absent already")
        if removal.files_busy:
            users = self.host.files_open_in(self.root, self.host.dir_project(path))
            return Wiped(INCOMPLETE, "key removed, but inodes still in use keep their per-file "
                                     "keys until released: the volume's directory while its "
                                     "bind mount stands (unpublish finishes the removal)"
                                     + (f", and files held open by {', '.join(users)}"
                                        if users else ""))
        return Wiped(INCOMPLETE, f"key is {removal.status.replace('_', ' ')}: other users "
                                 "still hold it")

    def wipe_unrecorded(self, known: set[str]) -> dict[str, Wiped]:
        """Directories no record names (an unreadable record's volume): their keys too."""
        if not self.host.is_dir(self.root):
            return {}
        return {os.path.join(self.root, name): self._wipe_dir(os.path.join(self.root, name))
                for name in self.host.list_dir(self.root)
                if (match := VOLUME_DIR.match(name)) and match.group(1) not in known}

    # start-up ---------------------------------------------------------------------------
    def orphans(self, known: set[str]) -> list[Orphan]:
        """Directories no record names (after a reboot: locked, their key died with the old
        mount). Mounts the pool first if there is one, so its leftovers can be found."""
        if not (self.host.exists(self.image) or self.host.is_dir(self.root)):
            return []
        self._require()
        return [Orphan("directory_without_record", os.path.join(self.root, name), name)
                for name in self.host.list_dir(self.root)
                if (match := VOLUME_DIR.match(name)) and match.group(1) not in known]  # fmt: skip

    def remove_orphan(self, orphan: Orphan) -> None:
        def check() -> None:
            if uses := self._users(orphan.label):
                raise Busy(f"directory {orphan.label} has no record but is in use "
                           f"({', '.join(uses)})")  # fmt: skip

        self._remove(orphan.label, f"(no record, digest {orphan.digest})", check)
