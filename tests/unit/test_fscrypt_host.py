"""The fscrypt host layer without a kernel that has it: struct layouts and ioctl numbers against
the sizes the kernel encodes, the key page zeroed after the ioctl (success or failure), argv
builders, the directory walk on a temp dir, mountinfo logic on a fixture, and the fake."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csi.errors import Busy, FailedPrecondition, InvalidArgument
from csi.host import KEY_ABSENT, KEY_INCOMPLETELY_REMOVED, KEY_PRESENT, Quota, fscrypt
from csi.host import commands as cmd
from csi.host.fake import STEPS, FakeHost, FakeMount
from csi.host.fakes import FAKE_BUSY_PID
from csi.host.linux import LinuxHost
from csi.keys import VolumeKey

IDENT = "0123456789abcdef0123456789abcdef"


def make_key(fill: int = 0xA5) -> VolumeKey:
    return VolumeKey(bytearray([fill]) * 64)


# layouts and numbers ---------------------------------------------------------------------
@pytest.mark.parametrize(("struct", "size"), [
    (fscrypt.KeySpecifier, 40), (fscrypt.AddKeyArg, 0x50), (fscrypt.RemoveKeyArg, 0x40),
    (fscrypt.KeyStatusArg, 0x80), (fscrypt.PolicyV2, 24), (fscrypt.GetPolicyExArg, 32),
    (fscrypt.FsXattr, 28), (fscrypt.IfDqblk, 72), (fscrypt.AddKeyArgRaw, 0x50 + 64),
])  # fmt: skip
def test_struct_sizes_match_the_kernel(struct: type[ctypes.Structure], size: int) -> None:
    assert ctypes.sizeof(struct) == size


@pytest.mark.parametrize(("number", "expected"), [
    (fscrypt.FS_IOC_ADD_ENCRYPTION_KEY, 0xC0506617),
    (fscrypt.FS_IOC_REMOVE_ENCRYPTION_KEY, 0xC0406618),
    (fscrypt.FS_IOC_REMOVE_ENCRYPTION_KEY_ALL_USERS, 0xC0406619),
    (fscrypt.FS_IOC_GET_ENCRYPTION_KEY_STATUS, 0xC080661A),
    (fscrypt.FS_IOC_SET_ENCRYPTION_POLICY, 0x800C6613),
    (fscrypt.FS_IOC_GET_ENCRYPTION_POLICY_EX, 0xC0096616),
    (fscrypt.FS_IOC_FSGETXATTR, 0x801C581F),
    (fscrypt.FS_IOC_FSSETXATTR, 0x401C5820),
])  # fmt: skip
def test_ioctl_numbers_are_the_measured_ones(number: int, expected: int) -> None:
    assert number == expected


def test_the_raw_key_follows_the_add_key_header() -> None:
    assert fscrypt.AddKeyArgRaw.raw.offset == 0x50


def test_policy_is_v2_xts_cts_pad32_under_the_identifier() -> None:
    raw = bytes(fscrypt.policy_v2(IDENT))
    assert raw == bytes([2, 1, 4, 3, 0, 0, 0, 0]) + bytes.fromhex(IDENT)


@pytest.mark.parametrize("bad", ["", "0" * 31, "0" * 33, "G" * 32, "ABCDEF" + "0" * 26])
def test_identifiers_are_32_lowercase_hex_digits(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        fscrypt.parse_identifier(bad)


def test_quota_commands_encode_the_project_type() -> None:
    assert (fscrypt.Q_GETQUOTA << 8 | fscrypt.PRJQUOTA) == 0x80000702
    assert (fscrypt.Q_SETQUOTA << 8 | fscrypt.PRJQUOTA) == 0x80000802


# the key page ------------------------------------------------------------------------------
class Recorder:
    """A stand-in for libc's ioctl: what the kernel would have read at the address."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.address = 0
        self.seen = b""

    def __call__(self, fd: int, request: int, address: int) -> int:
        assert request == fscrypt.FS_IOC_ADD_ENCRYPTION_KEY
        self.address = address
        self.seen = ctypes.string_at(address, ctypes.sizeof(fscrypt.AddKeyArgRaw))
        if self.fail:
            ctypes.set_errno(self.fail)
            return -1
        arg = fscrypt.AddKeyArgRaw.from_address(address)
        arg.arg.key_spec.u[:16] = list(bytes.fromhex(IDENT))
        return 0


@pytest.fixture
def no_fcntl_for_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """fcntl.ioctl would leave a stack copy: it must never see the add-key request."""
    real = fcntl.ioctl

    def guarded(fd: int, request: int, *args: Any) -> Any:
        assert request != fscrypt.FS_IOC_ADD_ENCRYPTION_KEY, "the key went through fcntl.ioctl"
        return real(fd, request, *args)

    monkeypatch.setattr(fcntl, "ioctl", guarded)


@pytest.mark.usefixtures("no_fcntl_for_keys")
def test_the_key_reaches_the_ioctl_and_the_buffer_is_zero_after(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(fscrypt, "libc_ioctl", recorder)
    host = LinuxHost()
    with make_key() as key:
        assert host.fscrypt_add_key(str(tmp_path), key) == IDENT
    header = fscrypt.AddKeyArg.from_buffer_copy(recorder.seen[:0x50])
    assert header.key_spec.type == fscrypt.FSCRYPT_KEY_SPEC_TYPE_IDENTIFIER
    assert header.raw_size == 64
    assert recorder.seen[0x50:] == bytes([0xA5]) * 64
    assert recorder.address == host._fscrypt.key_page.address
    assert not any(ctypes.string_at(recorder.address, ctypes.sizeof(fscrypt.AddKeyArgRaw)))


@pytest.mark.usefixtures("no_fcntl_for_keys")
@pytest.mark.parametrize(("err", "raised"), [
    (errno.EINVAL, OSError), (errno.ENOTTY, FailedPrecondition), (errno.EACCES, OSError),
])  # fmt: skip
def test_the_buffer_is_zero_after_a_failed_ioctl_and_the_error_has_no_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, err: int, raised: type[Exception]
) -> None:
    recorder = Recorder(fail=err)
    host = fscrypt.FscryptHost(LinuxHost(), ioctl=recorder)
    with make_key(0x5C) as key, pytest.raises(raised) as caught:
        host.add_key(str(tmp_path), key)
    assert recorder.seen[0x50:] == bytes([0x5C]) * 64
    assert host.key_page.is_zero()
    text = str(caught.value)
    assert "5c5c" not in text.lower() and "\\x5c" not in text.lower() and "\\\\" not in text


def test_linux_host_types_the_failed_add(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fscrypt, "libc_ioctl", Recorder(fail=errno.EACCES))
    with make_key() as key, pytest.raises(FailedPrecondition, match="needs root"):
        LinuxHost().fscrypt_add_key(str(tmp_path), key)


def test_a_key_of_the_wrong_size_never_reaches_the_kernel(tmp_path: Path) -> None:
    recorder = Recorder()
    host = fscrypt.FscryptHost(LinuxHost(), ioctl=recorder)
    with VolumeKey(bytearray(32)) as key, pytest.raises(InvalidArgument):
        host.add_key(str(tmp_path), key)
    assert recorder.address == 0 and host.key_page.is_zero()


def test_the_default_ioctl_is_libc_through_ctypes() -> None:
    libc = fscrypt._libc()
    assert libc.ioctl.argtypes == [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    assert fscrypt.FscryptHost(LinuxHost())._ioctl is None  # late-bound to fscrypt.libc_ioctl


# argv builders -----------------------------------------------------------------------------
def test_pool_mkfs_has_encrypt_and_project_quota_lazy_init_and_4k_blocks() -> None:
    argv = cmd.mkfs_fscrypt_pool("/data/pool.img", 1 << 30)
    assert argv[0] == "mkfs.ext4" and argv[-1] == "/data/pool.img"
    assert argv[argv.index("-O") + 1] == "encrypt,project,quota"
    extended = argv[argv.index("-E") + 1].split(",")
    assert "quotatype=prjquota" in extended and "lazy_itable_init=1" in extended
    assert argv[argv.index("-b") + 1] == "4096" and argv[argv.index("-m") + 1] == "0"
    assert "-J" not in argv  # small pool: mkfs's own journal size
    big = cmd.mkfs_fscrypt_pool("/data/pool.img", 100 << 30)
    assert big[big.index("-J") + 1] == "size=64"


def test_pool_mount_enforces_project_limits_and_gives_space_back() -> None:
    argv = cmd.mount("/dev/loop3", "/data/pool", "ext4", fscrypt.POOL_MOUNT_OPTIONS)
    options = argv[argv.index("-o") + 1].split(",")
    assert {"prjquota", "discard", "nosuid", "nodev"} <= set(options)


# directories on a temp dir -----------------------------------------------------------------
@pytest.fixture
def linux() -> LinuxHost:
    return LinuxHost()


def test_remove_tree_deletes_everything_and_never_follows_a_symlink(
    linux: LinuxHost, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_text("y")
    (tree / "a" / "link").symlink_to(outside)
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tree / "fifo")
    linux.remove_tree(str(tree))
    assert not tree.exists() and (outside / "keep").read_text() == "x"
    linux.remove_tree(str(tree))  # absent: nothing


def test_remove_tree_of_a_very_deep_tree(linux: LinuxHost, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir("deep", dir_fd=fd)
    current = os.open("deep", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
    os.close(fd)
    for _ in range(1500):  # deeper than Python's recursion limit and PATH_MAX
        os.mkdir("dddddddddd", dir_fd=current)
        nxt = os.open("dddddddddd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
        os.close(current)
        current = nxt
    os.close(current)
    linux.remove_tree(str(tmp_path / "deep"))
    assert not (tmp_path / "deep").exists()


def test_clear_dir_keeps_the_directory(linux: LinuxHost, tmp_path: Path) -> None:
    (tmp_path / "v" / "sub").mkdir(parents=True)
    (tmp_path / "v" / "f").write_text("z")
    linux.clear_dir(str(tmp_path / "v"))
    assert (tmp_path / "v").is_dir() and not list((tmp_path / "v").iterdir())


def test_remove_tree_of_a_symlink_removes_only_the_link(linux: LinuxHost, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("z")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    linux.remove_tree(str(tmp_path / "link"))
    assert not (tmp_path / "link").exists() and (tmp_path / "real" / "f").exists()


# mountinfo logic on a fixture --------------------------------------------------------------
@pytest.fixture
def fixture_host(tmp_path: Path) -> Iterator[tuple[LinuxHost, Path]]:
    """A LinuxHost whose mountinfo says: a filesystem (the real device of tmp_path) mounted at
    fs/, its vol/ bound at t1, t1 bound again at t2, another dir at t3, a mount under vol."""
    dev = os.stat(tmp_path).st_dev
    d = f"{os.major(dev)}:{os.minor(dev)}"
    for sub in ("fs/vol/deeper", "fs/other", "t1", "t2", "t3", "fs/vol/mnt"):
        (tmp_path / sub).mkdir(parents=True)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    lines = [
        f"1 0 {d} / {tmp_path}/fs rw - ext4 /dev/x rw",
        f"2 1 {d} /vol {tmp_path}/t1 rw - ext4 /dev/x rw",
        f"3 1 {d} /vol {tmp_path}/t2 rw - ext4 /dev/x rw",
        f"4 1 {d} /other {tmp_path}/t3 rw - ext4 /dev/x rw",
        f"5 1 {d} /vol/deeper {tmp_path}/fs/vol/mnt rw - ext4 /dev/x rw",
    ]
    (proc / "self" / "mountinfo").write_text("\n".join(lines) + "\n")
    yield LinuxHost(proc=str(proc)), tmp_path


def test_is_bound_from_compares_device_and_root(fixture_host: tuple[LinuxHost, Path]) -> None:
    host, base = fixture_host
    vol = str(base / "fs" / "vol")
    assert host.is_bound_from(str(base / "t1"), vol)
    assert host.is_bound_from(str(base / "t2"), vol)
    assert not host.is_bound_from(str(base / "t3"), vol)
    assert not host.is_bound_from(str(base / "fs" / "other"), vol)  # not a mount point
    assert not host.is_bound_from(str(base / "t1"), str(base / "fs" / "gone"))


def test_dir_mounts_lists_binds_of_it_and_below(fixture_host: tuple[LinuxHost, Path]) -> None:
    host, base = fixture_host
    assert host.dir_mounts(str(base / "fs" / "vol")) == [
        str(base / "t1"), str(base / "t2"), str(base / "fs" / "vol" / "mnt")]  # fmt: skip
    assert host.dir_mounts(str(base / "fs" / "nope")) == []


def test_parse_mountinfo_reads_ids_groups_and_escapes() -> None:
    text = ("36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:7 - ext3 /dev/root rw\n"
            "37 36 98:0 /a /b rw - ext4 /dev/x rw\n"
            "garbage\n")  # fmt: skip
    assert fscrypt.parse_mountinfo(text) == [
        fscrypt.Mount(id="36", parent="35", dev="98:0", root="/mnt1", point="/mnt two",
                      shared="7", master="1"),
        fscrypt.Mount(id="37", parent="36", dev="98:0", root="/a", point="/b"),
    ]  # fmt: skip


@pytest.mark.parametrize(("root", "shows"), [
    ("/vol", True), ("/vol/deeper", True), ("/vol//deleted", True), ("/vol/x//deleted", True),
    ("/volume", False), ("/", False), ("/other//deleted", False), ("/vol", True),
])  # fmt: skip
def test_a_mount_shows_the_dir_by_root_and_a_deleted_root_counts(root: str, shows: bool) -> None:
    mount = fscrypt.Mount(id="1", parent="0", dev="8:1", root=root, point="/p")
    assert fscrypt._shows(mount, "8:1", "/vol") is shows
    assert not fscrypt._shows(mount, "8:2", "/vol")


def test_a_deleted_bind_is_not_taken_for_a_dir_named_deleted() -> None:
    mount = fscrypt.Mount(id="1", parent="0", dev="8:1", root="/vol//deleted", point="/p")
    assert not fscrypt._shows(mount, "8:1", "/vol/deleted")


@pytest.fixture
def namespaces(fixture_host: tuple[LinuxHost, Path]) -> tuple[LinuxHost, Path]:
    """The fixture's namespace (ours: pid 1 is in it too) plus three more: pids 20 and 21 share
    one (a container: a copy of our t1 bind made by propagation, its own bind of vol/deeper,
    one of a deleted vol); pid 30 is a kernel thread (no namespace to read), pid 40 exited
    after its namespace was read, pid 50 has a namespace of its own with nothing of vol."""
    host, base = fixture_host
    proc = base / "proc"
    d = f"{os.major(os.stat(base).st_dev)}:{os.minor(os.stat(base).st_dev)}"
    ns = base / "nsfs"
    ns.mkdir()
    for name in ("ours", "container", "gone", "other"):
        (ns / name).write_text(name)
    (proc / "self" / "ns").mkdir()
    (proc / "self" / "ns" / "mnt").symlink_to(ns / "ours")
    ours = [  # t1 a shared bind on a shared parent: what the kubelet dir does
        f"1 0 {d} / {base}/fs rw shared:3 - ext4 /dev/x rw",
        f"2 1 {d} /vol {base}/t1 rw shared:7 - ext4 /dev/x rw",
        f"3 1 {d} /vol {base}/t2 rw - ext4 /dev/x rw",
        f"4 1 {d} /other {base}/t3 rw - ext4 /dev/x rw",
        f"5 1 {d} /vol/deeper {base}/fs/vol/mnt rw - ext4 /dev/x rw",
    ]
    (proc / "self" / "mountinfo").write_text("\n".join(ours) + "\n")
    container = [
        "100 0 0:50 / / rw - overlay overlay rw",
        f"101 100 {d} / /host rw master:3 - ext4 /dev/x rw",
        f"102 101 {d} /vol /host/t1 rw master:7 - ext4 /dev/x rw",  # the copy of our t1
        f"103 100 {d} /vol/deeper /data rw master:7 - ext4 /dev/x rw",  # its own bind
        f"104 100 {d} /vol//deleted /old rw - ext4 /dev/x rw",
        f"105 100 {d} /other /elsewhere rw - ext4 /dev/x rw",
    ]
    pids: dict[str, str | None] = {"1": "ours", "20": "container", "21": "container",
                                   "30": None, "40": "gone", "50": "other"}  # fmt: skip
    for pid, space in pids.items():
        (proc / pid).mkdir()
        if space is not None:
            (proc / pid / "ns").mkdir()
            (proc / pid / "ns" / "mnt").symlink_to(ns / space)
    (proc / "1" / "mountinfo").write_text("1 0 9:9 / /never-read rw - ext4 /dev/y rw\n")
    (proc / "20" / "mountinfo").write_text("\n".join(container) + "\n")
    (proc / "21" / "mountinfo").write_text(f"9 0 {d} /vol /never-read rw - ext4 /dev/x rw\n")
    (proc / "50" / "mountinfo").write_text(f"200 0 {d} / / rw - ext4 /dev/x rw\n")
    return host, base


def test_dir_mounts_looks_in_every_mount_namespace(namespaces: tuple[LinuxHost, Path]) -> None:
    host, base = namespaces
    assert host._fscrypt._other_namespaces() == [20, 40, 50]
    assert host.dir_mounts(str(base / "fs" / "vol")) == [
        str(base / "t1"), str(base / "t2"), str(base / "fs" / "vol" / "mnt"),
        "/data (mount namespace of pid 20)", "/old (mount namespace of pid 20)",
    ]  # fmt: skip
    assert host.dir_mounts(str(base / "fs" / "vol" / "deeper")) == [
        str(base / "fs" / "vol" / "mnt"), "/data (mount namespace of pid 20)"]  # fmt: skip
    assert host.dir_mounts(str(base / "fs" / "other")) == [
        str(base / "t3"), "/elsewhere (mount namespace of pid 20)"]  # fmt: skip
    assert host.is_bound_from(str(base / "t1"), str(base / "fs" / "vol"))  # ours only
    assert not host.is_bound_from("/data", str(base / "fs" / "vol"))


def test_a_mountinfo_past_the_limit_is_reported_not_skipped(
    namespaces: tuple[LinuxHost, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, base = namespaces
    (base / "proc" / "50" / "mountinfo").write_text("x" * 200 + "\n")
    monkeypatch.setattr(fscrypt, "MOUNTINFO_LIMIT", 100)
    found = host.dir_mounts(str(base / "fs" / "other"))
    assert found[-1].startswith("? (mount namespace of pid 50: its mountinfo is over 100 bytes")


def test_our_namespace_unknown_means_every_namespace_is_read(
    namespaces: tuple[LinuxHost, Path],
) -> None:
    host, base = namespaces
    (base / "proc" / "self" / "ns" / "mnt").unlink()
    assert host._fscrypt._other_namespaces() == [1, 20, 40, 50]


def test_remove_tree_refuses_a_tree_with_a_mount_inside(
    fixture_host: tuple[LinuxHost, Path],
) -> None:
    host, base = fixture_host
    with pytest.raises(Busy, match="mounted"):
        host.remove_tree(str(base / "fs" / "vol"))
    with pytest.raises(Busy):
        host.clear_dir(str(base / "fs" / "vol"))
    assert (base / "fs" / "vol" / "deeper").is_dir()


def test_files_open_in_reads_proc_links_not_path_strings(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    held = tmp_path / "data" / "held"
    held.write_text("x")
    proc = tmp_path / "proc"
    for pid, comm in (("123", "worker"), ("77", "idle"), ("9", "fifo")):
        (proc / pid / "fd").mkdir(parents=True)
        (proc / pid / "comm").write_text(comm + "\n")
    (proc / "123" / "fd" / "3").symlink_to(held)
    (proc / "77" / "fd" / "0").symlink_to("/dev/null")
    os.mkfifo(tmp_path / "data" / "pipe")
    (proc / "9" / "fd" / "4").symlink_to(tmp_path / "data" / "pipe")  # never opened
    (proc / "self").mkdir()
    host = LinuxHost(proc=str(proc))
    assert host.files_open_in(str(tmp_path / "data"), 0) == ["pid 123 (worker)"]
    assert host.files_open_in(str(tmp_path / "data"), 7) == []


def test_files_open_in_follows_the_mappings_maps_puts_on_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    held = tmp_path / "data" / "lib.so"
    held.write_text("x")
    st = os.stat(held)
    on = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    proc = tmp_path / "proc"
    for pid in ("5", "6", "7"):
        (proc / pid / "map_files").mkdir(parents=True)
        (proc / pid / "comm").write_text(f"p{pid}\n")
    (proc / "5" / "maps").write_text(
        f"1000-2000 r-xp 00000000 {on} {st.st_ino} {held}\n"
        f"2000-3000 r--p 00001000 {on} {st.st_ino} {held}\n"  # same file: looked at once
        "3000-4000 rw-p 00000000 00:00 0 [heap]\n")  # fmt: skip
    (proc / "5" / "map_files" / "1000-2000").symlink_to(held)
    # pid 6: maps puts it on another device: its map_files entry is never looked at
    (proc / "6" / "maps").write_text(f"1000-2000 r-xp 00000000 ff:ff {st.st_ino} {held}\n")
    (proc / "6" / "map_files" / "1000-2000").symlink_to(held)
    # pid 7: a maps past the limit: every map_files entry is looked at
    (proc / "7" / "maps").write_text("x" * 5000 + "\n")
    (proc / "7" / "map_files" / "5000-6000").symlink_to(held)
    monkeypatch.setattr(fscrypt, "MAPS_LIMIT", 1000)
    host = LinuxHost(proc=str(proc))
    assert host.files_open_in(str(tmp_path / "data"), 0) == ["pid 5 (p5)", "pid 7 (p7)"]
    links = list(fscrypt.FscryptHost._links(str(proc / "5"), st.st_dev))
    assert [os.path.basename(link) for link in links] == ["cwd", "root", "1000-2000"]


# the fake ----------------------------------------------------------------------------------
ROOT = "/data/pool"


@pytest.fixture
def fake() -> FakeHost:
    return FakeHost()


def test_fake_identifier_depends_only_on_the_key(fake: FakeHost) -> None:
    with make_key(1) as a, make_key(1) as b, make_key(2) as c:
        ia, ib, ic = (fake.fscrypt_add_key(ROOT, k) for k in (a, b, c))
    assert ia == ib != ic and len(ia) == 32
    assert fake.fscrypt_key_status(ROOT, ia) == KEY_PRESENT
    assert fake.fscrypt_key_status("/elsewhere", ia) == KEY_ABSENT


def test_fake_volume_lifecycle_and_busy_removal(fake: FakeHost) -> None:
    vol = f"{ROOT}/v1"
    fake.make_project_dir(vol, 17)
    with make_key() as key:
        ident = fake.fscrypt_add_key(ROOT, key)
    fake.fscrypt_set_policy(vol, ident)
    fake.fscrypt_set_policy(vol, ident)  # same policy: nothing
    with pytest.raises(FailedPrecondition):
        fake.fscrypt_set_policy(vol, IDENT)
    assert fake.fscrypt_policy_of(vol) == ident and fake.dir_project(vol) == 17
    fake.quota_set(ROOT, 17, 1000, 50)
    assert fake.quota_get(ROOT, 17) == Quota(0, 1024, 0, 50)
    fake.fscrypt_busy.add(17)
    assert fake.files_open_in(ROOT, 17) == [f"pid {FAKE_BUSY_PID} (fake)"]
    removal = fake.fscrypt_remove_key(ROOT, ident)
    assert removal.status == KEY_INCOMPLETELY_REMOVED and removal.files_busy
    assert fake.fscrypt_key_status(ROOT, ident) == KEY_INCOMPLETELY_REMOVED
    fake.fscrypt_busy.clear()
    assert fake.files_open_in(ROOT, 17) == []
    assert fake.fscrypt_remove_key(ROOT, ident).status == KEY_ABSENT
    assert fake.fscrypt_remove_key(ROOT, ident).status == KEY_ABSENT  # absent: not an error
    assert not fake.is_empty()  # directory and quota are still there
    fake.remove_tree(vol)
    fake.quota_set(ROOT, 17, 0, 0)
    assert fake.is_empty() and fake.quota_get(ROOT, 17) == Quota(0, 0, 0, 0)


def test_fake_policy_needs_a_present_key_and_an_empty_dir(fake: FakeHost) -> None:
    fake.make_project_dir(f"{ROOT}/v", 1)
    with pytest.raises(FailedPrecondition, match="keyring"):
        fake.fscrypt_set_policy(f"{ROOT}/v", IDENT)
    with make_key() as key:
        ident = fake.fscrypt_add_key(ROOT, key)
    fake.dirs.add(f"{ROOT}/v/sub")
    with pytest.raises(FailedPrecondition, match="not empty"):
        fake.fscrypt_set_policy(f"{ROOT}/v", ident)
    fake.clear_dir(f"{ROOT}/v")
    fake.fscrypt_set_policy(f"{ROOT}/v", ident)
    assert f"{ROOT}/v" in fake.dirs


def test_fake_binds_plain_directories_and_binds_of_them(fake: FakeHost) -> None:
    fake.dirs |= {f"{ROOT}/v1", f"{ROOT}/v2", "/t/a", "/t/b", "/t/c"}
    fake.bind_mount(f"{ROOT}/v1", "/t/a", ["nosuid", "nodev"])
    fake.bind_mount("/t/a", "/t/b", ["ro"])
    fake.bind_mount(f"{ROOT}/v2", "/t/c", [])
    assert fake.is_bound_from("/t/a", f"{ROOT}/v1") and fake.is_bound_from("/t/b", f"{ROOT}/v1")
    assert not fake.is_bound_from("/t/c", f"{ROOT}/v1")
    assert fake.dir_mounts(f"{ROOT}/v1") == ["/t/a", "/t/b"]
    assert fake.mounts["/t/b"].options == ["ro"]
    fake.dirs.add(f"{ROOT}/v1/inner")
    fake.bind_mount(f"{ROOT}/v2", f"{ROOT}/v1/inner", [])
    with pytest.raises(Busy):  # like the kernel's: a mount under it, not binds of it elsewhere
        fake.remove_tree(f"{ROOT}/v1")
    fake.umount(f"{ROOT}/v1/inner")
    fake.umount("/t/a")
    fake.umount("/t/b")
    fake.remove_tree(f"{ROOT}/v1")
    assert f"{ROOT}/v1" not in fake.dirs and fake.dir_mounts(f"{ROOT}/v1") == []


def test_fake_bind_of_a_staged_mount_still_copies_its_source(fake: FakeHost) -> None:
    fake.mounts["/staging/x"] = FakeMount("/dev/mapper/x", "ext4", ["rw"])
    fake.dirs.add("/t/p")
    fake.bind_mount("/staging/x", "/t/p", ["ro"])
    assert fake.mounts["/t/p"].source == "/dev/mapper/x" and fake.mounts["/t/p"].directory == ""


@pytest.mark.parametrize("step", [
    "make_project_dir", "fscrypt_add_key", "fscrypt_set_policy", "fscrypt_remove_key",
    "fscrypt_key_status", "quota_set", "quota_get", "fscrypt_pool", "remove_tree",
    "clear_dir", "files_open_in", "dir_mounts", "is_bound_from", "fscrypt_unavailable",
    "fscrypt_policy_of", "dir_project",
])  # fmt: skip
def test_every_fake_fscrypt_step_can_fail(fake: FakeHost, step: str) -> None:
    assert step in STEPS
    fake.fail(step, FailedPrecondition(f"injected {step}"))
    calls: dict[str, Any] = {
        "make_project_dir": lambda: fake.make_project_dir(f"{ROOT}/v", 1),
        "fscrypt_add_key": lambda: fake.fscrypt_add_key(ROOT, make_key()),
        "fscrypt_set_policy": lambda: fake.fscrypt_set_policy(f"{ROOT}/v", IDENT),
        "fscrypt_remove_key": lambda: fake.fscrypt_remove_key(ROOT, IDENT),
        "fscrypt_key_status": lambda: fake.fscrypt_key_status(ROOT, IDENT),
        "quota_set": lambda: fake.quota_set(ROOT, 1, 1, 1),
        "quota_get": lambda: fake.quota_get(ROOT, 1),
        "fscrypt_pool": lambda: fake.fscrypt_pool("/data/pool.img", ROOT, 1 << 30),
        "remove_tree": lambda: fake.remove_tree(f"{ROOT}/v"),
        "clear_dir": lambda: fake.clear_dir(f"{ROOT}/v"),
        "files_open_in": lambda: fake.files_open_in(ROOT, 1),
        "dir_mounts": lambda: fake.dir_mounts(f"{ROOT}/v"),
        "is_bound_from": lambda: fake.is_bound_from("/t", f"{ROOT}/v"),
        "fscrypt_unavailable": lambda: fake.fscrypt_unavailable(ROOT),
        "fscrypt_policy_of": lambda: fake.fscrypt_policy_of(f"{ROOT}/v"),
        "dir_project": lambda: fake.dir_project(f"{ROOT}/v"),
    }
    with pytest.raises(FailedPrecondition, match=f"injected {step}"):
        calls[step]()
    try:  # only the next call fails
        calls[step]()
    except FailedPrecondition as exc:
        assert "injected" not in str(exc)


def test_fake_pool_and_reason_and_reboot(fake: FakeHost) -> None:
    fake.fscrypt_pool("/data/pool.img", ROOT, 1 << 30)
    fake.fscrypt_pool("/data/pool.img", ROOT, 1 << 30)  # mounted already: nothing
    assert fake.fscrypt_pools == {ROOT: "/data/pool.img"} and fake.is_empty()
    with pytest.raises(FailedPrecondition):
        fake.fscrypt_pool("/data/other.img", ROOT, 1 << 30)
    assert fake.fscrypt_unavailable(ROOT) is None
    fake.fscrypt_reason = "no project quota (fake)"
    assert fake.fscrypt_unavailable(ROOT) == "no project quota (fake)"
    with make_key() as key:
        ident = fake.fscrypt_add_key(ROOT, key)
    fake.make_project_dir(f"{ROOT}/v", 3)
    fake.reboot()
    assert fake.fscrypt_key_status(ROOT, ident) == KEY_ABSENT and not fake.fscrypt_pools
    assert fake.dir_project(f"{ROOT}/v") == 3  # the directory is on disk: it stays
