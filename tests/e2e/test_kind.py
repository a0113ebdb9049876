"""End to end on a kind cluster: build the image, install the chart, give pods encrypted scratch
volumes, write known data, prove that no plaintext reaches the node's disk, delete the pods and
prove that nothing is left (no backing file, header, journal record, mapping or loop device).

Needs docker (with a reachable engine) and kind on PATH; skipped with the reason otherwise,
unless E2E_REQUIRED=1 (``make e2e-kind``, the e2e workflow), where a missing tool is a failure.
Set KIND_CLUSTER_NAME to reuse a cluster, and E2E_KEEP_CLUSTER=1 to keep the one it creates.

The kind node is a container whose /dev was populated when it started: create enough loop
device nodes on the host before ``kind create cluster`` (the e2e workflow does), or losetup in
the node cannot find a free one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from csi.controller import ControllerServicer
from csi.proto import csi_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import helm as helm_tool  # noqa: E402

CHART = REPO / "charts" / "luks-ephemeral-csi"
IMAGE_REPOSITORY = "ghcr.io/luks-ephemeral-csi/luks-ephemeral-csi"
IMAGE_TAG = "e2e"
RELEASE = "luks-ephemeral-csi"
NAMESPACE = "kube-system"
DRIVER = "luks-ephemeral.csi.io"
DATA_DIR = "/var/lib/luks-ephemeral-csi"
STATE_DIR = "/run/luks-ephemeral-csi"
STORAGE_CLASS = "luks-ephemeral"
TEST_NAMESPACE = "luks-e2e"
DATA_BYTES = 8 * 1024 * 1024

pytestmark = pytest.mark.timeout(3600)


def e2e_unavailable() -> str | None:
    """Why this machine cannot run the kind e2e test, or None if it can."""
    for tool in ("docker", "kind"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "the docker engine does not answer (docker info timed out)"
    if info.returncode != 0 or not info.stdout.strip():
        detail = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the docker engine is not reachable: {detail}"
    return None


def controller_implemented() -> bool:
    """Generic ephemeral volumes need CreateVolume: has the driver overridden the stub yet?"""
    base = csi_pb2_grpc.ControllerServicer
    return getattr(ControllerServicer, "CreateVolume", None) is not getattr(
        base, "CreateVolume", None
    )


def run(
    argv: list[str], *, timeout: float = 600, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done


@dataclass
class Cluster:
    name: str
    node: str  # the kind node container (single-node cluster)
    kubeconfig: Path
    helm: Path
    generic_ephemeral: bool

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """kubectl inside the kind node (its image ships it): nothing to install on the host."""
        argv = ["docker", "exec", "-i", self.node, "kubectl",
                "--kubeconfig=/etc/kubernetes/admin.conf", *args]  # fmt: skip
        return run(argv, stdin=stdin, check=check, timeout=timeout)

    def on_node(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker", "exec", self.node, "sh", "-c", script], check=check, timeout=120)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = e2e_unavailable()
    if reason is not None:
        if os.environ.get("E2E_REQUIRED") == "1":
            pytest.fail(f"E2E_REQUIRED=1 but {reason}")
        pytest.skip(f"kind e2e needs docker with a running engine and kind: {reason}")
    try:
        helm = helm_tool.ensure_helm()
    except helm_tool.HelmUnavailable as exc:
        pytest.fail(f"helm is needed to install the chart: {exc}")

    name = os.environ.get("KIND_CLUSTER_NAME", "luks-ephemeral-e2e")
    existing = run(["kind", "get", "clusters"]).stdout.split()
    created = name not in existing
    if created:
        run(["kind", "create", "cluster", "--name", name, "--wait", "180s"], timeout=900)
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    cluster = Cluster(name, f"{name}-control-plane", kubeconfig, helm, controller_implemented())
    try:
        kubeconfig.write_text(run(["kind", "get", "kubeconfig", "--name", name]).stdout)
        image = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
        run(["docker", "build", "-t", image, str(REPO)], timeout=1800)
        run(["kind", "load", "docker-image", image, "--name", name], timeout=900)
        install(cluster)
        cluster.kubectl("create", "namespace", TEST_NAMESPACE, check=False)
        yield cluster
    finally:
        if created and os.environ.get("E2E_KEEP_CLUSTER") != "1":
            run(["kind", "delete", "cluster", "--name", name], check=False, timeout=300)
        elif not created:
            cluster.kubectl("delete", "namespace", TEST_NAMESPACE, "--wait=true", check=False)
            run([str(helm), "uninstall", RELEASE, "-n", NAMESPACE, "--wait",
                 "--kubeconfig", str(kubeconfig)], check=False)  # fmt: skip


def install(cluster: Cluster) -> None:
    settings = [
        f"image.repository={IMAGE_REPOSITORY}",
        f"image.tag={IMAGE_TAG}",
        "image.pullPolicy=Never",  # the image was loaded into the node, not pushed anywhere
        "node.logFormat=text",
        "node.logLevel=DEBUG",
    ]
    if cluster.generic_ephemeral:
        settings += ["controller.enabled=true", "storageClass.create=true"]
    argv = [str(cluster.helm), "upgrade", "--install", RELEASE, str(CHART), "-n", NAMESPACE,
            "--kubeconfig", str(cluster.kubeconfig), "--wait", "--timeout", "10m"]  # fmt: skip
    for setting in settings:
        argv += ["--set", setting]
    try:
        run(argv, timeout=900)
    except AssertionError:
        logs = cluster.kubectl(
            "-n", NAMESPACE, "logs", f"daemonset/{RELEASE}-node", "--all-containers",
            "--tail=100", check=False,
        )  # fmt: skip
        pytest.fail(f"helm install failed; node plugin logs:\n{logs.stdout}{logs.stderr}")
    wait_for(
        "the driver to register with kubelet",
        lambda: DRIVER in cluster.kubectl("get", "csinode", "-o", "yaml").stdout,
    )


def pod_manifest(name: str, marker_head: str, marker_tail: str, volume: dict[str, object]) -> str:
    """A pod that writes DATA_BYTES of a known line to its scratch volume, syncs, and waits.

    The marker is split in two env vars and joined by the shell, so the whole marker exists only
    in what the pod writes: finding it anywhere on the node would be a plaintext leak.
    """
    script = textwrap.dedent(
        f"""\
        set -e
        yes "$HEAD$TAIL" | head -c {DATA_BYTES} > /scratch/data
        sync
        touch /scratch/ready
        exec sleep 3600
        """
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": TEST_NAMESPACE},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"fsGroup": 2000},
            "containers": [{
                "name": "app",
                "image": "busybox:1.36",
                "command": ["sh", "-c", script],
                "env": [{"name": "HEAD", "value": marker_head},
                        {"name": "TAIL", "value": marker_tail}],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                "readinessProbe": {"exec": {"command": ["test", "-f", "/scratch/ready"]},
                                   "periodSeconds": 2},
            }],
            "volumes": [{"name": "scratch", **volume}],
        },
    }  # fmt: skip
    return yaml.safe_dump(pod)


def backing_files(cluster: Cluster) -> list[str]:
    out = cluster.on_node(f"ls -1 {DATA_DIR} 2>/dev/null || true").stdout
    return [line for line in out.split() if line.endswith(".img")]


def leftovers(cluster: Cluster) -> dict[str, str]:
    """What a volume leaves on the node while it exists; all empty once it is gone."""
    checks = {
        "backing files": f"ls -1 {DATA_DIR} 2>/dev/null | grep '\\.img$' || true",
        "headers": f"ls -1 {STATE_DIR}/headers 2>/dev/null || true",
        "journal records": f"ls -1 {STATE_DIR}/volumes 2>/dev/null | grep '\\.json$' || true",
        "LUKS mappings": "cat /sys/block/dm-*/dm/uuid 2>/dev/null | grep CRYPT-LUKS || true",
        "loop devices": f"losetup --list --noheadings -O BACK-FILE | grep {DATA_DIR} || true",
        "connected NBD devices": "ls -d /sys/block/nbd*/pid 2>/dev/null || true",
    }
    return {what: cluster.on_node(script).stdout.strip() for what, script in checks.items()}


def exercise(cluster: Cluster, name: str, volume: dict[str, object]) -> None:
    head, tail = "LUKS-EPHEMERAL-E2E-", secrets.token_hex(16)
    marker = head + tail
    before = set(backing_files(cluster))
    cluster.kubectl("apply", "-f", "-", stdin=pod_manifest(name, head, tail, volume))
    try:
        ready = cluster.kubectl(
            "-n", TEST_NAMESPACE, "wait", "--for=condition=Ready", f"pod/{name}",
            "--timeout=300s", check=False, timeout=360,
        )  # fmt: skip
        if ready.returncode != 0:
            described = cluster.kubectl("-n", TEST_NAMESPACE, "describe", "pod", name, check=False)
            pytest.fail(f"pod {name} never became ready:\n{described.stdout}")

        # The pod reads its own data back: the volume works.
        count = cluster.kubectl(
            "-n", TEST_NAMESPACE, "exec", name, "--", "grep", "-c", marker, "/scratch/data"
        ).stdout.strip()
        assert int(count) >= DATA_BYTES // (len(marker) + 1)

        # On the node: a new backing file, a LUKS2 mapping, and no plaintext anywhere on disk.
        new = set(backing_files(cluster)) - before
        assert len(new) == 1, f"expected one new backing file, found {sorted(new)}"
        assert "CRYPT-LUKS2" in leftovers(cluster)["LUKS mappings"]
        cluster.on_node("sync")
        leak = cluster.on_node(
            f"grep -rlaF '{marker}' {DATA_DIR} {STATE_DIR} 2>/dev/null || true"
        ).stdout.strip()
        assert leak == "", f"plaintext found on the node's disk in: {leak}"
        size = int(cluster.on_node(f"stat -c %s {DATA_DIR}/{new.pop()}").stdout)
        assert size >= DATA_BYTES
    finally:
        cluster.kubectl("-n", TEST_NAMESPACE, "delete", "pod", name, "--wait=true",
                        "--timeout=180s", check=False, timeout=240)  # fmt: skip
    wait_for(
        "the volume to be shredded",
        lambda: not any(leftovers(cluster).values()),
        timeout=180,
    )


def test_inline_volume_is_encrypted_and_shredded(cluster: Cluster) -> None:
    exercise(
        cluster,
        "inline",
        {"csi": {"driver": DRIVER, "fsType": "ext4", "volumeAttributes": {"size": "64Mi"}}},
    )


def test_inline_qcow2_volume_is_encrypted_and_shredded(cluster: Cluster) -> None:
    """The qsd sidecar serves the image; the driver attaches it through the kernel NBD client."""
    if not cluster.on_node("ls -d /sys/block/nbd0 2>/dev/null || true").stdout.strip():
        pytest.skip("the kind node's kernel has no NBD devices: run `modprobe nbd` on the host "
                    "(the e2e workflow does)")  # fmt: skip
    exercise(
        cluster,
        "qcow2",
        {"csi": {"driver": DRIVER, "fsType": "ext4",
                 "volumeAttributes": {"size": "64Mi", "backing": "qcow2"}}},
    )  # fmt: skip


def test_generic_ephemeral_volume_is_encrypted_and_shredded(cluster: Cluster) -> None:
    if not cluster.generic_ephemeral:
        pytest.skip("generic ephemeral volumes need the controller service (CreateVolume), "
                    "which the driver does not implement yet")  # fmt: skip
    claim = {
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": STORAGE_CLASS,
            "resources": {"requests": {"storage": "64Mi"}},
        }
    }
    exercise(cluster, "generic", {"ephemeral": {"volumeClaimTemplate": claim}})
    wait_for(
        "the PersistentVolume to be deleted",
        lambda: DRIVER not in cluster.kubectl("get", "pv", "-o", "yaml").stdout,
    )
