"""Run host commands: argv lists only, a timeout always, typed errors, secrets only via stdin."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from typing import Protocol

from csi.errors import Internal

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0


class CommandFailed(Internal):
    """A command exited non-zero; carries its exit code and (key-free) stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        super().__init__(
            f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed "
            f"(exit {returncode}): {self.stderr[-500:]}"
        )


class CommandTimeout(Internal):
    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        self.argv = list(argv)
        super().__init__(f"{argv[0]} did not finish within {timeout:g}s")


class ToolMissing(Internal):
    def __init__(self, tool: str) -> None:
        self.tool = tool
        super().__init__(f"{tool} is not installed on this node")


class Runner(Protocol):
    """What runs a command for the host: ``run`` below, or a scripted stand-in in tests.
    Returns stdout; raises CommandFailed, CommandTimeout or ToolMissing."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        stdin: memoryview | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> str: ...


def _environment() -> dict[str, str]:
    """A minimal environment: a fixed PATH and locale, and nothing inherited that could leak."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    if not os.path.exists("/run/udev/control"):
        # No udev (containers, minimal VMs): let libdevmapper create /dev/mapper nodes itself
        # instead of waiting for a udev event that never comes.
        env["DM_DISABLE_UDEV"] = "1"
    return env


def run(
    argv: Sequence[str],
    *,
    stdin: memoryview | bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Run ``argv``; return stdout. Secrets go through ``stdin`` and never into argv or env."""
    argv = [str(a) for a in argv]
    log.debug("run %s", argv)
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=_environment(),
            check=False,
        )
    except FileNotFoundError:
        raise ToolMissing(argv[0]) from None
    except subprocess.TimeoutExpired:
        raise CommandTimeout(argv, timeout) from None
    if proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc.stdout.decode(errors="replace")
