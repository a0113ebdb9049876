"""The baselines: flows run from the bench as plain argv subprocesses, nothing else.

floor         no encryption: sparse file, loop, lazy mkfs.ext4, mount (the driver's own
              builders for those steps);
handrun       the very commands the driver runs for a default inline volume, built by the
              driver's builders (csi.host.commands) from the driver's own choices for the
              spec (csi.backings.luks), so a flag changed in the driver changes here too;
conventional  a LUKS driver configured as ceph-csi does (argon2id KDF with 32 MiB, header on
              the device, no dm-crypt perf flags, default mkfs.ext4, plain mount): deliberately
              other flags, so built here.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import HOST, MiB, sh, sh_quiet
from bench.flows import Flow, Timer
from bench.kernel import datapath_of, keyslot_kdf
from csi.backings.luks import eager_mkfs, key_bits, needs_integrity_wipe
from csi.config import Config
from csi.exposures import filesystem_options
from csi.host import LuksFormat, commands
from csi.params import VolumeSpec, parse_attributes

# csi.exposures.MountFilesystem's options for a writable volume without mount flags (the
# driver builds this list inline; csi.host.commands.mount adds noinit_itable for ext4)
DRIVER_MOUNT_OPTIONS = filesystem_options((), readonly=False)
# ceph-csi (internal/util/cryptsetup/cryptsetup.go): luksFormat with a 32 MiB argon2 memory cap,
# luksOpen with --disable-keyring; the LUKS2 header (16 MiB) lives on the device itself.
CONVENTIONAL_HEADER_BYTES = 16 * MiB
CONVENTIONAL_FORMAT = ("cryptsetup", "-q", "luksFormat", "--type", "luks2", "--hash", "sha256",
                       "--pbkdf", "argon2id", "--pbkdf-memory", "32768")  # fmt: skip


@dataclass
class Objects:
    """What one baseline cycle creates, so a failure can be cleaned up."""

    backing: str
    header: str
    mapping: str
    target: str
    loop: str = ""
    mapper: str = ""

    def __post_init__(self) -> None:
        self.mapper = self.mapper or f"/dev/mapper/{self.mapping}"


PLACEHOLDERS = Objects("{backing}", "{header}", "{mapping}", "{target}", "{loop}", "{mapper}")


def inline_spec(size: str) -> VolumeSpec:
    """The spec the driver makes of an inline volume's ``{"size": size}`` (defaults for all)."""
    fields = parse_attributes({"size": size}, min_size=Config.min_size, max_size=Config.max_size)
    return VolumeSpec(**fields)


def driver_attach(obj: Objects) -> list[str]:
    return commands.losetup_attach(obj.backing, direct_io=True)


def driver_publish(obj: Objects, spec: VolumeSpec) -> list[tuple[str, list[str]]]:
    """(step, argv) of the driver's publish after the attach, for ``spec`` (a loop volume);
    the header as csi.backings.luks.header_of places it."""
    header = obj.header if spec.header == "detached" else None
    options = LuksFormat(spec.cipher, key_bits(spec), spec.integrity, header,
                         wipe=needs_integrity_wipe(spec))  # fmt: skip
    return [
        ("format", commands.luks_format(obj.loop, options)),
        ("open", commands.crypt_open(obj.loop, obj.mapping, header, keyring=True)),
        ("mkfs", commands.mkfs(obj.mapper, spec.fs_type, eager=eager_mkfs(spec))),
        ("mount", commands.mount(obj.mapper, obj.target, spec.fs_type, DRIVER_MOUNT_OPTIONS)),
    ]


def driver_unpublish(obj: Objects) -> list[tuple[str, list[str]]]:
    return [
        ("unmount", commands.umount(obj.target)),
        ("close", commands.crypt_close(obj.mapping)),
        ("detach", commands.losetup_detach(obj.loop)),
    ]


def handrun_script(spec: VolumeSpec) -> list[list[str]]:
    """The handrun flow's commands with placeholders, for the results file."""
    steps = driver_publish(PLACEHOLDERS, spec) + driver_unpublish(PLACEHOLDERS)
    return [driver_attach(PLACEHOLDERS), *(argv for _, argv in steps)]


class Baseline(Flow[Objects]):
    extra_bytes = 0
    has_mapping = True

    def __init__(self, root: Path, header_dir: Path, size: int) -> None:
        self.root = root
        self.header_dir = header_dir
        self.size = size
        self.datapath: dict[str, Any] | None = None

    def prepare(self, i: int) -> Objects:
        tag = f"bench-{self.name}-{i}-{uuid.uuid4().hex[:8]}"
        return Objects(
            backing=str(self.root / "backing" / f"{tag}.img"),
            header=str(self.header_dir / f"{tag}.hdr"),
            mapping=tag,
            target=str(self.root / "mnt" / tag),
        )

    def backing(self, ctx: Objects) -> str:
        return ctx.backing

    def inspect(self, ctx: Objects) -> None:
        if self.datapath is None and self.has_mapping:
            self.datapath = datapath_of(ctx.mapping, ctx.backing)
            header = ctx.header if os.path.exists(ctx.header) else None
            self.datapath["keyslot_kdf"] = keyslot_kdf(ctx.loop, header)

    def create_backing(self, obj: Objects, timer: Timer) -> None:
        with timer.step("create_backing"):  # in-process, as the driver does (minus its fsync)
            fd = os.open(obj.backing, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self.size + self.extra_bytes)
            finally:
                os.close(fd)

    def run(self, step: str, argv: list[str], timer: Timer, key: bytes | None = None) -> str:
        """One command, timed as ``step``; ``key`` (if any) goes to its stdin."""
        with timer.step(step):
            if step == "mount":
                os.makedirs(argv[-1], exist_ok=True)
            out = sh(argv, stdin=key)
            if step == "unmount":
                os.rmdir(argv[-1])
        return out

    def attach(self, obj: Objects, timer: Timer) -> None:
        obj.loop = self.run("attach", driver_attach(obj), timer).strip()

    def delete(self, obj: Objects, timer: Timer) -> None:
        with timer.step("delete"):
            os.unlink(obj.backing)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(obj.header)

    def cleanup(self, ctx: Objects) -> None:
        if HOST.is_mountpoint(ctx.target):
            sh_quiet(commands.umount(ctx.target))
        if HOST.crypt_exists(ctx.mapping):
            sh_quiet(commands.crypt_close(ctx.mapping))
        loop = ctx.loop or HOST.loop_find(ctx.backing)
        if loop:
            sh_quiet(commands.losetup_detach(loop))
        for path in (ctx.backing, ctx.header):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(ctx.target)


class Floor(Baseline):
    """No encryption: sparse file, loop (the driver's flags), lazy mkfs.ext4, mount; and back."""

    name = "floor"
    has_mapping = False

    def up(self, ctx: Objects, timer: Timer) -> None:
        self.create_backing(ctx, timer)
        self.attach(ctx, timer)
        self.run("mkfs", commands.mkfs(ctx.loop, "ext4", eager=False), timer)
        self.run("mount", commands.mount(ctx.loop, ctx.target, "ext4", DRIVER_MOUNT_OPTIONS), timer)

    def down(self, ctx: Objects, timer: Timer) -> None:
        self.run("unmount", commands.umount(ctx.target), timer)
        self.run("detach", commands.losetup_detach(ctx.loop), timer)
        self.delete(ctx, timer)


class HandRun(Baseline):
    """Exactly the commands the driver runs (its builders, its choices for the spec)."""

    name = "handrun"

    def __init__(self, root: Path, header_dir: Path, spec: VolumeSpec) -> None:
        super().__init__(root, header_dir, spec.backing_bytes)
        self.spec = spec

    def up(self, ctx: Objects, timer: Timer) -> None:
        self.create_backing(ctx, timer)
        self.attach(ctx, timer)
        key = os.urandom(64)
        for step, argv in driver_publish(ctx, self.spec):
            self.run(step, argv, timer, key if commands.KEY_FROM_STDIN in argv else None)

    def down(self, ctx: Objects, timer: Timer) -> None:
        for step, argv in driver_unpublish(ctx):
            self.run(step, argv, timer)
        self.delete(ctx, timer)


class Conventional(Baseline):
    """As ceph-csi configures LUKS: argon2id (32 MiB), header on the device, no perf flags,
    default mkfs.ext4, plain mount. The file is 16 MiB larger to hold the on-device header."""

    name = "conventional"
    extra_bytes = CONVENTIONAL_HEADER_BYTES

    def up(self, ctx: Objects, timer: Timer) -> None:
        self.create_backing(ctx, timer)
        self.attach(ctx, timer)
        key = os.urandom(64)
        self.run("format", [*CONVENTIONAL_FORMAT, ctx.loop, "-d", "-"], timer, key)
        luks_open = ["cryptsetup", "luksOpen", ctx.loop, ctx.mapping, "--disable-keyring"]
        self.run("open", [*luks_open, "-d", "-"], timer, key)
        self.run("mkfs", ["mkfs.ext4", "-F", "-q", ctx.mapper], timer)
        self.run("mount", ["mount", "-t", "ext4", ctx.mapper, ctx.target], timer)

    def down(self, ctx: Objects, timer: Timer) -> None:
        self.run("unmount", commands.umount(ctx.target), timer)
        self.run("close", ["cryptsetup", "luksClose", ctx.mapping], timer)
        self.run("detach", commands.losetup_detach(ctx.loop), timer)
        self.delete(ctx, timer)
