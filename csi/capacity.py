"""Capacity: what every volume charges against the node, and whether one more fits.

A volume is charged its full size plus what its backing adds (an attached header, qcow2 tables),
whether or not a block is written yet; sparse volumes also count what they may still claim from
the data dir's free space. The journal is the ledger: a reservation is its record.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from csi import backings, limits
from csi.config import Config
from csi.errors import NamespaceLimitExceeded, ResourceExhausted
from csi.host import Files
from csi.journal import Journal, Record
from csi.params import VolumeSpec, format_bytes


@dataclass(frozen=True)
class Usage:
    budget: int
    reserved: int
    provisioned: int
    allocated: int
    data_dir_free: int
    volumes: dict[tuple[str, str], int]


class Capacity:
    def __init__(self, config: Config, files: Files, journal: Journal,
                 allocated: Callable[[Record], int]) -> None:  # fmt: skip
        self.config = config
        self.files = files
        self.journal = journal
        self.allocated = allocated  # what a volume's backing takes on the disk now
        self._lock = threading.Lock()
        # told of every namespace refusal (the namespace metrics); must be cheap and not raise
        self.on_namespace_refusal: Callable[[NamespaceLimitExceeded], None] | None = None

    def reserve(self, record: Record, *, new_volume: bool = True) -> None:
        """Count the volume at its full charge against the node's limits (the volume count, its
        namespace's share, the admin's budget, and the data dir's free space minus what sparse
        volumes may still claim), then write its record atomically. Also used to grow a
        reservation (``new_volume=False``: counts are not checked)."""
        need = record.charge
        with self._lock:
            others = [r for r in self.journal.all() if r.volume_id != record.volume_id]
            if new_volume and len(others) >= self.config.max_volumes:
                raise ResourceExhausted(
                    f"this node already has {len(others)} volumes, its limit "
                    f"(--max-volumes={self.config.max_volumes})"
                )
            try:
                limits.check(self.config.namespace_limits, record, others, new_volume=new_volume)
            except NamespaceLimitExceeded as exc:
                if self.on_namespace_refusal is not None:
                    self.on_namespace_refusal(exc)
                raise
            reserved = sum(r.charge for r in others)
            budget = self.config.capacity
            if budget and reserved + need > budget:
                raise ResourceExhausted(
                    f"volume of {format_bytes(need)} does not fit in this node's budget: "
                    f"{format_bytes(max(0, budget - reserved))} of {format_bytes(budget)} left; "
                    "ask for a smaller size or schedule the pod elsewhere"
                )
            promised = sum(self._unallocated(r) for r in others)
            free = self.files.free_bytes(self.config.data_dir)
            if self._unallocated(record) + promised > free:
                raise ResourceExhausted(
                    f"volume of {format_bytes(need)} does not fit in the data dir "
                    f"{self.config.data_dir}: {free // 2**20} MiB free, "
                    f"{promised // 2**20} MiB already promised to other volumes"
                )
            self.journal.write(record)

    def write(self, record: Record) -> None:
        """Write a record under the capacity lock (a record is a reservation)."""
        with self._lock:
            self.journal.write(record)

    def room(self) -> int:
        """Bytes the charge of one more volume may take now (0 at the volume limit)."""
        with self._lock:
            records = self.journal.all()
            if len(records) >= self.config.max_volumes:
                return 0
            free = self.files.free_bytes(self.config.data_dir)
            room = free - sum(self._unallocated(r) for r in records)
            if self.config.capacity:
                room = min(room, self.config.capacity - sum(r.charge for r in records))
            return max(0, room)

    def largest_volume(self, spec: VolumeSpec) -> int:
        """The biggest size of this shape that fits now (before rounding)."""
        return backings.kind(spec.backing).largest_fitting(self.room(), spec)

    def _unallocated(self, record: Record) -> int:
        """Bytes a sparse volume may still claim from the data dir's free space."""
        return max(0, record.charge - self.allocated(record))

    def namespace_usage(self) -> dict[str, limits.Used]:
        """Bytes and volumes per namespace, for the namespace metrics."""
        return limits.usage(self.journal.all())

    def usage(self) -> Usage:
        """Budget, reservations and real disk use, for metrics and GetCapacity."""
        records = self.journal.all()
        counts: dict[tuple[str, str], int] = {}
        for r in records:
            key = (r.spec.backing, r.spec.access_type)
            counts[key] = counts.get(key, 0) + 1
        return Usage(
            budget=self.config.capacity,
            reserved=sum(r.charge for r in records),
            provisioned=sum(r.spec.size for r in records),
            allocated=sum(self.allocated(r) for r in records),
            data_dir_free=self.files.free_bytes(self.config.data_dir),
            volumes=counts,
        )  # fmt: skip
