"""The emergency shred: every key of this node's volumes leaves the kernel now.

For a node suspected compromised or about to be seized, waiting for pods to end is too slow.
The node is sealed first (no new volume from then on), then every volume's backing wipes its
key under the live volume (all LUKS mappings of a backing in one go: their tables become error
targets, their filesystems are shut down; fscrypt keys are removed for all users), including
objects no readable record names. Operations already running when the shred began are waited
for (briefly), and whatever they made is wiped in a second pass. Nothing is deleted: kubelet's
unpublish and unstage then clean up as usual, on volumes whose I/O fails.

The report says, per volume, what was wiped and what could not be: an fscrypt file still open
keeps its per-file key until it is closed (``incomplete``, never "done"); a kata=guest key is
in the pod's VM, out of the host's reach (``in_guest``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from csi.backings import Backing
from csi.backings.base import COMPLETE_OUTCOMES, FAILED, IN_GUEST, INCOMPLETE, WIPED, Wiped
from csi.errors import Aborted, DriverError, NotFound
from csi.journal import Record
from csi.seal import Seal
from csi.volumes import Volumes

log = logging.getLogger(__name__)

FINAL = (WIPED, IN_GUEST)  # outcomes a second pass need not ask again
SETTLE_SECONDS = 10.0  # how long running volume operations get to end before the second pass


@dataclass(frozen=True)
class VolumeWipe:
    volume_id: str  # or, for an object no record names, what it is
    backing: str
    outcome: str
    detail: str


@dataclass
class ShredReport:
    trigger: str
    seconds: float = 0.0
    sealed: bool = False
    results: list[VolumeWipe] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(r.outcome in COMPLETE_OUTCOMES for r in self.results)

    def count(self, *outcomes: str) -> int:
        return sum(r.outcome in outcomes for r in self.results)

    @property
    def summary(self) -> str:
        done = self.count(*COMPLETE_OUTCOMES)
        parts = [f"shredded {done} of {len(self.results)} volumes in {self.seconds:.2f} s"]
        if n := self.count(INCOMPLETE):
            parts.append(f"{n} incomplete (files still open keep their keys)")
        if n := self.count(FAILED):
            parts.append(f"{n} failed")
        parts.append("node sealed" if self.sealed else "node not sealed")
        return "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {"trigger": self.trigger, "seconds": self.seconds, "sealed": self.sealed,
                "complete": self.complete, "summary": self.summary,
                "volumes": [r.__dict__ for r in self.results]}  # fmt: skip


class ShredEvents:
    """What a shred reports to metrics; the default ignores it."""

    def shred_done(self, report: ShredReport) -> None:
        """A shred finished (``report.seconds`` from trigger to the last key gone)."""


class Shredder:
    def __init__(self, volumes: Volumes, events: ShredEvents | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 settle: float = SETTLE_SECONDS) -> None:  # fmt: skip
        self.volumes = volumes
        self.seal: Seal = volumes.seal
        self.events = events or ShredEvents()
        self.clock = clock
        self.settle = settle

    # what the trigger sources call ----------------------------------------------------------
    def shred_all(self, *, trigger: str, annotation: str = "") -> ShredReport:
        """Seal the node, then wipe every key of ours on it."""
        start = self.clock()
        report = ShredReport(trigger)
        self.seal.seal(trigger, annotation)
        report.sealed = True
        done: dict[str, VolumeWipe] = {}
        self._pass(self.volumes.journal.all(), done, unrecorded=True)
        try:  # operations that were running may have made a key after the first pass
            with self.volumes.locks.exclusive(self.settle):
                self._pass(self.volumes.journal.all(), done, unrecorded=True)
        except Aborted as exc:
            log.error("shred: %s; wiping under them", exc)
            self._pass(self.volumes.journal.all(), done, unrecorded=True)
            for volume_id in self.volumes.locks.busy():  # may still make a key after this
                earlier = done.get(volume_id)
                if earlier is None or earlier.outcome not in FINAL:
                    done[volume_id] = VolumeWipe(
                        volume_id, earlier.backing if earlier else "-", FAILED,
                        f"an operation on it was still running after {self.settle:g} s and "
                        "may make its key after this shred: run the shred again")  # fmt: skip
        report.results = list(done.values())
        report.seconds = self.clock() - start
        self.seal.add_shredded([r.volume_id for r in report.results if r.backing != "-"])
        self._finish(report)
        return report

    def shred_volume(self, volume_id: str) -> ShredReport:
        """One volume's key, now (a tenant's data must be gone): the node stays unsealed."""
        start = self.clock()
        record = self.volumes.journal.load(volume_id)
        if record is None:
            raise NotFound(f"volume {volume_id} is not on this node")
        report = ShredReport("cli")
        done: dict[str, VolumeWipe] = {}
        self._pass([record], done, unrecorded=False)
        report.results = list(done.values())
        report.seconds = self.clock() - start
        self._finish(report)
        return report

    def unseal(self, *, trigger: str) -> bool:
        was = self.seal.unseal()
        if was:
            log.warning("node unsealed (by %s): publish and stage are allowed again", trigger)
        return was

    def sealed_by(self) -> str | None:
        state = self.seal.state()
        return state.trigger if state is not None else None

    # the work ----------------------------------------------------------------------------
    def _pass(self, records: list[Record], done: dict[str, VolumeWipe], *,
              unrecorded: bool) -> None:  # fmt: skip
        """Wipe what ``done`` does not hold as wiped yet: records by backing (one batch each),
        then objects no record names."""
        groups: dict[int, tuple[Backing, list[Record]]] = {}
        for record in records:
            earlier = done.get(record.volume_id)
            if earlier is not None and earlier.outcome in FINAL:
                continue  # no_key is asked again: a running publish may have made one since
            backing = self.volumes.backing_of(record.spec)
            groups.setdefault(id(backing), (backing, []))[1].append(record)
        for backing, group in groups.values():
            batch = [(self.volumes.names(r.volume_id), r.spec) for r in group]
            try:
                wiped = backing.wipe_keys(batch)
            except DriverError as exc:
                wiped = {r.volume_id: Wiped(FAILED, str(exc)) for r in group}
            for record in group:
                result = wiped.get(record.volume_id, Wiped(FAILED, "the backing said nothing"))
                done[record.volume_id] = VolumeWipe(record.volume_id, record.spec.backing,
                                                    result.outcome, result.detail)  # fmt: skip
        if unrecorded:
            self._unrecorded(records, done)

    def _unrecorded(self, records: list[Record], done: dict[str, VolumeWipe]) -> None:
        # an unreadable record's digest is not known here: its volume's key is wiped too
        known = {self.volumes.names(r.volume_id).digest for r in records}
        # the dm-crypt mappings the LUKS backings share are swept once, as start-up does
        sweeps = [("dm-crypt", self.volumes.luks.wipe_unrecorded)]
        sweeps += [(b.name, b.wipe_unrecorded) for b in self.volumes.backings.values()]
        for what, sweep in sweeps:
            try:
                stray = sweep(known)
            except DriverError as exc:
                stray = {f"({what}: objects without a record)": Wiped(FAILED, str(exc))}
            for label, result in stray.items():
                earlier = done.get(label)
                if earlier is None or earlier.outcome not in COMPLETE_OUTCOMES:
                    done[label] = VolumeWipe(label, "-", result.outcome,
                                             f"no record names it: {result.detail}")

    def _finish(self, report: ShredReport) -> None:
        level = logging.WARNING if report.complete else logging.ERROR
        log.log(level, "emergency shred (%s): %s", report.trigger, report.summary,
                extra={"fields": {"volumes": [r.__dict__ for r in report.results]}})  # fmt: skip
        self.events.shred_done(report)

