"""``DmCrypt`` over the shared fake state: LUKS headers checked by key hash, mappings, their
users (including ones the driver cannot see as mounts) and cryptsetup's temporary mappings."""

from __future__ import annotations

import hashlib

from csi.errors import Busy, Internal
from csi.host import KeyWipe, LuksFormat, MappingUse
from csi.host.fakes.state import ATTACHED_OFFSET, FakeFile, FakeState
from csi.host.runner import CommandFailed
from csi.keys import VolumeKey


class FakeDmCrypt(FakeState):
    @staticmethod
    def _fingerprint(key: VolumeKey) -> str:
        return hashlib.sha256(key.view).hexdigest()

    def luks_format(self, device: str, key: VolumeKey, options: LuksFormat) -> None:
        with self._lock:
            self._enter("luks_format", device)
            location = options.header or self._backing_of(device)
            self.luks[location] = self._fingerprint(key)
            self.luks_options[location] = options
            if options.header:
                self.files[options.header] = FakeFile(16 * 1024**2, 16 * 1024**2)
            self.seen_keys.append(bytes(key.view))

    def crypt_open(
        self, device: str, name: str, key: VolumeKey, header: str | None, *, keyring: bool = True
    ) -> None:
        with self._lock:
            self._enter("crypt_open", f"{device} {name}")
            if name in self.mappings:
                raise CommandFailed(["cryptsetup"], 5, f"Device {name} already exists.")
            location = header or self._backing_of(device)
            if self.luks.get(location) != self._fingerprint(key):
                raise CommandFailed(["cryptsetup"], 2, "No key available with this passphrase.")
            self.mappings[name] = device
            self.keyring[name] = keyring
            self.mapping_sizes[name] = self._data_size(device, header)

    def _data_size(self, device: str, header: str | None) -> int:
        """What a mapping of ``device`` can hold: all of it, or what follows an attached header."""
        return self.loop_sizes.get(device, 0) - (0 if header else ATTACHED_OFFSET)

    def crypt_resize(self, name: str, header: str | None) -> None:
        """Like cryptsetup 2.6: a key held by keyring reference cannot be reloaded without the
        passphrase, and stdin is empty."""
        with self._lock:
            self._enter("crypt_resize", name)
            if name not in self.mappings:
                raise CommandFailed(["cryptsetup"], 4, f"Device {name} is not active.")
            if self.keyring.get(name, True):
                raise CommandFailed(["cryptsetup"], 1, "Nothing to read on input.")
            self.mapping_sizes[name] = self._data_size(self.mappings[name], header)

    def device_size(self, device: str) -> int:
        if device.startswith("/dev/mapper/"):
            name = device.removeprefix("/dev/mapper/")
            if name in self.mapping_sizes:
                return self.mapping_sizes[name]
        elif device in self.loop_sizes:
            return self.loop_sizes[device]
        raise Internal(f"cannot open {device}: No such file or directory")

    def crypt_close(self, name: str) -> None:
        with self._lock:
            self._enter("crypt_close", name)
            device = f"/dev/mapper/{name}"
            if (any(m.source == device for m in self.mounts.values())
                    or self.foreign_users.get(name) or name in self.other_namespaces):
                raise Busy(f"mapping {name} is still in use; it stays open")
            self.mappings.pop(name, None)
            self.wiped.discard(name)
            self.keyring.pop(name, None)
            self.mapping_sizes.pop(name, None)
            self.filesystems.pop(device, None)
            self.fs_sizes.pop(device, None)

    def crypt_wipe_keys(self, names: list[str]) -> list[KeyWipe]:
        """Like the error-table swap: each key is gone from the kernel at once, in use or not."""
        with self._lock:
            self._enter("crypt_wipe_keys", " ".join(names))
            results = []
            for name in names:
                if name not in self.mappings:
                    results.append(KeyWipe(name, "no_key", "no mapping"))
                elif name in self.wiped:
                    results.append(KeyWipe(name, "no_key", "already wiped (error table)"))
                else:
                    self.wiped.add(name)
                    self.keyring.pop(name, None)
                    results.append(KeyWipe(name, "wiped", "table replaced by an error target"))
            return results

    def crypt_exists(self, name: str) -> bool:
        return name in self.mappings

    def crypt_names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.mappings if n.startswith(prefix))

    def mapping_users(self, name: str) -> list[MappingUse]:
        if name not in self.mappings:
            return []
        device = f"/dev/mapper/{name}"
        uses = [MappingUse("mounted", t) for t, m in self.mounts.items() if m.source == device]
        uses += [MappingUse("bound", t) for t, m in self.mounts.items() if m.device == device]
        opens = self.foreign_users.get(name, 0)
        if name in self.other_namespaces and not any(u.kind == "mounted" for u in uses):
            opens += 1
        if opens:
            uses.append(MappingUse("open", str(opens)))
        return uses

    def temporary_mappings_on(self, device: str) -> list[str]:
        found: list[str] = []
        level = [device]
        while level:
            above = sorted(n for n, d in self.temporary.items() if d in level)
            found += above
            level = [f"/dev/mapper/{n}" for n in above]
        return list(reversed(found))

    def remove_temporary_mapping(self, name: str) -> None:
        with self._lock:
            self._enter("remove_temporary_mapping", name)
            if f"/dev/mapper/{name}" in self.temporary.values():
                raise Busy(f"temporary mapping {name} is still in use")
            self.temporary.pop(name, None)
