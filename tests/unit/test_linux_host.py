"""The real ``LinuxHost``, without a kernel: commands go to a scripted runner, and the kernel's
tables are read from checked-in fixture trees (``tests/unit/fixtures/linux``: a /proc and a
/sys shaped like a node running a few volumes; its README says what is in them).

Covered: how command failures are classified into typed errors, the O_DIRECT fallback of
``loop_attach``, mountinfo parsing and unescaping, the sysfs readers (loops, dm names,
holders, cryptsetup's temporary mappings), who uses a mapping, that a key only ever travels on
stdin, and that every command line is the one ``csi.host.commands`` builds.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi.errors import Busy, FailedPrecondition, Internal, InvalidArgument
from csi.host import LuksFormat, MappingUse, dm, mountcalls, wipe
from csi.host import commands as cmd
from csi.host import linux as linux_host
from csi.host.dm import DeviceMapper
from csi.host.linux import LinuxHost, read_mountinfo, read_mounts
from csi.host.nbd import Qcow2Nbd
from csi.host.runner import DEFAULT_TIMEOUT, CommandFailed, run
from csi.keys import VolumeKey, random_key
from tests.unit.dm_kernel import Device, DmKernel

FIXTURES = Path(__file__).parent / "fixtures" / "linux"
MOUNTINFO = FIXTURES / "proc" / "self" / "mountinfo"
STAGING = "/var/lib/kubelet/plugins/kubernetes.io/csi/luks-eph/abc/globalmount"
POD1 = "/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount"
POD2 = "/var/lib/kubelet/pods/p2/volumes/kubernetes.io~csi/my vol/mount"  # \040 in the file
ODD = "/srv/back\\slash\ttab"  # \134 and \011 in the file
OPTIONS = LuksFormat("aes-xts-plain64", 512, "none", None)


# --- a scripted command runner ----------------------------------------------------------------
@dataclass
class Call:
    argv: list[str]
    stdin: bytes | None
    timeout: float


@dataclass
class Step:
    prefix: list[str]
    stdout: str
    exit: int
    stderr: str
    effect: Callable[[], object] | None


@dataclass
class ScriptedRunner:
    """Stands in for ``csi.host.runner.run``: records each call (a copy of stdin too) and
    answers from a script: the first unused step whose argv prefix matches; a command no step
    matches succeeds with empty stdout, as most of the host's commands do."""

    calls: list[Call] = field(default_factory=list)
    script: list[Step] = field(default_factory=list)

    def on(
        self,
        *prefix: str,
        stdout: str = "",
        exit: int = 0,
        stderr: str = "",
        effect: Callable[[], object] | None = None,
    ) -> ScriptedRunner:
        self.script.append(Step(list(prefix), stdout, exit, stderr, effect))
        return self

    def __call__(
        self,
        argv: Sequence[str],
        *,
        stdin: memoryview | bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> str:
        argv = [str(a) for a in argv]
        self.calls.append(Call(argv, None if stdin is None else bytes(stdin), timeout))
        for i, step in enumerate(self.script):
            if argv[: len(step.prefix)] == step.prefix:
                del self.script[i]
                if step.effect is not None:
                    step.effect()
                if step.exit:
                    raise CommandFailed(argv, step.exit, step.stderr)
                return step.stdout
        return ""

    @property
    def argvs(self) -> list[list[str]]:
        return [c.argv for c in self.calls]


@pytest.fixture
def runner() -> ScriptedRunner:
    return ScriptedRunner()


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """A private copy of the fixture /sys (tests may change it), with the ``holders/``
    directory every block device has (git keeps no empty directories)."""
    root = tmp_path / "sys"
    shutil.copytree(FIXTURES / "sys", root)
    for device in (root / "block").iterdir():
        (device / "holders").mkdir(exist_ok=True)
    return root


@pytest.fixture
def host(runner: ScriptedRunner, sysfs: Path) -> LinuxHost:
    return LinuxHost(sysfs=str(sysfs), proc=str(FIXTURES / "proc"), runner=runner)


@pytest.fixture
def key() -> Iterator[VolumeKey]:
    k = random_key(64)
    yield k
    k.wipe()


# --- construction and injection ---------------------------------------------------------------
def test_defaults_are_the_real_runner_and_the_real_kernel_tables() -> None:
    host = LinuxHost()
    assert host.runner is run
    assert (host.sysfs, host.proc, host.dev, host.qcow2) == ("/sys", "/proc", "/dev", None)


def test_without_a_runner_the_module_run_is_looked_up_at_each_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Older tests patch ``csi.host.linux.run`` after the host exists: that must still work."""
    host = LinuxHost()
    scripted = ScriptedRunner()
    monkeypatch.setattr(linux_host, "run", scripted)
    host.loop_refresh("/dev/loop4")
    assert scripted.argvs == [["losetup", "--set-capacity", "/dev/loop4"]]


def test_an_injected_runner_gets_every_command(runner: ScriptedRunner) -> None:
    host = LinuxHost(runner=runner)
    assert host.runner is runner
    host.loop_refresh("/dev/loop4")
    assert runner.argvs == [["losetup", "--set-capacity", "/dev/loop4"]]


# --- mountinfo --------------------------------------------------------------------------------
def test_mountinfo_fixture_is_parsed_and_unescaped() -> None:
    entries = read_mounts(str(MOUNTINFO))
    assert len(entries) == 12
    by_id = {e.point: e for e in entries}
    assert by_id[POD2].dev == "253:0" and by_id[POD2].source == "/dev/mapper/luks-eph-aaa"
    assert by_id[ODD].fs_type == "xfs" and by_id[ODD].dev == "253:4"
    bound = by_id["/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pvc-2/p3"]
    assert (bound.root, bound.fs_type, bound.source) == ("/dm-1", "devtmpfs", "udev")
    # optional fields (shared:N, master:N, none) do not shift the fields after " - "
    assert [e.fs_type for e in entries][:4] == ["ext4", "devtmpfs", "tmpfs", "tmpfs"]
    assert read_mountinfo(str(MOUNTINFO))[4] == (STAGING, "/dev/mapper/luks-eph-aaa", "ext4")


def test_mountinfo_lines_without_a_separator_or_fields_are_skipped(tmp_path: Path) -> None:
    broken = tmp_path / "mountinfo"
    broken.write_text(
        "garbage\n"
        "50 22 253:9 / /ok rw - ext4 /dev/mapper/x rw\n"
        "51 22 253:9 / /no-separator rw ext4 /dev/mapper/x rw\n"
        "52 22 253:9 /only-four-fields - ext4 /dev/mapper/x rw\n"
    )
    assert [e.point for e in read_mounts(str(broken))] == ["/ok"]


def test_mount_queries_read_the_injected_proc(host: LinuxHost) -> None:
    assert host.is_mountpoint(POD2) and host.is_mountpoint(ODD)
    assert not host.is_mountpoint(POD2.replace(" ", "\\040"))  # the escaped form is not a path
    assert host.mountpoints_of("/dev/mapper/luks-eph-aaa") == [STAGING, POD1, POD2]
    assert host.mount_source(STAGING) == "/dev/mapper/luks-eph-aaa"
    assert host.mount_source("/srv/over") == "tmpfs"  # the last entry is the visible one
    assert host.mount_source("/nowhere") is None


# --- sysfs: loops -----------------------------------------------------------------------------
def test_loops_come_from_backing_file_with_deleted_files_under_their_old_path(
    host: LinuxHost,
) -> None:
    assert host.loop_find("/var/lib/luks-eph/volumes/aaa.img") == "/dev/loop0"
    assert host.loop_find("/var/lib/luks-eph/volumes/bbb.img") == "/dev/loop1"  # (deleted)
    assert host.loop_find("/var/lib/luks-eph/volumes/bbb.img (deleted)") is None
    assert host.loop_find("/var/lib/luks-eph/volumes/none.img") is None
    assert host.loops_in("/var/lib/luks-eph/volumes/") == {
        "/dev/loop0": "/var/lib/luks-eph/volumes/aaa.img",
        "/dev/loop1": "/var/lib/luks-eph/volumes/bbb.img",
    }  # not loop10 (volumes-old/), loop2 (elsewhere) or the free loop3
    assert host.loops_in("/var/lib/luks-eph/volumes") == host.loops_in("/var/lib/luks-eph/volumes/")


# --- sysfs: dm names, holders, temporary mappings ---------------------------------------------
def test_dm_names_come_from_sysfs(host: LinuxHost) -> None:
    assert host.crypt_names("luks-eph-") == ["luks-eph-aaa", "luks-eph-bbb", "luks-eph-ddd"]
    assert host.crypt_exists("vg0-root") and not host.crypt_exists("luks-eph-zzz")


def test_temporary_mappings_are_found_through_holders_top_first(host: LinuxHost) -> None:
    assert host.temporary_mappings_on("/dev/loop1") == [
        "temporary-cryptsetup-4243", "temporary-cryptsetup-4242",
    ]  # fmt: skip
    assert host.temporary_mappings_on("/dev/loop0") == []  # holds only luks-eph-aaa
    assert host.temporary_mappings_on("/dev/loop99") == []  # no such device


def test_fs_error_count_follows_the_device_symlink(host: LinuxHost, tmp_path: Path) -> None:
    (tmp_path / "dm-0").write_text("")
    os.symlink(tmp_path / "dm-0", tmp_path / "luks-eph-aaa")
    assert host.fs_error_count(str(tmp_path / "luks-eph-aaa")) == 3
    assert host.fs_error_count("/dev/dm-1") == 0
    assert host.fs_error_count("/dev/dm-4") == 0  # xfs: no ext4 counter at all


# --- who uses a mapping -----------------------------------------------------------------------
def test_mapping_users_counts_mounts_by_device_number(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    runner.on("dmsetup", "info", stdout="  1\n")  # the three mounts share one open
    assert host.mapping_users("luks-eph-aaa") == [
        MappingUse("mounted", STAGING), MappingUse("mounted", POD1), MappingUse("mounted", POD2),
    ]  # fmt: skip
    assert runner.argvs == [cmd.dmsetup_open_count("luks-eph-aaa")]


def test_opens_no_mount_explains_are_reported(host: LinuxHost, runner: ScriptedRunner) -> None:
    runner.on("dmsetup", "info", stdout="3\n")
    assert host.mapping_users("luks-eph-aaa")[-1] == MappingUse("open", "2")


def test_holders_and_an_over_mounted_mount_are_users(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    runner.on("dmsetup", "info", stdout="3")
    assert host.mapping_users("luks-eph-ddd") == [
        MappingUse("mounted", ODD), MappingUse("mounted", "/srv/over"),
        MappingUse("held", "dm-5"), MappingUse("open", "1"),
    ]  # fmt: skip


def test_a_mapping_open_only_elsewhere_shows_as_open(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    """luks-eph-bbb has no mount here; its devtmpfs bind's node does not exist on this machine,
    so it is not counted as bound, and the kernel's open count is all that is left."""
    runner.on("dmsetup", "info", stdout="1")
    assert host.mapping_users("luks-eph-bbb") == [MappingUse("open", "1")]


def test_an_unknown_mapping_has_no_users_and_runs_nothing(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    assert host.mapping_users("luks-eph-zzz") == []
    assert runner.calls == []


def test_a_garbled_open_count_is_an_internal_error(host: LinuxHost, runner: ScriptedRunner) -> None:
    runner.on("dmsetup", "info", stdout="Device does not exist.")
    with pytest.raises(Internal, match="no open count for luks-eph-aaa"):
        host.mapping_users("luks-eph-aaa")


def test_a_sysfs_read_error_leaves_as_a_typed_error(host: LinuxHost, sysfs: Path) -> None:
    (sysfs / "block" / "dm-0" / "dev").unlink()
    with pytest.raises(Internal, match="mapping_users luks-eph-aaa"):
        host.mapping_users("luks-eph-aaa")


def test_is_mounted_from_decides_by_device_number_of_the_visible_mount(host: LinuxHost) -> None:
    assert host.is_mounted_from(POD2, "luks-eph-aaa")
    assert host.is_mounted_from(ODD, "luks-eph-ddd")
    assert not host.is_mounted_from(POD2, "luks-eph-ddd")
    assert not host.is_mounted_from("/srv/over", "luks-eph-ddd")  # covered by a tmpfs
    assert not host.is_mounted_from("/nowhere", "luks-eph-aaa")
    assert not host.is_mounted_from(POD2, "luks-eph-zzz")


def test_a_bound_device_node_is_recognised_by_its_rdev(
    tmp_path: Path, sysfs: Path, runner: ScriptedRunner
) -> None:
    """A raw block publish: a devtmpfs bind onto a file whose node is the mapping's device."""
    node = tmp_path / "publish" / "p3"
    node.parent.mkdir()
    try:
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(253, 1))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a block device node here: {exc}")
    other = tmp_path / "publish" / "p4"
    os.mknod(other, stat.S_IFBLK | 0o600, os.makedev(253, 7))
    (tmp_path / "proc" / "self").mkdir(parents=True)
    (tmp_path / "proc" / "self" / "mountinfo").write_text(
        f"43 22 0:5 /dm-1 {node} rw,nosuid shared:2 - devtmpfs udev rw\n"
        f"44 22 0:5 /dm-1 {other} rw,nosuid shared:2 - devtmpfs udev rw\n"
        f"45 22 0:24 /luks-eph-bbb {tmp_path} rw - ext4 /dev/sda1 rw\n"
    )
    host = LinuxHost(sysfs=str(sysfs), proc=str(tmp_path / "proc"), runner=runner)
    runner.on("dmsetup", "info", stdout="0")
    assert host.mapping_users("luks-eph-bbb") == [MappingUse("bound", str(node))]
    assert host.is_mounted_from(str(node), "luks-eph-bbb")
    assert not host.is_mounted_from(str(other), "luks-eph-bbb")  # another device's node


# --- loop_attach: O_DIRECT and its fallback ---------------------------------------------------
def test_loop_attach_asks_for_direct_io_first(host: LinuxHost, runner: ScriptedRunner) -> None:
    runner.on("losetup", stdout="/dev/loop5\n")
    assert host.loop_attach("/var/lib/luks-eph/volumes/new.img") == "/dev/loop5"
    assert runner.argvs == [[
        "losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on",
        "/var/lib/luks-eph/volumes/new.img",
    ]]  # fmt: skip


def test_refused_direct_io_detaches_the_half_made_loop_and_retries_buffered(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    """losetup may have bound the device before O_DIRECT was refused: that stale loop (here
    loop0, per the fixture sysfs) is detached before the buffered attach."""
    backing = "/var/lib/luks-eph/volumes/aaa.img"
    runner.on("losetup", "--find", exit=1, stderr="losetup: set direct io failed: Invalid argument")
    runner.on("losetup", "--find", stdout="/dev/loop6\n")
    assert host.loop_attach(backing) == "/dev/loop6"
    assert runner.argvs == [
        ["losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on", backing],
        ["losetup", "--detach", "/dev/loop0"],
        ["losetup", "--find", "--show", "--sector-size", "4096", backing],
    ]


def test_refused_direct_io_without_a_stale_loop_just_retries(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    runner.on("losetup", exit=1, stderr="losetup: set direct io failed")
    runner.on("losetup", stdout="/dev/loop7")
    assert host.loop_attach("/tmpfs/x.img") == "/dev/loop7"
    assert [a[1] for a in runner.argvs] == ["--find", "--find"]
    assert "--direct-io=on" not in runner.argvs[1]


def test_loop_attach_without_a_loop_device_in_stdout_fails(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    runner.on("losetup", stdout="\n")
    with pytest.raises(Internal, match=r"losetup gave no loop device for /x\.img"):
        host.loop_attach("/x.img")


def test_both_attaches_failing_raises_the_second_failure(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    runner.on("losetup", exit=1, stderr="direct io")
    runner.on("losetup", exit=1, stderr="losetup: cannot find an unused loop device")
    with pytest.raises(CommandFailed, match="unused loop device"):
        host.loop_attach("/x.img")


# --- loop_detach ------------------------------------------------------------------------------
def test_detaching_a_loop_that_is_gone_succeeds(
    host: LinuxHost, runner: ScriptedRunner, tmp_path: Path
) -> None:
    """The node may stay (loop devices are reused) while its binding is gone: ENXIO."""
    device = tmp_path / "loop9"
    device.write_text("")
    runner.on("losetup", exit=1, stderr=f"losetup: {device}: detach failed: No such device "
              "or address")  # fmt: skip
    host.loop_detach(str(device))
    assert runner.argvs == [["losetup", "--detach", str(device)]]


def test_a_detach_failure_of_a_present_device_is_raised(
    host: LinuxHost, runner: ScriptedRunner, tmp_path: Path
) -> None:
    device = tmp_path / "loop9"
    device.write_text("")
    runner.on("losetup", exit=1, stderr="losetup: detach failed: Permission denied")
    with pytest.raises(CommandFailed, match="Permission denied"):
        host.loop_detach(str(device))
    device.unlink()  # the node itself is gone: nothing is left to detach
    runner.on("losetup", exit=1, stderr="losetup: detach failed: Permission denied")
    host.loop_detach(str(device))


# --- dm-crypt ---------------------------------------------------------------------------------
def test_the_key_goes_on_stdin_and_never_into_argv(
    host: LinuxHost, runner: ScriptedRunner, key: VolumeKey
) -> None:
    secret = bytes(key.view)
    host.luks_format("/dev/loop0", key, LuksFormat("aes-xts-plain64", 512, "hmac-sha256", "/h"))
    host.crypt_open("/dev/loop0", "luks-eph-aaa", key, "/h")
    assert [c.stdin for c in runner.calls] == [secret, secret]
    for call in runner.calls:
        assert "--key-file=-" in call.argv
        joined = " ".join(call.argv)
        assert secret.hex() not in joined and secret.decode("latin-1") not in joined
        assert not any(secret[:8].hex() in a for a in call.argv)
    assert runner.calls[0].timeout == cmd.FORMAT_TIMEOUT
    assert runner.calls[1].timeout == DEFAULT_TIMEOUT


def test_the_luks2_format_and_open_command_lines_are_pinned(
    host: LinuxHost, runner: ScriptedRunner, key: VolumeKey
) -> None:
    """The exact command lines (the builders' and so the benchmark's too)."""
    host.luks_format("/dev/loop0", key, LuksFormat("aes-xts-plain64", 512, "hmac-sha256",
                                                    "/run/h", wipe=False))  # fmt: skip
    host.crypt_open("/dev/loop0", "luks-eph-aaa", key, None, keyring=False)
    assert runner.argvs == [
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
         "--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096",
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256",
         "--luks2-metadata-size", "16k", "--luks2-keyslots-size", "512k", "--key-file=-",
         "--integrity", "hmac-sha256", "--integrity-no-wipe", "--header", "/run/h",
         "/dev/loop0"],
        ["cryptsetup", "open", "--type", "luks2", "--key-file=-", "--perf-no_read_workqueue",
         "--perf-no_write_workqueue", "--disable-keyring", "/dev/loop0", "luks-eph-aaa"],
    ]  # fmt: skip


def test_crypt_open_keeps_the_key_in_the_table_only_when_asked(
    host: LinuxHost, runner: ScriptedRunner, key: VolumeKey
) -> None:
    host.crypt_open("/dev/loop0", "luks-eph-a", key, None)
    host.crypt_open("/dev/loop0", "luks-eph-b", key, "/run/hdr", keyring=False)
    with_keyring, without = runner.argvs
    assert "--disable-keyring" not in with_keyring and "--header" not in with_keyring
    assert with_keyring[-2:] == ["/dev/loop0", "luks-eph-a"]
    assert "--disable-keyring" in without
    assert without[-4:] == ["--header", "/run/hdr", "/dev/loop0", "luks-eph-b"]


def test_crypt_close_of_an_absent_mapping_runs_nothing(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    host.crypt_close("luks-eph-zzz")
    assert runner.calls == []


@pytest.mark.parametrize(
    "stderr",
    ["Device luks-eph-aaa is still in use.", "device-mapper: remove ioctl failed: Device or "
     "resource busy"],
)  # fmt: skip
def test_crypt_close_of_a_busy_mapping_is_busy(
    host: LinuxHost, runner: ScriptedRunner, stderr: str
) -> None:
    runner.on("cryptsetup", "close", exit=5, stderr=stderr)
    with pytest.raises(Busy, match="mapping luks-eph-aaa is still in use"):
        host.crypt_close("luks-eph-aaa")
    assert runner.argvs == [["cryptsetup", "close", "luks-eph-aaa"]]


def test_crypt_close_failing_after_the_mapping_went_is_success(
    host: LinuxHost, runner: ScriptedRunner, sysfs: Path
) -> None:
    runner.on("cryptsetup", "close", exit=4, stderr="Device luks-eph-aaa is not active.",
              effect=lambda: shutil.rmtree(sysfs / "block" / "dm-0"))  # fmt: skip
    host.crypt_close("luks-eph-aaa")
    assert not host.crypt_exists("luks-eph-aaa")


def test_crypt_close_failing_otherwise_is_raised(host: LinuxHost, runner: ScriptedRunner) -> None:
    runner.on("cryptsetup", "close", exit=1, stderr="Cannot initialize device-mapper.")
    with pytest.raises(CommandFailed, match="Cannot initialize device-mapper"):
        host.crypt_close("luks-eph-aaa")


@pytest.mark.parametrize("stderr", ["Nothing to read on input.", "Enter passphrase for x:"])
def test_crypt_resize_that_wants_a_passphrase_is_a_precondition(
    host: LinuxHost, runner: ScriptedRunner, stderr: str
) -> None:
    runner.on("cryptsetup", "resize", exit=1, stderr=stderr)
    with pytest.raises(FailedPrecondition, match="by keyring reference"):
        host.crypt_resize("luks-eph-aaa", None)


def test_crypt_resize_failing_otherwise_is_raised(host: LinuxHost, runner: ScriptedRunner) -> None:
    runner.on("cryptsetup", "resize", exit=4, stderr="Device luks-eph-aaa is not active.")
    with pytest.raises(CommandFailed, match="not active"):
        host.crypt_resize("luks-eph-aaa", "/run/hdr")
    assert runner.argvs == [["cryptsetup", "resize", "--header", "/run/hdr", "luks-eph-aaa"]]


def test_only_cryptsetups_temporary_mappings_may_be_removed(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    with pytest.raises(InvalidArgument):
        host.remove_temporary_mapping("luks-eph-aaa")
    host.remove_temporary_mapping("temporary-cryptsetup-1")  # not there: nothing to do
    assert runner.calls == []


def test_removing_a_busy_temporary_mapping_is_busy(
    host: LinuxHost, runner: ScriptedRunner
) -> None:
    runner.on("dmsetup", "remove", exit=1, stderr="device-mapper: remove ioctl failed: Device "
              "or resource busy")  # fmt: skip
    with pytest.raises(Busy, match="temporary-cryptsetup-4242"):
        host.remove_temporary_mapping("temporary-cryptsetup-4242")
    assert runner.argvs == [["dmsetup", "remove", "--retry", "temporary-cryptsetup-4242"]]


def test_a_temporary_mapping_that_went_meanwhile_is_removed(
    host: LinuxHost, runner: ScriptedRunner, sysfs: Path
) -> None:
    runner.on("dmsetup", "remove", exit=1, stderr="No such device or address",
              effect=lambda: shutil.rmtree(sysfs / "block" / "dm-3"))  # fmt: skip
    host.remove_temporary_mapping("temporary-cryptsetup-4243")
    runner.on("dmsetup", "remove", exit=1, stderr="Command failed")  # still there: raised
    with pytest.raises(CommandFailed):
        host.remove_temporary_mapping("temporary-cryptsetup-4242")


# --- filesystems and mounts -------------------------------------------------------------------
@dataclass
class MountCalls:
    """Stands in for ``csi.host.mountcalls``: records each call; ``fail`` maps a call's name to
    the errno it raises (once)."""

    calls: list[tuple[str, ...]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    current: int = 0  # the per-mount flags statvfs would report for the fresh bind

    def _call(self, name: str, *args: str) -> None:
        self.calls.append((name, *args))
        if (code := self.fail.pop(name, None)) is not None:
            raise OSError(code, os.strerror(code), args[-1])

    def bind(self, source: str, target: str) -> None:
        self._call("bind", source, target)

    def remount_bind(self, target: str, options: Iterable[str]) -> None:
        flags = mountcalls.remount_flags(self.current, options)
        self._call("remount_bind", target, hex(flags))

    def unmount(self, target: str) -> None:
        self._call("unmount", target)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> MountCalls:
    fake = MountCalls()
    for name in ("bind", "remount_bind", "unmount"):
        monkeypatch.setattr(mountcalls, name, getattr(fake, name))
    return fake


def test_umount_of_a_busy_target_is_busy(
    host: LinuxHost, runner: ScriptedRunner, calls: MountCalls
) -> None:
    calls.fail["unmount"] = errno.EBUSY
    with pytest.raises(Busy, match=f"target {STAGING} is busy.*retry later"):
        host.umount(STAGING)
    assert calls.calls == [("unmount", STAGING)]
    assert runner.argvs == []  # no umount(8)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOENT])
def test_umount_of_a_target_that_is_not_mounted_succeeds(
    host: LinuxHost, calls: MountCalls, code: int
) -> None:
    """As with umount(8): whatever the failure, nothing at the target in mountinfo is done."""
    calls.fail["unmount"] = code
    host.umount("/var/lib/kubelet/x")
    assert calls.calls == [("unmount", "/var/lib/kubelet/x")]


@pytest.mark.parametrize(("code", "error"), [(errno.EPERM, FailedPrecondition),
                                             (errno.EINVAL, Internal)])  # fmt: skip
def test_umount_failing_while_still_mounted_is_raised(
    host: LinuxHost, calls: MountCalls, code: int, error: type[Exception]
) -> None:
    calls.fail["unmount"] = code
    with pytest.raises(error, match="umount /srv/over: "):
        host.umount("/srv/over")  # in the fixture mountinfo


def test_ext4_mounts_add_noinit_itable(host: LinuxHost, runner: ScriptedRunner) -> None:
    host.mount("/dev/mapper/a", "/t", "ext4", ["nosuid", "nodev"])
    host.mount("/dev/mapper/b", "/u", "xfs", ["nosuid"])
    assert runner.argvs == [
        ["mount", "-t", "ext4", "-o", "nosuid,nodev,noinit_itable", "/dev/mapper/a", "/t"],
        ["mount", "-t", "xfs", "-o", "nosuid", "/dev/mapper/b", "/u"],
    ]


def test_bind_mount_remounts_with_the_per_mount_flags_only(
    host: LinuxHost, runner: ScriptedRunner, calls: MountCalls
) -> None:
    host.bind_mount(STAGING, POD1, ["ro", "nosuid", "commit=30", "nodev"])
    flags = mountcalls.MS_BIND | mountcalls.MS_REMOUNT | mountcalls.MS_RDONLY
    flags |= mountcalls.MS_NOSUID | mountcalls.MS_NODEV
    assert calls.calls == [("bind", STAGING, POD1), ("remount_bind", POD1, hex(flags))]
    assert runner.argvs == []  # no mount(8)


def test_the_remount_keeps_the_binds_inherited_flags_as_mount8_does(
    host: LinuxHost, calls: MountCalls
) -> None:
    """A bind has its source's per-mount flags; ``mount -o remount,bind,rw,nosuid`` keeps
    noexec and the atime flags and clears only ro (util-linux 2.38, seen with strace)."""
    m = mountcalls
    calls.current = m.MS_RDONLY | m.MS_NOEXEC | m.MS_NODEV | m.MS_RELATIME
    host.bind_mount(STAGING, POD1, ["rw", "nosuid"])
    kept = m.MS_NOEXEC | m.MS_NODEV | m.MS_RELATIME | m.MS_NOSUID
    assert calls.calls[-1] == ("remount_bind", POD1, hex(kept | m.MS_BIND | m.MS_REMOUNT))


def test_remount_flags_map_every_per_mount_option_and_ignore_the_rest() -> None:
    m = mountcalls
    base = m.MS_BIND | m.MS_REMOUNT
    each = {"ro": m.MS_RDONLY, "rw": 0, "nosuid": m.MS_NOSUID, "nodev": m.MS_NODEV,
            "noexec": m.MS_NOEXEC, "noatime": m.MS_NOATIME, "nodiratime": m.MS_NODIRATIME,
            "relatime": m.MS_RELATIME, "strictatime": m.MS_STRICTATIME}  # fmt: skip
    assert set(each) == cmd.BIND_FLAGS
    for option, flag in each.items():
        assert m.remount_flags(0, [option]) == base | flag
    assert m.remount_flags(0, ["commit=30", "discard", "x=1"]) == base
    assert m.remount_flags(0, ["ro", "rw"]) == base  # in order, as mount(8): the last wins
    assert m.remount_flags(m.MS_RDONLY, ["rw"]) == base
    statvfs = os.ST_RDONLY | os.ST_NOSUID | os.ST_RELATIME | os.ST_SYNCHRONOUS
    assert m.current_flags(statvfs) == m.MS_RDONLY | m.MS_NOSUID | m.MS_RELATIME


def test_a_failed_remount_takes_the_bare_bind_away_again(
    host: LinuxHost, calls: MountCalls
) -> None:
    calls.fail["remount_bind"] = errno.EPERM
    calls.fail["unmount"] = errno.EINVAL  # its failure is not the story
    with pytest.raises(FailedPrecondition, match=f"remount of the bind at {POD1}"):
        host.bind_mount(STAGING, POD1, ["ro"])
    assert [c[0] for c in calls.calls] == ["bind", "remount_bind", "unmount"]
    assert calls.calls[-1] == ("unmount", POD1)


def test_a_failed_bind_runs_no_remount(host: LinuxHost, calls: MountCalls) -> None:
    calls.fail["bind"] = errno.ENOENT
    with pytest.raises(Internal, match=f"bind {STAGING} onto {POD1}: No such file"):
        host.bind_mount(STAGING, POD1, [])
    assert calls.calls == [("bind", STAGING, POD1)]


def test_fs_grow_picks_the_tool_and_what_it_takes(host: LinuxHost, runner: ScriptedRunner) -> None:
    host.fs_grow("/dev/mapper/a", "/t", "ext4")
    host.fs_grow("/dev/mapper/b", "/u", "xfs")
    assert runner.argvs == [["resize2fs", "/dev/mapper/a"], ["xfs_growfs", "/u"]]
    assert {c.timeout for c in runner.calls} == {cmd.GROW_TIMEOUT}
    with pytest.raises(Internal, match="cannot grow btrfs"):
        host.fs_grow("/dev/mapper/c", "/v", "btrfs")
    assert len(runner.calls) == 2


def test_mkfs_of_an_unknown_type_runs_nothing(host: LinuxHost, runner: ScriptedRunner) -> None:
    with pytest.raises(Internal, match="no mkfs for btrfs"):
        host.mkfs("/dev/mapper/a", "btrfs", eager=True)
    assert runner.calls == []


def test_eager_ext4_mkfs_gets_the_long_timeout_and_the_pinned_layout(
    host: LinuxHost, runner: ScriptedRunner, tmp_path: Path
) -> None:
    device = tmp_path / "dev"
    with open(device, "wb") as f:
        f.truncate(64 * 1024**2)
    host.mkfs(str(device), "ext4", eager=True)
    host.mkfs(str(device), "ext4")
    eager, lazy = runner.calls
    assert eager.argv == cmd.mkfs(str(device), "ext4", eager=True, layout=["-b", "4096"])
    assert eager.timeout == cmd.FORMAT_TIMEOUT
    assert lazy.argv == cmd.mkfs(str(device), "ext4", eager=False)
    assert lazy.timeout == DEFAULT_TIMEOUT
    assert "-b" not in lazy.argv


# --- readiness --------------------------------------------------------------------------------
def test_device_mapper_readiness_reads_the_injected_dev_and_proc(tmp_path: Path) -> None:
    host = LinuxHost(dev=str(tmp_path / "dev"), proc=str(FIXTURES / "proc"))
    control = f"{tmp_path}/dev/mapper/control"
    assert f"device-mapper ({control})" in host.missing_requirements()
    (tmp_path / "dev" / "mapper").mkdir(parents=True)
    try:
        os.mknod(control, stat.S_IFCHR | 0o600, os.makedev(10, 236))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a character device node here: {exc}")
    assert not any(m.startswith("device-mapper") for m in host.missing_requirements())
    no_dm = tmp_path / "proc"
    no_dm.mkdir()
    (no_dm / "misc").write_text(" 58 loop-control\n")  # a copied /dev, but no device-mapper
    host = LinuxHost(dev=str(tmp_path / "dev"), proc=str(no_dm))
    assert f"device-mapper ({control})" in host.missing_requirements()


# --- the command lines are the builders' ------------------------------------------------------
def test_every_command_line_is_the_one_the_builders_make(
    host: LinuxHost, runner: ScriptedRunner, key: VolumeKey
) -> None:
    """LinuxHost must not grow a second copy of any command line (the benchmark runs the
    builders' output and must measure what the driver runs). bind_mount and umount run no
    command: they are syscalls (csi.host.mountcalls)."""
    integrity = LuksFormat("aes-xts-plain64", 512, "hmac-sha256", "/run/h", wipe=False)
    runner.on("losetup", "--find", stdout="/dev/loop5")
    runner.on("losetup", "--find", exit=1, stderr="direct io")
    runner.on("losetup", "--find", stdout="/dev/loop6")
    runner.on("dmsetup", "info", stdout="1")
    expected: list[list[str]] = []

    def step(action: Callable[[], object], *argvs: list[str]) -> None:
        action()
        expected.extend(argvs)

    step(lambda: host.loop_attach("/b/new.img"), cmd.losetup_attach("/b/new.img", direct_io=True))
    step(lambda: host.loop_attach("/b/tmpfs.img"),
         cmd.losetup_attach("/b/tmpfs.img", direct_io=True),
         cmd.losetup_attach("/b/tmpfs.img", direct_io=False))  # fmt: skip
    step(lambda: host.loop_detach("/dev/loop5"), cmd.losetup_detach("/dev/loop5"))
    step(lambda: host.loop_refresh("/dev/loop5"), cmd.losetup_set_capacity("/dev/loop5"))
    step(lambda: host.luks_format("/dev/loop5", key, OPTIONS),
         cmd.luks_format("/dev/loop5", OPTIONS))  # fmt: skip
    step(lambda: host.luks_format("/dev/loop5", key, integrity),
         cmd.luks_format("/dev/loop5", integrity))  # fmt: skip
    step(lambda: host.crypt_open("/dev/loop5", "n", key, "/run/h", keyring=False),
         cmd.crypt_open("/dev/loop5", "n", "/run/h", keyring=False))  # fmt: skip
    step(lambda: host.crypt_resize("n", "/run/h"), cmd.crypt_resize("n", "/run/h"))
    step(lambda: host.crypt_close("luks-eph-aaa"), cmd.crypt_close("luks-eph-aaa"))
    step(lambda: host.mapping_users("luks-eph-aaa"), cmd.dmsetup_open_count("luks-eph-aaa"))
    step(lambda: host.remove_temporary_mapping("temporary-cryptsetup-4242"),
         cmd.dmsetup_remove("temporary-cryptsetup-4242"))  # fmt: skip
    step(lambda: host.mkfs("/dev/mapper/n", "xfs"), cmd.mkfs("/dev/mapper/n", "xfs", eager=False))
    step(lambda: host.mount("/dev/mapper/n", "/t", "ext4", ["rw"]),
         cmd.mount("/dev/mapper/n", "/t", "ext4", ["rw"]))  # fmt: skip
    step(lambda: host.fs_grow("/dev/mapper/n", "/t", "xfs"),
         cmd.fs_grow("/dev/mapper/n", "/t", "xfs"))  # fmt: skip
    assert runner.argvs == expected


def test_the_builders_return_fresh_lists() -> None:
    first = cmd.umount("/t")
    first.append("--lazy")
    assert cmd.umount("/t") == ["umount", "/t"]


def test_qcow2_nbd_runs_its_commands_through_the_injected_runner(
    tmp_path: Path, runner: ScriptedRunner
) -> None:
    q = Qcow2Nbd(str(tmp_path / "qsd.sock"), str(tmp_path / "claims"), str(tmp_path / "sys"),
                 runner=runner)  # fmt: skip
    assert q.runner is runner
    q.create(str(tmp_path / "a.qcow2"), 1 << 30, preallocate=True)
    assert runner.argvs == [cmd.qemu_img_create(str(tmp_path / "a.qcow2"), 1 << 30,
                                                preallocate=True)]  # fmt: skip
    assert runner.argvs[0][-3:] == ["preallocation=falloc", str(tmp_path / "a.qcow2"), "1073741824"]
    assert runner.calls[0].timeout == cmd.QEMU_IMG_CREATE_TIMEOUT
    image = tmp_path / "b.qcow2"
    runner.on("qemu-img", exit=1, stderr="No space left on device",
              effect=lambda: image.write_text("partial"))  # fmt: skip
    with pytest.raises(CommandFailed):
        q.create(str(image), 1 << 30, preallocate=False)
    assert not image.exists()  # a half-made image is removed


def test_the_nbd_command_lines_are_pinned(tmp_path: Path, runner: ScriptedRunner) -> None:
    """Qcow2Nbd's connect, disconnect and module load, run through the injected runner."""
    claims, sys_root = tmp_path / "claims", tmp_path / "sys"
    q = Qcow2Nbd(str(tmp_path / "qsd.sock"), str(claims), str(sys_root), runner=runner)

    runner.on("modprobe", effect=lambda: (sys_root / "block" / "nbd0").mkdir(parents=True))
    assert q._free_device() == "/dev/nbd0"
    q._write_claim("luks-eph-x", "/dev/nbd0", "4242")
    (sys_root / "block" / "nbd0" / "pid").write_text("4242")  # connected by that pid
    runner.on("nbd-client", "-d", effect=lambda: (sys_root / "block" / "nbd0" / "pid").unlink())
    q.detach("luks-eph-x")  # no qsd socket here: no export is left to remove
    assert not (claims / "luks-eph-x").exists()
    assert runner.argvs == [
        ["modprobe", "nbd", "nbds_max=128"],
        ["nbd-client", "-d", "/dev/nbd0"],
    ]
    assert cmd.nbd_connect(q.nbd_socket, "/dev/nbd0", "luks-eph-x") == [
        "nbd-client", "-unix", str(tmp_path / "nbd.sock"), "/dev/nbd0", "-N", "luks-eph-x",
        "-b", "4096",
    ]  # fmt: skip


# --- forced key wipe ----------------------------------------------------------------------------
@pytest.fixture
def kernel() -> DmKernel:
    k = DmKernel()
    k.add("luks-eph-aaa", "crypt")
    k.add("luks-eph-bbb", "error")
    k.add("vg0-root", "linear")
    return k


@pytest.fixture
def dm_host(runner: ScriptedRunner, sysfs: Path, kernel: DmKernel, tmp_path: Path) -> LinuxHost:
    """The host with a scripted device-mapper control (``tests.unit.dm_kernel``)."""
    (tmp_path / "dev" / "mapper").mkdir(parents=True)
    (tmp_path / "dev" / "mapper" / "control").touch()
    return LinuxHost(sysfs=str(sysfs), proc=str(FIXTURES / "proc"), runner=runner,
                     dm=DeviceMapper(str(tmp_path / "dev"), kernel))  # fmt: skip


def test_wipe_keys_swaps_in_error_tables_by_ioctl_and_proves_it(
    dm_host: LinuxHost, runner: ScriptedRunner, kernel: DmKernel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    shut: list[tuple[str, str]] = []

    def shut_down(path: str, dev: str) -> bool:
        shut.append((path, dev))
        return True

    monkeypatch.setattr(wipe, "shut_down", shut_down)
    results = dm_host.crypt_wipe_keys(["luks-eph-aaa", "luks-eph-bbb", "luks-eph-zzz"])
    assert [(r.name, r.outcome) for r in results] == [
        ("luks-eph-aaa", "wiped"), ("luks-eph-bbb", "no_key"), ("luks-eph-zzz", "no_key")]
    assert kernel.kinds("luks-eph-aaa") == ["error"] and kernel.kinds("vg0-root") == ["linear"]
    assert kernel.devices["luks-eph-aaa"].targets == [(0, 131072, "error")]  # the same size
    assert [(c, n) for c, n, _ in kernel.calls] == [
        (dm.TABLE_STATUS_CMD, "luks-eph-aaa"), (dm.TABLE_STATUS_CMD, "luks-eph-bbb"),
        (dm.TABLE_LOAD_CMD, "luks-eph-aaa"), (dm.DEV_SUSPEND_CMD, "luks-eph-aaa"),
        (dm.TABLE_STATUS_CMD, "luks-eph-aaa")]  # fmt: skip
    resume = kernel.calls[3][2]
    assert resume & dm.NOFLUSH_FLAG and resume & dm.SKIP_LOCKFS_FLAG  # no flush, no freeze
    assert runner.calls == []  # no process at all
    # the filesystem of aaa (253:0) is shut down once, at its first mount; ddd was not asked
    assert shut == [("/var/lib/kubelet/plugins/kubernetes.io/csi/luks-eph/abc/globalmount",
                     "253:0")]


def test_wipe_keys_tries_the_next_mount_when_a_shutdown_cannot_open_the_first(
    dm_host: LinuxHost, kernel: DmKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[str] = []

    def shut_down(path: str, dev: str) -> bool:
        tried.append(path)
        return len(tried) == 2

    monkeypatch.setattr(wipe, "shut_down", shut_down)
    assert dm_host.crypt_wipe_keys(["luks-eph-aaa"])[0].outcome == "wiped"
    assert tried == ["/var/lib/kubelet/plugins/kubernetes.io/csi/luks-eph/abc/globalmount",
                     "/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-1/mount"]


def test_wipe_keys_keeps_a_read_only_mapping_read_only(
    dm_host: LinuxHost, kernel: DmKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wipe, "shut_down", lambda path, dev: True)
    kernel.add("luks-eph-aaa", "crypt", sectors=4096, readonly=True)
    assert dm_host.crypt_wipe_keys(["luks-eph-aaa"])[0].outcome == "wiped"
    device = kernel.devices["luks-eph-aaa"]
    assert device.targets == [(0, 4096, "error")] and device.readonly


def test_one_mapping_that_cannot_be_wiped_never_keeps_the_others_keys(
    dm_host: LinuxHost, kernel: DmKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wipe, "shut_down", lambda path, dev: True)
    kernel.add("luks-eph-bbb", "crypt")
    kernel.add("luks-eph-ddd", "crypt")
    kernel.fail[(dm.DEV_SUSPEND_CMD, "luks-eph-aaa")] = errno.EINVAL
    kernel.fail[(dm.TABLE_LOAD_CMD, "luks-eph-bbb")] = errno.ENOMEM
    results = dm_host.crypt_wipe_keys(["luks-eph-aaa", "luks-eph-bbb", "luks-eph-ddd"])
    assert [(r.name, r.outcome) for r in results] == [
        ("luks-eph-aaa", "failed"), ("luks-eph-bbb", "failed"), ("luks-eph-ddd", "wiped")]
    assert "cannot wipe its table" in results[0].detail and "aaa: EINVAL" in results[0].detail
    assert kernel.kinds("luks-eph-aaa") == ["crypt"] and kernel.kinds("luks-eph-bbb") == ["crypt"]
    # the failed resume left no inactive error table behind (as dmsetup clears it)
    assert (dm.TABLE_CLEAR_CMD, "luks-eph-aaa", 0) in kernel.calls
    assert kernel.devices["luks-eph-aaa"].inactive is None


def test_a_mapping_removed_meanwhile_has_no_key_and_a_table_that_stays_crypt_fails(
    dm_host: LinuxHost, kernel: DmKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wipe, "shut_down", lambda path, dev: True)
    kernel.add("luks-eph-bbb", "crypt")
    del kernel.devices["luks-eph-aaa"]  # sysfs still lists it: removed between the two
    original = kernel._status

    def stays_crypt(buffer: bytearray, fields: list[object], device: Device) -> None:
        device.targets = [(0, 131072, "crypt")]  # as if another load put the crypt table back
        original(buffer, fields, device)

    monkeypatch.setattr(kernel, "_status", stays_crypt)
    results = dm_host.crypt_wipe_keys(["luks-eph-aaa", "luks-eph-bbb"])
    assert (results[0].outcome, results[0].detail) == ("no_key", "mapping removed meanwhile")
    assert (results[1].outcome, results[1].detail) == ("failed", "table is still crypt")


def test_close_of_a_wiped_mapping_removes_it_and_its_integrity_mapping_with_dmsetup(
    dm_host: LinuxHost, runner: ScriptedRunner, sysfs: Path, kernel: DmKernel
) -> None:
    host = dm_host
    dif = sysfs / "block" / "dm-9"
    (dif / "dm").mkdir(parents=True)
    (dif / "dm" / "name").write_text("luks-eph-bbb_dif\n")
    (dif / "dev").write_text("253:9\n")
    runner.on("cryptsetup", "close", exit=1, stderr="Device luks-eph-bbb is not a valid LUKS.")
    host.crypt_close("luks-eph-bbb")
    assert runner.argvs[1:] == [["dmsetup", "remove", "--retry", "luks-eph-bbb"],
                                ["dmsetup", "remove", "--retry", "luks-eph-bbb_dif"]]
    runner.calls.clear()
    runner.on("cryptsetup", "close", exit=1, stderr="Device luks-eph-aaa is busy.")
    with pytest.raises(Busy):
        host.crypt_close("luks-eph-aaa")
    runner.on("cryptsetup", "close", exit=1, stderr="Cannot initialize device-mapper.")
    with pytest.raises(CommandFailed, match="device-mapper"):
        host.crypt_close("luks-eph-aaa")  # not wiped: the failure is real
