"""``Fscrypt`` and ``Directories`` over the shared fake state: project directories with policies,
one keyring per root, project quotas, busy files, the pool, and directory binds.

What it models of the kernel (as measured on a real ext4, see tests/host): a key's identifier
derives from its bytes (here: a hash), so the same key gives the same identifier; removing a key
while files of a project it protects are open (``fscrypt_busy``) reports FILES_BUSY and leaves
the key INCOMPLETELY_REMOVED until a later removal finds nothing open; a policy only goes on an
empty directory whose key is present.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from csi.errors import Busy, FailedPrecondition, InvalidArgument
from csi.host import KEY_ABSENT, KEY_INCOMPLETELY_REMOVED, KEY_PRESENT, KeyRemoval, Quota
from csi.host.fakes.state import FakeState
from csi.keys import VolumeKey

FAKE_BUSY_PID = 4242


@dataclass
class FakeFscrypt(FakeState):
    # why backing=fscrypt is impossible under any root (None: possible)
    fscrypt_reason: str | None = None
    # root -> {identifier -> KEY_PRESENT | KEY_INCOMPLETELY_REMOVED}; absent keys are not kept
    fscrypt_keys: dict[str, dict[str, str]] = field(default_factory=dict)
    projects: dict[str, int] = field(default_factory=dict)  # directory -> project id
    policies: dict[str, str] = field(default_factory=dict)  # directory -> key identifier
    quotas: dict[tuple[str, int], Quota] = field(default_factory=dict)  # (root, project)
    fscrypt_busy: set[int] = field(default_factory=set)  # projects with files held open
    fscrypt_pools: dict[str, str] = field(default_factory=dict)  # mounted pool root -> image

    # directories -------------------------------------------------------------------------
    @staticmethod
    def _under(path: str, top: str, *, including: bool) -> bool:
        return path.startswith(top.rstrip("/") + "/") or (including and path == top)

    def _delete_under(self, path: str, *, including: bool) -> None:
        if mounted := [t for t in self.mounts if self._under(t, path, including=including)]:
            raise Busy(f"cannot delete {path}: {', '.join(sorted(mounted))} is mounted in it")
        for table in (self.files, self.symlinks, self.projects, self.policies):
            for p in [p for p in table if self._under(p, path, including=including)]:
                del table[p]
        self.dirs -= {d for d in self.dirs if self._under(d, path, including=including)}
        self.nonempty -= {d for d in self.nonempty if self._under(d, path, including=including)}

    def remove_tree(self, path: str) -> None:
        with self._lock:
            self._enter("remove_tree", path)
            self._delete_under(path, including=True)

    def clear_dir(self, path: str) -> None:
        with self._lock:
            self._enter("clear_dir", path)
            self._delete_under(path, including=False)
            self.nonempty.discard(path)

    def is_bound_from(self, path: str, directory: str) -> bool:
        self._enter("is_bound_from", path)
        mount = self.mounts.get(path)
        return mount is not None and bool(mount.directory) and mount.directory == directory

    def dir_mounts(self, directory: str) -> list[str]:
        self._enter("dir_mounts", directory)
        return sorted(t for t, m in self.mounts.items()
                      if m.directory and self._under(m.directory, directory, including=True))

    # pool and probe ----------------------------------------------------------------------
    def fscrypt_unavailable(self, root: str) -> str | None:
        self._enter("fscrypt_unavailable", root)
        return self.fscrypt_reason

    def fscrypt_pool(self, image: str, root: str, size: int) -> None:
        with self._lock:
            self._enter("fscrypt_pool", root)
            if self.fscrypt_pools.get(root, image) != image:
                raise FailedPrecondition(f"{root} is already a mount of another pool")
            if self.fscrypt_reason is not None:
                raise FailedPrecondition(self.fscrypt_reason)
            self.fscrypt_pools[root] = image
            self.dirs.add(root)

    # projects and policies ---------------------------------------------------------------
    def make_project_dir(self, path: str, project: int) -> None:
        with self._lock:
            self._enter("make_project_dir", path)
            self.dirs.add(path)
            self.projects[path] = project

    def dir_project(self, path: str) -> int:
        self._enter("dir_project", path)
        return self.projects.get(path, 0)

    @staticmethod
    def fake_identifier(key: VolumeKey) -> str:
        """What the fake kernel calls a key: a hash of its bytes, as the real one derives it."""
        return hashlib.sha256(b"fscrypt-fake\0" + bytes(key.view)).hexdigest()[:32]

    def fscrypt_add_key(self, root: str, key: VolumeKey) -> str:
        with self._lock:
            self._enter("fscrypt_add_key", root)
            if len(key) != 64:
                raise InvalidArgument("an fscrypt key has 64 bytes")
            identifier = self.fake_identifier(key)
            self.fscrypt_keys.setdefault(root, {})[identifier] = KEY_PRESENT
            self.seen_keys.append(bytes(key.view))
            return identifier

    def fscrypt_set_policy(self, path: str, identifier: str) -> None:
        with self._lock:
            self._enter("fscrypt_set_policy", path)
            current = self.policies.get(path)
            if current == identifier:
                return
            if current is not None:
                raise FailedPrecondition(f"{path} is already encrypted under another policy")
            if path not in self.dirs:
                raise FailedPrecondition(f"{path}: No such file or directory")
            if not any(KEY_PRESENT == ring.get(identifier) for ring in self.fscrypt_keys.values()):
                raise FailedPrecondition(f"key {identifier} is not in the keyring")
            if path in self.nonempty or any(self._under(p, path, including=False)
                                            for p in (*self.files, *self.dirs)):  # fmt: skip
                raise FailedPrecondition(f"{path} is not empty")
            self.policies[path] = identifier

    def fscrypt_policy_of(self, path: str) -> str | None:
        self._enter("fscrypt_policy_of", path)
        return self.policies.get(path)

    def fscrypt_key_status(self, root: str, identifier: str) -> str:
        self._enter("fscrypt_key_status", root)
        return self.fscrypt_keys.get(root, {}).get(identifier, KEY_ABSENT)

    def _busy_under(self, identifier: str) -> bool:
        return any(self.projects.get(d) in self.fscrypt_busy
                   for d, i in self.policies.items() if i == identifier)  # fmt: skip

    def fscrypt_remove_key(self, root: str, identifier: str) -> KeyRemoval:
        with self._lock:
            self._enter("fscrypt_remove_key", root)
            ring = self.fscrypt_keys.get(root, {})
            if identifier not in ring:
                return KeyRemoval(KEY_ABSENT, files_busy=False, other_users=False)
            if self._busy_under(identifier):
                ring[identifier] = KEY_INCOMPLETELY_REMOVED
                return KeyRemoval(KEY_INCOMPLETELY_REMOVED, files_busy=True, other_users=False)
            del ring[identifier]
            return KeyRemoval(KEY_ABSENT, files_busy=False, other_users=False)

    # quotas and open files ---------------------------------------------------------------
    def quota_get(self, root: str, project: int) -> Quota:
        self._enter("quota_get", root)
        return self.quotas.get((root, project), Quota(0, 0, 0, 0))

    def quota_set(self, root: str, project: int, bytes_limit: int, inodes_limit: int) -> None:
        with self._lock:
            self._enter("quota_set", root)
            if bytes_limit < 0 or inodes_limit < 0:
                raise InvalidArgument("quota limits cannot be negative")
            old = self.quotas.get((root, project), Quota(0, 0, 0, 0))
            limit = -(-bytes_limit // 1024) * 1024  # the kernel keeps 1 KiB units
            new = Quota(old.bytes_used, limit, old.inodes_used, inodes_limit)
            if new == Quota(0, 0, 0, 0):
                self.quotas.pop((root, project), None)
            else:
                self.quotas[(root, project)] = new

    def files_open_in(self, root: str, project: int) -> list[str]:
        self._enter("files_open_in", root)
        return [f"pid {FAKE_BUSY_PID} (fake)"] if project in self.fscrypt_busy else []

    # whole-node events -------------------------------------------------------------------
    def reboot(self) -> None:
        """Keys live only in kernel memory and pools are mounts: both go; directories stay."""
        super().reboot()
        self.fscrypt_keys.clear()
        self.fscrypt_busy.clear()
        self.fscrypt_pools.clear()

    def is_empty(self) -> bool:
        """No key in any keyring, no project directory, no quota entry (a pool may stay)."""
        keys = any(self.fscrypt_keys.values())
        return super().is_empty() and not (keys or self.projects or self.policies
                                           or self.quotas)  # fmt: skip
