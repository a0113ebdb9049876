"""What every bench module uses: constants, progress output, commands, statistics."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

from csi.errors import DriverError
from csi.host.linux import LinuxHost
from csi.host.runner import run

REPO = Path(__file__).resolve().parents[1]
MiB = 1024**2
GiB = 1024**3
COMMAND_TIMEOUT = 900.0

# The kernel's view, read as the driver reads it (mounts, loop devices, dm names, st_blocks).
HOST = LinuxHost()


class BenchError(Exception):
    """A command or a driver call failed; the message never holds key material."""


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(argv: Sequence[str], *, stdin: bytes | None = None) -> str:
    """An argv through the driver's own runner (csi.host.runner.run: the same fixed PATH,
    locale and DM_DISABLE_UDEV); a key goes only through stdin. Raises on failure."""
    return run(argv, stdin=stdin, timeout=COMMAND_TIMEOUT)


def sh_quiet(argv: Sequence[str]) -> str:
    """``sh`` for best-effort clean-up and probes: a failure gives empty output."""
    with contextlib.suppress(DriverError):
        return sh(argv)
    return ""


def read_text(path: str, default: str = "") -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return round(num / den, 3)


def r4(x: float) -> float:
    return round(x, 4)


def mib(n: float) -> float:
    return round(n / MiB, 2)


def allocated(path: str) -> int:
    """Bytes the file holds on disk (0 if it is gone)."""
    return HOST.allocated_bytes(path)
