"""Least privilege in the Helm chart: which container carries an API token, which host paths each
container sees, what the node's RBAC grants (exactly what csi/kube.py calls), and checkov's
verdict on the rendered chart, where every finding must be fixed or listed with its reason in
charts/luks-ephemeral-csi/checkov-allowlist.yaml."""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.config.incluster_config import SERVICE_CERT_FILENAME, SERVICE_TOKEN_FILENAME

from csi.journal import Names
from tests.unit import test_chart
from tests.unit.test_chart import (
    CHART,
    DATA_DIR,
    FULL_VALUES,
    KATA_ROOT,
    RELEASE,
    STATE_DIR,
    Obj,
    containers,
    controller_containers,
    controller_spec,
    find,
    kinds,
    mounts,
    parse,
    pod_spec,
    render,
    rules,
    run_helm,
)

# The chart tests' fixtures (helm, and the default and full renders), shared.
helm = test_chart.helm
full_values = test_chart.full_values
default_render = test_chart.default_render
default_objects = test_chart.default_objects
full_objects = test_chart.full_objects
objects = test_chart.objects

REPO = Path(__file__).resolve().parents[2]
ALLOWLIST = CHART / "checkov-allowlist.yaml"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_VOLUME = "kube-api-access"

# Which containers call the Kubernetes API, and so get a token (nobody else does).
# the driver: the reaper, pod and Node Events, the Node shred annotation; the provisioner
NODE_API_CALLERS = {"driver", "csi-provisioner"}
CONTROLLER_API_CALLERS = {"csi-resizer"}  # the driver in controller mode never calls the API


# tokens --------------------------------------------------------------------------------------
def pod_specs(objects: list[Obj]) -> dict[str, Obj]:
    specs = {"node": pod_spec(objects)}
    if "Deployment" in kinds(objects):
        specs["controller"] = controller_spec(objects)
    return specs


def token_mounts(container: Obj) -> list[Obj]:
    return [m for m in container.get("volumeMounts", []) if m["name"] == TOKEN_VOLUME]


def test_no_pod_gets_the_automatic_token(objects: list[Obj]) -> None:
    for name, spec in pod_specs(objects).items():
        assert spec.get("automountServiceAccountToken") is False, name
    for account in [o for o in objects if o["kind"] == "ServiceAccount"]:
        assert account.get("automountServiceAccountToken") is False, account["metadata"]["name"]


def test_token_only_in_containers_that_call_the_api(
    default_objects: list[Obj], full_objects: list[Obj]
) -> None:
    def holders(pod: dict[str, Obj]) -> set[str]:
        return {name for name, c in pod.items() if token_mounts(c)}

    assert holders(containers(default_objects)) == {"driver"}
    assert holders(containers(full_objects)) == NODE_API_CALLERS
    assert holders(controller_containers(full_objects)) == CONTROLLER_API_CALLERS
    # nobody else reaches the token by another path either
    for rendered in (default_objects, full_objects):
        for spec in pod_specs(rendered).values():
            for container in spec["containers"]:
                for mount in container.get("volumeMounts", []):
                    if mount["name"] != TOKEN_VOLUME:
                        assert not mount["mountPath"].startswith("/var/run/secrets"), mount


def test_projected_token_is_where_the_kubernetes_clients_look(objects: list[Obj]) -> None:
    """The same files at the same path as the automatic token, so the driver's in-cluster config
    (csi/kube.py: InClusterConfigLoader) and client-go in the sidecars work unchanged."""
    assert os.path.dirname(SERVICE_TOKEN_FILENAME) == TOKEN_DIR
    assert os.path.dirname(SERVICE_CERT_FILENAME) == TOKEN_DIR
    for name, spec in pod_specs(objects).items():
        volumes = {v["name"]: v for v in spec["volumes"]}
        projected = volumes[TOKEN_VOLUME]["projected"]
        files: dict[str, Obj] = {}
        for source in projected["sources"]:
            ((kind, body),) = source.items()
            if kind == "serviceAccountToken":
                files[body["path"]] = source
                assert 600 <= body.get("expirationSeconds", 3600) <= 86400, name
                assert "audience" not in body, name  # the API server's own audience
            else:
                for item in body["items"]:
                    files[item["path"]] = source
        assert set(files) == {
            os.path.basename(SERVICE_TOKEN_FILENAME),
            os.path.basename(SERVICE_CERT_FILENAME),
            "namespace",
        }, name
        ca = files[os.path.basename(SERVICE_CERT_FILENAME)]["configMap"]
        assert ca["name"] == "kube-root-ca.crt"
        assert ca["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
        (namespace,) = files["namespace"]["downwardAPI"]["items"]
        assert namespace["fieldRef"]["fieldPath"] == "metadata.namespace"
        for container in spec["containers"]:
            for mount in token_mounts(container):
                assert mount == {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}


# host paths --------------------------------------------------------------------------------
def sees(container: Obj, path: str) -> bool:
    """Whether ``path`` (a path on the node, mounted at the same path) is inside a mount."""
    return any(
        path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        for m in container.get("volumeMounts", [])
    )


def test_qsd_sees_only_its_sockets_and_the_images(objects: list[Obj]) -> None:
    """Forged journal records, headers or NBD claims would steer the privileged driver: qsd,
    which parses NBD traffic from the kernel, must not be able to write them."""
    pod = containers(objects)
    qsd, driver = pod["qsd"], pod["driver"]
    qsd_dir = f"{STATE_DIR}/qsd"
    assert qsd["volumeMounts"] == [
        {"name": "state-dir", "mountPath": qsd_dir, "subPath": "qsd"},
        {"name": "data-dir", "mountPath": DATA_DIR},
        {"name": "fscrypt-hidden", "mountPath": f"{DATA_DIR}/fscrypt", "readOnly": True},
    ]
    # the driver's state: journal, detached headers, NBD claims, its lock
    names = Names.of("a-volume", DATA_DIR, STATE_DIR)
    for private in (f"{STATE_DIR}/volumes/x.json", names.header, f"{STATE_DIR}/nbd/luks-eph-x",
                    f"{STATE_DIR}/driver.lock"):  # fmt: skip
        assert not sees(qsd, private), private
        assert sees(driver, private), private
    # what qsd does need: its QMP and NBD sockets, and the image files, at the driver's paths
    for shared in (f"{qsd_dir}/qmp.sock", f"{qsd_dir}/nbd.sock", names.backing):
        assert sees(qsd, shared) and sees(driver, shared), shared
    assert not [m for m in qsd["volumeMounts"] if m.get("mountPropagation")]


def shown_by(container: Obj, path: str) -> str | None:
    """The volume that ``path`` (a path on the node, mounted at the same path) is read from in
    ``container``: the deepest mount that contains it, as the runtime mounts nested paths."""
    covering = [
        m for m in container.get("volumeMounts", [])
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]  # fmt: skip
    return max(covering, key=lambda m: len(m["mountPath"]))["name"] if covering else None


def test_qsd_never_sees_the_fscrypt_volumes(objects: list[Obj]) -> None:
    """While a pod runs, its fscrypt volume's key is in the kernel, and the volume's directory
    under <data dir>/fscrypt reads as plaintext to any process that reaches it (fscrypt keys are
    per filesystem, not per process). qsd needs none of it: an empty read-only tmpfs covers the
    path in its container, whereas the driver sees the real directory (or the pool mounted
    there)."""
    pod = containers(objects)
    qsd, driver = pod["qsd"], pod["driver"]
    volume = f"{DATA_DIR}/fscrypt/{'0' * 32}/secret.txt"
    assert shown_by(qsd, volume) == "fscrypt-hidden"
    assert shown_by(qsd, f"{DATA_DIR}/fscrypt") == "fscrypt-hidden"
    assert shown_by(driver, volume) == "data-dir"
    assert shown_by(qsd, f"{DATA_DIR}/fscrypt.pool") == "data-dir"  # a sibling: not covered
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert volumes["fscrypt-hidden"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Mi"}
    others = [n for n, c in pod.items() if "fscrypt-hidden" in mounts(c)]
    assert others == ["qsd"]


def test_only_the_driver_sees_the_kata_direct_volumes(objects: list[Obj]) -> None:
    """A mountInfo.json there tells the Kata runtime which file or device to give a pod's VM,
    and with which metadata (encryptionKey=ephemeral or not): whoever can write it chooses what
    a confidential pod gets. Only the driver mounts the directory; qsd and the sidecars never
    see it, and it reaches no container with mount propagation."""
    pod = containers(objects)
    mount_info = f"{KATA_ROOT}/L3Zhci9saWIva3ViZWxldA==/mountInfo.json"
    holders = [name for name, c in pod.items() if sees(c, mount_info)]
    assert holders == ["driver"]
    assert shown_by(pod["driver"], mount_info) == "kata-direct-volumes"
    others = [n for n, c in pod.items() if "kata-direct-volumes" in mounts(c)]
    assert others == ["driver"]
    (mount,) = [m for m in pod["driver"]["volumeMounts"] if m["name"] == "kata-direct-volumes"]
    assert "mountPropagation" not in mount
    # nor does it lie in another mount of the driver's, where a second path could reach it
    assert shown_by({"volumeMounts": [m for m in pod["driver"]["volumeMounts"]
                                      if m["name"] != "kata-direct-volumes"]},
                    mount_info) is None  # fmt: skip


def test_sidecars_see_only_the_socket_dirs(objects: list[Obj]) -> None:
    expected = {
        "node-driver-registrar": {"plugin-dir", "registration-dir"},
        "liveness-probe": {"plugin-dir"},
        "csi-provisioner": {"plugin-dir", TOKEN_VOLUME},
    }
    for name, container in containers(objects).items():
        if name in expected:
            assert set(mounts(container)) == expected[name], name


def test_pods_default_to_the_runtimes_seccomp_profile(objects: list[Obj]) -> None:
    """Every container but the privileged driver (which kubelet runs unconfined) is confined."""
    for name, spec in pod_specs(objects).items():
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name


# NetworkPolicy -----------------------------------------------------------------------------
def policies(objects: list[Obj]) -> dict[str, Obj]:
    return {o["metadata"]["name"].removeprefix(f"{RELEASE}-"): o["spec"]
            for o in objects if o["kind"] == "NetworkPolicy"}  # fmt: skip


def test_network_policies_admit_only_the_metrics_port(
    default_objects: list[Obj], full_objects: list[Obj]
) -> None:
    assert set(policies(default_objects)) == {"node"}
    specs = policies(full_objects)
    assert set(specs) == {"node", "controller"}
    metrics = next(p for p in containers(full_objects)["driver"]["ports"]
                   if p["name"] == "metrics")  # fmt: skip
    assert specs["node"]["policyTypes"] == ["Ingress"]  # egress: the API server, unnameable
    assert specs["node"]["ingress"] == [
        {"ports": [{"port": metrics["containerPort"], "protocol": "TCP"}]}
    ]
    assert specs["controller"] == {
        "podSelector": specs["controller"]["podSelector"], "policyTypes": ["Ingress"],
        "ingress": [],
    }  # fmt: skip
    pods = {"node": find(full_objects, "DaemonSet"),
            "controller": find(full_objects, "Deployment")}  # fmt: skip
    for name, spec in specs.items():
        labels = pods[name]["spec"]["template"]["metadata"]["labels"]
        assert spec["podSelector"]["matchLabels"].items() <= labels.items(), name
    # the node policy does not select the controller's pods, nor the other way round
    node_labels = pods["node"]["spec"]["template"]["metadata"]["labels"]
    assert not specs["controller"]["podSelector"]["matchLabels"].items() <= node_labels.items()


def test_network_policy_follows_metrics_and_can_be_turned_off(helm: Path) -> None:
    objects = render(helm, "node.metrics.enabled=false")
    assert policies(objects)["node"]["ingress"] == []  # nothing to admit
    objects = render(helm, "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.team=obs")
    (rule,) = policies(objects)["node"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "obs"}}}]
    objects = render(helm, "networkPolicy.enabled=false", "controller.enabled=true")
    assert "NetworkPolicy" not in kinds(objects)


# RBAC: exactly what the code calls ---------------------------------------------------------
# CoreV1Api method -> (apiGroup, resource, verb) it needs, and why the driver calls it.
API_CALLS: dict[str, tuple[str, str, str]] = {
    # KubeApi.pods_on_node (orphan reaper): one cluster-wide list with fieldSelector
    # spec.nodeName=<node>; no get, no watch
    "list_pod_for_all_namespaces": ("", "pods", "list"),
    # KubeApi.event and KubeApi.node_event (pod and Node Events): a new Event each time, never
    # patched or updated
    "create_namespaced_event": ("", "events", "create"),
    # KubeApi.node_annotations (emergency shred trigger): this node, by name
    "read_node": ("", "nodes", "get"),
    # KubeApi.watch_node (emergency shred trigger): always watch=True with fieldSelector
    # metadata.name=<node> (asserted below), so it needs watch and never list
    "list_node": ("", "nodes", "watch"),
}


def imports_kubernetes(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "kubernetes"
                                                for a in node.names):  # fmt: skip
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kubernetes":
            return True
    return False


def core_calls() -> list[ast.Call]:
    """Every ``self.core.<method>(...)`` call in csi/kube.py."""
    tree = ast.parse((REPO / "csi" / "kube.py").read_text())
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "core"
    ]  # fmt: skip


def kube_api_methods() -> set[str]:
    """Every ``self.core.<method>(...)`` call in csi/kube.py, the only module that imports the
    kubernetes client (asserted), and the only API class it builds (asserted)."""
    importers = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "csi").rglob("*.py")
        if "proto" not in path.parts and imports_kubernetes(path)
    )
    assert importers == ["csi/kube.py"]
    tree = ast.parse((REPO / "csi" / "kube.py").read_text())
    methods: set[str] = set()
    api_classes: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        target = node.func.value
        if isinstance(target, ast.Attribute) and target.attr == "core":
            methods.add(node.func.attr)
        if node.func.attr.endswith("Api") and isinstance(target, ast.Name):
            api_classes.add(node.func.attr)
    assert api_classes == {"CoreV1Api"}
    return methods


def test_every_api_call_of_the_driver_is_in_the_rbac_table() -> None:
    assert kube_api_methods() == set(API_CALLS)


def test_nodes_are_only_watched_by_name_never_listed() -> None:
    """``list_node`` is a list (RBAC ``list``, every node of the cluster) unless it watches:
    each call must pass ``watch=True`` and a ``metadata.name=`` field selector."""
    calls = [c for c in core_calls() if isinstance(c.func, ast.Attribute)
             and c.func.attr == "list_node"]  # fmt: skip
    assert calls, "no list_node call: update API_CALLS"
    for call in calls:
        keywords = {k.arg: k.value for k in call.keywords}
        watch = keywords.get("watch")
        assert isinstance(watch, ast.Constant) and watch.value is True, ast.unparse(call)
        selector = keywords.get("field_selector")
        assert isinstance(selector, ast.JoinedStr), ast.unparse(call)
        first = selector.values[0]
        assert isinstance(first, ast.Constant) and first.value == "metadata.name=", (
            ast.unparse(call)
        )
        assert "label_selector" not in keywords and "limit" not in keywords


def node_role(objects: list[Obj]) -> dict[tuple[str, str], set[str]]:
    role = find(objects, "ClusterRole", f"{RELEASE}-node")
    assert all("resourceNames" not in r and "nonResourceURLs" not in r for r in role["rules"])
    return rules(role)


@pytest.mark.parametrize("method", sorted(API_CALLS))
def test_node_role_grants_exactly_the_verb_each_call_needs(
    default_objects: list[Obj], method: str
) -> None:
    """The resource's verbs are exactly those of the calls on it: this one's among them."""
    group, resource, verb = API_CALLS[method]
    needed = {v for g, r, v in API_CALLS.values() if (g, r) == (group, resource)}
    granted = node_role(default_objects).get((group, resource))
    assert granted == needed and verb in granted, method


def test_node_role_reads_nodes_but_never_lists_or_writes_them(objects: list[Obj]) -> None:
    """A list would show every node of the cluster; a patch would let a compromised driver
    clear the shred annotation of any node. Neither is granted."""
    assert node_role(objects)[("", "nodes")] == {"get", "watch"}


def test_node_role_grants_nothing_else(objects: list[Obj]) -> None:
    expected: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in API_CALLS.values():
        expected.setdefault((group, resource), set()).add(verb)
    assert node_role(objects) == expected
    assert not [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith(
        "-node")]  # fmt: skip


# checkov -----------------------------------------------------------------------------------
WORKLOADS = ("DaemonSet", "Deployment")
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # every feature the values offer, switched on
    "full": {
        **FULL_VALUES,
        "qcow2": {"enabled": True},
        "resizer": {"enabled": True},
        "node": {**FULL_VALUES["node"], "metrics": {"enabled": True, "port": 9810}},
        "networkPolicy": {"enabled": True},
    },
}
# A pod checkov must object to: proves the scan really ran on our files.
CANARY = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "canary", "namespace": "checkov-canary"},
    "spec": {"containers": [{"name": "canary", "image": "busybox:1.36",
                             "securityContext": {"privileged": True}}]},
}  # fmt: skip
CANARY_CHECK = "CKV_K8S_16"  # Container should not be privileged

Finding = tuple[str, str, str]  # check id, "Kind/component", container ("" if none)


@pytest.fixture(scope="module")
def checkov() -> Path:
    found = shutil.which("checkov", path=f"{Path(sys.executable).parent}{os.pathsep}"
                         f"{os.environ.get('PATH', '')}")  # fmt: skip
    if found is None:
        reason = "checkov is not installed (it is in the dev extra: pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run the chart's security scan")
        pytest.skip(reason=reason)
    return Path(found)


def split_per_container(obj: Obj) -> list[Obj]:
    """One copy of a workload per container, named ``<name>--<container>``: checkov reports a
    workload once whichever container fails, and this way every finding names its container
    (and a new finding in one container is not hidden by an allowed one in another)."""
    if obj["kind"] not in WORKLOADS:
        return [obj]
    copies = []
    for container in obj["spec"]["template"]["spec"]["containers"]:
        one = copy.deepcopy(obj)
        one["metadata"]["name"] = f"{obj['metadata']['name']}--{container['name']}"
        one["spec"]["template"]["spec"]["containers"] = [container]
        copies.append(one)
    return copies


def render_variant(helm: Path, variant: str, directory: Path) -> int:
    """Render one value set into ``<directory>/<variant>.yaml``; returns its object count.
    fullnameOverride and namespace are the variant's name, so the variants' objects (and the
    NetworkPolicies checkov matches to pods) cannot mix."""
    values = directory / f"{variant}-values.yaml"
    values.write_text(yaml.safe_dump({**VARIANTS[variant], "fullnameOverride": variant}))
    done = run_helm(helm, "template", variant, str(CHART), "-n", f"checkov-{variant}",
                    "-f", str(values))  # fmt: skip
    assert done.returncode == 0, done.stderr
    values.unlink()
    objects = [one for obj in parse(done.stdout) for one in split_per_container(obj)]
    (directory / f"{variant}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return len(objects)


def finding(result: Obj) -> tuple[str, Finding]:
    """(variant, finding) of one failed check; the resource is ``Kind.namespace.name[...]``."""
    variant = Path(result["file_path"]).stem
    kind, _namespace, rest = result["resource"].split(".", 2)
    name = rest.split(".", 1)[0]
    component, _, container = name.removeprefix(f"{variant}-").partition("--")
    return variant, (result["check_id"], f"{kind}/{component}", container)


def run_checkov(checkov: Path, directory: Path) -> Obj:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "PRISMA_"))}
    env["LOG_LEVEL"] = "WARNING"
    done = subprocess.run(
        [str(checkov), "--directory", str(directory), "--framework", "kubernetes",
         "--output", "json", "--quiet", "--compact", "--skip-download"],
        capture_output=True, text=True, timeout=600, check=False, env=env, cwd=directory,
    )  # fmt: skip
    assert done.returncode in (0, 1), f"checkov failed ({done.returncode}): {done.stderr[-2000:]}"
    report = json.loads(done.stdout)
    reports = report if isinstance(report, list) else [report]
    (kubernetes,) = [r for r in reports if r.get("check_type") == "kubernetes"]
    result: Obj = kubernetes
    return result


def allowlist_entries() -> list[Obj]:
    entries: list[Obj] = yaml.safe_load(ALLOWLIST.read_text())
    return entries


def load_allowlist() -> dict[Finding, str]:
    allowed: dict[Finding, str] = {}
    for entry in allowlist_entries():
        assert set(entry) == {"check", "name", "resource", "containers", "reason"}, entry
        assert len(entry["reason"].split()) >= 8, f"{entry['check']}: give a real reason"
        for container in entry["containers"]:
            key = (entry["check"], entry["resource"], container)
            assert key not in allowed, f"listed twice: {key}"
            allowed[key] = entry["reason"]
    return allowed


@pytest.fixture(scope="module")
def checkov_report(checkov: Path, helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Obj:
    """Both value sets and the canary in one directory, scanned by one checkov run (it takes
    seconds to start)."""
    directory = tmp_path_factory.mktemp("checkov")
    count = sum(render_variant(helm, variant, directory) for variant in VARIANTS)
    (directory / "canary.yaml").write_text(yaml.safe_dump(CANARY))
    report = run_checkov(checkov, directory)
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    assert report["summary"]["resource_count"] >= count, report["summary"]
    return report


@pytest.fixture(scope="module")
def checkov_findings(checkov_report: Obj) -> dict[str, set[Finding]]:
    """Variant ("default", "full", "canary") -> its failed checks."""
    found: dict[str, set[Finding]] = {variant: set() for variant in [*VARIANTS, "canary"]}
    for result in checkov_report["results"]["failed_checks"]:
        variant, one = finding(result)
        found[variant].add(one)
    return found


def test_checkov_really_scans(checkov_findings: dict[str, set[Finding]]) -> None:
    assert (CANARY_CHECK, "Pod/canary", "") in checkov_findings["canary"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_checkov_finds_nothing_beyond_the_allowlist(
    checkov_findings: dict[str, set[Finding]], variant: str
) -> None:
    allowed = load_allowlist()
    new = sorted(f for f in checkov_findings[variant] if f not in allowed)
    assert not new, (
        f"checkov findings in the {variant} render that are neither fixed nor listed with a "
        f"reason in {ALLOWLIST.relative_to(REPO)}: {new}"
    )


def test_checkov_allowlist_has_no_stale_entry(
    checkov_report: Obj, checkov_findings: dict[str, set[Finding]]
) -> None:
    seen = set().union(*(checkov_findings[v] for v in VARIANTS))
    stale = sorted(key for key in load_allowlist() if key not in seen)
    assert not stale, f"fixed, so remove from {ALLOWLIST.relative_to(REPO)}: {stale}"
    names = {r["check_id"]: r["check_name"] for r in checkov_report["results"]["failed_checks"]}
    for entry in allowlist_entries():  # the names tell a reader what each id is about
        assert entry["name"] == names[entry["check"]], entry["check"]


def test_checkov_allowlist_gives_hostpid_to_the_node_pod_alone() -> None:
    """hostPID (CKV_K8S_17) is a pod setting: allowed for the node DaemonSet, whose driver
    needs it (fscrypt volumes in use in any mount namespace), never for the controller."""
    resources = {resource for check, resource, _ in load_allowlist() if check == "CKV_K8S_17"}
    assert resources == {"DaemonSet/node"}


def test_checkov_allowlist_keeps_the_sidecars_unprivileged() -> None:
    """Privilege, escalation and capabilities may be allowed for the driver alone."""
    for check, resource, container in load_allowlist():
        if check in ("CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_28", "CKV_K8S_37", "CKV_K8S_38"):
            assert (resource, container) == ("DaemonSet/node", "driver"), (check, container)
