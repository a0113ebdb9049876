"""The results' summary: ratios, goals met or not, notes, and ``--only``'s merge into an
earlier results file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import ratio, say

PHASES = ("latency", "concurrency", "footprint", "memory", "integrity", "fscrypt", "shred")
# Top-level results keys each phase writes (for --only, which merges them into an old file).
PHASE_KEYS = {
    "latency": ("latency", "handrun_script", "datapath_baselines", "mkfs_default"),
    "footprint": ("footprint", "datapath"),
    "memory": ("memory", "rss_idle_mib"),
}

# Goals (issue: make bench). A ratio goal compares p50 publish latencies.
GOAL_HANDRUN_MAX = 1.15
GOAL_CONVENTIONAL_MIN = 5.0
GOAL_SPEEDUP_MIN = 1.5
GOAL_ALLOC_MAX_MIB = 16.0
GOAL_RSS_MAX_MIB = 80.0
GOAL_INTEGRITY_MAX = 2.0  # integrity publish p50: 2 GiB / 256 MiB
GOAL_FSCRYPT_BIND_MAX = 1.5  # fscrypt publish p50 / mkdir + bind + remount
GOAL_LUKS_FSCRYPT_MIN = 20.0  # loop-LUKS publish p50 / fscrypt publish p50
GOAL_SHRED_MAX = 2.0  # shred of 50 live volumes (p50 of the driver's seconds) / unpublish-1 p50


def goal(value: float | None, target: float, at_most: bool, unit: str) -> dict[str, Any]:
    met = None if value is None else (value <= target if at_most else value >= target)
    return {"target": f"{'<=' if at_most else '>='} {target:g}{unit}", "value": value, "met": met}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    env = results["environment"]
    lat = results.get("latency", {}).get("flows", {})

    def p50(flow: str, what: str = "publish") -> float | None:
        v = lat.get(flow, {}).get("stats", {}).get(f"{what}_p50_s")
        return float(v) if v is not None else None

    conc = results.get("concurrency", {})
    foot = results.get("footprint", {})
    qcow2 = foot.get("qcow2") or {}
    mem = results.get("memory", {})
    integ = results.get("integrity", {})
    integ_flows = integ.get("flows", {})

    def integ_p50(flow: str) -> float | None:
        v = integ_flows.get(flow, {}).get("stats", {}).get("publish_p50_s")
        return float(v) if v is not None else None

    fs = results.get("fscrypt", {})

    def fs_p50(flow: str, what: str = "publish") -> float | None:
        v = fs.get("flows", {}).get(flow, {}).get("stats", {}).get(f"{what}_p50_s")
        return float(v) if v is not None else None

    shred = results.get("shred", {})
    shred_one = shred.get("unpublish_1", {}).get("stats", {})

    summary: dict[str, Any] = {
        "publish_vs_handrun_p50": ratio(p50("ours"), p50("handrun")),
        "conventional_vs_ours_p50": ratio(p50("conventional"), p50("ours")),
        "publish_vs_floor_p50": ratio(p50("ours"), p50("floor")),
        "cycle_vs_handrun_p50": ratio(p50("ours", "cycle"), p50("handrun", "cycle")),
        "cycle_conventional_vs_ours_p50": ratio(p50("conventional", "cycle"), p50("ours", "cycle")),
        "cycle_vs_floor_p50": ratio(p50("ours", "cycle"), p50("floor", "cycle")),
        "concurrency_speedup_16": conc.get("speedup"),
        "concurrency_errors": conc.get("errors"),
        "alloc_10g_mib": foot.get("alloc_mib"),
        "alloc_10g_qcow2_mib": foot.get("qcow2_alloc_mib"),
        "qcow2_publish_vs_loop": ratio(qcow2.get("publish_s"), foot.get("publish_s")),
        "qcow2_unpublish_vs_loop": ratio(qcow2.get("unpublish_s"), foot.get("unpublish_s")),
        "rss_idle_mib": mem.get("rss_idle_mib", results.get("rss_idle_mib")),
        "rss_50_volumes_mib": mem.get("rss_with_volumes_mib"),
        # integrity=hmac-sha256 filesystem volumes (keys name the sizes the bench uses)
        "integrity_2g_vs_256m": integ.get("large_vs_small_p50"),
        "integrity_publish_256m_p50_s": integ_p50("integrity_small"),
        "integrity_publish_2g_p50_s": integ_p50("integrity_large"),
        "plain_publish_256m_p50_s": integ_p50("plain_small"),
        "integrity_256m_vs_plain_256m": integ.get("integrity_vs_plain_small_p50"),
        # backing=fscrypt, its bind floor and loop-LUKS, interleaved in one phase
        "fscrypt_publish_vs_bind_p50": fs.get("fscrypt_vs_bind_p50"),
        "luks_vs_fscrypt_publish_p50": fs.get("luks_vs_fscrypt_p50"),
        # not a goal: against the floor done with the driver's own syscalls (no mount process)
        "fscrypt_publish_vs_bind_syscalls_p50": fs.get("fscrypt_vs_bind_syscalls_p50"),
        "fscrypt_publish_p50_s": fs_p50("fscrypt"),
        "fscrypt_unpublish_p50_s": fs_p50("fscrypt", "unpublish"),
        "bind_floor_publish_p50_s": fs_p50("bind_floor"),
        "luks_publish_p50_s": fs_p50("luks"),
        # emergency shred of N (50) live volumes against NodeUnpublishVolume of one
        "shred_50_vs_unpublish_1": shred.get("shred_vs_unpublish_1_p50"),
        "shred_50_wall_vs_unpublish_1": shred.get("shred_wall_vs_unpublish_1_p50"),
        "shred_volumes": shred.get("volumes"),
        "shred_p50_s": shred.get("shred_p50_s"),
        "shred_seconds": shred.get("shred_seconds"),
        "shred_call_wall_p50_s": shred.get("shred_call_wall_p50_s"),
        "unpublish_1_p50_s": shred_one.get("unpublish_p50_s"),
        "kernel": env["kernel"],
        "emulated": env["emulated"],
        "date": results["date"],
    }
    summary["goals"] = {
        "publish_vs_handrun_p50": goal(
            summary["publish_vs_handrun_p50"], GOAL_HANDRUN_MAX, True, "x"
        ),
        "conventional_vs_ours_p50": goal(
            summary["conventional_vs_ours_p50"], GOAL_CONVENTIONAL_MIN, False, "x"
        ),
        "concurrency_speedup_16": goal(
            summary["concurrency_speedup_16"], GOAL_SPEEDUP_MIN, False, "x"
        ),
        "alloc_10g_mib": goal(summary["alloc_10g_mib"], GOAL_ALLOC_MAX_MIB, True, " MiB"),
        "rss_50_volumes_mib": goal(summary["rss_50_volumes_mib"], GOAL_RSS_MAX_MIB, True, " MiB"),
        "integrity_2g_vs_256m": goal(
            summary["integrity_2g_vs_256m"], GOAL_INTEGRITY_MAX, True, "x"
        ),
        "fscrypt_publish_vs_bind_p50": goal(
            summary["fscrypt_publish_vs_bind_p50"], GOAL_FSCRYPT_BIND_MAX, True, "x"
        ),
        "luks_vs_fscrypt_publish_p50": goal(
            summary["luks_vs_fscrypt_publish_p50"], GOAL_LUKS_FSCRYPT_MIN, False, "x"
        ),
        "shred_50_vs_unpublish_1": goal(
            summary["shred_50_vs_unpublish_1"], GOAL_SHRED_MAX, True, "x"
        ),
    }
    if conc and conc.get("errors"):
        summary["goals"]["concurrency_speedup_16"]["met"] = False  # zero errors is part of it
    if integ and integ.get("errors"):
        summary["goals"]["integrity_2g_vs_256m"]["met"] = False  # every publish must work
    if fs and (fs.get("errors") or fs.get("unavailable")):
        for key in ("fscrypt_publish_vs_bind_p50", "luks_vs_fscrypt_publish_p50"):
            summary["goals"][key]["met"] = False  # every cycle of every flow must work
    if shred and shred.get("errors"):
        summary["goals"]["shred_50_vs_unpublish_1"]["met"] = False  # every baseline cycle too
    return summary


def merged(path: Path, fresh: dict[str, Any], phases: Sequence[str]) -> dict[str, Any]:
    """``--only``: the results file as it was, with the sections of ``phases`` (and their
    config) taken from this run; without a readable file, this run's results alone."""
    try:
        old: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        say(f"--only: {path} not readable ({exc}); writing this run's results alone")
        return fresh
    out = dict(old)
    for phase in phases:
        for key in PHASE_KEYS.get(phase, (phase,)):
            if key in fresh:
                out[key] = fresh[key]
    config = dict(old.get("config", {}))
    for key in ("integrity_sizes", "integrity_cycles"):
        if "integrity" in phases:
            config[key] = fresh["config"][key]
    for key in ("shred_volumes", "shred_size", "shred_cycles", "shred_baseline"):
        if "shred" in phases:
            config[key] = fresh["config"][key]
    config["phases"] = sorted(set(config.get("phases", [])) | set(phases), key=PHASES.index)
    config.setdefault("merged_runs", []).append(
        {"date": fresh["date"], "phases": list(phases), "kernel": fresh["environment"]["kernel"]}
    )
    out["config"] = config
    return out


def notes(results: dict[str, Any]) -> list[str]:
    out = []
    if results["environment"]["emulated"]:
        out.append(
            "Run under software emulation (QEMU TCG): absolute times are 10-50x real "
            "hardware; compare ratios only. On hardware cryptsetup calibrates argon2id to "
            "its default --iter-time (2000 ms per unlock); under emulation even the minimum "
            "cost (see datapath_baselines.conventional.keyslot_kdf) takes longer than that, "
            "so the conventional flow's KDF is inflated like every other CPU-bound step."
        )
    out.append(
        "Ratios compare p50 publish latencies (the summary's cycle_* keys compare "
        "publish+unpublish)."
    )
    out.append(
        "Baselines create the sparse file in-process without the driver's fsync, and "
        "skip the driver's journal, checks and chmod: they are the cheapest possible."
    )
    out.append(
        "Conventional: the backing file is 16 MiB larger to hold the on-device LUKS2 "
        "header; mkfs is a plain `mkfs.ext4 -F -q` (see mkfs_default)."
    )
    out.append(
        "The driver serves Prometheus metrics on 127.0.0.1 (step times are scraped "
        "from luks_ephemeral_step_seconds); its RSS includes that HTTP server."
    )
    if results["config"].get("driver_qsd_socket"):
        out.append(
            "The driver ran with --qsd-socket (as with the chart's default qcow2.enabled), "
            "pointing at a qemu-storage-daemon the bench ran as its own daemon; loop volumes "
            "never talk to it (their teardown skips the NBD step)."
        )
    integ = results.get("integrity")
    if integ:
        when = integ.get("measured", {}).get("date")
        out.append(
            "Integrity: integrity=hmac-sha256 ext4 volumes are formatted without the "
            "dm-integrity wipe (--integrity-no-wipe) and made with eager metadata "
            "(lazy_itable_init=0, lazy_journal_init=0); p50 of "
            f"{integ.get('cycles')} publishes per size, interleaved"
            + (f", measured {when}" if when and when != results.get("date") else "")
            + "; the step times are each publish's own."
        )
    fs = results.get("fscrypt")
    if fs:
        if fs.get("unavailable"):
            out.append(f"fscrypt: not measured, the driver refused the volume: {fs['unavailable']}")
        else:
            out.append(
                "fscrypt: backing=fscrypt, the bench's own bind floor (mkdir, `mount --bind`, "
                "`mount -o remount,bind,rw,nosuid,nodev`; back: umount, rmdir) and the "
                f"driver's loop-LUKS volume, {fs.get('size')} each, {fs.get('cycles')} cycles "
                "per flow, interleaved; one fscrypt cycle ran first on its own (it makes and "
                "mounts the driver's pool when needed). Step times are each publish's own."
            )
    shred = results.get("shred")
    if shred:
        when = shred.get("measured", {}).get("date")
        out.append(
            f"Shred: {shred.get('cycles')} cycles of `shred --all` (admin socket) over "
            f"{shred.get('volumes')} live {shred.get('size')} loop volumes ({shred.get('live')}); "
            "the figure is the report's seconds (trigger to last key gone, timed in the "
            "driver), each cycle verified complete (every volume wiped, no crypt table left), "
            f"then all unpublished and the node unsealed. Baseline: "
            f"{shred.get('baseline_per_round')} NodeUnpublishVolume calls of one live volume "
            "of the same size per cycle, the order rotated each round"
            + (f", measured {when}" if when and when != results.get("date") else "")
            + "."
        )
    foot = results.get("footprint")
    if foot:
        q = foot.get("qcow2")
        if q:
            out.append(
                "Footprint: one volume per backing, loop first (the driver's first publish "
                "since it started), then qcow2; each publish and unpublish time is one sample. "
                "qcow2 allocation is st_blocks of the image file, as for loop's sparse file."
            )
        else:
            out.append(f"Footprint: backing=qcow2 {foot.get('qcow2_note')}")
    return out
