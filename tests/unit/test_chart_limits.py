"""The chart's per-namespace limits (node.namespaceLimits): the defaults reach the driver, the
overrides reach it as JSON its own parser accepts, and the schema refuses what it would not."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from csi.config import Config, add_flags, from_args
from csi.limits import Limit
from tests.unit.test_chart import (  # noqa: F401  (helm is a fixture)
    CHART,
    NAMESPACE,
    RELEASE,
    Obj,
    containers,
    helm,
    run_helm,
)
from tests.unit.test_chart import render_args as render

GiB = 1024**3
TiB = 1024**4
LIMIT_ENV = ("NAMESPACE_MAX_BYTES", "NAMESPACE_MAX_VOLUMES", "NAMESPACE_LIMITS")


def driver_env(objects: list[Obj]) -> dict[str, str]:
    env = containers(objects)["driver"]["env"]
    return {e["name"]: e["value"] for e in env if e["name"] in LIMIT_ENV}


def driver_config(objects: list[Obj]) -> Config:
    """What the driver makes of the container's args and env, with its own parser."""
    args = containers(objects)["driver"]["args"]
    parser = argparse.ArgumentParser()
    add_flags(parser)
    environ = {"NODE_ID": "node-a", **driver_env(objects)}
    return from_args(args[0], parser.parse_args(args[1:]), environ=environ)


def test_defaults_give_every_namespace_a_share_of_the_node(helm: Path) -> None:  # noqa: F811
    objects = render(helm)
    assert driver_env(objects) == {"NAMESPACE_MAX_BYTES": "100Gi", "NAMESPACE_MAX_VOLUMES": "32",
                                   "NAMESPACE_LIMITS": "{}"}  # fmt: skip
    limits = driver_config(objects).namespace_limits
    assert limits.default == Limit(100 * GiB, 32)
    assert limits.overrides == ()
    # the share is less than the whole node the other defaults promise a single pod
    config = driver_config(objects)
    assert limits.default.max_bytes < config.max_size
    assert limits.default.max_volumes < config.max_volumes


def test_overrides_reach_the_driver_as_json_it_accepts(helm: Path) -> None:  # noqa: F811
    overrides = {"ml-training": {"bytes": "2Ti", "volumes": 8}, "ci": {"volumes": 64},
                 "batch": {"bytes": 0}, "raw": {"bytes": 3 * TiB}}  # fmt: skip
    objects = render(helm, "--set-json", f"node.namespaceLimits.overrides={json.dumps(overrides)}",
                     "--set", "controller.enabled=true")  # fmt: skip
    assert json.loads(driver_env(objects)["NAMESPACE_LIMITS"]) == overrides
    config = driver_config(objects)
    assert config.mode == "all"  # CreateVolume runs in this container: it sees the same limits
    limits = config.namespace_limits
    assert limits.of("ml-training") == Limit(2 * TiB, 8)
    assert limits.of("ci") == Limit(100 * GiB, 64)
    assert limits.of("batch") == Limit(0, 32)
    assert limits.of("raw") == Limit(3 * TiB, 32)  # a number of bytes, printed whole
    assert limits.of("someone-else") == Limit(100 * GiB, 32)


def test_zero_turns_the_default_share_off(helm: Path) -> None:  # noqa: F811
    objects = render(helm, "--set", "node.namespaceLimits.maxBytes=0",
                     "--set", "node.namespaceLimits.maxVolumes=0")  # fmt: skip
    assert not driver_config(objects).namespace_limits.enabled
    objects = render(helm, "--set", "node.namespaceLimits.maxBytes=53687091200")
    assert driver_env(objects)["NAMESPACE_MAX_BYTES"] == "53687091200"  # not 5.36870912e+10
    assert driver_config(objects).namespace_limits.default.max_bytes == 50 * GiB


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "node.namespaceLimits.maxBytes=lots"), "/node/namespaceLimits/maxBytes"),
        (("--set", "node.namespaceLimits.maxBytes=-1"), "/node/namespaceLimits/maxBytes"),
        (("--set", "node.namespaceLimits.maxVolumes=-1"), "/node/namespaceLimits/maxVolumes"),
        (("--set", "node.namespaceLimits.maxVolumes=few"), "/node/namespaceLimits/maxVolumes"),
        (("--set", "node.namespaceLimits.maxVolums=4"), "/node/namespaceLimits"),  # a typo
        (("--set", "node.namespaceLimits.overrides.Team-A.volumes=1"), "Team-A"),
        (("--set", "node.namespaceLimits.overrides.a_b.volumes=1"), "a_b"),
        (("--set", "node.namespaceLimits.overrides.team-a.volums=1"),
         "/node/namespaceLimits/overrides/team-a"),
        (("--set", "node.namespaceLimits.overrides.team-a.bytes=lots"),
         "/node/namespaceLimits/overrides/team-a/bytes"),
        (("--set", "node.namespaceLimits.overrides.team-a.volumes=-2"),
         "/node/namespaceLimits/overrides/team-a/volumes"),
        (("--set-json", 'node.namespaceLimits.overrides={"team-a": {}}'),
         "/node/namespaceLimits/overrides/team-a"),  # says nothing: a mistake
        (("--set-json", 'node.namespaceLimits.overrides={"team-a": 4}'),
         "/node/namespaceLimits/overrides/team-a"),
    ],
)
def test_values_schema_rejects_bad_limits(helm: Path, args: tuple[str, ...],  # noqa: F811
                                          message: str) -> None:  # fmt: skip
    done = run_helm(helm, "template", RELEASE, str(CHART), *args)
    assert done.returncode != 0, f"helm accepted {args}"
    assert "schema" in done.stderr and message in done.stderr, done.stderr


def test_values_explain_the_defaults() -> None:
    text = (CHART / "values.yaml").read_text()
    block = text[text.index("namespaceLimits:") - 1200 : text.index("overrides: {}")]
    for words in ("ResourceQuota", "whole node", "quarter of maxVolumes", "RESOURCE_EXHAUSTED",
                  "NamespaceLimitExceeded", "--extra-create-metadata"):  # fmt: skip
        assert words in block, words
