"""Kata direct volumes, host side, without a kernel: ``csi.host.kata`` through ``LinuxHost`` on
plain files in a temp dir (mountInfo.json: path, encoding, keys, modes, atomic rewrite, bounded
and tolerant reads, listings that skip junk, removal that never follows a symlink), the guard
against a scripted runner and a fixture mountinfo, file_users against a fixture /proc tree, and
the fake (``FakeHost``'s ``DirectVolumes``).
"""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from csi.errors import DriverError, FailedPrecondition, Internal, InvalidArgument
from csi.host import GUARD_SOURCE, DirectVolume, kata
from csi.host import commands as cmd
from csi.host.fake import STEPS, FakeHost, FakeMount
from csi.host.kata import (
    MOUNT_INFO,
    MOUNT_INFO_LIMIT,
    mount_info_bytes,
    parse_mount_info,
    target_of,
    visible_mount,
    volume_dir_name,
)
from csi.host.linux import LinuxHost
from csi.host.runner import DEFAULT_TIMEOUT

# a kubelet target whose standard base64 has a "+" where the urlsafe one has "-", and "=="
TARGET = ("/var/lib/kubelet/pods/7f3c2a1e-0b4d-4c8e-9a6f-2d1e5b8c9a70/volumes/"
          "kubernetes.io~csi/kata-scratch/mount")  # fmt: skip
TARGET_NAME = (
    "L3Zhci9saWIva3ViZWxldC9wb2RzLzdmM2MyYTFlLTBiNGQtNGM4ZS05YTZmLTJkMWU1YjhjOWE3MC92b2x1bWVz"
    "L2t1YmVybmV0ZXMuaW9-Y3NpL2thdGEtc2NyYXRjaC9tb3VudA=="
)
SLASHY = "/k/?\u00ff\u00ff~/mnt"  # standard base64 has both "+" and "/"; non-ASCII (UTF-8) too
VOLUME = DirectVolume(
    volume_type="directvol", device="/var/lib/luks-ephemeral/kata/v1.img", fstype="ext4",
    metadata={"encryptionKey": "ephemeral", "createFilesystem": "true", "fsGroup": "2000"},
    options=["nosuid", "nodev"],
)  # fmt: skip
KEYS = {"volume-type", "device", "fstype", "metadata", "options"}


@pytest.fixture
def host() -> LinuxHost:
    return LinuxHost()


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "kata-containers" / "shared" / "direct-volumes")


def vdir(root: str, target: str = TARGET) -> Path:
    return Path(root) / volume_dir_name(target)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# names -----------------------------------------------------------------------------------------
def test_the_name_is_go_urlencoding_padded_not_the_standard_alphabet() -> None:
    standard = base64.b64encode(TARGET.encode()).decode()
    assert "+" in standard and standard.endswith("==")  # the case the alphabets differ on
    assert volume_dir_name(TARGET) == TARGET_NAME
    assert TARGET_NAME == standard.replace("+", "-").replace("/", "_")
    slashy = base64.b64encode(SLASHY.encode()).decode()
    assert "/" in slashy and "+" in slashy
    name = volume_dir_name(SLASHY)
    assert "/" not in name and "+" not in name and name.endswith("=")
    assert target_of(name) == SLASHY and target_of(TARGET_NAME) == TARGET


@pytest.mark.parametrize("target", ["", "relative/path", "/a\0b", "/bad\udcff"])
def test_a_target_that_is_not_an_absolute_utf8_path_is_refused(target: str) -> None:
    with pytest.raises(InvalidArgument):
        volume_dir_name(target)


def test_a_target_too_long_for_one_name_is_invalid_argument() -> None:
    longest = "/" + "a" * 190  # 191 bytes -> 256 base64 characters
    assert len(base64.urlsafe_b64encode(longest.encode())) == 256
    with pytest.raises(InvalidArgument, match="exceeds 255"):
        volume_dir_name(longest)
    assert len(volume_dir_name(longest[:-2])) == 252  # 189 bytes: the longest target


@pytest.mark.parametrize("name", [
    "", "not base64!", "YQ==",  # "a": not absolute
    base64.b64encode(SLASHY.encode()).decode().replace("/", "_"),  # still a "+": standard
    "L2E", "L2E==", "L2F=",  # no padding, too much, non-zero padding bits (decodes to "/a")
    base64.urlsafe_b64encode(b"/\xff\xfe").decode(),  # not UTF-8
    base64.urlsafe_b64encode(b"/a\0b").decode(),
    ".mountInfo.json.abcd.tmp",
])  # fmt: skip
def test_names_that_are_not_an_encoded_absolute_path_decode_to_none(name: str) -> None:
    assert target_of(name) is None


# content ---------------------------------------------------------------------------------------
def test_the_json_has_exactly_kata_keys_and_string_values() -> None:
    doc = json.loads(mount_info_bytes(VOLUME))
    assert set(doc) == KEYS
    assert doc == {
        "volume-type": "directvol", "device": VOLUME.device, "fstype": "ext4",
        "metadata": {"encryptionKey": "ephemeral", "createFilesystem": "true", "fsGroup": "2000"},
        "options": ["nosuid", "nodev"],
    }  # fmt: skip
    empty = json.loads(mount_info_bytes(DirectVolume("directvol", "/d", "ext4", {}, [])))
    assert empty["metadata"] == {} and empty["options"] == []  # written even when empty
    assert parse_mount_info(mount_info_bytes(VOLUME)) == VOLUME


def test_a_file_kata_itself_wrote_is_read() -> None:
    go = (b'{"device":"/dev/sdb","fstype":"ext4","volume-type":"directvol",'
          b'"unknown":1,"metadata":{"k":"v"}}')  # fmt: skip
    assert parse_mount_info(go) == DirectVolume("directvol", "/dev/sdb", "ext4", {"k": "v"}, [])


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[]", b'"x"', b"null", b"\xff\xfe{}",
    b'{"device":"/d","fstype":"ext4"}',
    b'{"volume-type":1,"device":"/d","fstype":"ext4"}',
    b'{"volume-type":"directvol","device":"/d","fstype":"ext4","metadata":{"a":1}}',
    b'{"volume-type":"directvol","device":"/d","fstype":"ext4","metadata":[]}',
    b'{"volume-type":"directvol","device":"/d","fstype":"ext4","options":"ro"}',
    b'{"volume-type":"directvol","device":"/d","fstype":"ext4","options":[1]}',
    b"[" * 100_000,
])  # fmt: skip
def test_anything_else_parses_to_none(data: bytes) -> None:
    assert parse_mount_info(data) is None


# write / read ---------------------------------------------------------------------------------
def test_write_makes_the_exact_path_and_modes_whatever_the_umask(host: LinuxHost,
                                                                 root: str) -> None:
    old = os.umask(0o277)  # would make the directory 0500 and the file 0400
    try:
        host.direct_volume_write(root, TARGET, VOLUME)
    finally:
        os.umask(old)
    directory = Path(root) / TARGET_NAME
    assert os.listdir(root) == [TARGET_NAME]
    assert os.listdir(directory) == [MOUNT_INFO]
    assert stat.S_ISDIR(os.lstat(directory).st_mode) and mode(directory) == 0o700
    assert stat.S_ISREG(os.lstat(directory / MOUNT_INFO).st_mode)
    assert mode(directory / MOUNT_INFO) == 0o600
    assert set(json.loads((directory / MOUNT_INFO).read_bytes())) == KEYS
    assert host.direct_volume_read(root, TARGET) == VOLUME


def test_an_existing_directory_gets_mode_0700(host: LinuxHost, root: str) -> None:
    directory = vdir(root)
    directory.mkdir(parents=True, mode=0o755)
    directory.chmod(0o755)
    host.direct_volume_write(root, TARGET, VOLUME)
    assert mode(directory) == 0o700


def test_the_same_volume_again_changes_nothing(host: LinuxHost, root: str) -> None:
    host.direct_volume_write(root, TARGET, VOLUME)
    path = vdir(root) / MOUNT_INFO
    before = os.stat(path)
    host.direct_volume_write(root, TARGET, VOLUME)
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def test_a_rewrite_replaces_the_file_by_rename_and_keeps_the_sandbox_file(
    host: LinuxHost, root: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    host.direct_volume_write(root, TARGET, VOLUME)
    directory = vdir(root)
    (directory / "sandbox-0123abcd").touch()  # what Kata's runtime adds
    (directory / ".mountInfo.json.deadbeef.tmp").write_bytes(b"half")  # a killed writer's
    before = os.stat(directory / MOUNT_INFO).st_ino
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ro = DirectVolume("directvol", VOLUME.device, "ext4", dict(VOLUME.metadata), ["ro"])
    host.direct_volume_write(root, TARGET, ro)
    assert os.stat(directory / MOUNT_INFO).st_ino != before  # a new file renamed over
    assert sorted(os.listdir(directory)) == [MOUNT_INFO, "sandbox-0123abcd"]
    assert host.direct_volume_read(root, TARGET) == ro
    assert mode(directory / MOUNT_INFO) == 0o600
    assert len(synced) >= 2  # the file, then its directory


def test_a_failed_rename_leaves_the_old_file_and_no_temporary(
    host: LinuxHost, root: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    host.direct_volume_write(root, TARGET, VOLUME)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", fail)
    other = DirectVolume("directvol", "/other.img", "ext4", {}, [])
    with pytest.raises(DriverError):
        host.direct_volume_write(root, TARGET, other)
    assert os.listdir(vdir(root)) == [MOUNT_INFO]
    assert host.direct_volume_read(root, TARGET) == VOLUME


def test_a_symlink_in_place_of_the_directory_is_never_followed(host: LinuxHost, root: str,
                                                               tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Path(root).mkdir(parents=True)
    vdir(root).symlink_to(elsewhere)
    with pytest.raises(InvalidArgument, match="symlink"):
        host.direct_volume_write(root, TARGET, VOLUME)
    assert os.listdir(elsewhere) == []
    assert host.direct_volume_read(root, TARGET) is None


def test_a_symlink_named_mountinfo_is_replaced_not_written_through(host: LinuxHost, root: str,
                                                                   tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    vdir(root).mkdir(parents=True)
    (vdir(root) / MOUNT_INFO).symlink_to(victim)
    assert host.direct_volume_read(root, TARGET) is None
    host.direct_volume_write(root, TARGET, VOLUME)
    assert victim.read_bytes() == b"keep"
    assert not (vdir(root) / MOUNT_INFO).is_symlink()
    assert host.direct_volume_read(root, TARGET) == VOLUME


def test_relative_or_too_long_targets_are_refused_on_write(host: LinuxHost, root: str) -> None:
    for target in ("relative", "", "/" + "a" * 300):
        with pytest.raises(InvalidArgument):
            host.direct_volume_write(root, target, VOLUME)
        assert host.direct_volume_read(root, target) is None
    assert not os.path.exists(root)


def test_read_is_none_for_absent_malformed_oversized_or_odd_files(host: LinuxHost,
                                                                  root: str) -> None:
    assert host.direct_volume_read(root, TARGET) is None  # no root at all
    directory = vdir(root)
    directory.mkdir(parents=True)
    assert host.direct_volume_read(root, TARGET) is None  # no file
    path = directory / MOUNT_INFO
    for data in (b"{", b"[1]", b'{"device": 3}', b"\x00" * 10):
        path.write_bytes(data)
        assert host.direct_volume_read(root, TARGET) is None
    good = mount_info_bytes(VOLUME)
    path.write_bytes(good + b" " * (MOUNT_INFO_LIMIT - len(good)))  # exactly the limit: read
    assert host.direct_volume_read(root, TARGET) == VOLUME
    path.write_bytes(good + b" " * (MOUNT_INFO_LIMIT + 1 - len(good)))
    assert host.direct_volume_read(root, TARGET) is None
    path.unlink()
    os.mkfifo(path)  # would block a plain open: O_NONBLOCK, and not a regular file
    assert host.direct_volume_read(root, TARGET) is None
    path.unlink()
    path.mkdir()
    assert host.direct_volume_read(root, TARGET) is None


def test_a_read_never_reads_more_than_the_limit(host: LinuxHost, root: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    vdir(root).mkdir(parents=True)
    (vdir(root) / MOUNT_INFO).write_bytes(b" " * (10 * MOUNT_INFO_LIMIT))
    asked: list[int] = []
    real_read = os.read

    def read(fd: int, n: int) -> bytes:
        asked.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read)
    assert host.direct_volume_read(root, TARGET) is None
    assert sum(asked) <= MOUNT_INFO_LIMIT + 1


# list / remove ---------------------------------------------------------------------------------
def test_targets_decodes_names_and_skips_junk(host: LinuxHost, root: str) -> None:
    host.direct_volume_write(root, TARGET, VOLUME)
    host.direct_volume_write(root, SLASHY, VOLUME)
    broken = "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/broken/mount"
    vdir(root, broken).mkdir()
    (vdir(root, broken) / MOUNT_INFO).write_text("garbage")
    base = Path(root)
    for junk in ("not base64!", "YQ==", "L2F=", ".mountInfo.json.x.tmp"):
        (base / junk).mkdir()
    (base / volume_dir_name("/a/file")).write_text("")  # a file, not a directory
    (base / volume_dir_name("/a/link")).symlink_to(base / TARGET_NAME)
    assert host.direct_volume_targets(root) == {TARGET: VOLUME, SLASHY: VOLUME, broken: None}
    assert host.direct_volume_targets(str(base / "absent")) == {}


def test_remove_deletes_the_directory_with_the_sandbox_file_and_is_idempotent(
    host: LinuxHost, root: str,
) -> None:
    host.direct_volume_write(root, TARGET, VOLUME)
    host.direct_volume_write(root, SLASHY, VOLUME)
    (vdir(root) / "0123456789abcdef").touch()
    host.direct_volume_remove(root, TARGET)
    assert not os.path.lexists(vdir(root))
    assert host.direct_volume_targets(root) == {SLASHY: VOLUME}
    host.direct_volume_remove(root, TARGET)
    host.direct_volume_remove(str(Path(root) / "absent"), TARGET)
    host.direct_volume_remove(root, "/" + "a" * 300)  # cannot exist: nothing to do


def test_remove_never_follows_a_symlink(host: LinuxHost, root: str, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / MOUNT_INFO).write_text("{}")
    Path(root).mkdir(parents=True)
    vdir(root).symlink_to(elsewhere)
    host.direct_volume_remove(root, TARGET)
    assert not os.path.lexists(vdir(root)) and os.listdir(elsewhere) == [MOUNT_INFO]
    vdir(root).mkdir()
    (vdir(root) / "sandbox").symlink_to(elsewhere)
    host.direct_volume_remove(root, TARGET)
    assert not os.path.lexists(vdir(root)) and os.listdir(elsewhere) == [MOUNT_INFO]


def test_remove_refuses_an_empty_target_instead_of_deleting_the_root(host: LinuxHost,
                                                                     root: str) -> None:
    host.direct_volume_write(root, TARGET, VOLUME)
    with pytest.raises(InvalidArgument):
        host.direct_volume_remove(root, "")
    assert os.listdir(root) == [TARGET_NAME]


def test_os_errors_leave_the_host_typed(host: LinuxHost, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(DriverError):
        host.direct_volume_write(str(a_file), TARGET, VOLUME)


# the guard -------------------------------------------------------------------------------------
LINE = "{id} 30 {dev} / {point} {opts} shared:1 - {fs} {source} {sopts}\n"
BASE = LINE.format(id=20, dev="0:21", point="/", opts="rw,relatime", fs="ext4",
                   source="/dev/vda1", sopts="rw")  # fmt: skip


class GuardRunner:
    """Answers ``mount -t tmpfs ...`` by adding the guard's line to the fixture mountinfo."""

    def __init__(self, mountinfo: Path, *, effect: bool = True) -> None:
        self.mountinfo = mountinfo
        self.calls: list[list[str]] = []
        self.effect = effect

    def __call__(self, argv: Sequence[str], *, stdin: memoryview | bytes | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> str:  # fmt: skip
        self.calls.append(list(argv))
        if self.effect:
            with self.mountinfo.open("a") as f:
                f.write(guard_line(argv[-1]))
        return ""


def guard_line(point: str, *, opts: str = "ro,nosuid,nodev,noexec,relatime",
               source: str = GUARD_SOURCE, fs: str = "tmpfs") -> str:  # fmt: skip
    escaped = point.replace("\\", "\\134").replace(" ", "\\040")
    return LINE.format(id=99, dev="0:99", point=escaped, opts=opts, fs=fs, source=source,
                       sopts="ro,size=4k,mode=555")  # fmt: skip


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(BASE)
    return tmp_path / "proc"


def test_the_guard_command_is_a_read_only_tmpfs_named_guard_source() -> None:
    assert cmd.guard_mount("/t") == [
        "mount", "-t", "tmpfs", "-o", "ro,nosuid,nodev,noexec,size=4k,mode=0555",
        GUARD_SOURCE, "/t",
    ]  # fmt: skip


def test_guard_mount_mounts_once_and_is_guarded_reads_mountinfo(proc: Path,
                                                                tmp_path: Path) -> None:
    target = tmp_path / "pods" / "my vol" / "mount"  # made first; a space in mountinfo
    runner = GuardRunner(proc / "self" / "mountinfo")
    host = LinuxHost(proc=str(proc), runner=runner)
    assert not host.is_guarded(str(target))
    host.guard_mount(str(target))
    assert target.is_dir()
    assert runner.calls == [cmd.guard_mount(str(target))]
    assert host.is_guarded(str(target))
    host.guard_mount(str(target))  # there already: nothing
    assert len(runner.calls) == 1


def test_a_mount_that_does_not_show_up_is_internal(proc: Path, tmp_path: Path) -> None:
    host = LinuxHost(proc=str(proc), runner=GuardRunner(proc / "self" / "mountinfo",
                                                        effect=False))  # fmt: skip
    with pytest.raises(Internal, match="does not show"):
        host.guard_mount(str(tmp_path / "t"))


@pytest.mark.parametrize("line", [
    guard_line("/t", source="tmpfs"),  # a tmpfs, not ours
    guard_line("/t", fs="ramfs"),  # our name on another filesystem
    guard_line("/t", opts="rw,nosuid,nodev,noexec").replace("ro,size", "rw,size"),  # writable
    guard_line("/t/sub"),  # a path under the target
    guard_line("/t") + guard_line("/t", source="/dev/mapper/x", fs="ext4"),  # covered by another
])  # fmt: skip
def test_only_the_visible_read_only_tmpfs_named_guard_source_is_the_guard(line: str) -> None:
    assert not kata.is_guard(visible_mount(BASE + line, "/t"))


def test_the_guard_is_seen_even_above_another_mount_and_unescaped() -> None:
    over = guard_line("/t", source="/dev/mapper/x", fs="ext4") + guard_line("/t")
    assert kata.is_guard(visible_mount(BASE + over, "/t"))
    assert kata.is_guard(visible_mount(BASE + guard_line("/a b\\c"), "/a b\\c"))
    assert visible_mount(BASE, "/t") is None


def test_guard_mount_is_never_stacked_over_another_mount(proc: Path, tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    with (proc / "self" / "mountinfo").open("a") as f:
        f.write(guard_line(str(target), source="/dev/mapper/x", fs="ext4"))
    runner = GuardRunner(proc / "self" / "mountinfo")
    host = LinuxHost(proc=str(proc), runner=runner)
    with pytest.raises(FailedPrecondition, match="already a mount point"):
        host.guard_mount(str(target))
    assert runner.calls == []


def test_guard_mount_refuses_a_file_or_a_symlink(proc: Path, tmp_path: Path) -> None:
    runner = GuardRunner(proc / "self" / "mountinfo")
    host = LinuxHost(proc=str(proc), runner=runner)
    (tmp_path / "file").write_text("")
    with pytest.raises(FailedPrecondition, match="not a directory"):
        host.guard_mount(str(tmp_path / "file"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    with pytest.raises(InvalidArgument, match="symlink"):
        host.guard_mount(str(tmp_path / "link"))
    assert runner.calls == []


# file_users ------------------------------------------------------------------------------------
def fake_process(proc: Path, pid: int, comm: str, fds: dict[str, str]) -> None:
    base = proc / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "comm").write_text(comm + "\n")
    for fd, target in fds.items():
        (base / "fd" / fd).symlink_to(target)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "v1.img"
    path.write_bytes(b"\0" * 4096)
    yield path


def test_file_users_are_processes_with_a_descriptor_on_the_inode(proc: Path, tmp_path: Path,
                                                                 disk: Path) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(b"")
    alias = tmp_path / "hardlink.img"
    os.link(disk, alias)
    fake_process(proc, 100, "qemu-system-x86", {"0": "/dev/null", "7": str(disk)})
    fake_process(proc, 200, "cat", {"3": str(other)})
    fake_process(proc, 250, "shim", {"9": str(alias)})  # another name, the same inode
    fake_process(proc, 300, "dangling", {"4": str(tmp_path / "gone")})
    (proc / "400").mkdir()  # exited: no fd directory any more
    (proc / "self" / "fd").mkdir()
    (proc / "self" / "fd" / "3").symlink_to(disk)  # "self" is no pid
    host = LinuxHost(proc=str(proc))
    assert host.file_users(str(disk)) == ["pid 100 (qemu-system-x86)", "pid 250 (shim)"]
    assert host.file_users(str(other)) == ["pid 200 (cat)"]
    assert host.file_users(str(tmp_path / "absent")) == []


def test_file_users_is_bounded(proc: Path, disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for pid in range(10, 20):
        fake_process(proc, pid, f"p{pid}", {"3": str(disk)})
    monkeypatch.setattr(kata, "FILE_USERS_LIMIT", 3)
    assert LinuxHost(proc=str(proc)).file_users(str(disk)) == [
        "pid 10 (p10)", "pid 11 (p11)", "pid 12 (p12)"]  # fmt: skip


# the fake --------------------------------------------------------------------------------------
def test_fake_direct_volumes_by_root_and_target() -> None:
    fake = FakeHost()
    fake.direct_volume_write("/r", TARGET, VOLUME)
    fake.direct_volume_write("/other", SLASHY, VOLUME)
    assert fake.direct_volume_read("/r", TARGET) == VOLUME
    assert fake.direct_volume_read("/r", SLASHY) is None
    assert fake.direct_volume_targets("/r") == {TARGET: VOLUME}
    fake.direct_volumes[("/r", "/broken")] = None  # a file the driver cannot read
    assert fake.direct_volume_targets("/r") == {"/broken": None, TARGET: VOLUME}
    assert not fake.is_empty()
    fake.direct_volume_remove("/r", TARGET)
    fake.direct_volume_remove("/r", TARGET)
    fake.direct_volume_remove("/r", "/broken")
    fake.direct_volume_remove("/other", SLASHY)
    assert fake.direct_volumes == {} and fake.is_empty()
    with pytest.raises(InvalidArgument):
        fake.direct_volume_write("/r", "relative", VOLUME)
    with pytest.raises(InvalidArgument):
        fake.direct_volume_write("/r", "/" + "a" * 300, VOLUME)
    with pytest.raises(InvalidArgument):
        fake.direct_volume_remove("/r", "")


def test_fake_steps_can_fail() -> None:
    fake = FakeHost()
    new = ("direct_volume_write", "direct_volume_read", "direct_volume_remove",
           "direct_volume_targets", "guard_mount", "is_guarded", "file_users")  # fmt: skip
    assert set(new) <= set(STEPS)
    for step in new:
        fake.fail(step, Internal(f"boom {step}"))
    calls: list[Callable[[], object]] = [
        lambda: fake.direct_volume_write("/r", TARGET, VOLUME),
        lambda: fake.direct_volume_read("/r", TARGET),
        lambda: fake.direct_volume_remove("/r", TARGET),
        lambda: fake.direct_volume_targets("/r"),
        lambda: fake.guard_mount(TARGET),
        lambda: fake.is_guarded(TARGET),
        lambda: fake.file_users("/disk"),
    ]
    for step, call in zip(new, calls, strict=True):
        with pytest.raises(Internal, match=f"boom {step}"):
            call()
    assert fake.direct_volumes == {} and fake.mounts == {}
    assert f"direct_volume_write {TARGET}" in fake.calls


def test_fake_guard_is_a_read_only_tmpfs_mount() -> None:
    fake = FakeHost()
    fake.guard_mount(TARGET)
    fake.guard_mount(TARGET)
    mount = fake.mounts[TARGET]
    assert (mount.fs_type, mount.source) == ("tmpfs", GUARD_SOURCE) and "ro" in mount.options
    assert TARGET in fake.dirs and fake.is_guarded(TARGET) and fake.is_mountpoint(TARGET)
    assert not fake.is_empty()
    fake.umount(TARGET)
    assert not fake.is_guarded(TARGET)
    fake.mounts[TARGET] = FakeMount("/dev/mapper/x", "ext4", ["rw"])
    with pytest.raises(FailedPrecondition, match="already a mount point"):
        fake.guard_mount(TARGET)
    assert not fake.is_guarded(TARGET)
    fake.mounts[TARGET] = FakeMount("tmpfs", "tmpfs", ["ro"])  # not ours
    assert not fake.is_guarded(TARGET)


def test_fake_guard_refuses_a_file_target() -> None:
    fake = FakeHost()
    fake.make_file("/t/file")
    with pytest.raises(FailedPrecondition, match="not a directory"):
        fake.guard_mount("/t/file")


def test_fake_file_users_and_reboot() -> None:
    fake = FakeHost()
    fake.file_holders["/disk.img"] = ["pid 7 (qemu)"]
    assert fake.file_users("/disk.img") == ["pid 7 (qemu)"]
    assert fake.file_users("/other") == []
    fake.direct_volume_write("/run/kata", TARGET, VOLUME)
    fake.guard_mount(TARGET)
    fake.reboot()  # /run is a tmpfs, processes are gone, mounts are gone
    assert fake.direct_volumes == {} and fake.file_holders == {} and fake.mounts == {}
    assert fake.is_empty()
