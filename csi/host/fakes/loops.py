"""``Loops`` over the shared fake state: loop devices over backing files."""

from __future__ import annotations

from csi.host.fakes.state import FakeState
from csi.host.runner import CommandFailed


class FakeLoops(FakeState):
    def loop_find(self, backing: str) -> str | None:
        for device, path in self.loops.items():
            if path == backing:
                return device
        return None

    def loop_attach(self, backing: str) -> str:
        with self._lock:
            self._enter("loop_attach", backing)
            if backing not in self.files:
                raise CommandFailed(["losetup"], 1, f"{backing}: No such file or directory")
            device = f"/dev/loop{self._next_loop}"
            self._next_loop += 1
            self.loops[device] = backing
            self.loop_sizes[device] = self.files[backing].size
            return device

    def loops_in(self, directory: str) -> dict[str, str]:
        prefix = directory.rstrip("/") + "/"
        return {d: p for d, p in self.loops.items() if p.startswith(prefix)}

    def loop_detach(self, device: str) -> None:
        with self._lock:
            self._enter("loop_detach", device)
            if any(m == device for m in (*self.mappings.values(), *self.temporary.values())):
                # like losetup -d on a busy device: it only marks it for autoclear
                return
            self.loops.pop(device, None)
            self.loop_sizes.pop(device, None)

    def loop_refresh(self, device: str) -> None:
        with self._lock:
            self._enter("loop_refresh", device)
            if device not in self.loops:
                raise CommandFailed(["losetup"], 1, f"{device}: No such device or address")
            self.loop_sizes[device] = self.files[self.loops[device]].size
