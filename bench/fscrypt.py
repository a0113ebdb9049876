"""The fscrypt phase: backing=fscrypt publish and unpublish through the driver, against the
cheapest a directory volume can cost, and against the driver's own loop-LUKS publish.

fscrypt     the driver via its socket, ``backing=fscrypt`` (directory, project quota, key,
            policy, bind);
bind_floor  run by the bench itself: ``mkdir`` of a plain directory, then the driver's own bind
            commands for a writable volume (``mount --bind``, ``mount -o
            remount,bind,rw,nosuid,nodev``, from csi.host.commands) onto a fresh mount point;
            back: ``umount``, ``rmdir`` of both;
bind_floor_syscalls  the same, with the mount(2)/umount2(2) calls the driver itself makes
            (csi.host.mountcalls) instead of mount(8)/umount(8): the floor without a process;
luks        the driver via its socket, a default (loop, LUKS2) inline volume of the same size.

The three are interleaved round-robin (bench.flows.round_robin, the order rotated by one flow
each round); each driver publish and unpublish gets its own step times (the step metric
scraped around it, outside the timed calls).
Before the recorded rounds one fscrypt cycle runs on its own: the first fscrypt volume makes
and mounts the driver's pool when the data dir cannot hold such volumes itself, and a node
that cannot make them at all is reported, not failed.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.baselines import DRIVER_MOUNT_OPTIONS
from bench.common import HOST, ratio, say, sh, sh_quiet
from bench.flows import (
    Flow,
    Ours,
    Publish,
    Timer,
    flow_stats,
    round_robin,
    step_delta,
    step_means,
)
from bench.processes import BenchDriver
from csi.host import commands, mountcalls

BACKING = "fscrypt"
POOL_DIR = "fscrypt"  # the driver's: <data dir>/fscrypt/<digest> (csi.backings.fscrypt)
POOL_IMAGE = "fscrypt.pool"


@dataclass
class BindDir:
    """What one floor cycle creates: a plain directory and the mount point it is bound on."""

    source: str
    target: str


class BindFloor(Flow[BindDir]):
    """mkdir + bind + remount (nosuid,nodev) of a plain directory, and back: the floor under
    any directory-backed volume (no key, no policy, no quota, no journal, no gRPC)."""

    name = "bind_floor"

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "src").mkdir(parents=True, exist_ok=True)
        (root / "mnt").mkdir(parents=True, exist_ok=True)

    def prepare(self, i: int) -> BindDir:
        tag = f"bench-bind-{i}-{uuid.uuid4().hex[:8]}"
        return BindDir(str(self.root / "src" / tag), str(self.root / "mnt" / tag))

    def up(self, ctx: BindDir, timer: Timer) -> None:
        with timer.step("make_dir"):
            os.mkdir(ctx.source, 0o700)
        with timer.step("mount"):
            os.mkdir(ctx.target, 0o750)
            sh(commands.bind_mount(ctx.source, ctx.target))
            sh(commands.bind_remount(ctx.target, DRIVER_MOUNT_OPTIONS))

    def down(self, ctx: BindDir, timer: Timer) -> None:
        with timer.step("unmount"):
            sh(commands.umount(ctx.target))
            os.rmdir(ctx.target)
        with timer.step("delete"):
            os.rmdir(ctx.source)

    def backing(self, ctx: BindDir) -> str:
        return ctx.source

    def cleanup(self, ctx: BindDir) -> None:
        if HOST.is_mountpoint(ctx.target):
            sh_quiet(commands.umount(ctx.target))
        for path in (ctx.target, ctx.source):
            with contextlib.suppress(OSError):
                os.rmdir(path)


class BindFloorSyscalls(BindFloor):
    """The floor with the driver's own syscalls: what a directory volume costs without any
    process, key, policy, quota, journal or gRPC."""

    name = "bind_floor_syscalls"

    def up(self, ctx: BindDir, timer: Timer) -> None:
        with timer.step("make_dir"):
            os.mkdir(ctx.source, 0o700)
        with timer.step("mount"):
            os.mkdir(ctx.target, 0o750)
            mountcalls.bind(ctx.source, ctx.target)
            mountcalls.remount_bind(ctx.target, DRIVER_MOUNT_OPTIONS)

    def down(self, ctx: BindDir, timer: Timer) -> None:
        with timer.step("unmount"):
            mountcalls.unmount(ctx.target)
            os.rmdir(ctx.target)
        with timer.step("delete"):
            os.rmdir(ctx.source)


def floor_script() -> list[list[str]]:
    """The floor's commands with placeholders, for the results file."""
    return [
        ["mkdir", "{source}"],
        ["mkdir", "{target}"],
        commands.bind_mount("{source}", "{target}"),
        commands.bind_remount("{target}", DRIVER_MOUNT_OPTIONS),
        commands.umount("{target}"),
        ["rmdir", "{target}"],
        ["rmdir", "{source}"],
    ]


class OursBothWays(Ours):
    """Ours with each cycle's own step times for the unpublish too: the step metric is scraped
    again once the publish is timed (in ``inspect``) and once the unpublish is (in ``steps``),
    both outside the timed calls."""

    def __init__(self, driver: BenchDriver, size: str, name: str) -> None:
        super().__init__(driver, size, name, own_steps=True, retry_busy=True)

    def inspect(self, ctx: Publish) -> None:
        published = self.driver.scrape_steps()
        ctx.steps = step_delta(ctx.before, published)
        ctx.before = published

    def steps(self, ctx: Publish, timer: Timer) -> dict[str, float]:
        return {**ctx.steps, **step_delta(ctx.before, self.driver.scrape_steps())}


class FscryptOurs(OursBothWays):
    """The driver's publish of a ``backing=fscrypt`` inline volume (Ours with that attribute);
    its allocation is what the volume's directory holds."""

    def up(self, ctx: Publish, timer: Timer) -> None:
        self.driver.publish(ctx.pod, self.size, backing=BACKING)

    def backing(self, ctx: Publish) -> str:
        return str(self.driver.data_dir / POOL_DIR / self.driver.names(ctx.pod).digest)


def pool_state(driver: BenchDriver) -> dict[str, Any]:
    """Where the driver keeps fscrypt volumes: its own pool (image, mounted) or the data dir."""
    image = driver.data_dir / POOL_IMAGE
    root = driver.data_dir / POOL_DIR
    own = image.exists()
    return {
        "root": str(root),
        "own_pool": own,
        "pool_mounted": HOST.is_mountpoint(str(root)),
        "pool_apparent_bytes": image.stat().st_size if own else None,
        "pool_allocated_bytes": HOST.allocated_bytes(str(image)) if own else None,
    }


def fscrypt_phase(
    driver: BenchDriver, root: Path, size: str, cycles: int, warmup: int
) -> dict[str, Any]:
    """fscrypt, the bind floor and loop-LUKS, round-robin; ratios of their p50 publishes."""
    fscrypt = FscryptOurs(driver, size, "fscrypt")
    result: dict[str, Any] = {
        "order": "round-robin, rotated by one flow each round",
        "cycles": cycles,
        "warmup": warmup,
        "size": size,
        "floor_script": floor_script(),
        "flows": {},
    }
    say(f"fscrypt: a first {size} backing=fscrypt volume (the pool is made if need be)")
    try:
        first = fscrypt.cycle(-1000)
    except grpc.RpcError as exc:
        result["unavailable"] = f"{exc.code().name}: {exc.details()}"
        say(f"fscrypt: not measured: {result['unavailable']}")
        return result
    result["first_cycle"] = first.to_json()
    result["pool"] = pool_state(driver)
    flows: list[Flow[Any]] = [
        fscrypt,
        BindFloor(root),
        BindFloorSyscalls(root),
        OursBothWays(driver, size, "luks"),
    ]
    samples, errors = round_robin("fscrypt", flows, cycles, warmup)
    for flow in flows:
        result["flows"][flow.name] = {
            "stats": flow_stats(samples[flow.name]),
            "step_means_s": step_means(samples[flow.name]),
            "errors": errors[flow.name],
            "samples": [s.to_json() for s in samples[flow.name]],
        }
        if isinstance(flow, Ours):
            result["flows"][flow.name]["unpublish_busy_retries"] = flow.busy_retries

    def p50(name: str, what: str = "publish") -> float | None:
        v = result["flows"][name]["stats"].get(f"{what}_p50_s")
        return float(v) if v is not None else None

    result["fscrypt_vs_bind_p50"] = ratio(p50("fscrypt"), p50("bind_floor"))
    result["luks_vs_fscrypt_p50"] = ratio(p50("luks"), p50("fscrypt"))
    result["fscrypt_vs_bind_syscalls_p50"] = ratio(p50("fscrypt"), p50("bind_floor_syscalls"))
    result["fscrypt_vs_bind_unpublish_p50"] = ratio(
        p50("fscrypt", "unpublish"), p50("bind_floor", "unpublish")
    )
    result["luks_vs_fscrypt_unpublish_p50"] = ratio(
        p50("luks", "unpublish"), p50("fscrypt", "unpublish")
    )
    result["errors"] = sum(len(e) for e in errors.values())
    say(
        f"fscrypt: publish p50 {p50('fscrypt')} s, bind floor {p50('bind_floor')} s "
        f"({result['fscrypt_vs_bind_p50']}x), loop-LUKS {p50('luks')} s "
        f"(LUKS / fscrypt {result['luks_vs_fscrypt_p50']}x)"
    )
    return result
