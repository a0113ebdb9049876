"""The integrity phase: integrity=hmac-sha256 filesystem volumes of two sizes (and one
without integrity, for reference), round-robin, each publish with its own step times."""

from __future__ import annotations

from typing import Any

from bench.common import ratio, say
from bench.flows import Ours, flow_stats, round_robin, step_means
from bench.processes import BenchDriver


def integrity_flows(driver: BenchDriver, small: str, large: str) -> list[Ours]:
    def flow(name: str, size: str, integrity: str | None) -> Ours:
        return Ours(driver, size, name, integrity, own_steps=True, retry_busy=True)

    return [
        flow("integrity_small", small, "hmac-sha256"),
        flow("integrity_large", large, "hmac-sha256"),
        flow("plain_small", small, None),  # None: a volume without integrity, for reference
    ]


def integrity_phase(
    driver: BenchDriver, small: str, large: str, cycles: int, warmup: int
) -> dict[str, Any]:
    """Publish + unpublish of each flow, rotated by one flow each round; each publish's own
    step times come from scraping the driver's step metric around it (publishes run one at a
    time); a busy unpublish is retried, as kubelet does."""
    flows = integrity_flows(driver, small, large)
    samples, errors = round_robin("integrity", flows, cycles, warmup)
    result: dict[str, Any] = {
        "order": "round-robin, rotated by one flow each round",
        "cycles": cycles,
        "warmup": warmup,
        "fs_type": "ext4",
        "flows": {},
    }
    for flow in flows:
        result["flows"][flow.name] = {
            "size": flow.size,
            "integrity": flow.integrity or "none",
            "stats": flow_stats(samples[flow.name]),
            "step_means_s": step_means(samples[flow.name]),
            "errors": errors[flow.name],
            "unpublish_busy_retries": flow.busy_retries,
            "samples": [s.to_json() for s in samples[flow.name]],
        }

    def p50(name: str) -> float | None:
        v = result["flows"][name]["stats"].get("publish_p50_s")
        return float(v) if v is not None else None

    result["large_vs_small_p50"] = ratio(p50("integrity_large"), p50("integrity_small"))
    result["integrity_vs_plain_small_p50"] = ratio(p50("integrity_small"), p50("plain_small"))
    result["errors"] = sum(len(e) for e in errors.values())
    say(
        f"integrity: publish p50 {small} {p50('integrity_small')} s, {large} "
        f"{p50('integrity_large')} s ({result['large_vs_small_p50']}x), without integrity "
        f"{small} {p50('plain_small')} s"
    )
    return result
