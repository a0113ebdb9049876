"""``Files`` over the shared fake state: backing files, directories and symlinks."""

from __future__ import annotations

import os

from csi.errors import Busy, FailedPrecondition, Internal
from csi.host.fakes.state import FakeFile, FakeState


class FakeFiles(FakeState):
    def create_backing(self, path: str, size: int, preallocate: bool) -> None:
        with self._lock:
            self._enter("create_backing", path)
            if size > self.free:
                raise Internal(f"cannot create backing file {path}: No space left on device")
            self.files[path] = FakeFile(size, size if preallocate else 0)

    def grow_backing(self, path: str, size: int, preallocate: bool) -> None:
        with self._lock:
            self._enter("grow_backing", path)
            f = self.files.get(path)
            if f is None:
                raise Internal(f"cannot open backing file {path}: No such file or directory")
            need = (size - f.allocated) if preallocate else 0
            if need > self.free_bytes(path):
                raise Internal(f"cannot grow backing file {path}: No space left on device")
            f.size = max(f.size, size)
            if preallocate:
                f.allocated = f.size

    def remove_file(self, path: str) -> None:
        with self._lock:
            self._enter("remove_file", path)
            self.files.pop(path, None)
            self.luks.pop(path, None)
            self.qcow2_sizes.pop(path, None)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs or path in self.symlinks

    def is_dir(self, path: str) -> bool:
        return path in self.dirs

    def list_dir(self, path: str) -> list[str]:
        prefix = path.rstrip("/") + "/"
        names = (p[len(prefix) :] for p in (*self.files, *self.dirs) if p.startswith(prefix))
        return sorted({n for n in names if "/" not in n})

    def allocated_bytes(self, path: str) -> int:
        f = self.files.get(path)
        return f.allocated if f else 0

    def free_bytes(self, path: str) -> int:
        return self.free - sum(f.allocated for f in self.files.values())

    def realpath(self, path: str) -> str:
        parts = os.path.normpath(path).split("/")
        current = "/"
        for part in parts[1:]:
            current = os.path.join(current, part)
            if current in self.symlinks:
                current = self.symlinks[current]
        return current

    def is_symlink(self, path: str) -> bool:
        return path in self.symlinks

    def make_dir(self, path: str) -> None:
        self.dirs.add(path)

    def make_file(self, path: str) -> None:
        with self._lock:
            self._enter("make_file", path)
            self.files.setdefault(path, FakeFile(0, 0))

    def remove_dir(self, path: str) -> None:
        if path in self.nonempty:
            raise FailedPrecondition(f"target {path} is not a mount of the volume and holds files")
        if path in self.mounts:
            raise Busy(f"target {path} is still a mount point")
        self.dirs.discard(path)

    def set_volume_root(self, path: str, group: int | None) -> None:
        self._enter("set_volume_root", path)
