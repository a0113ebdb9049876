"""The shred phase: the emergency shred of N live volumes against the unpublish of one.

shred        N (50) inline loop volumes of --shred-size (64 MiB) published through the driver's
             socket (8 at a time), every one live: mounted, with a file held open and written.
             One writer process holds the N files open and writes round-robin: 4 KiB then
             fsync on each file in turn, then 100 ms of sleep, again, until every file has
             failed. A few seconds in, ``shred --all`` goes to the driver's admin socket
             (csi.admin.call, what ``luks-ephemeral-csi shred --all`` sends). The figure is the
             report's ``seconds`` (trigger to last key gone, timed inside the driver); the wall
             time of the call is kept too. The report must say complete with every volume
             ``wiped``, the node sealed, and no mapping of ours may still have a crypt table
             (``dmsetup table``): else the phase fails, and so the run (a benchmark of a failed
             shred is no figure). Then the writer (whose writes fail now) is stopped, the N
             volumes are unpublished (8 at a time, each must succeed) and the node is unsealed.
unpublish_1  the baseline: NodeUnpublishVolume of one live, mounted volume of the same size
             (published, a file written and fsynced, untimed; then the unpublish, timed).

Each round has one shred cycle and --shred-baseline unpublish_1 cycles, the order of the two
rotated by one each round (as bench.flows.round_robin does), after --warmup unrecorded
unpublish_1 cycles. The ratio compares the p50 of the shred's own seconds with the p50 unpublish.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from bench.common import HOST, BenchError, percentile, r4, ratio, say, sh
from bench.flows import Ours, Publish, Timer, flow_stats
from bench.phases import run_all
from bench.processes import BenchDriver
from csi import admin
from csi.tools.kubelet import Kubelet

PARALLEL = 8  # publishes and unpublishes in flight at once, as the memory phase does
WRITE_BYTES = 4096
WRITER_PAUSE = 0.1  # seconds of sleep after each round-robin pass over all files
LIVE_SECONDS = 3.0  # the writer runs this long before the shred
WRITER_EXIT_WAIT = 60.0  # after the shred: how long the writer gets to see every file fail
SHRED_TIMEOUT = 900.0
LOG_LINES = 400  # of the driver's log during each shred call, kept in the results
LIVE = (
    "one writer process holding every volume's file open, writing round-robin: 4 KiB then "
    f"fsync per file, then {WRITER_PAUSE:g} s of sleep per pass; it had done at least one pass "
    f"and ran {LIVE_SECONDS:g} s before the shred"
)

# The writer: argv = pause, bytes per write, then the files. Prints "ready" after its first
# pass, and on exit (every file failed, or SIGTERM) one JSON line: writes and errno per file,
# passes, seconds.
WRITER = r"""
import json, os, signal, sys, time
pause, size = float(sys.argv[1]), int(sys.argv[2])
fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
       for p in sys.argv[3:]]
block = os.urandom(size)
writes = [0] * len(fds)
errnos = [None] * len(fds)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
start = time.monotonic()
passes = 0
while not stop and any(e is None for e in errnos):
    for i, fd in enumerate(fds):
        if errnos[i] is None:
            try:
                os.write(fd, block)
                os.fsync(fd)
                writes[i] += 1
            except OSError as exc:
                errnos[i] = exc.errno
    passes += 1
    if passes == 1:
        print("ready", flush=True)
    time.sleep(pause)
print(json.dumps({"writes": writes, "errnos": errnos, "passes": passes,
                  "seconds": time.monotonic() - start}), flush=True)
"""


class Writer:
    """The live load: one process writing to every volume's file (see WRITER)."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(WRITER_PAUSE), str(WRITE_BYTES), *paths],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.finish(0.0)
            raise BenchError(f"the writer did not start (said {line!r}, exit {self.proc.poll()})")

    def finish(self, wait: float) -> dict[str, Any]:
        """Its summary once it exits by itself (within ``wait`` s), else after SIGTERM."""
        stopped = False
        try:
            out, _ = self.proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            stopped = True
            self.proc.terminate()
            try:
                out, _ = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
        lines = [x for x in (out or "").splitlines() if x.startswith("{")]
        summary: dict[str, Any] = json.loads(lines[-1]) if lines else {}
        summary["stopped_by_bench"] = stopped
        summary["exit"] = self.proc.returncode
        return summary


class UnpublishOne(Ours):
    """The baseline: one live volume of the shredded ones' shape, unpublished on its own. A
    file is written and fsynced on it before the (timed) unpublish, outside the timing."""

    def inspect(self, ctx: Publish) -> None:
        path = os.path.join(self.driver.k.target(ctx.pod, "scratch"), "live")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, os.urandom(WRITE_BYTES) * 4)
            os.fsync(fd)
        finally:
            os.close(fd)


def shred_problems(
    answer: Mapping[str, Any], volume_ids: Sequence[str], mappings: Sequence[str],
    tables: Mapping[str, Sequence[str]],
) -> list[str]:  # fmt: skip
    """What makes a measured shred no figure: an error, an incomplete or unsealed report, a
    volume of ours not ``wiped``, a mapping of ours still with a crypt table."""
    if "error" in answer:
        return [f"the shred answered {answer['error']}: {answer.get('message', '')}"]
    report = answer.get("report")
    if not isinstance(report, Mapping):
        return [f"the shred gave no report: {sorted(answer)}"]
    problems = []
    if not report.get("complete"):
        problems.append(f"report not complete: {report.get('summary')}")
    if not report.get("sealed"):
        problems.append("the node is not sealed after the shred")
    outcomes = {v.get("volume_id"): v for v in report.get("volumes", [])}
    for vid in volume_ids:
        v = outcomes.get(vid)
        if v is None:
            problems.append(f"{vid}: not in the report")
        elif v.get("outcome") != "wiped":
            problems.append(f"{vid}: {v.get('outcome')} ({v.get('detail')})")
    for vid, v in outcomes.items():
        if vid not in volume_ids and v.get("outcome") not in ("wiped", "no_key"):
            problems.append(f"{vid} (not ours): {v.get('outcome')} ({v.get('detail')})")
    for mapping in mappings:
        if "crypt" in tables.get(mapping, []):
            problems.append(f"{mapping} still has a crypt table")
    return problems


def parse_tables(out: str) -> dict[str, list[str]]:
    """``dmsetup table`` of every device -> name -> target types, in table order."""
    tables: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, sep, rest = line.partition(": ")
        fields = rest.split()
        if sep and len(fields) >= 3:
            tables.setdefault(name, []).append(fields[2])
    return tables


def count_targets(mappings: Sequence[str], tables: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Target types of our mappings' tables (``gone`` for a mapping no longer there)."""
    out: dict[str, int] = {}
    for mapping in mappings:
        for target in tables.get(mapping, ["gone"]):
            out[target] = out.get(target, 0) + 1
    return out


def errno_counts(errnos: Sequence[int | None]) -> dict[str, int]:
    """How many files failed with each errno, by name (EIO, EROFS, ...)."""
    out: dict[str, int] = {}
    for e in errnos:
        if e is not None:
            name = errno.errorcode.get(e, str(e))
            out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))


def log_lines(driver: BenchDriver, offset: int, limit: int = LOG_LINES) -> list[str]:
    """What the driver logged from ``offset`` on (during the shred call): at most ``limit``
    lines, each cut to 400 characters (the shred's own line lists every volume)."""
    with driver.log_path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    cut = [x if len(x) <= 400 else x[:400] + " ..." for x in lines]
    return cut if len(cut) <= limit else [*cut[: limit // 2], "...", *cut[-limit // 2 :]]


def unseal(driver: BenchDriver) -> dict[str, Any]:
    return admin.call(str(driver.state_dir), {"command": "unseal"})


def shred_cycle(driver: BenchDriver, n: int, size: str, index: int) -> dict[str, Any]:
    """Publish ``n`` volumes, make them live, shred them all, clean up, unseal; raises
    BenchError (after the clean-up) if the shred or the clean-up failed."""
    pods = [str(uuid.uuid4()) for _ in range(n)]
    volume_ids = [Kubelet.volume_id(pod, "scratch") for pod in pods]
    mappings = [driver.names(pod).mapping for pod in pods]
    down = Ours(driver, size, "shredded", retry_busy=True)
    cycle: dict[str, Any] = {"cycle": index, "volumes": n}
    problems: list[str] = []
    writer: Writer | None = None
    say(f"shred: cycle {index}: publishing {n} volumes of {size} ({PARALLEL} at a time)")
    wall, lat, errs = run_all(pods, lambda p: driver.publish(p, size), True, PARALLEL)
    cycle["publish_wall_s"] = r4(wall)
    cycle["publish_p50_s"] = r4(percentile(lat, 0.5) or 0.0)
    try:
        if errs:
            raise BenchError(f"{len(errs)} of {n} publishes failed, first: {errs[0]}")
        writer = Writer([os.path.join(driver.k.target(p, "scratch"), "live") for p in pods])
        time.sleep(LIVE_SECONDS)
        say(f"shred: cycle {index}: {n} volumes live; shred --all through the admin socket")
        log_from = driver.log_path.stat().st_size
        start = time.perf_counter()
        answer = admin.call(str(driver.state_dir), {"command": "shred", "volume": None},
                            timeout=SHRED_TIMEOUT)  # fmt: skip
        cycle["call_wall_s"] = r4(time.perf_counter() - start)
        tables = parse_tables(sh(["dmsetup", "table"]))  # dmsetup's word, not the driver's
        cycle["driver_log"] = log_lines(driver, log_from)
        problems = shred_problems(answer, volume_ids, mappings, tables)
        report = answer.get("report") or {}
        cycle["seconds"] = report.get("seconds")
        cycle["complete"] = report.get("complete")
        cycle["summary"] = report.get("summary")
        cycle["outcomes"] = {}
        for v in report.get("volumes", []):
            cycle["outcomes"][v.get("outcome")] = cycle["outcomes"].get(v.get("outcome"), 0) + 1
        cycle["targets_after"] = count_targets(mappings, tables)
        load = writer.finish(WRITER_EXIT_WAIT)
        writer = None
        errnos = load.get("errnos") or []
        cycle["writer"] = {
            "passes": load.get("passes"),
            "seconds": r4(load.get("seconds") or 0.0),
            "writes": sum(load.get("writes") or []),
            "files_failed": sum(e is not None for e in errnos),
            "errnos": errno_counts(errnos),
            "stopped_by_bench": load["stopped_by_bench"],
        }
        say(
            f"shred: cycle {index}: {cycle['seconds']} s in the driver, call wall "
            f"{cycle['call_wall_s']} s; {cycle['summary']}; writer: "
            f"{cycle['writer']['files_failed']}/{n} files failed"
        )
    finally:
        if writer is not None:
            writer.finish(0.0)
        uwall, ulat, uerrs = run_all(pods, lambda p: down.down(Publish(p), Timer()), True,
                                     PARALLEL)  # fmt: skip
        cycle["unpublish_wall_s"] = r4(uwall)
        cycle["unpublish_p50_s"] = r4(percentile(ulat, 0.5) or 0.0)
        cycle["unpublish_busy_retries"] = down.busy_retries
        cycle["unpublish_errors"] = uerrs
        left = [m for m in mappings if HOST.crypt_exists(m)]
        try:
            cycle["unsealed"] = unseal(driver).get("unsealed")
        except admin.AdminUnavailable as exc:
            cycle["unsealed"] = f"failed: {exc}"
    if uerrs:
        problems.append(f"{len(uerrs)} of {n} unpublishes after the shred failed: {uerrs[0]}")
    if left:
        problems.append(f"{len(left)} mappings left after the unpublishes, e.g. {left[0]}")
    if cycle["unsealed"] is not True:
        problems.append(f"unseal after the shred: {cycle['unsealed']}")
    if problems:
        raise BenchError(f"shred cycle {index}: " + "; ".join(problems[:10]))
    return cycle


def shred_phase(
    driver: BenchDriver, n: int, size: str, cycles: int, baseline: int, warmup: int
) -> dict[str, Any]:
    """``cycles`` rounds of one shred cycle and ``baseline`` unpublish_1 cycles, their order
    rotated each round; ratio of the p50 shred seconds to the p50 unpublish of one."""
    status = admin.call(str(driver.state_dir), {"command": "status"})
    if status.get("sealed"):
        raise BenchError(f"the node is sealed before the shred phase: {status.get('seal')}")
    one = UnpublishOne(driver, size, "unpublish_1", retry_busy=True)
    for w in range(warmup):
        say(f"shred: warm-up unpublish_1 cycle {w + 1}/{warmup}")
        one.cycle(-1 - w)
    samples = []
    errors: list[str] = []
    runs: list[dict[str, Any]] = []
    order: list[str] = []
    blocks = ("unpublish_1", "shred")
    for i in range(cycles):
        for block in (*blocks[i % 2 :], *blocks[: i % 2]):
            order.append(block)
            if block == "shred":
                runs.append(shred_cycle(driver, n, size, i))
                continue
            for k in range(baseline):
                try:
                    samples.append(one.cycle(i * baseline + k))
                except Exception as exc:
                    errors.append(f"cycle {i}.{k}: {exc}")
                    say(f"shred: unpublish_1 cycle {i}.{k} failed: {exc}")
            say(f"shred: round {i + 1}/{cycles}: unpublish_1 "
                + ", ".join(f"{s.unpublish:.2f}" for s in samples[-baseline:]) + " s")  # fmt: skip
    seconds = [float(r["seconds"]) for r in runs]
    walls = [float(r["call_wall_s"]) for r in runs]
    stats = flow_stats(samples)
    shred_p50 = percentile(seconds, 0.5)
    wall_p50 = percentile(walls, 0.5)
    unpublish_p50 = stats.get("unpublish_p50_s")
    result: dict[str, Any] = {
        "volumes": n,
        "size": size,
        "cycles": cycles,
        "baseline_per_round": baseline,
        "warmup": warmup,
        "order": order,
        "live": LIVE,
        "shred_seconds": seconds,
        "shred_call_walls_s": walls,
        "shred_p50_s": None if shred_p50 is None else r4(shred_p50),
        "shred_call_wall_p50_s": None if wall_p50 is None else r4(wall_p50),
        "unpublish_1": {
            "stats": stats,
            "errors": errors,
            "unpublish_busy_retries": one.busy_retries,
            "samples": [s.to_json() for s in samples],
        },
        "runs": runs,
        "shred_vs_unpublish_1_p50": ratio(shred_p50, unpublish_p50),
        "shred_wall_vs_unpublish_1_p50": ratio(wall_p50, unpublish_p50),
        "errors": len(errors),
    }
    say(
        f"shred: {n} live volumes shredded in {result['shred_p50_s']} s (p50 of {cycles}; call "
        f"wall {result['shred_call_wall_p50_s']} s), unpublish of one {unpublish_p50} s (p50 of "
        f"{len(samples)}): {result['shred_vs_unpublish_1_p50']}x"
    )
    return result
