"""qcow2 backing on the real kernel: qemu-img image, qemu-storage-daemon serving it over NBD (a
separate process, as the chart's sidecar is), the kernel NBD client, then the same LUKS2 path.

The qemu-storage-daemon here is started by the test, never by the driver, so SIGKILL of the
driver leaves the NBD server and the kernel's connection to it alone."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi.tools.qsd import QemuStorageDaemon
from tests.node.conftest import (
    Driver,
    SmallFs,
    crypt_mappings,
    leftovers,
    names_of,
    sh,
    volume_leftovers,
)
from tests.node.test_crash_real import WRITER
from tests.node.test_pvc_real import NODE

MiB = 1024**2
MARKER = b"QCOW2-PLAINTEXT-MARKER-7f3a9c "


class Qsd(QemuStorageDaemon):
    """qemu-storage-daemon as its own daemon, as the chart's sidecar is."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix="lec-qsd-", dir="/run")))
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _missing() -> list[str]:
    missing = [t for t in ("qemu-storage-daemon", "qemu-img", "nbd-client") if not shutil.which(t)]
    if not glob.glob("/sys/block/nbd*"):
        missing.append("kernel NBD devices (modprobe nbd)")
    return missing


@pytest.fixture
def qsd() -> Iterator[Qsd]:
    if missing := _missing():
        reason = f"qcow2 tests need {', '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason=reason)
    daemon = Qsd()
    yield daemon
    daemon.close()


@pytest.fixture
def qdriver(base: Path, data_fs: SmallFs, qsd: Qsd) -> Iterator[Driver]:
    d = Driver(base, data_fs.mountpoint, "--qsd-socket", str(qsd.socket))
    d.start()
    yield d
    d.cleanup()


def connected_nbds() -> list[str]:
    return sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob("/sys/block/nbd*/pid"))


def mapping_device_major(mapping: str) -> int:
    """The major number of the device under the mapping (43 is nbd, 7 is loop)."""
    deps = sh("dmsetup", "deps", "-o", "devno", mapping)  # "1 dependencies  : (43, 0)"
    return int(deps.split("(")[1].split(",")[0])


def qcow2_leftovers(driver: Driver, qsd: Qsd, pod: str) -> list[str]:
    names = driver.names(pod)
    found = leftovers(driver, pod)
    found += [f"export {e}" for e in qsd.exports() if e == names.mapping]
    found += [f"node {n}" for n in qsd.nodes()]
    found += [f"nbd {d}" for d in connected_nbds()]
    found += [f"claim {c}" for c in glob.glob(str(driver.state_dir / "nbd" / "*"))]
    return found


def test_qcow2_publish_write_unpublish_no_plaintext(qdriver: Driver, qsd: Qsd) -> None:
    target = qdriver.publish("pod-q", attributes={"size": "64Mi", "backing": "qcow2"})
    names = qdriver.names("pod-q")
    info = json.loads(sh("qemu-img", "info", "-U", "--output=json", names.backing))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 64 * MiB
    assert qsd.exports() == [names.mapping]
    assert mapping_device_major(names.mapping) == 43, "the mapping should sit on an NBD device"
    assert len(connected_nbds()) == 1
    data = MARKER * (4 * MiB // len(MARKER))
    Path(target, "secret.txt").write_bytes(data)
    os.sync()
    sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    image = Path(names.backing).read_bytes()
    assert len(image) > 4 * MiB, "the written data should have reached the image"
    assert MARKER not in image, "plaintext reached the qcow2 image"
    assert b"LUKS\xba\xbe" not in image, "the header is detached: no LUKS magic in the image"
    assert Path(target, "secret.txt").read_bytes() == data
    assert not qdriver.k.stats("pod-q", "scratch").volume_condition.abnormal
    qdriver.unpublish("pod-q")
    assert qcow2_leftovers(qdriver, qsd, "pod-q") == []


def test_qcow2_preallocated_image_holds_its_blocks(qdriver: Driver, qsd: Qsd) -> None:
    qdriver.publish("pod-qp", attributes={"size": "64Mi", "backing": "qcow2",
                                          "preallocate": "true"})  # fmt: skip
    allocated = os.stat(qdriver.names("pod-qp").backing).st_blocks * 512
    assert allocated >= 64 * MiB
    qdriver.unpublish("pod-qp")
    assert qcow2_leftovers(qdriver, qsd, "pod-qp") == []


def test_qcow2_sigkill_while_writing_keeps_data(qdriver: Driver, qsd: Qsd) -> None:
    target = qdriver.publish("pod-ql", attributes={"size": "128Mi", "backing": "qcow2"})
    names = qdriver.names("pod-ql")
    [device] = connected_nbds()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, f"{target}/live.bin", "300"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1)
    qdriver.kill()
    assert writer.poll() is None, "the writer should still be writing while the driver is dead"
    qdriver.start()  # start-up reconcile re-adopts the live volume
    out, _ = writer.communicate(timeout=900)
    assert writer.returncode == 0, "the writer saw an I/O error"
    os.sync()
    sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    digest = hashlib.sha256(Path(target, "live.bin").read_bytes()).hexdigest()
    assert digest == out.strip()
    assert connected_nbds() == [device], "the same NBD device should carry the volume"
    assert qsd.exports() == [names.mapping]
    assert crypt_mappings().count(names.mapping) == 1
    assert not qdriver.k.stats("pod-ql", "scratch").volume_condition.abnormal
    qdriver.unpublish("pod-ql")
    assert qcow2_leftovers(qdriver, qsd, "pod-ql") == []


def test_qcow2_refused_without_qemu_storage_daemon(driver: Driver) -> None:
    """The driver started without --qsd-socket refuses qcow2 with the reason, leaving nothing."""
    with pytest.raises(grpc.RpcError) as err:
        driver.publish("pod-qn", attributes={"size": "64Mi", "backing": "qcow2"})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "qsd-socket" in str(err.value.details())
    assert leftovers(driver, "pod-qn") == []


def test_qcow2_unpublish_after_qemu_storage_daemon_died(qdriver: Driver, qsd: Qsd) -> None:
    """qsd gone (its container crashed): the volume is reported abnormal, and unpublish still
    tears everything down instead of hanging on the dead NBD device's in-flight I/O."""
    target = qdriver.publish("pod-qd", attributes={"size": "64Mi", "backing": "qcow2"})
    Path(target, "before").write_bytes(MARKER * 1000)
    os.sync()
    os.kill(int(qsd.pidfile.read_text()), 9)
    time.sleep(1)
    condition = qdriver.k.stats("pod-qd", "scratch").volume_condition
    assert condition.abnormal, condition.message
    assert "qemu-storage-daemon" in condition.message
    started = time.monotonic()
    qdriver.unpublish("pod-qd")
    assert time.monotonic() - started < 300
    names = qdriver.names("pod-qd")
    assert leftovers(qdriver, "pod-qd") == []
    assert connected_nbds() == []
    assert not os.path.exists(names.backing)
    assert glob.glob(str(qdriver.state_dir / "nbd" / "*")) == []


def test_qcow2_pvc_block_and_filesystem_stage_publish_unstage(
    base: Path, data_fs: SmallFs, qsd: Qsd
) -> None:
    """Provisioned qcow2 volumes: a raw block volume read and written through the pod's device
    and a filesystem volume bound into a pod, each staged on its own NBD device; unstage and
    DeleteVolume leave no export, no block node, no NBD connection, no claim and no file."""
    d = Driver(base, data_fs.mountpoint, "--metrics-address", "", "--qsd-socket",
               str(qsd.socket), mode="all")  # fmt: skip
    d.start()
    try:
        qcow2 = {"backing": "qcow2"}
        block = d.p.create("pvc-qb", NODE, 64 * MiB, parameters=qcow2, block=True)
        files = d.p.create("pvc-qf", NODE, 64 * MiB, parameters=qcow2)
        d.k.stage(block)
        d.k.stage(files)
        assert len(connected_nbds()) == 2 and len(qsd.exports()) == 2
        device = d.k.publish_pvc(block, "pod-b")
        data = MARKER * (MiB // len(MARKER))
        with open(device, "r+b", buffering=0) as dev:
            os.pwrite(dev.fileno(), data, 8 * MiB)
            os.fsync(dev.fileno())
        target = d.k.publish_pvc(files, "pod-f")
        Path(target, "kept").write_bytes(data)
        os.sync()
        sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        with open(device, "rb", buffering=0) as dev:
            assert os.pread(dev.fileno(), len(data), 8 * MiB) == data
        assert Path(target, "kept").read_bytes() == data
        for pv in (block, files):
            names = names_of(d, pv.volume_id)
            assert mapping_device_major(names.mapping) == 43
            assert MARKER not in Path(names.backing).read_bytes(), "plaintext in the image"
        d.k.unpublish_pvc(block, "pod-b")
        d.k.unpublish_pvc(files, "pod-f")
        for pv in (block, files):
            d.k.unstage(pv)
            d.p.delete(pv.volume_id)
            assert volume_leftovers(d, pv) == []
        assert qsd.exports() == [] and qsd.nodes() == [] and connected_nbds() == []
        assert glob.glob(str(d.state_dir / "nbd" / "*")) == []
    finally:
        d.cleanup()
