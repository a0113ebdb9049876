"""Nothing left after unpublish; busy volumes survive; no key outside memory."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from pathlib import Path

import grpc
import pytest

from csi.tools.kubelet import InlineVolume
from tests.node.conftest import (
    Driver,
    crypt_mappings,
    cryptsetup_keys,
    leftovers,
    loops_on,
    mountpoints,
    rpc_code,
    sh,
)


def test_nothing_left_after_unpublish(driver: Driver) -> None:
    target = driver.publish("pod-gone", attributes={"size": "64Mi"})
    names = driver.names("pod-gone")
    # while published, every object exists: so the checks below can fail
    assert leftovers(driver, "pod-gone"), "published volume should be visible"
    assert names.mapping in crypt_mappings()
    assert target in mountpoints()
    Path(target, "f").write_text("data")
    driver.unpublish("pod-gone")
    assert leftovers(driver, "pod-gone") == []
    assert not os.path.exists(target)
    assert cryptsetup_keys() == []
    listing = subprocess.run(
        [*driver.proc.args[:3], "volumes", "--state-dir", str(driver.state_dir),  # type: ignore[union-attr, index]
         "--data-dir", str(driver.data_dir)], capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "(no volumes on this node)" in listing.stdout


def test_busy_volume_is_not_torn_down(driver: Driver) -> None:
    target = driver.publish("pod-busy", attributes={"size": "64Mi"})
    Path(target, "keep.txt").write_text("precious")
    holder = subprocess.Popen(["sleep", "600"], cwd=target)
    try:
        with pytest.raises(grpc.RpcError) as err:
            driver.unpublish("pod-busy")
        assert rpc_code(err.value) == grpc.StatusCode.FAILED_PRECONDITION
        assert "busy" in str(err.value.details())
        names = driver.names("pod-busy")
        assert names.mapping in crypt_mappings()
        assert Path(target, "keep.txt").read_text() == "precious"
    finally:
        holder.kill()
        holder.wait()
    driver.unpublish("pod-busy")
    assert leftovers(driver, "pod-busy") == []


KEYLIKE = re.compile(rb"(?<![0-9a-fA-F-])[0-9a-fA-F]{64,}(?![0-9a-fA-F])")


def test_no_key_in_any_process_argv_or_environment(driver: Driver) -> None:
    """Sample every process's cmdline and environ while volumes are being published."""
    found: list[str] = []
    stop = threading.Event()
    samples = [0]

    def sample() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                for what in ("cmdline", "environ"):
                    try:
                        with open(f"/proc/{pid}/{what}", "rb") as f:
                            data = f.read()
                    except OSError:
                        continue
                    # a volume id is csi-<sha256>: not secret, and excluded by the lookbehind
                    for match in KEYLIKE.findall(data):
                        found.append(f"{pid}/{what}: {match[:16]!r}...")
            samples[0] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for i in range(3):
            driver.publish(f"pod-leak-{i}", attributes={"size": "32Mi"})
        for i in range(3):
            driver.unpublish(f"pod-leak-{i}")
    finally:
        stop.set()
        sampler.join()
    assert samples[0] > 3
    assert found == []
    # the driver's own log carries no key-like value either
    assert not KEYLIKE.search(re.sub(rb"csi-[0-9a-f]{64}", b"", driver.log().encode()))


def test_readonly_volume_is_mounted_read_only(driver: Driver) -> None:
    target = driver.publish("pod-ro", attributes={"size": "32Mi"}, readonly=True)
    with pytest.raises(OSError):
        Path(target, "x").write_text("nope")
    driver.unpublish("pod-ro")
    assert leftovers(driver, "pod-ro") == []


def test_mount_flags_and_fs_group(driver: Driver) -> None:
    target = driver.publish("pod-flags", attributes={"size": "32Mi"},
                            mount_flags=["noatime"], fs_group="2000")  # fmt: skip
    options = next(line.split()[5] for line in open("/proc/self/mountinfo")
                   if line.split()[4] == target)  # fmt: skip
    for flag in ("nosuid", "nodev", "noatime", "rw"):
        assert flag in options.split(","), options
    st = os.stat(target)
    assert st.st_gid == 2000 and st.st_mode & 0o2070 == 0o2070
    driver.unpublish("pod-flags")


@pytest.mark.parametrize(
    ("fs_type", "size", "extra"),
    [("ext4", "64Mi", {}), ("xfs", "320Mi", {}),
     ("ext4", "64Mi", {"integrity": "hmac-sha256"}),
     ("ext4", "64Mi", {"cipher": "xchacha12,aes-adiantum-plain64"})],
    ids=["ext4", "xfs", "integrity", "adiantum"],
)  # fmt: skip
def test_matrix_write_read(driver: Driver, fs_type: str, size: str, extra: dict[str, str]) -> None:
    pod = f"pod-m-{fs_type}-{len(extra)}-{''.join(extra)}"
    target = driver.publish(pod, attributes={"size": size, **extra}, fs_type=fs_type)
    names = driver.names(pod)
    table = sh("dmsetup", "table", names.mapping)
    if extra.get("integrity"):
        assert "hmac(sha256)" in table or "integrity" in sh("dmsetup", "ls")
    data = os.urandom(1 << 20)
    Path(target, "blob").write_bytes(data)
    os.sync()
    assert Path(target, "blob").read_bytes() == data
    fs = next(line.split(" - ")[1].split()[0] for line in open("/proc/self/mountinfo")
              if line.split()[4] == target)  # fmt: skip
    assert fs == fs_type
    stats = driver.k.stats(pod, "scratch")
    assert not stats.volume_condition.abnormal, stats.volume_condition.message
    driver.unpublish(pod)
    assert leftovers(driver, pod) == []
    assert not any(n.startswith(names.mapping) for n in sh("dmsetup", "ls").split())


def test_sparse_and_preallocated_footprint(driver: Driver) -> None:
    driver.publish("pod-sparse", attributes={"size": "10Gi"})
    sparse = driver.names("pod-sparse").backing
    allocated = os.stat(sparse).st_blocks * 512
    assert os.path.getsize(sparse) == 10 * 1024**3
    assert allocated <= 16 * 1024**2, f"sparse 10Gi volume allocated {allocated >> 20} MiB"
    driver.publish("pod-prealloc", attributes={"size": "128Mi", "preallocate": "true"})
    prealloc = driver.names("pod-prealloc").backing
    assert os.stat(prealloc).st_blocks * 512 >= 128 * 1024**2
    driver.unpublish("pod-sparse")
    driver.unpublish("pod-prealloc")
    assert leftovers(driver, "pod-sparse") == [] and leftovers(driver, "pod-prealloc") == []


def test_sixteen_concurrent_volumes(driver: Driver) -> None:
    pods = [f"pod-c{i:02d}" for i in range(16)]
    errors: list[BaseException] = []

    def publish(pod: str) -> None:
        try:
            driver.k.publish(InlineVolume(pod, "scratch", {"size": "32Mi"}))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(p,)) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    mappings = set(crypt_mappings())
    assert {driver.names(p).mapping for p in pods} <= mappings
    backings = {driver.names(p).backing for p in pods}
    devices = {line.split()[0] for line in loops_on(driver.data_dir)
               if line.split()[-1] in backings}  # fmt: skip
    assert len(devices) == 16
    for pod in pods:
        target = driver.k.target(pod, "scratch")
        Path(target, "who").write_text(pod)
    for pod in pods:
        assert Path(driver.k.target(pod, "scratch"), "who").read_text() == pod
        assert not driver.k.stats(pod, "scratch").volume_condition.abnormal
    threads = [threading.Thread(target=driver.unpublish, args=(p,)) for p in pods]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for pod in pods:
        assert leftovers(driver, pod) == []
