"""The latency, concurrency and memory phases (footprint and integrity have modules of their
own)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.common import mib, r4, ratio, say
from bench.flows import Flow, flow_stats, round_robin, step_means
from bench.processes import BenchDriver


def latency_phase(
    driver: BenchDriver, flows: Sequence[Flow[Any]], cycles: int, warmup: int
) -> dict[str, Any]:
    """Every flow round-robin; the driver's step times are its step metric over the recorded
    rounds (the warm-up rounds come before the first scrape)."""
    round_robin("latency", flows, 0, warmup)
    before = driver.scrape_steps()
    samples, errors = round_robin("latency", flows, cycles, 0)
    after = driver.scrape_steps()
    ours_steps: dict[str, float] = {}
    for step, (total, count) in after.items():
        t0, c0 = before.get(step, (0.0, 0.0))
        if count - c0 > 0:
            ours_steps[step] = r4((total - t0) / (count - c0))
    result: dict[str, Any] = {"order": "round-robin, rotated by one flow each round", "flows": {}}
    for flow in flows:
        result["flows"][flow.name] = {
            "stats": flow_stats(samples[flow.name]),
            "step_means_s": ours_steps if flow.name == "ours" else step_means(samples[flow.name]),
            "errors": errors[flow.name],
            "samples": [s.to_json() for s in samples[flow.name]],
        }
    return result


def run_all(
    pods: list[str], action: Callable[[str], None], parallel: bool, workers: int | None = None
) -> tuple[float, list[float], list[str]]:
    """``action`` on every pod, in threads (``workers`` at a time, all at once by default) or
    one after another: wall time, each call's latency, and the errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(pod: str) -> None:
        try:
            start = time.perf_counter()
            action(pod)
            t = time.perf_counter() - start
            with lock:
                latencies.append(t)
        except Exception as exc:
            with lock:
                errors.append(f"{pod}: {exc}")

    start = time.perf_counter()
    if parallel:
        with ThreadPoolExecutor(max_workers=workers or len(pods)) as pool:
            list(pool.map(one, pods))
    else:
        for pod in pods:
            one(pod)
    return time.perf_counter() - start, latencies, errors


def concurrency_phase(driver: BenchDriver, n: int, size: str, repeats: int) -> dict[str, Any]:
    # ABBA order (sequential, concurrent, concurrent, sequential, ...): on a shared, noisy
    # host, drift in the background load then hits both modes alike.
    order = [
        m
        for r in range(repeats)
        for m in (("sequential", "concurrent") if r % 2 == 0 else ("concurrent", "sequential"))
    ]
    runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
    for k, mode in enumerate(order):
        pods = [str(uuid.uuid4()) for _ in range(n)]
        parallel = mode == "concurrent"
        say(f"concurrency: {n} publishes, {mode} ({k + 1}/{len(order)})")
        wall, lat, errs = run_all(pods, lambda p: driver.publish(p, size), parallel)
        say(f"concurrency: {mode} publish wall {wall:.1f} s, {len(errs)} errors")
        uwall, ulat, uerrs = run_all(pods, driver.unpublish, parallel)
        runs[mode].append(
            {
                "publish_wall_s": r4(wall),
                "publish_latencies_s": [r4(x) for x in sorted(lat)],
                "unpublish_wall_s": r4(uwall),
                "unpublish_latencies_s": [r4(x) for x in sorted(ulat)],
                "errors": errs + uerrs,
            }
        )
    result: dict[str, Any] = {"volumes": n, "size": size, "repeats": repeats, "order": order}
    for mode, mode_runs in runs.items():
        result[mode] = {
            "publish_wall_s": r4(sum(x["publish_wall_s"] for x in mode_runs) / len(mode_runs)),
            "unpublish_wall_s": r4(sum(x["unpublish_wall_s"] for x in mode_runs) / len(mode_runs)),
            "publish_walls_s": [x["publish_wall_s"] for x in mode_runs],
            "errors": [e for x in mode_runs for e in x["errors"]],
            "runs": mode_runs,
        }
    seq, conc = result["sequential"], result["concurrent"]
    # ratio of mean walls (= ratio of summed walls: both modes ran equally often)
    result["speedup"] = ratio(seq["publish_wall_s"], conc["publish_wall_s"])
    result["speedup_per_repeat"] = [
        ratio(a["publish_wall_s"], b["publish_wall_s"])
        for a, b in zip(runs["sequential"], runs["concurrent"], strict=True)
    ]
    result["unpublish_speedup"] = ratio(seq["unpublish_wall_s"], conc["unpublish_wall_s"])
    result["errors"] = len(seq["errors"]) + len(conc["errors"])
    return result


def memory_phase(driver: BenchDriver, n: int, size: str, idle: dict[str, int]) -> dict[str, Any]:
    before = driver.rss()
    pods = [str(uuid.uuid4()) for _ in range(n)]
    errors: list[str] = []

    def publish(pod: str) -> None:
        try:
            driver.publish(pod, size)
        except Exception as exc:
            errors.append(f"{pod}: {exc}")

    def unpublish(pod: str) -> None:
        with contextlib.suppress(Exception):
            driver.unpublish(pod)

    say(f"memory: publishing {n} volumes of {size} (8 at a time)")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(publish, pods))
    time.sleep(2)
    loaded = driver.rss()
    published = len(list((driver.state_dir / "volumes").glob("*.json")))
    say(f"memory: {published} volumes published, driver VmRSS {mib(loaded.get('VmRSS', 0))} MiB")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(unpublish, pods))
    after = driver.rss()
    return {
        "volumes": n,
        "volume_size": size,
        "volumes_published": published,
        "errors": errors,
        "idle": idle,
        "before_phase": before,
        "with_volumes": loaded,
        "after_unpublish": after,
        "rss_idle_mib": mib(idle.get("VmRSS", 0)),
        "rss_with_volumes_mib": mib(loaded.get("VmRSS", 0)),
        "note": f"{size} volumes to save time: the driver's memory does not depend on size",
    }
