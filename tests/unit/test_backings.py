"""The backing registry is the one place that knows the backings: everything derived from it
agrees, nothing outside the backing modules switches on a backing's name, and each backing's
arithmetic is consistent."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from csi import backings, ids, metrics, params
from csi.backings import REGISTRY, Backing
from csi.params import MiB, VolumeSpec
from csi.volumes import PublishRequest
from tests.unit.harness import Harness

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "charts" / "luks-ephemeral-csi" / "values.schema.json"

def test_parameter_values_metric_labels_and_chart_enum_all_come_from_the_registry() -> None:
    names = tuple(REGISTRY)
    assert names == ("loop", "qcow2", "fscrypt")
    assert params.CHOICES["backing"] == names
    assert params.DEFAULTS["backing"] == backings.DEFAULT == VolumeSpec(size=MiB).backing
    assert metrics.BACKINGS == names
    schema = json.loads(SCHEMA.read_text())
    enum = schema["properties"]["storageClass"]["properties"]["parameters"]["properties"][
        "backing"]["enum"]  # fmt: skip
    assert tuple(enum) == names, "the chart's StorageClass schema must offer exactly the registry"

def test_growth_classes_in_volume_ids_come_from_the_backings() -> None:
    words = set().union(*(cls.FIXED_REASONS for cls in REGISTRY.values()))
    assert set(ids.FIXED_REASONS) == words == {"qcow2", "integrity", "kata"}
    for word in words:
        assert ids.node_of(f"node-a/{'0' * 32}.{word}") == "node-a"
    assert ids.node_of(f"node-a/{'0' * 32}.sparse") is None
    spec = VolumeSpec(size=64 * MiB, backing="qcow2", integrity="hmac-sha256")
    assert ids.provisioned_id("node-a", "pvc-1", spec).endswith(".qcow2")

@pytest.mark.parametrize("name", list(REGISTRY))
@pytest.mark.parametrize("header", ["detached", "attached"])
def test_largest_fitting_is_the_inverse_of_disk_bytes(name: str, header: str) -> None:
    cls = REGISTRY[name]
    for size in (64 * MiB, 1000 * MiB, 10 * 1024 * MiB, 123 * 1024 * MiB):
        spec = VolumeSpec(size=size, backing=name, header=header)
        need = cls.disk_bytes(spec)
        assert need >= size
        fits = cls.largest_fitting(need, spec)
        assert size - MiB < fits <= need  # within rounding of the size that needed it
        biggest = VolumeSpec(size=fits // MiB * MiB, backing=name, header=header)
        assert cls.disk_bytes(biggest) <= need

def test_every_backing_implements_the_whole_contract() -> None:
    for cls in REGISTRY.values():
        assert issubclass(cls, Backing)
        assert not getattr(cls, "__abstractmethods__", None), f"{cls.name} leaves methods abstract"
        assert cls.name in REGISTRY and REGISTRY[cls.name] is cls

def _switches_on_a_backing_name(path: Path) -> list[str]:
    """Comparisons with a registry name (``x == "qcow2"``, ``x in ("loop", ...)``)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            literals = [side] if isinstance(side, ast.Constant) else (
                list(side.elts) if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [])
            if any(isinstance(c, ast.Constant) and c.value in REGISTRY for c in literals):
                found.append(f"{path.name}:{node.lineno}")
    return found

def test_no_module_outside_the_backings_switches_on_a_backing_name() -> None:
    offenders = []
    for path in sorted((REPO / "csi").rglob("*.py")):
        if "backings" in path.parts or "proto" in path.parts:
            continue
        offenders += _switches_on_a_backing_name(path)
    assert offenders == []

def test_the_switch_finder_finds_a_switch(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('def f(b: str) -> bool:\n    return b == "qcow2" or b in ("loop",)\n')
    assert _switches_on_a_backing_name(sample) == ["sample.py:2", "sample.py:2"]

@pytest.mark.parametrize("name", ["loop", "qcow2"])  # fscrypt's: tests/unit/test_fscrypt.py
def test_wipe_key_takes_the_key_from_a_volume_in_use_and_release_still_shreds(name: str) -> None:

    h = Harness()
    if name == "qcow2":
        h.host.qsd_running = True
    request = PublishRequest(h.volume_id("pod-a"), h.target("pod-a"),
                             VolumeSpec(size=64 * MiB, backing=name))  # fmt: skip
    if h.volumes.backing_of(request.spec).unavailable():
        pytest.skip(f"the harness offers no {name} backing")
    h.volumes.publish(request)
    names = h.volumes.names(request.volume_id)
    backing = h.volumes.backings[name]
    backing.wipe_key(names, request.spec)  # the volume is mounted: a polite release would refuse
    assert names.mapping in h.host.wiped and names.mapping not in h.host.keyring
    backing.wipe_key(names, request.spec)  # again: nothing more to do
    h.volumes.unpublish(request.volume_id, request.target_path)
    assert not h.host.crypt_exists(names.mapping) and not h.host.exists(names.backing)
    assert names.mapping not in h.host.wiped
