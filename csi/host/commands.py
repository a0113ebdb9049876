"""The command lines the host runs, built in one place: pure functions, no I/O, no subprocess.

The driver (``csi.host.linux.LinuxHost``, ``csi.host.nbd.Qcow2Nbd``) and the benchmark share
these builders, so what the benchmark measures is what the driver runs, and a flag changes in
exactly one place. Each builder returns a fresh argv list (``list[str]``) for
``csi.host.runner.run``; a key never appears in one: ``luks_format`` and ``crypt_open`` read it
from stdin (``--key-file=-``), which the caller passes as ``run(..., stdin=key.view)``.

Every builder names its list ``argv = ["program", ...]``: tests/unit/test_dockerfile.py reads
that form from the source to check the image ships every program the host runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from csi.errors import Internal
from csi.host import GUARD_SOURCE, LuksFormat

SECTOR_SIZE = 4096  # dm-crypt and loop sector size, bytes
PBKDF2_MIN_ITERATIONS = 1000  # cryptsetup's floor; the passphrase is a full-entropy key
KEY_FROM_STDIN = "--key-file=-"
# one keyslot is all we use: a compact LUKS2 header keeps tmpfs use and overhead small
LUKS2_METADATA_SIZE = "16k"
LUKS2_KEYSLOTS_SIZE = "512k"
NBD_BLOCK_SIZE = 4096
NBDS_MAX = 128  # NBD devices to ask for when the module is not loaded yet

FORMAT_TIMEOUT = 900.0  # dm-integrity wipes the whole device at format time
GROW_TIMEOUT = 600.0  # growing a big filesystem online writes new group descriptors
QEMU_IMG_CREATE_TIMEOUT = 900.0  # preallocation=falloc of a big image

# Per-mount (VFS) flags: the only ones a bind remount can change; filesystem options such as
# commit= apply to the superblock and were set when the volume was staged.
BIND_FLAGS = frozenset(
    {"ro", "rw", "nosuid", "nodev", "noexec", "noatime", "nodiratime", "relatime", "strictatime"}
)

FILESYSTEMS = ("ext4", "xfs")  # what mkfs, mount and fs_grow know how to make and grow
EXT4_GROUP_BYTES = 32768 * 4096  # one ext4 block group at 4 KiB blocks (-b 4096 pins it)
XFS_AG_HEAD_BYTES = 128 * 1024  # xfs_repair reads 4 x 32 KiB at each allocation group's start
PREFILL_HEAD, PREFILL_TAIL = 1 << 20, 2 << 20  # blkid's probers read up to ~1.5 MiB from the end


# loop ------------------------------------------------------------------------------------
def losetup_attach(backing: str, *, direct_io: bool) -> list[str]:
    """Attach ``backing`` to a free loop device; stdout is the device path."""
    argv = ["losetup", "--find", "--show", "--sector-size", str(SECTOR_SIZE)]
    if direct_io:
        argv.append("--direct-io=on")
    return [*argv, backing]


def losetup_detach(device: str) -> list[str]:
    argv = ["losetup", "--detach", device]
    return argv


def losetup_set_capacity(device: str) -> list[str]:
    """Make the loop device see its backing file's new size."""
    argv = ["losetup", "--set-capacity", device]
    return argv


# dm-crypt --------------------------------------------------------------------------------
def luks_format(device: str, options: LuksFormat) -> list[str]:
    """LUKS2 with PBKDF2 at its minimum (the key is random, not a password); key on stdin."""
    argv = [
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
        "--cipher", options.cipher, "--key-size", str(options.key_bits),
        "--sector-size", str(SECTOR_SIZE), "--pbkdf", "pbkdf2",
        "--pbkdf-force-iterations", str(PBKDF2_MIN_ITERATIONS), "--hash", "sha256",
        "--luks2-metadata-size", LUKS2_METADATA_SIZE, "--luks2-keyslots-size", LUKS2_KEYSLOTS_SIZE,
        KEY_FROM_STDIN,
    ]  # fmt: skip
    if options.integrity != "none":
        argv += ["--integrity", options.integrity]
        if not options.wipe:
            argv.append("--integrity-no-wipe")
    if options.header:
        argv += ["--header", options.header]
    return [*argv, device]


def crypt_open(device: str, name: str, header: str | None, *, keyring: bool) -> list[str]:
    """Open ``device`` as ``/dev/mapper/<name>``; key on stdin. ``keyring=False`` keeps the
    volume key in the dm-crypt table, so ``crypt_resize`` works without the passphrase."""
    argv = [
        "cryptsetup", "open", "--type", "luks2", KEY_FROM_STDIN,
        "--perf-no_read_workqueue", "--perf-no_write_workqueue",
    ]  # fmt: skip
    if not keyring:
        argv.append("--disable-keyring")
    if header:
        argv += ["--header", header]
    return [*argv, device, name]


def crypt_resize(name: str, header: str | None) -> list[str]:
    argv = ["cryptsetup", "resize"]
    if header:
        argv += ["--header", header]
    return [*argv, name]


def crypt_close(name: str) -> list[str]:
    argv = ["cryptsetup", "close", name]
    return argv


def dmsetup_open_count(name: str) -> list[str]:
    """stdout: how many times the kernel has the mapping open, as a bare number."""
    argv = ["dmsetup", "info", "-c", "--noheadings", "-o", "open", name]
    return argv


def dmsetup_remove(name: str) -> list[str]:
    argv = ["dmsetup", "remove", "--retry", name]
    return argv


# filesystems -----------------------------------------------------------------------------
def unwiped_prefill(fs_type: str, size: int) -> tuple[list[tuple[int, int]], list[str]]:
    """Byte ranges to zero on an unwiped dm-integrity device before mkfs, and the mkfs
    arguments that pin the layout they assume (pass them to ``mkfs`` as ``layout``). About
    3 MiB, plus 4 KiB per 128 MiB (ext4)."""
    ranges = [(0, PREFILL_HEAD), (max(0, size - PREFILL_TAIL) // 4096 * 4096, PREFILL_TAIL)]
    if fs_type == "ext4":
        ranges += [(s, 4096) for s in range(EXT4_GROUP_BYTES, size, EXT4_GROUP_BYTES)]
        return ranges, ["-b", "4096"]
    agsize = min(1 << 40, (size // 4 + 4095) // 4096 * 4096)  # 4 AGs, as mkfs.xfs would pick
    ranges += [(s, XFS_AG_HEAD_BYTES) for s in range(agsize, size, agsize)]
    return ranges, ["-d", f"agsize={agsize}"]


def mkfs(device: str, fs_type: str, *, eager: bool, layout: Sequence[str] = ()) -> list[str]:
    """ext4 or xfs, without discard. ``eager`` writes every ext4 metadata block now (inode
    tables, journal) instead of lazily; ``layout`` is the second half of ``unwiped_prefill``
    for an eager mkfs on an unwiped dm-integrity device. Internal for any other fs type."""
    if fs_type == "ext4":
        lazy = "0" if eager else "1"
        extended = f"lazy_itable_init={lazy},lazy_journal_init={lazy},nodiscard"
        argv = ["mkfs.ext4", "-F", "-q", "-m", "0", *layout, "-E", extended, device]
        return argv
    if fs_type == "xfs":
        argv = ["mkfs.xfs", "-f", "-q", "-K", *layout, device]
        return argv
    raise Internal(f"no mkfs for {fs_type}")


def mount(source: str, target: str, fs_type: str, options: Iterable[str]) -> list[str]:
    opts = list(options)
    if fs_type == "ext4":
        opts.append("noinit_itable")  # keep sparse files sparse: no background zeroing
    argv = ["mount", "-t", fs_type, "-o", ",".join(opts), source, target]
    return argv


# read-only from the start: the tmpfs is empty and stays so (nothing can be written to it, by
# root either); nosuid,nodev,noexec in case it ever were not; the smallest size tmpfs takes
GUARD_OPTIONS = ("ro", "nosuid", "nodev", "noexec", "size=4k", "mode=0555")


def guard_mount(target: str) -> list[str]:
    """The guard of a Kata target: an empty read-only tmpfs named ``GUARD_SOURCE``, so a pod
    that is not run by Kata gets EROFS at the target instead of the node's disk."""
    argv = ["mount", "-t", "tmpfs", "-o", ",".join(GUARD_OPTIONS), GUARD_SOURCE, target]
    return argv


def bind_mount(source: str, target: str) -> list[str]:
    """A plain bind; it ignores ro/nosuid/nodev, so ``bind_remount`` must follow it."""
    argv = ["mount", "--bind", source, target]
    return argv


def bind_remount(target: str, options: Iterable[str]) -> list[str]:
    """Apply the per-mount flags among ``options`` (``BIND_FLAGS``) to the bind at ``target``."""
    flags = [f for f in options if f in BIND_FLAGS]
    argv = ["mount", "-o", ",".join(["remount", "bind", *flags]), target]
    return argv


def umount(target: str) -> list[str]:
    argv = ["umount", target]
    return argv


def fs_grow(device: str, mount_point: str, fs_type: str) -> list[str]:
    """Grow a mounted filesystem to its device: resize2fs takes the device, xfs_growfs the
    mount point. Internal for any other fs type."""
    if fs_type == "ext4":
        argv = ["resize2fs", device]
        return argv
    if fs_type == "xfs":
        argv = ["xfs_growfs", mount_point]
        return argv
    raise Internal(f"cannot grow {fs_type}")


# qcow2 over NBD --------------------------------------------------------------------------
def qemu_img_create(path: str, size: int, *, preallocate: bool) -> list[str]:
    mode = "falloc" if preallocate else "off"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"preallocation={mode}", path,
            str(size)]  # fmt: skip
    return argv


def nbd_connect(socket: str, device: str, export: str) -> list[str]:
    """Connect the kernel NBD client ``device`` to ``export`` on the unix ``socket``."""
    argv = ["nbd-client", "-unix", socket, device, "-N", export, "-b", str(NBD_BLOCK_SIZE)]
    return argv


def nbd_disconnect(device: str) -> list[str]:
    argv = ["nbd-client", "-d", device]
    return argv


def modprobe_nbd(nbds_max: int = NBDS_MAX) -> list[str]:
    argv = ["modprobe", "nbd", f"nbds_max={nbds_max}"]
    return argv


# fscrypt pool ----------------------------------------------------------------------------
POOL_JOURNAL_MIB = 64  # a small journal: the pool holds many small volumes, not a database
POOL_JOURNAL_MIN_SIZE = 2 * 1024**3  # below this, mkfs's own (smaller) journal size


def mkfs_fscrypt_pool(image: str, size: int) -> list[str]:
    """The driver's own fscrypt pool: ext4 with encryption and project quotas (only project
    quotas: ``quotatype=prjquota``), lazy init, no reserved blocks, 4 KiB blocks (the loop
    device has 4 KiB sectors)."""
    journal = ["-J", f"size={POOL_JOURNAL_MIB}"] if size >= POOL_JOURNAL_MIN_SIZE else []
    argv = [
        "mkfs.ext4", "-F", "-q", "-b", "4096", "-m", "0", *journal,
        "-O", "encrypt,project,quota",
        "-E", "quotatype=prjquota,lazy_itable_init=1,lazy_journal_init=1,nodiscard",
        image,
    ]  # fmt: skip
    return argv
