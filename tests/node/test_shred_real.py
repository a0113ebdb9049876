"""The emergency shred on the real kernel, through the real driver and its CLI.

Two live volumes with a writer each; ``luks-ephemeral-csi shred --all``; then, with the volumes
still mounted: no mapping of ours has a crypt table (``dmsetup table --showkeys``), reads and
writes fail, the backing files hold only ciphertext, a new publish is UNAVAILABLE, and kubelet's
unpublish leaves nothing. An open fscrypt file is reported incomplete, never done. With no
driver running, the CLI acts itself and the seal outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from csi.seal import ANNOTATION
from csi.tools.kubelet import Kubelet
from tests.node.conftest import Driver, SmallFs, release_pool, rpc_code, sh
from tests.unit.metrics_harness import FakeApiServer

MARKER = b"SHRED-PLAINTEXT-MARKER-7d1e"
WRITER = f"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
print("ready", flush=True)
while True:
    try:
        os.write(fd, {MARKER!r} * 512)
        os.fsync(fd)
    except OSError as exc:
        print("error", exc.errno, flush=True)
        sys.exit(3)
    time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def shred_data(base: Path) -> Iterator[SmallFs]:
    """A data dir of this module's own: the fscrypt test makes the driver mount its pool there,
    and the pool (a loop device) must go with the module, not stay for the next one."""
    fs = SmallFs(base, "shred-data", 4 * 1024)
    yield fs
    release_pool(fs.mountpoint)
    fs.close()


@pytest.fixture
def driver(base: Path, shred_data: SmallFs) -> Iterator[Driver]:
    d = Driver(base, shred_data.mountpoint, "--metrics-address", "", mode="all")
    d.start()
    yield d
    d.stop(60)
    with contextlib.suppress(Exception):
        cli(d, "unseal")
    for name in our_mappings():  # what a failed test left: never another test's problem
        for point in mounts_of(name):
            sh("umount", "-l", point, check=False)
        sh("dmsetup", "remove", "--retry", name, check=False)
    d.cleanup()


def cli(d: Driver, *args: str) -> tuple[int, dict[str, object]]:
    """``python -m csi <args> --json`` with the driver's directories; (exit code, answer)."""
    argv = [sys.executable, "-m", "csi", *args, "--json", "--state-dir", str(d.state_dir),
            "--data-dir", str(d.data_dir), "--kubelet-root", str(d.kubelet_root),
            "--node-id", d.node_id, "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, timeout=600, check=False)
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"{args}: no JSON ({proc.returncode}): {proc.stdout!r} "
                             f"{proc.stderr.decode()[-2000:]}") from None
    return proc.returncode, answer


def our_mappings() -> list[str]:
    return [line.split()[0] for line in sh("dmsetup", "ls").splitlines()
            if line.startswith("luks-eph-")]


def tables_with_keys() -> dict[str, list[str]]:
    """Our mappings' table lines, keys shown."""
    out: dict[str, list[str]] = {}
    for line in sh("dmsetup", "table", "--showkeys").splitlines():
        name, _, rest = line.partition(": ")
        if name.startswith("luks-eph-"):
            out.setdefault(name, []).append(rest)
    return out


def mounts_of(name: str) -> list[str]:
    dev = Path(f"/sys/block/{os.path.basename(os.path.realpath('/dev/mapper/' + name))}/dev")
    if not dev.exists():
        return []
    number = dev.read_text().strip()
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[2] == number]


def start_writer(path: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # some fsynced writes are on the disk
    return proc


def nothing_left(d: Driver, pods: list[str]) -> list[str]:
    found = []
    for pod in pods:
        names = d.names(pod)
        found += [f"mapping {m}" for m in our_mappings() if m == names.mapping]
        found += [f"file {p}" for p in (names.backing, names.header) if os.path.exists(p)]
        if (d.state_dir / "volumes" / f"{names.digest}.json").exists():
            found.append(f"record of {pod}")
        target = d.k.target(pod, "scratch")
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == target for line in f):
                found.append(f"mount {target}")
    found += [f"loop {line}" for line in sh("losetup", "-l", "-n", "-O", "BACK-FILE").splitlines()
              if str(d.data_dir) + "/" in line and "fscrypt.pool" not in line]
    return found


def test_shred_all_under_live_writers(driver: Driver) -> None:
    d = driver
    targets = {"pod-a": d.publish("pod-a", attributes={"size": "64Mi"}),
               "pod-b": d.publish("pod-b", attributes={"size": "64Mi", "header": "attached"})}
    writers = {pod: start_writer(os.path.join(t, "data")) for pod, t in targets.items()}
    mappings = {pod: d.names(pod).mapping for pod in targets}
    before = tables_with_keys()
    assert all(before[m][0].split()[2] == "crypt" for m in mappings.values())

    code, answer = cli(d, "shred", "--all")
    report = answer["report"]
    assert code == 0 and report["complete"] and report["sealed"], report  # type: ignore[index]
    print(f"shred of 2 live volumes: {report['seconds']:.3f} s")  # type: ignore[index]
    outcomes = {v["volume_id"]: v["outcome"] for v in report["volumes"]}  # type: ignore[index]
    assert outcomes == {Kubelet.volume_id(p, "scratch"): "wiped" for p in targets}

    # no mapping of ours holds a key: each table is one error target
    after = tables_with_keys()
    for pod, mapping in mappings.items():
        assert after[mapping] == [after[mapping][0]] and after[mapping][0].split()[2] == "error", (
            pod, after[mapping])
    assert not any("crypt" in line for lines in after.values() for line in lines)
    # the writers hit errors; reads and writes on the still-mounted volumes fail
    for pod, writer in writers.items():
        try:
            assert writer.wait(60) == 3, f"the writer of {pod} kept writing"
        finally:
            writer.kill()
        assert targets[pod] in mounts_of(mappings[pod])  # still mounted
        with pytest.raises(OSError):
            Path(targets[pod], "data").read_bytes()
        with pytest.raises(OSError):
            Path(targets[pod], "new").write_bytes(b"x")
    # the backing files hold only ciphertext
    for pod in targets:
        backing = Path(d.names(pod).backing)
        assert backing.exists() and MARKER not in backing.read_bytes(), pod
    # sealed: a new publish is refused, naming the seal
    with pytest.raises(grpc.RpcError) as refused:
        d.publish("pod-c", attributes={"size": "64Mi"})
    assert rpc_code(refused.value) == grpc.StatusCode.UNAVAILABLE
    assert "sealed" in str(refused.value.details())
    # kubelet's clean-up on the shredded volumes leaves nothing
    for pod in targets:
        d.unpublish(pod)
        d.unpublish(pod)  # again: OK
    assert nothing_left(d, [*targets, "pod-c"]) == []
    # unseal: volumes can be made again
    assert cli(d, "unseal") == (0, {"unsealed": True})
    d.publish("pod-c", attributes={"size": "64Mi"})
    d.unpublish("pod-c")
    assert nothing_left(d, ["pod-c"]) == []


def test_an_open_fscrypt_file_is_reported_incomplete_then_finished(driver: Driver) -> None:
    d = driver
    target = d.publish("pod-f", attributes={"backing": "fscrypt", "size": "64Mi"})
    Path(target, "closed").write_bytes(MARKER)
    holder = open(Path(target, "held"), "wb")  # held open across the shred
    try:
        holder.write(MARKER)
        holder.flush()
        code, answer = cli(d, "shred", "--all")
        report = answer["report"]
        assert code == 1 and not report["complete"], report  # type: ignore[index]
        volume = report["volumes"][0]  # type: ignore[index]
        assert volume["outcome"] == "incomplete" and "held open by" in volume["detail"], volume
    finally:
        holder.close()
    # the bind mount still pins the volume's directory: still incomplete, never "done"
    code, answer = cli(d, "shred", "--all")
    assert code == 1, answer
    assert answer["report"]["volumes"][0]["outcome"] == "incomplete", answer  # type: ignore[index]
    d.unpublish("pod-f")  # the file is closed: the clean-up finishes the removal
    assert not os.path.exists(os.path.join(d.data_dir, "fscrypt", d.names("pod-f").digest))


def test_shred_with_no_driver_running_and_the_seal_outlives_it(driver: Driver) -> None:
    d = driver
    target = d.publish("pod-n", attributes={"size": "64Mi"})
    Path(target, "data").write_bytes(MARKER * 1024)
    os.sync()
    d.kill()  # as a crashed driver: the volume stays mounted, nothing answers
    code, answer = cli(d, "shred", "--all")
    assert code == 0 and answer["report"]["complete"], answer  # type: ignore[index]
    mapping = d.names("pod-n").mapping
    assert tables_with_keys()[mapping][0].split()[2] == "error"
    with pytest.raises(OSError):
        Path(target, "data").read_bytes()
    d.start()
    with pytest.raises(grpc.RpcError) as refused:
        d.publish("pod-m", attributes={"size": "64Mi"})
    assert rpc_code(refused.value) == grpc.StatusCode.UNAVAILABLE
    stats = d.k.stats("pod-n", "scratch")
    assert stats.volume_condition.abnormal
    assert "emergency shred" in stats.volume_condition.message
    d.unpublish("pod-n")
    assert nothing_left(d, ["pod-n", "pod-m"]) == []
    assert cli(d, "unseal") == (0, {"unsealed": True})


def wait_for(what: str, check: Callable[[], bool], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(0.2)


def test_the_node_annotation_shreds_and_its_removal_unseals(base: Path, data_fs: SmallFs) -> None:
    """Against the local API stand-in: the driver watches its Node; a new annotation value
    shreds every volume and posts a Warning event on the Node; removing it unseals."""
    api = FakeApiServer()
    api.add_node("node-test")
    d = Driver(base, data_fs.mountpoint, "--metrics-address", "", "--kube-api-url", api.url,
               mode="all")  # fmt: skip
    try:
        d.start()
        target = d.publish("pod-k", attributes={"size": "64Mi"})
        Path(target, "data").write_bytes(MARKER * 1024)
        mapping = d.names("pod-k").mapping
        wait_for("the driver watches its node", lambda: api.open_watches() > 0)
        api.set_node_annotation("node-test", ANNOTATION, str(int(time.time())))
        wait_for("the key is wiped",
                 lambda: tables_with_keys()[mapping][0].split()[2] == "error")  # fmt: skip
        with pytest.raises(OSError):
            Path(target, "data").read_bytes()
        wait_for("a Warning event on the Node", lambda: any(
            e.get("involvedObject", {}).get("kind") == "Node" for e in api.events()))
        event = next(e for e in api.events() if e["involvedObject"]["kind"] == "Node")
        assert (event["type"], event["reason"]) == ("Warning", "EmergencyShred")
        assert "shredded 1 of 1 volumes" in event["message"], event["message"]
        with pytest.raises(grpc.RpcError) as refused:
            d.publish("pod-l", attributes={"size": "64Mi"})
        assert rpc_code(refused.value) == grpc.StatusCode.UNAVAILABLE
        d.restart()  # the same value is not acted on twice; the seal stays
        assert cli(d, "shred", "--volume", Kubelet.volume_id("pod-k", "scratch"))[0] == 0
        with pytest.raises(grpc.RpcError):
            d.publish("pod-l", attributes={"size": "64Mi"})
        api.set_node_annotation("node-test", ANNOTATION, None)
        wait_for("unsealed", lambda: not (d.state_dir / "seal.json").exists())
        d.publish("pod-l", attributes={"size": "64Mi"})
        d.unpublish("pod-l")
        d.unpublish("pod-k")
        assert nothing_left(d, ["pod-k", "pod-l"]) == []
    finally:
        d.cleanup()
        api.close()
