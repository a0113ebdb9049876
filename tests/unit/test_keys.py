"""Volume keys: CSPRNG bytes in a mutable buffer, zeroed in place, never rendered."""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from csi.keys import PASSPHRASE_BYTES, VolumeKey, random_key


@pytest.mark.parametrize("size", [1, 32, PASSPHRASE_BYTES, 4096])
def test_random_key_has_the_requested_length(size: int) -> None:
    key = random_key(size)
    assert len(key) == size
    assert len(key.view) == size
    assert key.wiped is False


def test_two_keys_differ_and_are_not_zero() -> None:
    a, b = random_key(PASSPHRASE_BYTES), random_key(PASSPHRASE_BYTES)
    assert bytes(a.view) != bytes(b.view)
    assert any(a.view) and any(b.view)
    # 64 CSPRNG bytes: expect most distinct byte values, not a repeated pattern
    assert len(set(bytes(a.view))) > 16


def test_wipe_zeroes_the_buffer_in_place() -> None:
    buf = bytearray(range(1, 65))
    key = VolumeKey(buf)
    view = key.view  # a view taken before the wipe sees the zeros: no copy was made
    key.wipe()
    assert buf == bytearray(64)
    assert bytes(view) == bytes(64)
    assert key.wiped is True
    assert len(key) == 64


def test_view_after_wipe_raises() -> None:
    key = random_key(32)
    key.wipe()
    with pytest.raises(ValueError, match="wiped"):
        _ = key.view


def test_view_is_read_only() -> None:
    key = random_key(16)
    view = key.view
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 0


def test_context_manager_wipes_on_exit_and_on_error() -> None:
    with random_key(32) as key:
        assert any(key.view)
    assert key.wiped
    buf = bytearray(b"\x07" * 32)
    with pytest.raises(RuntimeError), VolumeKey(buf) as other:
        raise RuntimeError("format failed")
    assert other.wiped
    assert buf == bytearray(32)


def test_wiped_checks_the_buffer_not_just_a_flag() -> None:
    buf = bytearray(b"\x01" * 8)
    key = VolumeKey(buf)
    key.wipe()
    buf[0] = 1  # someone wrote into it afterwards
    assert key.wiped is False


def test_repr_and_str_never_show_the_bytes(caplog: pytest.LogCaptureFixture) -> None:
    secret = bytes(range(200, 232))
    key = VolumeKey(bytearray(secret))
    renderings = [repr(key), str(key), f"{key}", f"{key!r}", format(key), str([key])]
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test.keys").warning("key is %s", key)
    renderings.append(caplog.text)
    for text in renderings:
        assert "redacted" in text
        assert "32 bytes" in text
        assert secret.hex() not in text
        assert secret.hex()[:16] not in text
        assert repr(secret)[:20] not in text
        assert secret.decode("latin-1") not in text
    assert key.view.tobytes() == secret  # the key itself was intact all along


def test_key_has_no_instance_dict() -> None:
    key = random_key(16)
    assert not hasattr(key, "__dict__")  # nothing stray (e.g. a bytes copy) can be attached
    with pytest.raises(AttributeError):
        key.copy = b"x"  # type: ignore[attr-defined]


# --- keeping keys out of swap and out of core dumps ----------------------------------------

REPO = Path(__file__).resolve().parents[2]


def vm_flags(address: int) -> set[str]:
    """The kernel's VmFlags of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if span:
                inside = int(span[1], 16) <= address < int(span[2], 16)
            elif inside and line.startswith("VmFlags:"):
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def address_of(key: VolumeKey) -> int:
    anchor = ctypes.c_char.from_buffer(key._buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


@pytest.mark.skipif(os.geteuid() != 0, reason="mlock beyond RLIMIT_MEMLOCK needs CAP_IPC_LOCK")
def test_random_key_lives_in_locked_pages_until_the_wipe() -> None:
    key = random_key(PASSPHRASE_BYTES)
    address = address_of(key)
    assert address % mmap.PAGESIZE == 0  # pages of its own: no other object shares them
    assert key.locked is True
    flags = vm_flags(address)
    assert "lo" in flags  # mlocked: never written to swap
    assert "dd" in flags  # MADV_DONTDUMP: left out of a core dump
    assert "wf" in flags  # MADV_WIPEONFORK: a forked child sees zeros
    # the view still goes to a child through a pipe, as cryptsetup gets it
    piped = subprocess.run(["od", "-An", "-tx1", "-v"], input=key.view, capture_output=True,
                           check=True).stdout.split()  # fmt: skip
    assert bytes(int(b, 16) for b in piped) == bytes(key.view)
    view = key.view
    key.wipe()
    assert key.wiped and key.locked is False
    assert bytes(view) == bytes(PASSPHRASE_BYTES)  # zeroed in place, then unlocked
    assert "lo" not in vm_flags(address)


def test_a_callers_buffer_is_wiped_but_not_locked() -> None:
    key = VolumeKey(bytearray(b"\x05" * 16))  # a bytearray shares its page with other objects
    assert key.locked is False
    key.wipe()
    assert key.wiped and key.locked is False


# As a uid without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0, as in many containers: mlock fails
# with EPERM. The keys must still work, and the driver must say so once, not once per key.
MLOCK_REFUSED = """
import json, logging, os, resource, sys
from csi.keys import random_key
logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(message)s")
resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
if os.geteuid() == 0:
    os.setgroups([]); os.setresgid(65532, 65532, 65532); os.setresuid(65532, 65532, 65532)
keys = [random_key(64) for _ in range(3)]
report = {"locked": [k.locked for k in keys], "random": [any(k.view) for k in keys]}
for k in keys:
    k.wipe()
report["wiped"] = [k.wiped for k in keys]
print(json.dumps(report))
"""


def test_a_key_still_works_when_mlock_is_refused_and_the_driver_warns_once() -> None:
    done = subprocess.run([sys.executable, "-c", MLOCK_REFUSED], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {"locked": [False] * 3, "random": [True] * 3, "wiped": [True] * 3}
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, done.stderr
    assert "cannot lock volume keys in RAM" in warnings[0]
    assert "RLIMIT_MEMLOCK" in warnings[0]
