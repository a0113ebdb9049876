"""Kata Containers hand-off (kata=guest|host) on the real kernel, with the real driver process.

No Kata runtime runs here: the tests play its part from the outside. They read the
``mountInfo.json`` the driver writes for a target exactly where Kata's runtime looks for it
(``<root>/<urlsafe base64 of the target path, padded>/``), write the sandbox-id file Kata adds to
that directory, and hold the raw disk open as a running VM's hypervisor does. What they check on
the host is what a Kata node must see: in guest mode a raw file that nothing on the host ever
attached, formatted, opened or mounted; in host mode an opened, formatted device mounted nowhere;
in both a read-only empty guard at the target, and nothing left after unpublish, a crash after
any step, or a lost journal.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi.__main__ import CRASH_ENV
from csi.host import GUARD_SOURCE
from csi.steps import PREPARE_STEPS, RESERVE
from csi.tools.kubelet import PvcVolume
from tests.node.conftest import (
    Driver,
    SmallFs,
    crypt_mappings,
    leftovers,
    loops_on,
    mountpoints,
    names_of,
    record_state,
    rpc_code,
    sh,
    volume_leftovers,
)

MiB = 1024**2
NODE = "node-test"
KEYS = {"volume-type", "device", "fstype", "metadata", "options"}
GUEST = {"kata": "guest", "size": "64Mi"}
HOST = {"kata": "host", "size": "64Mi"}
# the steps an inline publish of each mode runs (the crash hook fires only after a step that ran)
STEPS = {
    "guest": (RESERVE, "create_backing", "mount", "record"),
    "host": (RESERVE, *PREPARE_STEPS, "mount", "record"),
}

NO_TOOLS = shutil.which("blkid") is None or shutil.which("dmsetup") is None
WHY = "the Kata node tests read the kernel's view with blkid and dmsetup: install them"
pytestmark = pytest.mark.skipif(NO_TOOLS, reason=WHY)


class KataDriver(Driver):
    """The driver in ``all`` mode with its own Kata direct-volume root under /run (tmpfs, as
    Kata's own /run/kata-containers is); the root is not made in advance: the driver makes it."""

    def __init__(self, base: Path, data_dir: Path) -> None:
        self.kata_parent = Path(tempfile.mkdtemp(prefix="lec-kata-", dir="/run"))
        self.kata_root = self.kata_parent / "direct-volumes"
        super().__init__(base, data_dir, "--metrics-address", "",
                         "--kata-direct-volume-root", str(self.kata_root), mode="all")  # fmt: skip

    def cleanup(self) -> None:
        super().cleanup()
        shutil.rmtree(self.kata_parent, ignore_errors=True)


@pytest.fixture
def kd(base: Path, data_fs: SmallFs) -> Iterator[KataDriver]:
    driver = KataDriver(base, data_fs.mountpoint)
    driver.start()
    yield driver
    for target in [m for m in mountpoints() if m.startswith(str(driver.kubelet_root) + "/")]:
        sh("umount", "-l", target, check=False)  # a failed test's guard: not the next test's
    driver.cleanup()


# --- what Kata and the kernel see ------------------------------------------------------------
def volume_dir(d: KataDriver, target: str) -> Path:
    """Where Kata's runtime looks for the target's direct volume: Go's b64.URLEncoding."""
    return d.kata_root / base64.urlsafe_b64encode(target.encode()).decode()


def mount_info(d: KataDriver, target: str) -> dict[str, Any]:
    doc = json.loads((volume_dir(d, target) / "mountInfo.json").read_bytes())
    assert isinstance(doc, dict)
    return doc


def visible(target: str) -> tuple[str, str, set[str]] | None:
    """(fs type, source, mount and superblock options) of the mount visible at ``target``."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if fields[4] == target:
                found = (rest[0], rest[1], set(fields[5].split(",")) | set(rest[2].split(",")))
    return found


def guarded(target: str) -> bool:
    mount = visible(target)
    return mount is not None and mount[:2] == ("tmpfs", GUARD_SOURCE) and "ro" in mount[2]


def tricky_volume(d: KataDriver) -> tuple[str, str]:
    """A pod uid and volume name whose target path encodes differently in standard and urlsafe
    base64 and needs '=' padding. In an ASCII path only '~' (kubernetes.io~csi) can give '+'
    (and only '?' or DEL could give '/'), at a byte offset of 2 mod 3: the pod uid's length
    moves it there."""
    for k in range(3):
        for j in range(3):
            pod, name = f"pod-b64{'x' * k}", f"kata{'y' * j}"
            target = d.k.target(pod, name).encode()
            if "+" in base64.b64encode(target).decode() and len(target) % 3:
                return pod, name
    raise AssertionError("no pod uid gives a target path with '+' and padding")


def kata_leftovers(d: KataDriver, pod: str, name: str = "scratch") -> list[str]:
    """Everything a torn-down Kata volume could leave: the usual objects, any direct volume
    (this driver's root is its own: every entry is a leftover), the guard, the target."""
    target = d.k.target(pod, name)
    found = leftovers(d, pod, name)
    if d.kata_root.exists():
        found += [f"direct volume {p}" for p in d.kata_root.iterdir()]
    found += [f"guard {target}"] if guarded(target) else []
    found += [f"target {target}"] if os.path.lexists(target) else []
    return found


def assert_no_host_use_of(path: str) -> None:
    """Nothing on the host made or opened anything of the raw file: no signature, no LUKS
    header, no loop device, no device-mapper table, no mount, no data."""
    probe = subprocess.run(["blkid", "-p", path], capture_output=True, text=True, check=False)
    assert probe.returncode == 2 and probe.stdout == "", f"blkid -p found: {probe.stdout}"
    is_luks = subprocess.run(["cryptsetup", "isLuks", path], capture_output=True, check=False)
    assert is_luks.returncode != 0, "the raw file has a LUKS header"
    assert sh("losetup", "-j", path).strip() == "", "a loop device is backed by the raw file"
    loops = [line for line in sh("losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE")
             .splitlines() if path in line]  # fmt: skip
    assert loops == []
    digest = Path(path).stem
    tables = sh("dmsetup", "table", check=False)
    assert digest not in tables and path not in tables, tables
    with open("/proc/self/mountinfo") as f:
        sources = [line.partition(" - ")[2].split()[1] for line in f]
    assert path not in sources
    st = os.stat(path)
    assert st.st_blocks == 0, f"the raw file has {st.st_blocks * 512} bytes allocated"
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            assert chunk.count(0) == len(chunk), "the raw file has data on it"


def assert_guard_refuses_writes(target: str) -> None:
    assert guarded(target), visible(target)
    assert os.listdir(target) == []
    with pytest.raises(OSError) as err:
        fd = os.open(os.path.join(target, "plain"), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert err.value.errno == errno.EROFS
    with pytest.raises(OSError) as err:
        os.mkdir(os.path.join(target, "dir"))
    assert err.value.errno == errno.EROFS


def assert_handed_over(d: KataDriver, target: str, device: str) -> None:
    assert mount_info(d, target)["device"] == device
    assert guarded(target)


# --- guest mode ------------------------------------------------------------------------------
def test_guest_mount_info_path_keys_values_and_permissions(kd: KataDriver) -> None:
    pod, name = tricky_volume(kd)
    target = kd.publish(pod, name, attributes=GUEST, fs_group="2000", mount_flags=["noatime"])
    names = kd.names(pod, name)
    expected = base64.urlsafe_b64encode(target.encode()).decode()
    standard = base64.b64encode(target.encode()).decode()
    assert "+" in standard and expected == standard.replace("+", "-").replace("/", "_")
    assert "-" in expected and expected.endswith("=")
    assert [p.name for p in kd.kata_root.iterdir()] == [expected]
    directory = kd.kata_root / expected
    assert sorted(os.listdir(directory)) == ["mountInfo.json"]  # no temporary left behind
    dir_st, file_st = os.lstat(directory), os.lstat(directory / "mountInfo.json")
    assert stat.S_ISDIR(dir_st.st_mode) and stat.S_IMODE(dir_st.st_mode) == 0o700
    assert stat.S_ISREG(file_st.st_mode) and stat.S_IMODE(file_st.st_mode) == 0o600
    assert (dir_st.st_uid, file_st.st_uid) == (0, 0)
    doc = mount_info(kd, target)
    assert set(doc) == KEYS
    assert doc == {
        "volume-type": "directvol",
        "device": names.backing,
        "fstype": "ext4",
        "metadata": {"encryptionKey": "ephemeral", "createFilesystem": "true", "fsGroup": "2000"},
        "options": ["noatime"],
    }
    assert os.path.getsize(names.backing) == 64 * MiB
    stats = kd.k.stats(pod, name)
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    # the same request again: OK, and the hand-off is unchanged
    kd.publish(pod, name, attributes=GUEST, fs_group="2000", mount_flags=["noatime"])
    assert mount_info(kd, target) == doc and guarded(target)
    kd.unpublish(pod, name)
    assert kata_leftovers(kd, pod, name) == []


def test_guest_raw_file_is_never_used_on_the_host(kd: KataDriver) -> None:
    kd.publish("pod-raw", attributes=GUEST)
    names = kd.names("pod-raw")
    assert_no_host_use_of(names.backing)
    assert names.mapping not in crypt_mappings()
    assert not os.path.exists(names.header)
    assert [line for line in loops_on(kd.data_dir) if f"{kd.data_dir}/" in line] == []
    kd.unpublish("pod-raw")
    assert kata_leftovers(kd, "pod-raw") == []


def test_guard_makes_writes_at_the_target_fail(kd: KataDriver) -> None:
    target = kd.publish("pod-guard", attributes=GUEST)
    assert_guard_refuses_writes(target)
    fs_type, source, options = visible(target) or ("", "", set())
    assert (fs_type, source) == ("tmpfs", GUARD_SOURCE)
    assert {"ro", "nosuid", "nodev", "noexec"} <= options, options
    kd.unpublish("pod-guard")
    assert kata_leftovers(kd, "pod-guard") == []


def test_unpublish_removes_the_sandbox_id_file_and_everything_else(kd: KataDriver) -> None:
    target = kd.publish("pod-sandbox", attributes=GUEST)
    directory = volume_dir(kd, target)
    sandbox = directory / ("0123456789abcdef" * 4)  # what Kata's runtime adds to the directory
    sandbox.touch()
    assert kata_leftovers(kd, "pod-sandbox"), "a published volume should be visible"
    kd.unpublish("pod-sandbox")
    assert not os.path.lexists(directory)
    assert not guarded(target) and target not in mountpoints()
    assert kata_leftovers(kd, "pod-sandbox") == []
    assert record_state(kd, kd.names("pod-sandbox").volume_id) is None
    kd.unpublish("pod-sandbox")  # again: OK
    assert kata_leftovers(kd, "pod-sandbox") == []


def test_a_process_holding_the_raw_file_refuses_unpublish(kd: KataDriver) -> None:
    target = kd.publish("pod-vm", attributes=GUEST)
    names = kd.names("pod-vm")
    before = mount_info(kd, target)
    with open(names.backing, "rb") as disk:  # the hypervisor of a VM that still runs
        holder = subprocess.Popen(["sleep", "600"], stdin=disk)
    try:
        with pytest.raises(grpc.RpcError) as err:
            kd.unpublish("pod-vm")
        assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert f"pid {holder.pid}" in str(err.value.details()), err.value.details()
        assert mount_info(kd, target) == before and guarded(target)
        assert os.path.exists(names.backing)
        assert record_state(kd, names.volume_id) == "published"
    finally:
        holder.kill()
        holder.wait()
    kd.unpublish("pod-vm")
    assert kata_leftovers(kd, "pod-vm") == []


# --- host mode -------------------------------------------------------------------------------
def test_host_mode_hands_over_a_formatted_device_mounted_nowhere(kd: KataDriver) -> None:
    target = kd.publish("pod-host", attributes=HOST, readonly=True)
    names = kd.names("pod-host")
    doc = mount_info(kd, target)
    assert doc == {"volume-type": "directvol", "device": names.mapper_device, "fstype": "ext4",
                   "metadata": {}, "options": ["ro"]}  # fmt: skip
    assert names.mapping in crypt_mappings()
    fs_type = sh("blkid", "-p", "-o", "value", "-s", "TYPE", names.mapper_device).strip()
    assert fs_type == "ext4"
    rdev = os.stat(names.mapper_device).st_rdev
    number = f"{os.major(rdev)}:{os.minor(rdev)}"
    sources = (names.mapper_device, f"/dev/dm-{os.minor(rdev)}")
    with open("/proc/self/mountinfo") as f:
        mounted = [line for line in f if line.split()[2] == number
                   or line.partition(" - ")[2].split()[1] in sources]  # fmt: skip
    assert mounted == [], mounted
    assert_guard_refuses_writes(target)
    kd.unpublish("pod-host")
    assert kata_leftovers(kd, "pod-host") == []
    kd.unpublish("pod-host")  # again: OK
    assert kata_leftovers(kd, "pod-host") == []


# --- crashes and start-up --------------------------------------------------------------------
CRASHES = [(mode, step) for mode, steps in STEPS.items() for step in steps]


@pytest.mark.parametrize(("mode", "step"), CRASHES, ids=[f"{m}-{s}" for m, s in CRASHES])
def test_sigkill_after_each_publish_step(kd: KataDriver, mode: str, step: str) -> None:
    pod = f"pod-kcrash-{mode}-{step}"
    attributes = GUEST if mode == "guest" else HOST
    kd.restart(env={CRASH_ENV: step})
    with pytest.raises(grpc.RpcError):
        kd.publish(pod, attributes=attributes)
    assert kd.wait_exit() == -9, "the fault hook should have killed the driver"
    kd.start()
    if step != "record":  # a half-done publish is rolled back at start-up
        assert kata_leftovers(kd, pod) == []
    target = kd.publish(pod, attributes=attributes)
    names = kd.names(pod)
    device = names.backing if mode == "guest" else names.mapper_device
    assert_handed_over(kd, target, device)
    assert [p.name for p in kd.kata_root.iterdir()] == [volume_dir(kd, target).name]
    if mode == "guest":
        assert_no_host_use_of(names.backing)
    else:
        assert crypt_mappings().count(names.mapping) == 1
        assert len([line for line in loops_on(kd.data_dir) if names.backing in line]) == 1
    kd.unpublish(pod)
    assert kata_leftovers(kd, pod) == []


@pytest.mark.parametrize("mode", ["guest", "host"])
def test_start_up_takes_back_a_hand_off_without_record(kd: KataDriver, mode: str) -> None:
    pod = f"pod-orphan-{mode}"
    target = kd.publish(pod, attributes=GUEST if mode == "guest" else HOST)
    names = kd.names(pod)
    directory = volume_dir(kd, target)
    assert directory.is_dir() and guarded(target)
    kd.kill()
    (kd.state_dir / "volumes" / f"{names.digest}.json").unlink()  # the journal record is lost
    kd.start()
    assert not os.path.lexists(directory), "start-up must remove a hand-off no record names"
    assert not guarded(target) and target not in mountpoints()
    assert names.mapping not in crypt_mappings()
    assert not os.path.exists(names.backing)
    kd.unpublish(pod)  # kubelet's late NodeUnpublish
    assert kata_leftovers(kd, pod) == []


def foreign_hand_off(d: KataDriver) -> Path:
    """Another driver's direct volume in the root: Kata is in use there."""
    name = base64.urlsafe_b64encode(b"/var/lib/kubelet/pods/x/volumes/y").decode()
    directory = d.kata_root / name
    directory.mkdir(mode=0o700)
    (directory / "mountInfo.json").write_text(json.dumps(
        {"volume-type": "directvol", "device": "/dev/sdz", "fstype": "ext4", "metadata": {},
         "options": []}))  # fmt: skip
    return directory


def test_start_up_tears_down_a_record_whose_hand_off_is_gone(kd: KataDriver) -> None:
    target = kd.publish("pod-lost", attributes=GUEST)
    names = kd.names("pod-lost")
    other = foreign_hand_off(kd)
    kd.kill()
    shutil.rmtree(volume_dir(kd, target))  # no VM can get the disk any more
    kd.start()
    assert record_state(kd, names.volume_id) is None
    assert not guarded(target) and not os.path.exists(names.backing)
    assert (other / "mountInfo.json").exists(), "another driver's direct volume was touched"
    shutil.rmtree(other)
    kd.unpublish("pod-lost")
    assert kata_leftovers(kd, "pod-lost") == []


def test_start_up_with_an_empty_root_tears_nothing_down(kd: KataDriver) -> None:
    """A new or wrong --kata-direct-volume-root must not cost a published volume its data."""
    target = kd.publish("pod-root", attributes=GUEST)
    names = kd.names("pod-root")
    kd.kill()
    shutil.rmtree(volume_dir(kd, target))
    kd.start()
    assert record_state(kd, names.volume_id) == "published"
    assert guarded(target) and os.path.exists(names.backing)
    kd.unpublish("pod-root")
    assert kata_leftovers(kd, "pod-root") == []


# --- a PVC -----------------------------------------------------------------------------------
def test_pvc_kata_guest_is_prepared_at_stage_and_handed_to_the_pod(kd: KataDriver) -> None:
    pv: PvcVolume = kd.p.create("pvc-kata", NODE, 64 * MiB, parameters={"kata": "guest"})
    names = names_of(kd, pv.volume_id)
    assert record_state(kd, pv.volume_id) == "reserved" and not os.path.exists(names.backing)
    staging = kd.k.stage(pv)
    assert os.path.getsize(names.backing) == 64 * MiB
    assert staging not in mountpoints()  # stage prepares only
    assert_no_host_use_of(names.backing)
    assert not kd.kata_root.exists() or list(kd.kata_root.iterdir()) == []

    target = kd.k.publish_pvc(pv, "pod-pvc", readonly=True)
    doc = mount_info(kd, target)
    assert set(doc) == KEYS
    assert doc["volume-type"] == "directvol" and doc["device"] == names.backing
    assert doc["fstype"] == "ext4" and "ro" in doc["options"]
    assert doc["metadata"]["encryptionKey"] == "ephemeral"
    assert doc["metadata"]["createFilesystem"] == "true"
    directory = volume_dir(kd, target)
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(directory / "mountInfo.json").st_mode) == 0o600
    assert_guard_refuses_writes(target)
    assert_no_host_use_of(names.backing)
    kd.k.publish_pvc(pv, "pod-pvc", readonly=True)  # again: OK
    assert mount_info(kd, target) == doc

    (directory / ("fedcba9876543210" * 4)).touch()  # Kata's sandbox-id file
    kd.k.unpublish_pvc(pv, "pod-pvc")
    assert not os.path.lexists(directory) and not guarded(target)
    assert not os.path.lexists(target)
    assert os.path.exists(names.backing)  # still staged
    kd.k.unpublish_pvc(pv, "pod-pvc")  # again: OK
    kd.k.unstage(pv)
    assert not os.path.exists(names.backing)
    assert record_state(kd, pv.volume_id) == "reserved"
    kd.p.delete(pv.volume_id)
    assert volume_leftovers(kd, pv) == []
    assert not kd.kata_root.exists() or list(kd.kata_root.iterdir()) == []
