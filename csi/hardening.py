"""Process hardening at start-up: no core dumps, not dumpable, and a loud warning when the state
dir (journal, detached LUKS headers) is on a disk rather than in memory.

``RLIMIT_CORE`` 0 (soft and hard) is inherited by every child (cryptsetup holds the key too), and
a core-dump handler such as systemd-coredump or apport honours it. ``PR_SET_DUMPABLE`` 0 makes
the kernel refuse to dump this process at all, whatever the handler; it also makes ``/proc/self``
root's and stops ptrace by same-uid processes. A process can still read its own ``/proc/self``
files, so mountinfo and the process metrics keep working. The kernel resets the flag when a child
execs, so for children the core limit is what counts.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import resource

log = logging.getLogger(__name__)

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
IN_MEMORY = {TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}
# struct statfs starts with f_type (a long, __fsword_t, on x86_64 and aarch64); 120 bytes there.
_STATFS_BUFFER = 256


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]  # fmt: skip
    libc.prctl.restype = ctypes.c_int
    libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    libc.statfs.restype = ctypes.c_int
    return libc


def _prctl(option: int, arg: int = 0) -> int:
    result: int = _libc().prctl(option, arg, 0, 0, 0)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return result


def disable_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def make_undumpable() -> None:
    _prctl(PR_SET_DUMPABLE, 0)


def dumpable() -> bool:
    return _prctl(PR_GET_DUMPABLE) != 0


def harden_process() -> None:
    """Before any key exists: no core file from this process or its children, and no dump or
    same-uid ptrace of this process."""
    disable_core_dumps()
    make_undumpable()
    log.info("process hardened: core dumps off (RLIMIT_CORE 0, inherited), not dumpable")


def fs_type(path: str) -> int:
    """The ``statfs`` f_type magic of the filesystem ``path`` is on."""
    buf = ctypes.create_string_buffer(_STATFS_BUFFER)
    if _libc().statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def warn_unless_in_memory(state_dir: str) -> bool:
    """Log one warning when ``state_dir`` is not on tmpfs or ramfs; True when it is."""
    try:
        magic = fs_type(state_dir)
    except OSError as exc:
        log.warning("cannot tell which filesystem state dir %s is on: %s", state_dir, exc)
        return False
    if magic in IN_MEMORY:
        return True
    log.warning(
        "state dir %s is not on tmpfs or ramfs (filesystem magic 0x%x): detached LUKS headers "
        "and the journal reach the node's disk and outlive a reboot; use a tmpfs such as /run",
        state_dir, magic,
    )  # fmt: skip
    return False
