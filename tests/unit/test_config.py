"""Pure tests of csi/config.py: flag > env > default, validation, derived properties."""

from __future__ import annotations

import argparse
import dataclasses
import socket

import pytest

from csi.config import Config, add_flags, endpoint_path, from_args
from csi.errors import InvalidArgument

MiB = 1024**2


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(list(argv))


def test_defaults_without_flags_or_env() -> None:
    config = from_args("node", parse(), environ={})
    assert config == Config(mode="node", node_id=socket.gethostname())
    assert config.driver_name == "luks-ephemeral.csi.io"
    assert config.capacity == 0
    assert config.min_size == 32 * MiB
    assert config.max_size == 1024**4
    assert config.max_volumes == 128
    assert config.socket_path == "/run/luks-ephemeral-csi/csi.sock"


def test_env_overrides_default() -> None:
    env = {
        "CSI_ENDPOINT": "unix:///tmp/x/csi.sock",
        "NODE_ID": "worker-7",
        "DRIVER_NAME": "scratch.example.com",
        "CAPACITY": "20Gi",
        "MAX_VOLUMES": "9",
        "LOG_FORMAT": "text",
        "LOG_LEVEL": "debug",
    }
    config = from_args("node", parse(), environ=env)
    assert config.endpoint == "unix:///tmp/x/csi.sock"
    assert config.socket_path == "/tmp/x/csi.sock"
    assert config.node_id == "worker-7"
    assert config.driver_name == "scratch.example.com"
    assert config.capacity == 20 * 1024**3
    assert config.max_volumes == 9
    assert config.log_format == "text"
    assert config.log_level == "DEBUG"


def test_flag_overrides_env() -> None:
    env = {"NODE_ID": "from-env", "CAPACITY": "20Gi", "MAX_VOLUMES": "9", "MIN_SIZE": "1Mi"}
    args = parse("--node-id", "from-flag", "--capacity", "5Gi", "--max-volumes", "3",
                 "--min-size", "64Mi")  # fmt: skip
    config = from_args("all", args, environ=env)
    assert config.node_id == "from-flag"
    assert config.capacity == 5 * 1024**3
    assert config.max_volumes == 3
    assert config.min_size == 64 * MiB
    assert config.mode == "all"


def test_empty_env_value_falls_back_to_default() -> None:
    config = from_args("node", parse(), environ={"DRIVER_NAME": "", "MAX_VOLUMES": ""})
    assert config.driver_name == "luks-ephemeral.csi.io"
    assert config.max_volumes == 128


def test_directories_are_made_absolute() -> None:
    args = parse("--state-dir", "state", "--data-dir", "/var/lib/x/../data", "--kubelet-root",
                 "/var/lib/kubelet/")  # fmt: skip
    config = from_args("node", args, environ={})
    assert config.state_dir.startswith("/") and config.state_dir.endswith("/state")
    assert config.data_dir == "/var/lib/data"
    assert config.kubelet_root == "/var/lib/kubelet"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (("--capacity", "lots"), "--capacity"),
        (("--min-size", "-1"), "--min-size"),
        (("--max-size", "10XB"), "--max-size"),
        (("--max-volumes", "many"), "--max-volumes"),
        (("--log-format", "xml"), "--log-format"),
        (("--min-size", "2Gi", "--max-size", "1Gi"), "--min-size"),
    ],
)
def test_bad_flag_values_name_the_flag(argv: tuple[str, ...], flag: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        from_args("node", parse(*argv), environ={})
    assert flag in str(err.value)


def test_bad_env_value_names_the_flag() -> None:
    with pytest.raises(InvalidArgument, match="--capacity"):
        from_args("node", parse(), environ={"CAPACITY": "1.5.5"})


def test_bad_log_level_names_the_flag() -> None:
    with pytest.raises(InvalidArgument, match="--log-level"):
        from_args("node", parse("--log-level", "verbose"), environ={})


def test_negative_max_volumes_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="--max-volumes"):
        from_args("node", parse("--max-volumes", "-1"), environ={})


def test_bad_mode_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="mode must be one of node, controller, all"):
        from_args("sidecar", parse(), environ={})


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:10000", "unix://relative/csi.sock", "/run/csi.sock", "unix:/run/csi.sock"],
)
def test_endpoint_must_be_absolute_unix(endpoint: str) -> None:
    with pytest.raises(InvalidArgument, match="must be unix:///absolute/path"):
        from_args("node", parse("--endpoint", endpoint), environ={})
    with pytest.raises(InvalidArgument):
        endpoint_path(endpoint)


def test_endpoint_path() -> None:
    assert endpoint_path("unix:///csi/csi.sock") == "/csi/csi.sock"


@pytest.mark.parametrize(
    ("mode", "node", "controller"),
    [("node", True, False), ("controller", False, True), ("all", True, True)],
)
def test_mode_decides_services(mode: str, node: bool, controller: bool) -> None:
    config = from_args(mode, parse(), environ={})
    assert (config.serves_node, config.serves_controller) == (node, controller)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "all"  # type: ignore[misc]


def test_state_lock_wait_default_env_and_flag() -> None:
    assert from_args("node", parse(), environ={}).state_lock_wait == 30
    env = {"STATE_LOCK_WAIT": "1m"}
    assert from_args("node", parse(), environ=env).state_lock_wait == 60
    assert from_args("node", parse("--state-lock-wait", "0"), environ=env).state_lock_wait == 0
    assert from_args("all", parse("--state-lock-wait", "2.5s"), environ={}).state_lock_wait == 2.5


@pytest.mark.parametrize(("raw", "message"), [
    ("-1", "--state-lock-wait must be at least 0 seconds"),
    ("soon", "--state-lock-wait 'soon' must be a number of seconds"),
])  # fmt: skip
def test_state_lock_wait_rejects_bad_values(raw: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        from_args("node", parse("--state-lock-wait", raw), environ={})
