"""One driver per state dir: an exclusive ``flock`` on ``<state_dir>/driver.lock``.

Two drivers on one state dir undo each other's work: the second one's start-up reconcile rolls
back the first one's publish in flight. So the driver takes this lock before it reads the journal
and holds it for the life of the process.

The kernel drops an flock when the last descriptor of the open file is closed, so a crashed or
SIGKILLed driver never leaves a stale lock behind. The descriptor is close-on-exec: a cryptsetup
child that outlives its driver does not keep the lock. The file is never deleted (unlinking a lock
file lets a waiter lock the old inode while a newcomer locks a new one); its content, the holder's
pid and host name (in a pod: the pod's name), only says who holds it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from types import TracebackType

log = logging.getLogger(__name__)

STATE_LOCK_FILE = "driver.lock"
POLL_SECONDS = 0.2


class LockHeld(Exception):
    """Another process holds the lock; the message names what is locked and by whom."""

    def __init__(self, what: str, holder: str, waited: float) -> None:
        self.what = what
        self.holder = holder
        waiting = f" (waited {waited:.0f} s)" if waited >= 0.5 else ""
        super().__init__(
            f"{what} is in use by another luks-ephemeral-csi driver, {holder}{waiting}: only one "
            "driver may run on it at a time; stop the other one first (on Kubernetes: two "
            "node pods on one node, e.g. a DaemonSet rolling update with maxSurge > 0)"
        )


class ExclusiveLock:
    """An exclusive flock on one file, held from ``acquire`` until ``release`` or process exit."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = 0.0, stop: threading.Event | None = None) -> ExclusiveLock:
        """Take the lock, polling for up to ``wait`` seconds (or until ``stop`` is set) while
        another process holds it; then raise LockHeld."""
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            started = time.monotonic()
            deadline = started + wait
            announced = False
            while not _try_lock(fd):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (stop is not None and stop.is_set()):
                    raise LockHeld(self.what, _holder(fd), time.monotonic() - started)
                if not announced:
                    log.warning("%s is held by %s: waiting up to %g s for it to exit",
                                self.what, _holder(fd), wait)  # fmt: skip
                    announced = True
                pause = min(POLL_SECONDS, remaining)
                if stop is not None:
                    stop.wait(pause)
                else:
                    time.sleep(pause)
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder_record(), 0)
        except BaseException:
            os.close(fd)  # closing the descriptor also drops the lock if it was taken
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> ExclusiveLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def state_dir_lock(state_dir: str) -> ExclusiveLock:
    """The lock that makes a driver the only one on ``state_dir`` (created if missing)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    return ExclusiveLock(os.path.join(state_dir, STATE_LOCK_FILE), f"state dir {state_dir}")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder_record() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode() + b"\n"


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it (empty if it has not written yet)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        pid, host = int(data["pid"]), str(data["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"
    return f"pid {pid} on host {host}"
