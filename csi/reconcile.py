"""Start-up: roll back half-done work and remove objects no record accounts for.

A half-done inline publish is torn down and forgotten (kubelet retries it); a half-done stage or
unstage of a provisioned volume goes back to RESERVED, keeping the capacity CreateVolume
reserved (kubelet retries the stage, or the CO deletes the volume). Then every object of ours no
record names is removed, unless the kernel says it is in use: backing files first (through
whatever backing still holds them), then mappings, then each backing's own devices, then
headers. A record that cannot be read still names its objects: they are never orphans.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from csi.backings import Orphan
from csi.backings.luks import BACKING_FILE, MAPPING_PREFIX
from csi.errors import Busy, DriverError
from csi.journal import HALF_DONE, PUBLISHED, Names, Record

if TYPE_CHECKING:
    from csi.volumes import Events, Volumes

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    rolled_back: list[str] = field(default_factory=list)
    orphans_removed: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def count(self, reason: str, events: Events) -> None:
        self.orphans_removed[reason] = self.orphans_removed.get(reason, 0) + 1
        events.orphan_removed(reason)


class Reconciler:
    def __init__(self, volumes: Volumes) -> None:
        self.volumes = volumes
        self.host = volumes.host
        self.events = volumes.events

    def reconcile(self) -> ReconcileReport:
        report = ReconcileReport()
        volumes = self.volumes
        volumes.journal.remove_partial_writes()
        known: set[str] = set()
        for record in volumes.journal.all():
            names = volumes.names(record.volume_id)
            if record.state not in HALF_DONE:
                known.add(names.digest)
                continue
            try:
                with volumes.locks.hold(record.volume_id):
                    if record.provisioned:
                        volumes.release_staged(record)
                        known.add(names.digest)
                    else:
                        volumes.teardown(names, record.target_path, record)
                report.rolled_back.append(record.volume_id)
            except Exception as exc:  # one bad volume never stops start-up for the others
                if not isinstance(exc, DriverError):
                    log.exception("start-up could not roll back volume %s", record.volume_id)
                known.add(names.digest)
                report.failures.append(f"{record.volume_id}: {exc}")
        for digest in sorted(volumes.journal.unreadable_digests()):
            known.add(digest)
            report.failures.append(f"journal record {digest}.json is unreadable and was set "
                                   "aside; its volume's objects are left alone")  # fmt: skip
        try:
            self._reconcile_hand_offs(known, report)
        except DriverError as exc:
            report.failures.append(f"Kata direct volumes not checked: {exc}")
        try:
            self._remove_orphans(known, report)
        except DriverError as exc:
            report.failures.append(f"orphan check stopped: {exc}")
        return report

    def _digest_of(self, device: str) -> str | None:
        """The digest a handed-off device names, if it is one of ours (a raw file of the data
        dir, or one of our mappings)."""
        if os.path.dirname(device) == self.volumes.config.data_dir.rstrip("/"):
            match = BACKING_FILE.match(os.path.basename(device))
            return match.group(1) if match else None
        name = device.removeprefix("/dev/mapper/")
        if device.startswith("/dev/mapper/") and name.startswith(MAPPING_PREFIX):
            return name[len(MAPPING_PREFIX):]
        return None

    def _reconcile_hand_offs(self, known: set[str], report: ReconcileReport) -> None:
        """Kata direct volumes naming a device of ours that no record accounts for are taken
        back (with their guard); a handed-off record whose direct volume is gone (someone
        removed it: no VM can get the disk any more) is torn down. Nothing is looked at on a
        node without the direct-volume root (no Kata there)."""
        volumes = self.volumes
        root = volumes.config.kata_direct_volume_root
        if not self.host.is_dir(root):
            return
        entries = volumes.kata.direct_volume_targets(root)
        handed: dict[str, set[str]] = {}  # digest -> targets
        for target, volume in entries.items():
            digest = self._digest_of(volume.device) if volume else None
            if digest is None:
                continue  # not ours (or unreadable: never ours to delete)
            handed.setdefault(digest, set()).add(target)
            if digest not in known:
                self._take_back(digest, target, known, report)
        records = [r for r in volumes.journal.all() if r.spec.kata != "off"]
        if records and not entries:  # a new or wrong root (the chart makes it if missing)
            report.failures.append(
                f"the Kata direct-volume root {root} is empty while {len(records)} volumes are "
                "handed to Kata VMs: nothing was torn down; check --kata-direct-volume-root"
            )
            return
        for record in records:
            self._drop_lost_hand_offs(record, handed, report)

    def _take_back(self, digest: str, target: str, known: set[str],
                   report: ReconcileReport) -> None:  # fmt: skip
        """A hand-off of ours no record names: taken back with its guard and its (now empty)
        target directory, unless a VM still holds the disk (then it and the disk stay)."""
        volumes = self.volumes
        names = Names.of_digest(digest, volumes.config.data_dir, volumes.config.state_dir)
        try:
            volumes.take_back_hand_off(names, target)
            root = volumes.config.kubelet_root.rstrip("/") + "/"
            if target.startswith(root) and self.host.is_dir(target) and \
                    not self.host.is_mountpoint(target):
                self.host.remove_dir(target)
            report.count("handoff_without_record", self.events)
        except Busy as exc:
            known.add(digest)  # and its backing file and mapping are left alone too
            report.failures.append(str(exc))

    def _drop_lost_hand_offs(self, record: Record, handed: dict[str, set[str]],
                             report: ReconcileReport) -> None:  # fmt: skip
        if record.provisioned or record.state != PUBLISHED:
            return
        names = self.volumes.names(record.volume_id)
        if record.target_path in handed.get(names.digest, set()):
            return
        try:
            with self.volumes.locks.hold(record.volume_id):
                self.volumes.teardown(names, record.target_path, record)
            report.rolled_back.append(record.volume_id)
        except DriverError as exc:
            report.failures.append(f"{record.volume_id}: {exc}")

    def _remove_orphans(self, known: set[str], report: ReconcileReport) -> None:
        luks = self.volumes.luks
        every = list(self.volumes.backings.values())
        self._remove_each(luks.orphan_files(known),
                          lambda orphan: luks.remove_orphan_file(orphan, every), known, report)
        self._remove_each(luks.orphan_mappings(known), luks.remove_orphan_mapping, known, report)
        for backing in self.volumes.backings.values():
            try:
                orphans = backing.orphans(known)
            except DriverError as exc:  # a hung qsd must not keep the driver (or loops) down
                report.failures.append(f"{backing.name} orphans not checked: {exc}")
                continue
            self._remove_each(orphans, backing.remove_orphan, known, report)
        self._remove_each(luks.orphan_headers(known), luks.remove_orphan_header, known, report)

    def _remove_each(self, orphans: list[Orphan], remove: Callable[[Orphan], None],
                     known: set[str], report: ReconcileReport) -> None:  # fmt: skip
        for orphan in orphans:
            try:
                remove(orphan)
                report.count(orphan.reason, self.events)
            except Busy as exc:  # in use: it and everything of its volume are left alone
                known.add(orphan.digest)
                report.failures.append(str(exc))
            except DriverError as exc:
                report.failures.append(f"{orphan.label}: {exc}")
