"""The node's seal: after an emergency shred, no new volume until an operator lifts it.

A sealed node refuses publish and stage with UNAVAILABLE (kubelet keeps retrying, so pods
start by themselves once the node is unsealed). The seal lives in a small file in the state
dir, written atomically, so a driver restart (or the CLI acting with no driver running) keeps
it; the state dir is memory-backed, so a reboot, which drops every key anyway, lifts it. A
seal file that cannot be read keeps the node sealed: when in doubt, fail closed. It also lists
the volumes the shred reached, so their health says why their I/O fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from csi.errors import Unavailable
from csi.statefiles import read_bounded, write_atomically

log = logging.getLogger(__name__)

SEAL_FILE = "seal.json"
MAX_SEAL_BYTES = 256 * 1024  # a few thousand volume ids at most; bigger is not ours
ANNOTATION = "luks-ephemeral.csi.io/shred"
TRIGGERS = ("cli", "annotation", "unknown")


@dataclass(frozen=True)
class SealState:
    since: float
    trigger: str  # cli | annotation | unknown (an unreadable seal file)
    annotation: str = ""  # the annotation value that asked for it
    shredded: tuple[str, ...] = field(default_factory=tuple)  # volume ids the shred reached

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        how = {"cli": "luks-ephemeral-csi shred", "annotation": f"the Node annotation {ANNOTATION}"}
        trigger = how.get(self.trigger, "an unknown trigger")
        return f"sealed by an emergency shred at {when} ({trigger})"


class Seal:
    """Thread-safe; the in-memory state is the truth while this process owns the state dir."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, SEAL_FILE)
        self._lock = threading.Lock()
        self._state = self._load()

    def state(self) -> SealState | None:
        with self._lock:
            return self._state

    def is_sealed(self) -> bool:
        return self.state() is not None

    def check(self, what: str) -> None:
        """Refuse ``what`` (e.g. "publish of volume X") while sealed."""
        state = self.state()
        if state is not None:
            raise Unavailable(
                f"{what} refused: this node is {state.describe()}; an operator lifts the seal "
                f"with `luks-ephemeral-csi unseal` on the node"
                + (f" or by removing the annotation {ANNOTATION} from the Node"
                   if state.trigger == "annotation" else "")
            )

    def seal(self, trigger: str, annotation: str = "") -> SealState:
        """Seal now (kept: an existing seal's time and trigger stay, as it came first)."""
        with self._lock:
            if self._state is None:
                self._state = SealState(time.time(), trigger, annotation[:256])
                self._save()
            return self._state

    def add_shredded(self, volume_ids: list[str]) -> None:
        with self._lock:
            if self._state is None or not volume_ids:
                return
            merged = tuple(dict.fromkeys([*self._state.shredded, *volume_ids]))
            self._state = SealState(self._state.since, self._state.trigger,
                                    self._state.annotation, merged)  # fmt: skip
            self._save()

    def was_shredded(self, volume_id: str) -> bool:
        state = self.state()
        return state is not None and volume_id in state.shredded

    def unseal(self) -> bool:
        """Lift the seal; True if there was one."""
        with self._lock:
            was = self._state is not None
            self._state = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return was

    # the file ------------------------------------------------------------------------------
    def _load(self) -> SealState | None:
        try:
            raw = read_bounded(self.path, MAX_SEAL_BYTES)
        except OSError as exc:
            return self._unreadable(exc.strerror or str(exc))
        if raw is None:
            return None
        if len(raw) > MAX_SEAL_BYTES:
            return self._unreadable(f"more than {MAX_SEAL_BYTES} bytes")
        try:
            data = json.loads(raw)
            state = SealState(float(data["since"]), str(data["trigger"]),
                              str(data.get("annotation", "")),
                              tuple(str(v) for v in data.get("shredded", [])))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            return self._unreadable(f"not a seal: {type(exc).__name__}")
        if state.trigger not in TRIGGERS:
            return self._unreadable(f"unknown trigger {state.trigger[:40]!r}")
        return state

    def _unreadable(self, why: str) -> SealState:
        log.error("seal file %s is unreadable (%s): the node stays sealed", self.path, why)
        return SealState(time.time(), "unknown")

    def _save(self) -> None:
        state = self._state
        assert state is not None
        data = json.dumps({"since": state.since, "trigger": state.trigger,
                           "annotation": state.annotation,
                           "shredded": list(state.shredded)}).encode()  # fmt: skip
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        write_atomically(self.path, data)
