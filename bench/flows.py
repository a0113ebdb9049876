"""One timed publish + unpublish cycle, the same code for the driver and every baseline, and
the interleaved (round-robin) runs of several flows with their statistics."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from bench.common import allocated, mib, percentile, r4, say
from bench.processes import BenchDriver

C = TypeVar("C")
UNPUBLISH_TRIES = 30  # a FAILED_PRECONDITION (busy) unpublish is retried, as kubelet does


@dataclass
class Sample:
    publish: float
    unpublish: float
    alloc_bytes: int
    steps: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "publish_s": r4(self.publish),
            "unpublish_s": r4(self.unpublish),
            "cycle_s": r4(self.publish + self.unpublish),
            "alloc_bytes": self.alloc_bytes,
            "steps_s": {k: r4(v) for k, v in self.steps.items()},
        }


class Timer:
    """Seconds per lifecycle step (the driver's step metric labels) of one cycle."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - start


class Flow(Generic[C]):
    """A way to publish and unpublish one volume. ``cycle`` times it the same way for every
    flow: publish, then (untimed) the allocation and ``inspect``, then unpublish."""

    name = ""

    def prepare(self, i: int) -> C:
        raise NotImplementedError

    def up(self, ctx: C, timer: Timer) -> None:
        raise NotImplementedError

    def down(self, ctx: C, timer: Timer) -> None:
        raise NotImplementedError

    def backing(self, ctx: C) -> str:
        raise NotImplementedError

    def inspect(self, ctx: C) -> None:
        """Look at the published volume (not timed)."""

    def cleanup(self, ctx: C) -> None:
        """After a failure: remove whatever the cycle made."""

    def steps(self, ctx: C, timer: Timer) -> dict[str, float]:
        return timer.steps

    def cycle(self, i: int) -> Sample:
        ctx = self.prepare(i)
        timer = Timer()
        try:
            start = time.perf_counter()
            self.up(ctx, timer)
            published = time.perf_counter()
            alloc = allocated(self.backing(ctx))
            self.inspect(ctx)
            unstart = time.perf_counter()
            self.down(ctx, timer)
            done = time.perf_counter()
        except BaseException:
            self.cleanup(ctx)
            raise
        return Sample(published - start, done - unstart, alloc, self.steps(ctx, timer))


@dataclass
class Publish:
    pod: str
    before: dict[str, tuple[float, float]] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class Ours(Flow[Publish]):
    """The driver, through its socket, as kubelet calls it. ``own_steps``: each publish's step
    times from scraping the step metric around it (publishes then run one at a time);
    ``retry_busy``: a busy unpublish is retried, as kubelet does, and counted."""

    driver: BenchDriver
    size: str
    name: str = "ours"
    integrity: str | None = None
    own_steps: bool = False
    retry_busy: bool = False
    busy_retries: int = field(default=0, init=False)

    def prepare(self, i: int) -> Publish:
        ctx = Publish(str(uuid.uuid4()))
        if self.own_steps:
            ctx.before = self.driver.scrape_steps()
        return ctx

    def up(self, ctx: Publish, timer: Timer) -> None:
        self.driver.publish(ctx.pod, self.size, integrity=self.integrity)

    def backing(self, ctx: Publish) -> str:
        return self.driver.names(ctx.pod).backing

    def inspect(self, ctx: Publish) -> None:
        if self.own_steps:
            ctx.steps = step_delta(ctx.before, self.driver.scrape_steps())

    def down(self, ctx: Publish, timer: Timer) -> None:
        """A busy mapping (udev's blkid still probing it, say) is retried if ``retry_busy``."""
        for attempt in range(UNPUBLISH_TRIES if self.retry_busy else 1):
            try:
                self.driver.unpublish(ctx.pod)
                return
            except grpc.RpcError as exc:
                busy = exc.code() == grpc.StatusCode.FAILED_PRECONDITION
                if not (busy and self.retry_busy) or attempt == UNPUBLISH_TRIES - 1:
                    raise
                self.busy_retries += 1
                time.sleep(1.0)

    def cleanup(self, ctx: Publish) -> None:
        with contextlib.suppress(Exception):
            self.down(ctx, Timer())

    def steps(self, ctx: Publish, timer: Timer) -> dict[str, float]:
        return ctx.steps


def round_robin(
    label: str, flows: Sequence[Flow[Any]], cycles: int, warmup: int
) -> tuple[dict[str, list[Sample]], dict[str, list[str]]]:
    """``warmup`` unrecorded rounds, then ``cycles`` rounds of one cycle per flow, the order
    rotated by one flow each round; a failed cycle is an error of its flow, not of the run."""
    samples: dict[str, list[Sample]] = {f.name: [] for f in flows}
    errors: dict[str, list[str]] = {f.name: [] for f in flows}
    for w in range(warmup):
        say(f"{label}: warm-up round {w + 1}/{warmup}")
        for flow in flows:
            flow.cycle(-1 - w)
    for i in range(cycles):
        rotated = [*flows[i % len(flows) :], *flows[: i % len(flows)]]
        for flow in rotated:
            try:
                samples[flow.name].append(flow.cycle(i))
            except Exception as exc:
                errors[flow.name].append(f"cycle {i}: {exc}")
                say(f"{label}: {flow.name} cycle {i} failed: {exc}")
        line = ", ".join(
            f"{f.name} {samples[f.name][-1].publish:.2f}+{samples[f.name][-1].unpublish:.2f}s"
            for f in flows
            if samples[f.name]
        )
        say(f"{label}: round {i + 1}/{cycles}: {line}")
    return samples, errors


def flow_stats(samples: list[Sample]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(samples)}
    series: dict[str, list[float]] = {
        "publish": [s.publish for s in samples],
        "unpublish": [s.unpublish for s in samples],
        "cycle": [s.publish + s.unpublish for s in samples],
    }
    for what, values in series.items():
        for name, q in (("p50", 0.5), ("p95", 0.95)):
            v = percentile(values, q)
            out[f"{what}_{name}_s"] = None if v is None else r4(v)
        out[f"{what}_mean_s"] = r4(sum(values) / len(values)) if values else None
    allocs = [float(s.alloc_bytes) for s in samples]
    p = percentile(allocs, 0.5)
    out["alloc_p50_mib"] = None if p is None else mib(p)
    return out


def step_means(samples: list[Sample]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for s in samples:
        for step, seconds in s.steps.items():
            totals.setdefault(step, []).append(seconds)
    return {step: r4(sum(v) / len(v)) for step, v in totals.items()}


def step_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Seconds per step between two scrapes of luks_ephemeral_step_seconds (summed)."""
    out = {}
    for step, (total, count) in after.items():
        t0, c0 = before.get(step, (0.0, 0.0))
        if count > c0:
            out[step] = total - t0
    return out
