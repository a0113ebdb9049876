"""`make bench`: measure the real driver on the real kernel, against baselines, in one run.

    python bench/run.py [--cycles 20] [--out bench/results.json] [--phases latency,...]

Runs as root where loop devices and dm-crypt work (``make bench`` uses tools/vmrun.py, which
boots a throwaway VM when this kernel lacks device-mapper). It makes a data dir (ext4 on a
sparse loop image), starts the real ``python -m csi node`` process on a unix socket under /run
and drives it with kubelet-shaped requests (csi.tools.kubelet), like kubelet does for an inline
ephemeral volume. Phases:

latency      publish and unpublish of 1 GiB volumes, N cycles, interleaved round-robin with
             three baselines run from this script as plain argv subprocesses:
             floor (no encryption), handrun (the very commands the driver runs, nothing else)
             and conventional (a LUKS driver configured as ceph-csi does: argon2id KDF with
             32 MiB, header on the device, no dm-crypt perf flags, default mkfs.ext4, mount);
             plus the driver's own time per lifecycle step (luks_ephemeral_step_seconds).
concurrency  16 publishes in parallel threads against 16 in sequence.
footprint    blocks allocated in the backing file of a freshly published 10 GiB sparse volume,
             backing=loop and then backing=qcow2 (one volume each, publish and unpublish timed
             once), and the data path: dm table flags (key redacted), sector sizes, loop
             direct I/O. For qcow2 the bench runs its own qemu-storage-daemon (a daemon of its
             own, as the chart's sidecar is) and starts the driver with --qsd-socket.
memory       the driver's RSS idle and with 50 small (64 MiB) volumes published.
integrity    publish of integrity=hmac-sha256 filesystem volumes of 256 MiB and 2 GiB (and, for
             reference, a 256 MiB volume without integrity), interleaved round-robin, with the
             driver's time per step for each publish. dm-integrity's format-time wipe writes
             the whole device (8x the work for 2 GiB); filesystems skip it and write their
             metadata instead, so the goal is a 2 GiB publish within 2x of a 256 MiB one.
fscrypt      publish and unpublish of backing=fscrypt volumes (--size), interleaved round-robin
             with a floor the bench runs itself (mkdir + mount --bind + remount nosuid,nodev of
             a plain directory, and back) and with the driver's loop-LUKS publish of the same
             size (bench/fscrypt.py).
shred        the emergency shred (``shred --all`` through the driver's admin socket) of 50 live
             64 MiB loop volumes (mounted, a file of each held open and written by one writer
             process, round-robin with fsync), against NodeUnpublishVolume of one such volume;
             --shred-cycles shred cycles (publish 50, shred, unpublish them, unseal) rotated
             with --shred-baseline unpublishes of one each round (bench/shred.py). A shred that
             does not wipe every key fails the run.

``--only PHASE[,PHASE]`` runs just those phases and merges their sections into the existing
results file (the other sections, measured by an earlier run, are kept as they were).

Absolute times under software emulation (QEMU TCG) are 10-50x those of real hardware: read the
ratios. The handrun baseline runs exactly the driver's commands for a default inline volume:
built by the driver's own builders (csi.host.commands) from the driver's choices for the spec
(csi.backings.luks), with fresh names; every flow, the driver's and each baseline's, is timed by the
same code (bench/flows.py). Benchmarks are not tests: nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.baselines import Conventional, Floor, HandRun, handrun_script, inline_spec
from bench.common import REPO, BenchError, mib, say
from bench.environment import (
    detect_environment,
    missing_requirements,
    mkfs_default_meaning,
    qcow2_unavailable,
)
from bench.flows import Flow, Ours
from bench.footprint import footprint_phase
from bench.fscrypt import fscrypt_phase
from bench.integrity import integrity_phase
from bench.phases import concurrency_phase, latency_phase, memory_phase
from bench.processes import BenchDriver, DataFs, Qsd, sweep
from bench.shred import shred_phase
from bench.summary import PHASES, merged, notes, summarise
from csi.params import parse_quantity


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cycles", type=int, default=20, help="latency cycles per flow (20)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first (1)")
    parser.add_argument("--size", default="1Gi", help="volume size for latency/concurrency")
    parser.add_argument("--concurrency", type=int, default=16, help="parallel publishes (16)")
    parser.add_argument(
        "--concurrency-repeats",
        type=int,
        default=2,
        help="sequential/concurrent pairs, in ABBA order (2)",
    )
    parser.add_argument("--footprint-size", default="10Gi", help="sparse volume to measure")
    parser.add_argument("--volumes", type=int, default=50, help="volumes for the RSS phase (50)")
    parser.add_argument("--volume-size", default="64Mi", help="size of the RSS phase's volumes")
    parser.add_argument("--data-size", default="40Gi", help="sparse node-disk image (40Gi)")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}"
    )
    parser.add_argument(
        "--only",
        default="",
        help="run only these phases (comma-separated) and merge their sections into the "
        "existing --out file, keeping every other section as it was",
    )
    parser.add_argument(
        "--integrity-sizes",
        default="256Mi,2Gi",
        help="small,large integrity=hmac-sha256 volumes of the integrity phase (256Mi,2Gi)",
    )
    parser.add_argument(
        "--integrity-cycles", type=int, default=3, help="integrity phase cycles per flow (3)"
    )
    parser.add_argument(
        "--shred-volumes", type=int, default=50, help="live volumes each shred wipes (50)"
    )
    parser.add_argument("--shred-size", default="64Mi", help="size of the shred phase's volumes")
    parser.add_argument(
        "--shred-cycles", type=int, default=3, help="shred cycles (publish N, shred, clean up) (3)"
    )
    parser.add_argument(
        "--shred-baseline",
        type=int,
        default=2,
        help="unpublishes of one volume per shred cycle, the baseline (2)",
    )
    parser.add_argument(
        "--driver-log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING"),
        help="the driver's --log-level (INFO; DEBUG logs every command, for diagnosis)",
    )
    parser.add_argument("--work-dir", default="/tmp", help="where the node-disk image goes")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = parser.parse_args(argv)
    args.merge = bool(args.only)
    phases = [p for p in (args.only or args.phases).split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")
    if not phases:
        parser.error("no phase to run")
    args.phases = phases
    sizes = [x for x in args.integrity_sizes.split(",") if x]
    if len(sizes) != 2:
        parser.error("--integrity-sizes takes two sizes: small,large")
    args.integrity_small, args.integrity_large = sizes
    if args.integrity_cycles < 1:
        parser.error("--integrity-cycles must be at least 1")
    if min(args.shred_volumes, args.shred_cycles, args.shred_baseline) < 1:
        parser.error("--shred-volumes, --shred-cycles and --shred-baseline must be at least 1")
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    if args.concurrency_repeats < 1 or args.concurrency < 1:
        parser.error("--concurrency and --concurrency-repeats must be at least 1")
    return args


def measured(results: dict[str, Any]) -> dict[str, Any]:
    """When and where a phase ran (kept with its section when --only merges it)."""
    env = results["environment"]
    return {
        "date": results["date"],
        "kernel": env["kernel"],
        "emulated": env["emulated"],
        "cpus": env["cpus"],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_requirements()
    if missing:
        say("needs " + ", ".join(missing) + "; run `make bench` (it boots a VM when needed)")
        return 2
    size_bytes = parse_quantity(args.size)
    results: dict[str, Any] = {
        "schema": 1,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {
            "cycles": args.cycles,
            "warmup": args.warmup,
            "size": args.size,
            "concurrency": args.concurrency,
            "concurrency_repeats": args.concurrency_repeats,
            "footprint_size": args.footprint_size,
            "volumes": args.volumes,
            "volume_size": args.volume_size,
            "integrity_sizes": [args.integrity_small, args.integrity_large],
            "integrity_cycles": args.integrity_cycles,
            "shred_volumes": args.shred_volumes,
            "shred_size": args.shred_size,
            "shred_cycles": args.shred_cycles,
            "shred_baseline": args.shred_baseline,
            "driver_log_level": args.driver_log_level,
            "phases": args.phases,
        },
        "environment": detect_environment(),
        "notes": [],
    }
    env = results["environment"]
    say(
        f"kernel {env['kernel']}, emulated={env['emulated']}, {env['cpus']} CPUs, "
        f"phases {','.join(args.phases)}"
    )
    base = Path(tempfile.mkdtemp(prefix="lec-bench-", dir=args.work_dir))
    run_dir = Path(tempfile.mkdtemp(prefix="lec-bench-", dir="/run"))
    data: DataFs | None = None
    driver: BenchDriver | None = None
    qsd: Qsd | None = None
    qcow2_reason: str | None = None
    status = 0
    try:
        data = DataFs(base, parse_quantity(args.data_size))
        driver_dir = data.mountpoint / "driver"
        baseline_root = data.mountpoint / "baseline"
        for d in (baseline_root / "backing", baseline_root / "mnt", run_dir / "bench-headers"):
            d.mkdir(parents=True)
        spec = inline_spec(args.size)
        if not args.merge or "latency" in args.phases:  # only the latency phase runs it
            results["handrun_script"] = {
                "source": "built by the driver's builders (csi.host.commands) for the spec the "
                f"driver makes of size={args.size}",
                "script": handrun_script(spec),
                "matches_template": None,
            }
        # Whatever the phases, the driver runs as the chart's default (qcow2.enabled) runs it,
        # with --qsd-socket, whenever qemu-storage-daemon can run here: same config every run.
        qcow2_reason = qcow2_unavailable()
        if qcow2_reason is None:
            say("starting qemu-storage-daemon (its own daemon) for backing=qcow2")
            qsd = Qsd(run_dir)
            try:
                qsd.start()
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                qcow2_reason = f"qemu-storage-daemon did not start: {exc}"
                qsd.stop()
                qsd = None
        else:
            say(f"backing=qcow2 not measured: {qcow2_reason}")
        results["config"]["driver_qsd_socket"] = qsd is not None
        qsd_args = ["--qsd-socket", str(qsd.socket)] if qsd is not None else []
        driver = BenchDriver(base, run_dir, driver_dir, args.driver_log_level, qsd_args)
        say("starting the driver" + (" with --qsd-socket" if qsd_args else ""))
        driver.start()
        time.sleep(2)
        idle = driver.rss()
        results["rss_idle_mib"] = mib(idle.get("VmRSS", 0))
        say(f"driver idle VmRSS {results['rss_idle_mib']} MiB")
        if "footprint" in args.phases:
            results["footprint"], results["datapath"] = footprint_phase(
                driver, args.footprint_size, qsd, qcow2_reason
            )
        if "latency" in args.phases:
            headers = run_dir / "bench-headers"
            baselines = [
                Floor(baseline_root, headers, size_bytes),
                HandRun(baseline_root, headers, spec),
                Conventional(baseline_root, headers, size_bytes),
            ]
            flows: list[Flow[Any]] = [Ours(driver, args.size), *baselines]
            results["latency"] = latency_phase(driver, flows, args.cycles, args.warmup)
            dp = results.setdefault("datapath_baselines", {})
            for baseline in baselines[1:]:  # handrun and conventional
                dp[baseline.name] = baseline.datapath
            results["mkfs_default"] = mkfs_default_meaning()
        if "fscrypt" in args.phases:
            results["fscrypt"] = fscrypt_phase(
                driver, baseline_root / "bind", args.size, args.cycles, args.warmup
            )
        if "concurrency" in args.phases:
            results["concurrency"] = concurrency_phase(
                driver, args.concurrency, args.size, args.concurrency_repeats
            )
        if "memory" in args.phases:
            results["memory"] = memory_phase(driver, args.volumes, args.volume_size, idle)
        if "integrity" in args.phases:
            results["integrity"] = integrity_phase(
                driver,
                args.integrity_small,
                args.integrity_large,
                args.integrity_cycles,
                args.warmup,
            )
            results["integrity"]["measured"] = measured(results)
        if "shred" in args.phases:
            results["shred"] = shred_phase(
                driver,
                args.shred_volumes,
                args.shred_size,
                args.shred_cycles,
                args.shred_baseline,
                args.warmup,
            )
            results["shred"]["measured"] = measured(results)
    except Exception as exc:
        status = 1
        results["error"] = f"{type(exc).__name__}: {exc}"
        say(f"FAILED: {exc}")
        traceback.print_exc()
        if driver is not None:
            print(f"--- driver log tail ---\n{driver.log_tail()}", flush=True)
    finally:
        if driver is not None:
            driver.stop()
        try:
            if data is not None:
                sweep(base, data.mountpoint, run_dir / "state", run_dir / "qsd" / "qmp.sock")
        finally:
            if qsd is not None:  # after the NBD devices are gone, before the data fs goes
                qsd.stop()
            if data is not None:
                data.close()
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    if args.merge and status == 0:
        results = merged(args.out, results, args.phases)
    results["summary"] = summarise(results)
    results["notes"] = notes(results)
    text = json.dumps(results, indent=2) + "\n"
    if status != 0:
        # a failed run never replaces the results of a good one: print them instead
        print(f"--- results of the failed run ({args.out} left as it was) ---\n{text}", flush=True)
        return status
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(args.out)
    say(f"wrote {args.out}")
    print(json.dumps(results["summary"], indent=2), flush=True)
    return status
