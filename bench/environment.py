"""What this machine is (kernel, emulation, CPUs, tool versions) and what it lacks."""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from bench.common import HOST, read_text, sh_quiet
from csi.host import commands
from csi.host.nbd import TOOL_PATH


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version (some print it on stderr, some exit 1)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unavailable"


def detect_environment() -> dict[str, Any]:
    cpuinfo = read_text("/proc/cpuinfo")
    flags = next(
        (ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []
    )
    model = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        "",
    )
    vendor = read_text("/sys/devices/virtual/dmi/id/sys_vendor")
    product = read_text("/sys/devices/virtual/dmi/id/product_name")
    clocksources = read_text(
        "/sys/devices/system/clocksource/clocksource0/available_clocksource"
    ).split()
    qemu = vendor == "QEMU" or "QEMU" in model
    # A KVM guest gets the kvm-clock paravirtual clock; QEMU's software emulation (TCG) cannot.
    emulated = qemu and "kvm-clock" not in clocksources
    mem_kib = next(
        (
            int(ln.split()[1])
            for ln in read_text("/proc/meminfo").splitlines()
            if ln.startswith("MemTotal:")
        ),
        0,
    )
    return {
        "kernel": platform.release(),
        "emulated": emulated,
        "virtualisation": {
            "hypervisor_cpu_flag": "hypervisor" in flags,
            "dmi_sys_vendor": vendor,
            "dmi_product_name": product,
            "cpu_model": model,
            "clocksources": clocksources,
            "vmrun_guest": os.environ.get("VMRUN_GUEST") == "1",
        },
        "cpus": os.cpu_count(),
        "memory_mib": mem_kib // 1024,
        "python": platform.python_version(),
        "tools": {
            "cryptsetup": tool_version(["cryptsetup", "--version"]),
            "mke2fs": tool_version(["mke2fs", "-V"]),
            "losetup": tool_version(["losetup", "--version"]),
            "qemu-storage-daemon": tool_version(["qemu-storage-daemon", "--version"]),
            "nbd-client": tool_version(["nbd-client", "-V"]),
        },
        "udev": os.path.exists("/run/udev/control"),
    }


def mkfs_default_meaning() -> dict[str, Any]:
    """What a plain ``mkfs.ext4`` does here (e2fsprogs: /etc/mke2fs.conf over built-ins)."""
    conf = read_text("/etc/mke2fs.conf")
    itable_conf = re.search(r"lazy_itable_init\s*=\s*(\S+)", conf)
    journal_conf = re.search(r"lazy_journal_init\s*=\s*(\S+)", conf)
    kernel_lazy = os.path.exists("/sys/fs/ext4/features/lazy_itable_init")
    return {
        "argv": ["mkfs.ext4", "-F", "-q", "{mapper}"],
        "lazy_itable_init": itable_conf.group(1) if itable_conf else int(kernel_lazy),
        "lazy_itable_init_source": "mke2fs.conf"
        if itable_conf
        else "built-in: on because the kernel has /sys/fs/ext4/features/lazy_itable_init",
        "lazy_journal_init": journal_conf.group(1) if journal_conf else 0,
        "lazy_journal_init_source": "mke2fs.conf"
        if journal_conf
        else "built-in default 0: mke2fs zeroes the whole journal (32 MiB for 1 GiB)",
        "discard": "attempted by default; dm-crypt without allow_discards refuses it",
        "mount": "plain `mount -t ext4`: init_itable on, the kernel zeroes inode tables "
        "in the background after mount",
    }


def missing_requirements() -> list[str]:
    """Root, the crypt target, and whatever the driver itself says it needs on a node."""
    missing = [] if os.geteuid() == 0 else ["root"]
    missing += HOST.missing_requirements()
    # the driver checks /proc/misc for device-mapper; the bench also needs its crypt target
    targets = sh_quiet(["dmsetup", "targets"])
    if not any(line.split()[:1] == ["crypt"] for line in targets.splitlines()):
        missing.append("device-mapper with the crypt target (dmsetup targets)")
    return missing


def qcow2_unavailable() -> str | None:
    """What is missing here for backing=qcow2, or None. Like the driver, loads the nbd module
    (nbds_max=128) when the kernel has no NBD devices yet."""
    missing = [
        tool for tool in ("qemu-storage-daemon", "qemu-img", "nbd-client") if not which(tool)
    ]
    if not glob.glob("/sys/block/nbd*") and which("modprobe"):
        sh_quiet(commands.modprobe_nbd())
    if not glob.glob("/sys/block/nbd*"):
        missing.append("kernel NBD devices (no /sys/block/nbd*, `modprobe nbd` did not add any)")
    return "missing " + ", ".join(missing) if missing else None


def which(tool: str) -> bool:
    """Whether the driver's runner (its fixed PATH) finds ``tool``."""
    return shutil.which(tool, path=TOOL_PATH) is not None
