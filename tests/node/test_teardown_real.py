"""Teardown hardening on the real kernel.

- A volume still used from another mount namespace (a container's bind of the target: the
  driver cannot see it) is never taken away: NodeUnpublish / NodeUnstage answer
  FAILED_PRECONDITION and the target (staging path) is a mount of the volume again, never a
  plain directory on the node's disk.
- A lost journal does not destroy a live block volume bound into a pod (its mountinfo entry
  names devtmpfs, not /dev/mapper/...).
- cryptsetup killed while it wipes a dm-integrity device leaves its ``temporary-cryptsetup-*``
  mappings on our loop device: start-up removes them, so the loop device and the deleted backing
  file go too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi.journal import Names
from csi.tools.kubelet import Kubelet, PvcVolume
from tests.node.conftest import (
    Driver,
    crypt_mappings,
    leftovers,
    mountpoints,
    names_of,
    record_state,
    rpc_code,
    sh,
    volume_leftovers,
)

MiB = 1024**2
NODE = "node-test"
TEMPORARY = "temporary-cryptsetup-"


# --- fixtures -----------------------------------------------------------------------------
@pytest.fixture
def d(d: Driver) -> Iterator[Driver]:
    """conftest's ``all``-mode driver; once it has stopped, whatever a failed test left of
    ours is scrubbed (conftest's own cleanup then stops nothing more)."""
    yield d
    d.stop(60)
    scrub(d)


class Container:
    """A process in its own mount namespace with the volume bound at a path of its own (its
    ``/data``), as a container's bind of the volume's target: invisible in our mountinfo. Its
    namespace also holds a copy of every mount we had when it started."""

    def __init__(self, source: str) -> None:
        self.view = tempfile.mkdtemp(prefix="ctr-", dir="/run")
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount --bind "$1" "$2" && exec sleep 600', "container", source, self.view]
        )  # fmt: skip
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 120
        while True:
            try:
                theirs = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
                comm = Path(f"/proc/{self.proc.pid}/comm").read_text().strip()
                if theirs != mine and comm == "sleep" and self.view in self.mounts():
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"the container exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError("the container never bound the volume in its namespace")
            time.sleep(0.05)
        assert self.view not in mountpoints(), "the container's bind leaked into our namespace"

    def mounts(self) -> list[str]:
        with open(f"/proc/{self.proc.pid}/mountinfo") as f:
            return [line.split()[4] for line in f]

    def read(self, name: str) -> str:
        """Read a file of the volume as the container sees it."""
        return sh("nsenter", "-t", str(self.proc.pid), "-m", "cat", f"{self.view}/{name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        with contextlib.suppress(OSError):
            os.rmdir(self.view)


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    made: list[Container] = []
    yield made
    for container in made:
        container.stop()


# --- what the kernel says -----------------------------------------------------------------
def dm_names() -> dict[str, str]:
    """dm name -> dm-N, from sysfs."""
    found = {}
    for entry in glob.glob("/sys/block/dm-*/dm/name"):
        with contextlib.suppress(OSError):
            found[Path(entry).read_text().strip()] = entry.split("/")[3]
    return found


def dm_dev(name: str) -> str:
    """major:minor of a mapping."""
    kname = dm_names()[name]
    return Path(f"/sys/block/{kname}/dev").read_text().strip()


def mount_entry(path: str) -> list[str] | None:
    """The visible (last) mountinfo line at ``path``, split."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == path:
                found = fields
    return found


def temporary_mappings() -> list[str]:
    return sorted(n for n in dm_names() if n.startswith(TEMPORARY))


def holders_tree(kname: str) -> list[str]:
    """Every dm name stacked (directly or not) on block device ``kname``."""
    by_kname = {v: k for k, v in dm_names().items()}
    out = []
    with contextlib.suppress(FileNotFoundError):
        for holder in sorted(os.listdir(f"/sys/block/{kname}/holders")):
            out.append(by_kname.get(holder, holder))
            out += holders_tree(holder)
    return out


def loop_backing_files() -> dict[str, str]:
    """loop device -> backing file, from sysfs (a deleted file ends in ' (deleted)')."""
    found = {}
    for entry in glob.glob("/sys/block/loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            found["/dev/" + entry.split("/")[3]] = Path(entry).read_text().strip()
    return found


def loops_in(directory: Path) -> dict[str, str]:
    prefix = str(directory).rstrip("/") + "/"
    return {dev: f for dev, f in loop_backing_files().items() if f.startswith(prefix)}


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat_path).read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(stat_path.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaps does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def retry(call: Callable[[], None], seconds: float = 60) -> None:
    """Call until it stops answering FAILED_PRECONDITION, as kubelet would: a killed process's
    mount namespace can take a moment to release its mounts."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            call()
            return
        except grpc.RpcError as exc:
            if rpc_code(exc) != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(1)


def underneath(mountpoint: str) -> list[str]:
    """What the directory *under* a mount holds on the node's own disk: bind its parent
    (non-recursively, so submounts stay out) elsewhere and look."""
    peek = tempfile.mkdtemp(prefix="peek-", dir="/tmp")
    try:
        sh("mount", "--bind", os.path.dirname(mountpoint), peek)
        try:
            below = os.path.join(peek, os.path.basename(mountpoint))
            return sorted(os.listdir(below)) if os.path.isdir(below) else []
        finally:
            sh("umount", peek)
    finally:
        os.rmdir(peek)


def scrub(d: Driver) -> None:
    """Remove by hand whatever a failed test left of ours, so later tests see a clean node."""
    for point in reversed(mountpoints()):
        if point.startswith(str(d.kubelet_root) + "/"):
            sh("umount", "-l", point, check=False)
    for _ in range(4):  # top-down: a mapping nothing is stacked on first
        for name, kname in dm_names().items():
            if name.startswith(("luks-eph-", TEMPORARY)) and not holders_tree(kname):
                sh("dmsetup", "remove", "--retry", name, check=False)
    for device in loops_in(d.data_dir):
        sh("losetup", "-d", device, check=False)


def log_tail(d: Driver, lines: int = 60) -> str:
    return "\n".join(d.log().splitlines()[-lines:])


# --- item 1: a target still used in another mount namespace ---------------------------------
def test_inline_target_held_in_another_namespace_is_mounted_again(
    d: Driver, containers: list[Container]
) -> None:
    pod = "pod-elsewhere"
    target = d.publish(pod, attributes={"size": "64Mi"})
    names = d.names(pod)
    Path(target, "before.txt").write_text("written before")
    dev = dm_dev(names.mapping)
    entry = mount_entry(target)
    assert entry is not None and entry[2] == dev

    container = Container(target)
    containers.append(container)
    assert container.read("before.txt") == "written before"
    with pytest.raises(grpc.RpcError) as err:
        d.unpublish(pod)
    assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()

    # the target is the volume, as before: never a plain directory on the node's disk
    entry = mount_entry(target)
    assert entry is not None, f"{target} is no longer a mount point:\n{log_tail(d)}"
    assert entry[2] == dev, f"{target} is a mount of {entry[2]}, not the mapping's {dev}"
    assert {"nosuid", "nodev"} <= set(entry[5].split(","))
    assert names.mapping in crypt_mappings()
    assert record_state(d, Kubelet.volume_id(pod, "scratch")) == "published"
    assert Path(target, "before.txt").read_text() == "written before"
    Path(target, "after.txt").write_text("written after the refusal")
    os.sync()
    # the very filesystem the container still has, not a new directory
    assert container.read("after.txt") == "written after the refusal"
    assert underneath(target) == [], "files landed on the node's disk under the target"

    container.stop()
    retry(lambda: d.unpublish(pod))
    assert not os.path.exists(target)
    assert leftovers(d, pod) == []
    assert loops_in(d.data_dir) == {}


def test_pvc_staging_held_in_another_namespace_stays_staged(
    d: Driver, containers: list[Container]
) -> None:
    pv = d.p.create("pvc-elsewhere", NODE, 64 * MiB)
    names = names_of(d, pv.volume_id)
    staging = d.k.stage(pv)
    target = d.k.publish_pvc(pv, "pod-a")
    Path(target, "before.txt").write_text("written before")
    dev = dm_dev(names.mapping)

    container = Container(target)
    containers.append(container)
    d.k.unpublish_pvc(pv, "pod-a")  # only our bind goes: the container keeps its own
    assert target not in mountpoints() and not os.path.exists(target)
    assert container.read("before.txt") == "written before"

    with pytest.raises(grpc.RpcError) as err:
        d.k.unstage(pv)
    assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    entry = mount_entry(staging)
    assert entry is not None, (
        f"staging path {staging} lost its mount after the refused unstage "
        f"({err.value.details()}; record {record_state(d, pv.volume_id)}):\n{log_tail(d)}"
    )
    assert entry[2] == dev
    assert names.mapping in crypt_mappings()
    assert record_state(d, pv.volume_id) == "staged"
    assert Path(staging, "before.txt").read_text() == "written before"
    Path(staging, "after.txt").write_text("written after the refusal")
    os.sync()
    assert container.read("after.txt") == "written after the refusal"
    assert underneath(staging) == [], "files landed on the node's disk under the staging path"
    # still staged for real: a new pod can use it
    again = d.k.publish_pvc(pv, "pod-b")
    assert Path(again, "before.txt").read_text() == "written before"
    d.k.unpublish_pvc(pv, "pod-b")

    container.stop()
    retry(lambda: d.k.unstage(pv))
    assert record_state(d, pv.volume_id) == "reserved"
    assert staging not in mountpoints()
    d.p.delete(pv.volume_id)
    assert volume_leftovers(d, pv) == []
    assert loops_in(d.data_dir) == {}


# --- item 6: a lost journal and a block volume bound into a pod -----------------------------
PATTERN = b"luks-ephemeral block pattern\n" * 4096  # 118 KiB
OFFSET = 3 * MiB


def _block_pvc_without_journal(d: Driver, name: str) -> tuple[PvcVolume, str, Names]:
    """Stage and publish a block PVC, write PATTERN, then lose the journal and restart."""
    pv = d.p.create(name, NODE, 64 * MiB, block=True)
    names = names_of(d, pv.volume_id)
    d.k.stage(pv)
    target = d.k.publish_pvc(pv, "pod-a")
    st = os.stat(target)
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.stat(names.mapper_device).st_rdev
    entry = mount_entry(target)
    assert entry is not None
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, PATTERN, OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)

    d.kill()
    records = glob.glob(str(d.state_dir / "volumes" / "*.json"))
    assert records, f"no journal records under {d.state_dir}/volumes"
    for record in records:
        os.unlink(record)
    d.start()  # start-up reconcile runs with no record of the volume
    return pv, target, names


def _read_pattern(target: str) -> bytes:
    Path("/proc/sys/vm/drop_caches").write_text("3")
    fd = os.open(target, os.O_RDONLY)
    try:
        return os.pread(fd, len(PATTERN), OFFSET)
    finally:
        os.close(fd)


def test_lost_journal_keeps_a_bound_block_volume(d: Driver) -> None:
    pv, target, names = _block_pvc_without_journal(d, "pvc-block-lost")
    assert names.mapping in crypt_mappings(), f"the live mapping was closed:\n{log_tail(d)}"
    assert os.path.exists(names.backing), "the live volume's backing file was deleted"
    assert os.path.exists(names.header), "the live volume's header was deleted"
    assert names.backing in loops_in(d.data_dir).values(), "the loop device was detached"
    assert _read_pattern(target) == PATTERN
    assert "left alone" in d.log()

    # clean up by hand: nothing here depends on the record-less teardown (tested below)
    sh("umount", target)
    os.unlink(target)
    sh("cryptsetup", "close", names.mapping)
    for device, backing in loops_in(d.data_dir).items():
        if backing == names.backing:
            sh("losetup", "-d", device)
    os.unlink(names.backing)
    os.unlink(names.header)
    d.p.delete(pv.volume_id)
    assert volume_leftovers(d, pv) == []


def test_lost_journal_block_volume_unpublish_and_unstage_leave_nothing(d: Driver) -> None:
    """kubelet's late NodeUnpublish + NodeUnstage for that volume, now record-less: the bind,
    the mapping, the loop device and the files must all go."""
    pv, target, _ = _block_pvc_without_journal(d, "pvc-block-lost-2")
    assert _read_pattern(target) == PATTERN
    d.k.unpublish_pvc(pv, "pod-a")
    entry = mount_entry(target)
    assert entry is None, (
        f"record-less NodeUnpublish answered OK but left the device bound at {target}: "
        f"mountinfo {' '.join(entry or [])}"
    )
    assert not os.path.exists(target)
    d.k.unstage(pv)
    d.p.delete(pv.volume_id)
    assert volume_leftovers(d, pv) == []
    assert loops_in(d.data_dir) == {}


# --- item 11b: cryptsetup killed while it wipes a dm-integrity device -----------------------
def test_sigkill_during_integrity_wipe_leaves_no_temporary_mapping(d: Driver) -> None:
    pv = d.p.create("pvc-wipe", NODE, 256 * MiB, block=True,
                    parameters={"integrity": "hmac-sha256"})  # fmt: skip
    names = names_of(d, pv.volume_id)
    assert temporary_mappings() == []
    failure: list[BaseException] = []

    def stage() -> None:
        try:
            d.k.stage(pv)
        except BaseException as exc:  # the driver dies under it
            failure.append(exc)

    stager = threading.Thread(target=stage, daemon=True)
    stager.start()
    # cryptsetup's wipe runs on temporary-cryptsetup-<uuid> (dm-crypt) stacked on
    # temporary-cryptsetup-<uuid>_dif (dm-integrity); format itself makes a short-lived one
    deadline = time.monotonic() + 900
    wiping: list[str] = []
    while not wiping:
        temps = temporary_mappings()
        wiping = [t for t in temps if f"{t}_dif" in temps]
        if not wiping and temps:
            wiping = [t for t in temps if " crypt " in sh("dmsetup", "table", t, check=False)]
        if wiping:
            break
        if not stager.is_alive():
            pytest.fail(
                "stage finished before a temporary-cryptsetup mapping of the wipe ever "
                f"appeared ({failure or 'it succeeded'}): the scenario did not happen"
            )
        if time.monotonic() > deadline:
            pytest.fail("no temporary-cryptsetup mapping appeared within 900 s")
        time.sleep(0.05)

    assert d.proc is not None
    victims = descendants(d.proc.pid)
    d.proc.send_signal(signal.SIGKILL)  # the driver and its cryptsetup, like an OOM kill
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    d.proc.wait(30)
    d.kubelet.close()  # type: ignore[union-attr]
    stager.join(120)
    time.sleep(1)
    assert not [p for p in victims if alive(p)], "a child of the driver survived SIGKILL"

    left = temporary_mappings()
    loop = next((dev for dev, f in loops_in(d.data_dir).items() if f == names.backing), None)
    assert loop is not None, f"no loop device on {names.backing}: {loop_backing_files()}"
    stacked = holders_tree(os.path.basename(loop))
    assert left and set(left) <= set(stacked), (
        f"the kill left no temporary mapping on {loop} (left {left}, on the loop {stacked}): "
        "cryptsetup finished or cleaned up first; the scenario did not happen"
    )
    tables = {t: sh("dmsetup", "table", t, check=False).split()[2:3] for t in left}

    d.start()  # start-up reconcile
    try:
        assert temporary_mappings() == [], (
            f"start-up left cryptsetup's mappings {temporary_mappings()} "
            f"(after the kill: {tables}, stacked on {loop}: {stacked}):\n{log_tail(d)}"
        )
        assert loops_in(d.data_dir) == {}, f"loop devices still attached: {loops_in(d.data_dir)}"
        assert not os.path.exists(names.backing)
        assert names.mapping not in dm_names()
    finally:
        with contextlib.suppress(grpc.RpcError):
            d.k.unstage(pv)
        with contextlib.suppress(grpc.RpcError):
            d.p.delete(pv.volume_id)
    assert temporary_mappings() == []
    assert loops_in(d.data_dir) == {}
    assert volume_leftovers(d, pv) == []
