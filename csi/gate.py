"""The node gate: one lock per volume, and a node-wide exclusive mode.

Volume operations hold their volume's lock; a second caller on the same volume gets ABORTED at
once (the CO retries), never a wait. ``exclusive()`` waits until no volume operation runs and
keeps new ones out (they get ABORTED) while it holds the node: the emergency key wipe needs the
whole node to itself. It sits next to ``statelock`` (one driver per state directory): that lock
keeps other processes out, this gate orders the threads of ours.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from csi.errors import Aborted


class NodeGate:
    def __init__(self) -> None:
        self._guard = threading.Condition(threading.Lock())
        self._held: set[str] = set()
        self._exclusive = False

    @contextlib.contextmanager
    def hold(self, volume_id: str) -> Iterator[None]:
        """The volume's lock for one operation; ABORTED if it is busy or the node is held."""
        with self._guard:
            if self._exclusive:
                raise Aborted(
                    f"the node is held for a node-wide operation; retry volume {volume_id} later"
                )
            if volume_id in self._held:
                raise Aborted(f"an operation on volume {volume_id} is already in progress; retry")
            self._held.add(volume_id)
        try:
            yield
        finally:
            with self._guard:
                self._held.discard(volume_id)
                self._guard.notify_all()

    @contextlib.contextmanager
    def exclusive(self, timeout: float | None = None) -> Iterator[None]:
        """The whole node: waits (up to ``timeout`` seconds) for running volume operations to
        end, and refuses new ones until it is released. ABORTED if another holds it or the
        wait runs out."""
        with self._guard:
            if self._exclusive:
                raise Aborted("another node-wide operation is in progress; retry")
            self._exclusive = True  # from here new volume operations are refused
            if not self._guard.wait_for(lambda: not self._held, timeout):
                self._exclusive = False
                busy = ", ".join(sorted(self._held))
                raise Aborted(f"volume operations still running after {timeout:g}s: {busy}")
        try:
            yield
        finally:
            with self._guard:
                self._exclusive = False
                self._guard.notify_all()

    def busy(self) -> list[str]:
        """Volumes with an operation running now."""
        with self._guard:
            return sorted(self._held)
