"""The orphan reaper: tear down volumes whose pod is no longer on this node.

kubelet normally unpublishes a volume when its pod goes. When it does not (the pod was
force-deleted while the node was down, kubelet lost its state, a crash between the two), the
volume would keep its key in the kernel and its blocks on disk forever. The reaper compares the
journal with the API server's view of this node, and unpublishes what has been orphaned for
longer than a grace period. It never acts on an API failure: no answer means no reaping.

A static pod runs under its config hash (the uid kubelet passes us), while the API server only
knows its mirror pod, under another uid: the lister answers both, so such volumes stay.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from csi.errors import DriverError
from csi.journal import PUBLISHED
from csi.volumes import Volumes

log = logging.getLogger(__name__)

REASON = "pod_gone"


class PodLister(Protocol):
    def pods_on_node(self, node: str) -> set[str]:
        """Every id a live pod on ``node`` goes by: its uid, and a mirror pod's config hash."""
        ...


class OrphanReaper:
    """Each round: list this node's pods, mark volumes whose pod is missing, reap old marks."""

    def __init__(
        self,
        volumes: Volumes,
        api: PodLister,
        node_id: str,
        grace_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.volumes = volumes
        self.api = api
        self.node_id = node_id
        self.grace = grace_seconds
        self.clock = clock
        self.missing: dict[str, float] = {}  # volume id -> when its pod was first seen missing
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._round = threading.Lock()

    def run_once(self) -> list[str]:
        """One round; returns the ids of the volumes it tore down."""
        with self._round:
            return self._run()

    def _run(self) -> list[str]:
        try:
            alive = self.api.pods_on_node(self.node_id)
        except Exception as exc:
            log.warning("orphan reaper: cannot list pods on %s, skipping this round: %s",
                        self.node_id, exc)  # fmt: skip
            return []
        if not alive:
            # this driver's own pod runs on the node, so an empty list means a wrong --node-id
            # (not the Kubernetes node name) or a confused API server: reaping would destroy
            # every volume on the node
            log.warning(
                "orphan reaper: the API server lists no pods on node %r; is --node-id the "
                "Kubernetes node name? skipping this round", self.node_id,
            )  # fmt: skip
            return []
        try:
            volumes = self.volumes.list()
        except Exception:
            log.exception("orphan reaper: cannot read the journal, skipping this round")
            return []
        now = self.clock()
        still_missing: dict[str, float] = {}
        reaped: list[str] = []
        for info in volumes:
            record = info.record
            uid = record.pod.get("uid", "")
            if record.state != PUBLISHED or not uid or uid in alive:
                continue  # an in-flight publish, a volume we cannot attribute, or a live pod
            since = self.missing.get(record.volume_id, now)
            if now - since <= self.grace or self._stop.is_set():
                if record.volume_id not in self.missing:
                    log.info(
                        "orphan reaper: pod %s of volume %s is not on this node; reaping it "
                        "unless it is back within %.0f s", uid, record.volume_id, self.grace,
                    )  # fmt: skip
                still_missing[record.volume_id] = since
                continue
            pod = "/".join(p for p in (record.pod.get("namespace"), record.pod.get("name")) if p)
            try:
                self.volumes.unpublish(record.volume_id, record.target_path)
            except DriverError as exc:
                still_missing[record.volume_id] = since  # e.g. busy or in flight: next round
                log.warning("orphan reaper: cannot tear down volume %s yet: %s",
                            record.volume_id, exc)  # fmt: skip
                continue
            self.volumes.events.orphan_removed(REASON)
            reaped.append(record.volume_id)
            log.warning(
                "orphan reaper: tore down volume %s: its pod %s (%s) has been gone from this "
                "node for %.0f s", record.volume_id, pod or "?", uid, now - since,
            )  # fmt: skip
        self.missing = still_missing  # a pod that came back, or a volume now gone, is forgotten
        return reaped

    # background loop ---------------------------------------------------------------------
    def start(self, interval: float) -> None:
        """Run a round every ``interval`` seconds in a daemon thread until ``stop()``."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="orphan-reaper", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop; a round in progress finishes the volume it is tearing down first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.run_once()
            except Exception:  # a bug here must not kill the loop for good
                log.exception("orphan reaper: round failed")
