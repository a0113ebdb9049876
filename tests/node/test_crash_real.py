"""Crash recovery with the real driver process: SIGKILL after every step, kill while writing,
and a simulated reboot."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from csi.__main__ import CRASH_ENV
from csi.steps import PUBLISH_STEPS
from tests.node.conftest import Driver, crypt_mappings, leftovers, loops_on, sh


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_sigkill_after_each_publish_step(driver: Driver, step: str) -> None:
    pod = f"pod-crash-{step}"
    driver.restart(env={CRASH_ENV: step})
    with pytest.raises(grpc.RpcError):
        driver.publish(pod, attributes={"size": "32Mi"})
    assert driver.wait_exit() == -9, "the fault hook should have killed the driver"
    driver.start()
    target = driver.publish(pod, attributes={"size": "32Mi"})
    Path(target, "after-crash").write_text("ok")
    assert Path(target, "after-crash").read_text() == "ok"
    assert not driver.k.stats(pod, "scratch").volume_condition.abnormal
    assert crypt_mappings().count(driver.names(pod).mapping) == 1
    assert len([line for line in loops_on(driver.data_dir)
                if driver.names(pod).backing in line]) == 1  # fmt: skip
    driver.unpublish(pod)
    assert leftovers(driver, pod) == []


WRITER = """
import hashlib, os, sys, time
path, total = sys.argv[1], int(sys.argv[2])
h = hashlib.sha256()
with open(path, "wb") as f:
    for i in range(total):
        block = hashlib.sha256(str(i).encode()).digest() * 2048
        f.write(block); h.update(block)
        if i % 8 == 0:
            f.flush(); os.fsync(f.fileno())
        time.sleep(0.01)
    f.flush(); os.fsync(f.fileno())
print(h.hexdigest())
"""


def test_sigkill_while_writing_keeps_data(driver: Driver) -> None:
    target = driver.publish("pod-live", attributes={"size": "128Mi"})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, f"{target}/live.bin", "300"],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    driver.kill()
    driver.start()
    out, _ = writer.communicate(timeout=600)
    assert writer.returncode == 0, "the writer saw an I/O error"
    digest = hashlib.sha256(Path(target, "live.bin").read_bytes()).hexdigest()
    assert digest == out.strip()
    stats = driver.k.stats("pod-live", "scratch")
    assert not stats.volume_condition.abnormal
    assert any(u.used > 0 for u in stats.usage)
    driver.unpublish("pod-live")
    assert leftovers(driver, "pod-live") == []


def test_simulated_reboot_removes_orphans(driver: Driver) -> None:
    target = driver.publish("pod-reboot", attributes={"size": "32Mi"})
    names = driver.names("pod-reboot")
    driver.kill()
    # what a reboot does: mounts, mappings and loops vanish, tmpfs state is empty
    sh("umount", target)
    sh("cryptsetup", "close", names.mapping)
    for line in loops_on(driver.data_dir):
        if names.backing in line:
            sh("losetup", "-d", line.split()[0])
    shutil.rmtree(driver.state_dir)
    assert os.path.exists(names.backing)
    driver.start()
    assert not os.path.exists(names.backing), "start-up must delete the orphaned backing file"
    driver.unpublish("pod-reboot")  # kubelet's late NodeUnpublish
    assert leftovers(driver, "pod-reboot") == []
