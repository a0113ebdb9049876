#!/usr/bin/env python3
"""Run a command where loop devices and dm-crypt really work.

    python tools/vmrun.py [--memory 3G] [--cpus 2] [--timeout 3000] [--log FILE]
                          [--scratch 4G] [--env NAME[=VALUE]]... [--mode auto|host|vm]
                          -- CMD [ARGS...]

If this process is root and the host kernel has device-mapper with the crypt target (after a
quiet ``modprobe``), CMD runs right here. Otherwise CMD runs as root inside a throwaway VM:
virtme-ng (``vng``) boots a stock Debian kernel under QEMU (TCG) with this machine's root
filesystem shared read-only (copy-on-write overlays, throwaway) and the repository shared
writable over 9p, and ``tools/vm_guest.sh`` loads the modules and runs CMD with cwd = the
repository root. In the guest, /tmp is a fresh ext4 on a sparse scratch disk (the host's /tmp
is not visible: pass files through the repository) and /run is a tmpfs; unix sockets work on
both but not in the repository (9p). Only CI and --env variables reach CMD's environment;
VMRUN_GUEST=1 is set there. Run files are kept in REPO/.vmrun/run-*/ (output.log, rc,
setup.log, console.log, times).

Missing tools are installed when we are root (apt, pip). Exit status: CMD's own; 2 if neither
the host nor a VM can be had (the caller decides whether to skip; under CI=true it is a
failure either way); 3 if the VM never reported CMD's status (boot failure, timeout, crash).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

APT_PACKAGES = (
    "qemu-system-x86",
    "qemu-utils",
    "cryptsetup-bin",
    "linux-image-amd64",
    "xfsprogs",
    "kmod",
    "busybox-static",
    "nbd-client",
)
# Executable -> Debian package providing it (all needed on the host: the guest sees the host's
# root filesystem, so the guest's tools are the host's tools).
REQUIRED_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "nbd-client": "nbd-client",
    "cryptsetup": "cryptsetup-bin",
    "dmsetup": "dmsetup",
    "losetup": "mount",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "modprobe": "kmod",
}
HOST_MODULES = ("dm_mod", "dm_crypt", "dm_integrity", "loop", "nbd")
ENV_PASSED_BY_DEFAULT = ("CI",)
KEEP_RUN_DIRS = 20
VIRTIO_SERIAL_MAX = 20  # virtio-blk serial length; vng uses the image's path as the serial
EXIT_UNAVAILABLE = 2
EXIT_NO_RESULT = 3


class Unavailable(Exception):
    """Neither the host nor a VM can run the command."""


def say(msg: str) -> None:
    print(f"vmrun: {msg}", file=sys.stderr, flush=True)


def is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def is_root() -> bool:
    return os.geteuid() == 0


def repo_root() -> Path:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        if out:
            return Path(out).resolve()
    except (OSError, subprocess.CalledProcessError):
        pass
    # Not in a git checkout (or no git): this file lives in REPO/tools/.
    return Path(__file__).resolve().parent.parent


def quiet(cmd: list[str], timeout: float = 120.0) -> int:
    """Run cmd with all output discarded; return its status (127 if it cannot be run)."""
    try:
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        ).returncode
    except (OSError, subprocess.TimeoutExpired):
        return 127


# ---------------------------------------------------------------------------------------------
# Host mode


def host_has_dm_crypt() -> bool:
    """True if CMD can use loop + dm-crypt right here (we are root and the kernel has them)."""
    if not is_root():
        return False
    if shutil.which("modprobe"):
        quiet(["modprobe", "-q", "-a", *HOST_MODULES])
    if not Path("/dev/mapper/control").exists():
        return False
    if shutil.which("dmsetup") is None:
        return True  # cannot ask for the target list; the control node is the best we know
    try:
        out = subprocess.run(
            ["dmsetup", "targets"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.split()[:1] == ["crypt"] for line in out.splitlines())


def run_on_host(cmd: list[str], repo: Path, log: Path | None) -> int:
    say("host kernel has device-mapper with dm-crypt: running the command directly")
    start = time.monotonic()
    try:
        if log is None:
            status = subprocess.run(cmd, cwd=repo, check=False).returncode
        else:
            with log.open("wb") as sink:
                proc = subprocess.Popen(
                    cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
                out = proc.stdout
                assert out is not None
                while chunk := os.read(out.fileno(), 65536):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.buffer.flush()
                    sink.write(chunk)
                status = proc.wait()
    except FileNotFoundError as exc:
        say(f"cannot run {cmd[0]!r}: {exc}")
        return 127
    say(f"host run took {time.monotonic() - start:.1f} s")
    return status if status >= 0 else 128 - status


# ---------------------------------------------------------------------------------------------
# Tools for VM mode


def elf_is_static(path: Path) -> bool:
    """True if path is an ELF executable without a program interpreter (statically linked)."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # ELF64 only
                return False
            endian = "<" if head[5] == 1 else ">"
            (phoff,) = struct.unpack_from(endian + "Q", head, 0x20)
            phentsize, phnum = struct.unpack_from(endian + "HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        (p_type,) = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def static_busybox() -> Path | None:
    """virtme-ng builds its initramfs with a statically linked busybox (as it searches)."""
    for name in ("busybox-static", "busybox.static", "busybox"):
        found = shutil.which(name)
        if found and elf_is_static(Path(found)):
            return Path(found)
    return None


def version_key(version: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~_]", version)]


def has_dm_crypt_module(modules_dir: Path) -> bool:
    builtin = modules_dir / "modules.builtin"
    try:
        if builtin.is_file() and "/dm-crypt.ko" in builtin.read_text():
            return True
    except OSError:
        pass
    md = modules_dir / "kernel" / "drivers" / "md"
    return md.is_dir() and any(p.name.startswith("dm-crypt.ko") for p in md.iterdir())


def pick_kernel() -> tuple[Path, str] | None:
    """Newest /boot/vmlinuz-<ver> whose /lib/modules/<ver> has dm-crypt."""
    candidates: list[tuple[Path, str]] = []
    for image in Path("/boot").glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if image.is_file() and has_dm_crypt_module(Path("/lib/modules") / version):
            candidates.append((image, version))
    if not candidates:
        return None
    return max(candidates, key=lambda c: version_key(c[1]))


def find_vng() -> Path | None:
    # The running interpreter's environment first (a venv's bin/ need not be on PATH), then
    # PATH, then the project's own venv (whose dev extras include virtme-ng).
    for candidate in (
        Path(sys.executable).parent / "vng",
        Path(shutil.which("vng") or "/nonexistent/vng"),
        repo_root() / ".venv" / "bin" / "vng",
    ):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_tools() -> list[str]:
    """What the VM path still lacks, as human-readable items."""
    missing = [
        f"{tool} (apt: {pkg})" for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)
    ]
    if static_busybox() is None:
        missing.append("a statically linked busybox (apt: busybox-static)")
    if pick_kernel() is None:
        missing.append("a /boot/vmlinuz-* with dm-crypt in /lib/modules (apt: linux-image-amd64)")
    if find_vng() is None:
        missing.append("vng (pip: virtme-ng)")
    return missing


def apt_lists_present() -> bool:
    lists = Path("/var/lib/apt/lists")
    return lists.is_dir() and any(lists.glob("*_Packages*"))


def run_to_stderr(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run an installer with its output on our stderr (stdout is CMD's output only)."""
    try:
        return subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, check=False
        ).returncode
    except OSError as exc:
        say(f"cannot run {cmd[0]}: {exc}")
        return 127


def apt_install() -> bool:
    if shutil.which("apt-get") is None:
        say("apt-get not found: cannot install the VM packages")
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    extra = [pkg for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)]
    packages = list(dict.fromkeys([*APT_PACKAGES, *extra]))
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if not apt_lists_present():
        say("apt-get update")
        run_to_stderr(["apt-get", "update"], env)
    say("apt-get install " + " ".join(packages) + " (the kernel package takes minutes)")
    if run_to_stderr(install, env) == 0:
        return True
    say("apt-get install failed; retrying after apt-get update")
    run_to_stderr(["apt-get", "update"], env)
    return run_to_stderr(install, env) == 0


def pip_install_vng() -> bool:
    say(f"pip install virtme-ng into {sys.prefix}")
    return run_to_stderr([sys.executable, "-m", "pip", "install", "--quiet", "virtme-ng"]) == 0


def ensure_tools() -> tuple[Path, Path]:
    """Install what is missing (root only); return (vng, kernel image) or raise Unavailable."""
    missing = missing_tools()
    if missing and is_root():
        say("missing for the VM: " + "; ".join(missing))
        if any("apt:" in m for m in missing):
            apt_install()
        if find_vng() is None:
            pip_install_vng()
        missing = missing_tools()
    if missing:
        how = "" if is_root() else " (not root, so nothing was installed)"
        raise Unavailable("cannot boot a VM, missing" + how + ": " + "; ".join(missing))
    vng = find_vng()
    kernel = pick_kernel()
    assert vng is not None and kernel is not None
    if not os.access(kernel[0], os.R_OK):
        raise Unavailable(
            f"{kernel[0]} is not readable by this user (some distributions make it 0600)"
        )
    return vng, kernel[0]


# ---------------------------------------------------------------------------------------------
# VM mode


@dataclass
class VmOptions:
    memory: str
    cpus: int
    timeout: float
    kvm: bool
    env: dict[str, str]
    scratch_bytes: int


def new_run_dir(repo: Path) -> Path:
    base = repo / ".vmrun"
    base.mkdir(exist_ok=True)
    prune_run_dirs(base)
    return Path(tempfile.mkdtemp(prefix=time.strftime("run-%Y%m%d-%H%M%S-"), dir=base))


def prune_run_dirs(base: Path) -> None:
    """Keep the newest KEEP_RUN_DIRS run directories (and anything younger than an hour)."""
    runs = sorted(
        (p for p in base.glob("run-*") if p.is_dir()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in runs[KEEP_RUN_DIRS:]:
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)


def write_cmd_script(run_dir: Path, cmd: list[str], env: dict[str, str]) -> None:
    lines = ["# written by tools/vmrun.py; run by tools/vm_guest.sh inside the VM"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    lines.append("exec " + shlex.join(cmd))
    (run_dir / "cmd.sh").write_text("\n".join(lines) + "\n")


def read_guest_times(run_dir: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    try:
        for line in (run_dir / "times").read_text().splitlines():
            name, _, value = line.partition(" ")
            try:
                times[name] = float(value)
            except ValueError:
                pass
    except OSError:
        pass
    return times


class Streamer:
    """Copies what the guest appends to output.log (9p with sync writes) to our stdout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def pump(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console log)"
    return "\n".join(text.splitlines()[-lines:])


def run_in_vm(cmd: list[str], repo: Path, log: Path | None, opts: VmOptions) -> int:
    vng, kernel = ensure_tools()
    run_dir = new_run_dir(repo)
    write_cmd_script(run_dir, cmd, opts.env)
    guest_script = repo / "tools" / "vm_guest.sh"
    disk_args: list[str] = []
    scratch = run_dir / "scratch.img"
    if opts.scratch_bytes > 0 and not any(c in str(scratch) for c in "=, \n"):
        # Sparse: costs host disk only for what the guest writes; removed after the run.
        # `vng --disk PATH` attaches it as a virtio-blk disk whose serial is PATH (cut short).
        with scratch.open("wb") as f:
            f.truncate(opts.scratch_bytes)
        disk_args = ["--disk", str(scratch)]
        serial = str(scratch)[:VIRTIO_SERIAL_MAX]
        (run_dir / "guest.env").write_text(f"VMRUN_SCRATCH={shlex.quote(serial)}\n")
    elif opts.scratch_bytes > 0:
        say(f"no scratch disk: vng cannot take a path with '=', ',' or blanks ({scratch})")
    vng_cmd = [
        str(vng),
        "--run",
        str(kernel),
        *([] if opts.kvm else ["--disable-kvm"]),
        "--memory",
        opts.memory,
        "--cpus",
        str(opts.cpus),
        "--rwdir",
        str(repo),
        "--cwd",
        str(repo),
        *disk_args,
        "--exec",
        shlex.join(["sh", str(guest_script), str(run_dir)]),
    ]
    # vng runs its helper virtme-run through PATH: it must find the one beside itself.
    env = dict(os.environ)
    env["PATH"] = str(vng.parent) + os.pathsep + env.get("PATH", "")
    console_log = run_dir / "console.log"
    output_log = run_dir / "output.log"
    accel = "KVM" if opts.kvm else "TCG, no KVM"
    say(f"booting {kernel.name} under QEMU ({accel}); results in {run_dir}")
    start = time.monotonic()
    streamer = Streamer(output_log)
    timed_out = False
    with console_log.open("wb") as console:
        proc = subprocess.Popen(
            vng_cmd,
            cwd=repo,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a timeout can end all of it
        )
        try:
            while proc.poll() is None:
                if time.monotonic() - start > opts.timeout:
                    timed_out = True
                    say(f"timeout after {opts.timeout:.0f} s: stopping the VM")
                    stop_process_group(proc)
                    break
                streamer.pump()
                time.sleep(0.5)
        except KeyboardInterrupt:
            stop_process_group(proc)
            raise
    elapsed = time.monotonic() - start
    streamer.pump()
    scratch.unlink(missing_ok=True)

    if log is not None:
        try:
            shutil.copyfile(output_log, log)
        except OSError as exc:
            say(f"cannot copy the output to {log}: {exc}")

    times = read_guest_times(run_dir)
    detail = ""
    if "cmd_start" in times and "cmd_end" in times:
        cmd_s = times["cmd_end"] - times["cmd_start"]
        detail = f"; in the guest: boot+setup {times['cmd_start']:.1f} s, cmd {cmd_s:.1f} s"
    timing = f"VM run took {elapsed:.1f} s (boot+cmd{detail})"

    try:
        rc = int((run_dir / "rc").read_text().strip())
    except (OSError, ValueError):
        why = "timed out" if timed_out else f"vng exited with {proc.returncode}"
        say(f"the guest never wrote rc ({why}); last console lines ({console_log}):")
        print(tail(console_log, 40), file=sys.stderr)
        setup = run_dir / "setup.log"
        if setup.exists():
            say(f"guest setup log ({setup}):")
            print(tail(setup, 40), file=sys.stderr)
        say(timing)
        return EXIT_NO_RESULT
    if rc != 0:
        say(f"command exited with {rc} in the VM (logs in {run_dir})")
    say(timing)
    return rc


# ---------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """'4G', '512M', '0' -> bytes (binary units, as qemu and truncate read them)."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 4G, 512M, 0)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(m.group(1)) << (10 * power)


def parse_env(items: list[str]) -> dict[str, str]:
    env = {name: os.environ[name] for name in ENV_PASSED_BY_DEFAULT if name in os.environ}
    for item in items:
        name, eq, value = item.partition("=")
        if not name.isidentifier():
            raise SystemExit(f"vmrun: bad --env {item!r}")
        if eq:
            env[name] = value
        elif name in os.environ:
            env[name] = os.environ[name]
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vmrun.py",
        description="Run CMD where loop + dm-crypt work: on the host if it can, else in a VM.",
    )
    parser.add_argument("--memory", default="3G", help="VM memory (qemu -m syntax), default 3G")
    parser.add_argument("--cpus", type=int, default=2, help="VM CPUs, default 2")
    parser.add_argument("--timeout", type=float, default=3000.0, help="VM wall-time limit in s")
    parser.add_argument("--log", type=Path, help="also write CMD's output to this file")
    parser.add_argument(
        "--mode",
        choices=("auto", "host", "vm"),
        default="auto",
        help="auto (default): host if it has dm-crypt, else VM",
    )
    parser.add_argument(
        "--kvm",
        action="store_true",
        help="use KVM (on this kind of machine a stock kernel hangs or aborts under it)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="pass an environment variable into the VM (CI is always passed)",
    )
    parser.add_argument(
        "--scratch",
        type=parse_size,
        default=parse_size("4G"),
        metavar="SIZE",
        help="sparse scratch disk mounted as ext4 on the guest's /tmp (default 4G, 0: none)",
    )
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    cmd: list[str] = args.cmd
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        parser.error("no command given (use: vmrun.py [options] -- CMD [ARGS...])")

    repo = repo_root()
    log: Path | None = args.log.resolve() if args.log is not None else None
    if args.mode != "vm" and host_has_dm_crypt():
        return run_on_host(cmd, repo, log)
    if args.mode == "host":
        say("--mode host, but the host has no usable dm-crypt (or this is not root)")
        return EXIT_UNAVAILABLE
    opts = VmOptions(
        memory=args.memory,
        cpus=args.cpus,
        timeout=args.timeout,
        kvm=args.kvm,
        env=parse_env(args.env),
        scratch_bytes=args.scratch,
    )
    try:
        return run_in_vm(cmd, repo, log, opts)
    except Unavailable as exc:
        prefix = "CI=true and " if is_ci() else ""
        say(f"{prefix}{exc}")
        return EXIT_UNAVAILABLE


if __name__ == "__main__":
    sys.exit(main())
