"""The footprint phase: blocks a freshly published sparse volume holds (backing=loop, then
backing=qcow2 through the bench's own qemu-storage-daemon), and the driver's data path."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.common import HOST, allocated, mib, r4, say
from bench.kernel import connected_nbds, datapath_of, keyslot_kdf
from bench.processes import BenchDriver, Qsd
from csi.host.nbd import node_name
from csi.journal import Names


def one_volume(
    driver: BenchDriver, size: str, backing: str, inspect: Callable[[Names], None]
) -> tuple[dict[str, Any], Names]:
    """Publish one volume, measure what its backing file holds (right away and after a sync),
    ``inspect`` it, unpublish it; each time is one sample."""
    pod = str(uuid.uuid4())
    names = driver.names(pod)
    say(f"footprint: publishing a {size} volume ({backing})")
    start = time.perf_counter()
    try:
        driver.publish(pod, size, backing=None if backing == "loop" else backing)
    except BaseException:
        if backing != "loop":
            with contextlib.suppress(Exception):
                driver.unpublish(pod)
        raise
    publish_s = time.perf_counter() - start
    try:
        alloc_now = allocated(names.backing)
        os.sync()
        alloc_synced = allocated(names.backing)
        st = os.stat(names.backing)
        header = os.stat(names.header).st_size if os.path.exists(names.header) else None
        inspect(names)
    finally:
        start = time.perf_counter()
        driver.unpublish(pod)
        unpublish_s = time.perf_counter() - start
    return {
        "size": size,
        "backing": backing,
        "apparent_bytes": st.st_size,
        "allocated_bytes_right_after_publish": alloc_now,
        "allocated_bytes_after_sync": alloc_synced,
        "alloc_mib": mib(max(alloc_now, alloc_synced)),
        "detached_header_bytes_on_tmpfs": header,
        "publish_s": r4(publish_s),
        "unpublish_s": r4(unpublish_s),
        "timing_samples": 1,
    }, names


def footprint_phase(
    driver: BenchDriver, size: str, qsd: Qsd | None, qcow2_reason: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    datapath: dict[str, Any] = {}

    def loop_datapath(names: Names) -> None:
        datapath.update(datapath_of(names.mapping, names.backing))
        if loop := datapath.get("loop_device"):
            datapath["keyslot_kdf"] = keyslot_kdf(loop, names.header)

    footprint, _ = one_volume(driver, size, "loop", loop_datapath)
    footprint.update(qcow2_alloc_mib=None, qcow2_note=None, qcow2=None)
    say(f"footprint: {footprint['alloc_mib']} MiB allocated for {size} (loop)")
    if qsd is None:
        footprint["qcow2_note"] = f"not measured: {qcow2_reason or 'no qemu-storage-daemon'}"
        say(f"footprint: qcow2 {footprint['qcow2_note']}")
        return footprint, datapath
    try:
        q = qcow2_footprint(driver, size, qsd)
    except Exception as exc:
        footprint["qcow2_note"] = f"not measured: the qcow2 volume failed: {exc}"
        say(f"footprint: qcow2 {footprint['qcow2_note']}")
        return footprint, datapath
    footprint["qcow2"] = q
    footprint["qcow2_alloc_mib"] = q["alloc_mib"]
    footprint["qcow2_note"] = (
        "measured on one volume, published right after the loop one by the same driver"
        + (f"; LEFT BEHIND after unpublish: {', '.join(q['leftovers'])}" if q["leftovers"] else "")
    )
    say(
        f"footprint: {q['alloc_mib']} MiB allocated for {size} (qcow2), publish "
        f"{q['publish_s']:.2f} s, unpublish {q['unpublish_s']:.2f} s, "
        f"left behind: {', '.join(q['leftovers']) or 'nothing'}"
    )
    return footprint, datapath


def qcow2_footprint(driver: BenchDriver, size: str, qsd: Qsd) -> dict[str, Any]:
    """One backing=qcow2 volume: blocks its image holds right after publish, publish and
    unpublish wall time, and what is left after unpublish (nothing, if all is well)."""
    before = connected_nbds()
    devices: list[str] = []

    def new_devices(names: Names) -> None:
        devices.extend(sorted(set(connected_nbds()) - set(before)))

    result, names = one_volume(driver, size, "qcow2", new_devices)
    leftovers = []
    if os.path.exists(names.backing):
        leftovers.append(f"image {names.backing}")
    if os.path.exists(names.header):
        leftovers.append(f"header {names.header}")
    if HOST.crypt_exists(names.mapping):
        leftovers.append(f"mapping {names.mapping}")
    leftovers += [f"connected {d}" for d in connected_nbds() if d not in before]
    if (driver.state_dir / "nbd" / names.mapping).exists():
        leftovers.append(f"claim file {driver.state_dir / 'nbd' / names.mapping}")
    try:
        if names.mapping in qsd.exports():
            leftovers.append(f"qemu-storage-daemon export {names.mapping}")
        if node_name(names.mapping) in qsd.nodes():
            leftovers.append(f"qemu-storage-daemon block node {node_name(names.mapping)}")
    except Exception as exc:
        leftovers.append(f"unknown: qemu-storage-daemon did not answer ({exc})")
    result["nbd_devices"] = devices  # connected by this publish: one, if all is well
    result["leftovers"] = leftovers
    return result
