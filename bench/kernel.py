"""What the kernel says about one volume's data path: dm table (key redacted), sector sizes,
loop direct I/O, the keyslot's KDF; and which NBD devices are connected."""

from __future__ import annotations

import glob
import os
import re
from typing import Any

from bench.common import HOST, read_text, sh, sh_quiet

UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def redact_table(line: str) -> str:
    """A crypt table line with its key field replaced: never print anything key-like."""
    toks = line.split()
    if len(toks) > 4 and toks[2] == "crypt":
        key = toks[4]
        if key.startswith(":"):  # :<bytes>:<type>:<description>, a reference into the keyring
            size, _, rest = key[1:].partition(":")
            ktype = rest.partition(":")[0]
            toks[4] = f":{size}:{ktype}:<keyring reference redacted>"
        else:
            toks[4] = "<key redacted>"
    text = " ".join(toks)
    text = UUID_RE.sub("<uuid>", text)
    return re.sub(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32,}", "<redacted>", text)


def keyslot_kdf(device: str, header: str | None) -> dict[str, str]:
    """The keyslot's PBKDF parameters, from luksDump (never the salt or any digest)."""
    text = sh_quiet(["cryptsetup", "luksDump", *(["--header", header] if header else []), device])
    wanted = ("PBKDF", "Time cost", "Memory", "Threads", "Iterations")
    found: dict[str, str] = {}
    in_keyslots = False
    for line in text.splitlines():
        if line.startswith("Keyslots:"):
            in_keyslots = True
        elif line and not line[0].isspace():
            in_keyslots = False
        key, _, value = line.strip().partition(":")
        if in_keyslots and key in wanted and key not in found:
            found[key] = value.strip()
    return found


def kernel_name(device: str) -> str | None:
    """dm-N for /dev/mapper/NAME, by device number (a link without udev it may not be)."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return None
    return os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"))


def block_size(kname: str | None) -> int | None:
    if not kname:
        return None
    return int(read_text(f"/sys/block/{kname}/queue/logical_block_size", "0"))


def datapath_of(mapping: str, backing: str) -> dict[str, Any]:
    raw = sh(["dmsetup", "table", mapping]).strip()
    toks = raw.split()
    options: list[str] = []
    if len(toks) > 8 and toks[2] == "crypt" and toks[8].isdigit():
        options = toks[9 : 9 + int(toks[8])]
    kname = kernel_name(f"/dev/mapper/{mapping}") if HOST.crypt_exists(mapping) else None
    loop = HOST.loop_find(backing)
    lname = os.path.basename(loop) if loop else None
    sector = next((o.split(":", 1)[1] for o in options if o.startswith("sector_size:")), "512")
    return {
        "dm_table": redact_table(raw),
        "cipher": toks[3] if len(toks) > 3 else None,
        "key_in_kernel_keyring": len(toks) > 4 and toks[4].startswith(":"),
        "crypt_options": options,
        "perf_no_read_workqueue": "no_read_workqueue" in options,
        "perf_no_write_workqueue": "no_write_workqueue" in options,
        "crypt_sector_size": int(sector),
        "dm_logical_block_size": block_size(kname),
        "loop_device": loop,
        "loop_direct_io": read_text(f"/sys/block/{lname}/loop/dio") == "1" if lname else None,
        "loop_logical_block_size": block_size(lname),
    }


def connected_nbds() -> list[str]:
    """NBD devices the kernel has connected: those with a ``pid`` attribute."""
    return sorted("/dev/" + p.split(os.sep)[-2] for p in glob.glob("/sys/block/nbd*/pid"))
