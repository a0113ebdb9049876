"""csi.host.runner.run with real processes: output, typed errors, timeout, stdin, environment."""

from __future__ import annotations

import os
import sys
import time

import pytest

from csi.errors import Internal
from csi.host.runner import CommandFailed, CommandTimeout, ToolMissing, run
from csi.keys import VolumeKey

ALLOWED_ENV = {"PATH", "LC_ALL", "DM_DISABLE_UDEV"}


def test_stdout_is_returned() -> None:
    assert run(["echo", "hello", "world"]) == "hello world\n"


def test_arguments_are_not_interpreted_by_a_shell() -> None:
    assert run(["echo", "$HOME;", "`id`", "a b"]) == "$HOME; `id` a b\n"


def test_nonzero_exit_raises_command_failed_with_code_and_stderr() -> None:
    code = "import sys; print('to stdout'); sys.stderr.write('it broke\\n'); sys.exit(3)"
    with pytest.raises(CommandFailed) as err:
        run([sys.executable, "-c", code])
    failure = err.value
    assert isinstance(failure, Internal)
    assert failure.returncode == 3
    assert failure.stderr == "it broke"
    assert failure.argv == [sys.executable, "-c", code]
    assert "exit 3" in str(failure)
    assert "it broke" in str(failure)


def test_command_failed_from_a_real_tool() -> None:
    with pytest.raises(CommandFailed) as err:
        run(["ls", "/definitely/not/here"])
    assert err.value.returncode != 0
    assert "/definitely/not/here" in err.value.stderr


def test_missing_binary_is_tool_missing() -> None:
    with pytest.raises(ToolMissing) as err:
        run(["no-such-tool-luks-ephemeral", "--version"])
    assert err.value.tool == "no-such-tool-luks-ephemeral"
    assert "not installed" in str(err.value)
    assert isinstance(err.value, Internal)


def test_timeout_raises_command_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as err:
        run(["sleep", "5"], timeout=0.2)
    assert time.monotonic() - start < 3
    assert err.value.argv == ["sleep", "5"]
    assert "sleep" in str(err.value)


def test_stdin_is_delivered_from_a_memoryview() -> None:
    data = bytes(range(256)) * 4
    assert run(["wc", "-c"], stdin=memoryview(data)).strip() == "1024"
    assert run(["cat"], stdin=memoryview(b"line one\nline two\n")) == "line one\nline two\n"


def test_stdin_from_a_volume_key_view() -> None:
    key = VolumeKey(bytearray(b"0123456789abcdef" * 4))
    assert run(["cat"], stdin=key.view) == "0123456789abcdef" * 4
    assert run(["wc", "-c"], stdin=key.view).strip() == "64"


def test_no_stdin_means_an_empty_one() -> None:
    assert run(["wc", "-c"], timeout=5).strip() == "0"  # /dev/null, not the test's terminal


def test_environment_is_minimal_and_holds_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAKY_TOKEN", "inherited-value")
    secret = b"s3cr3t-passphrase-bytes-0123456789"
    out = run(["env"], stdin=memoryview(secret))
    env = dict(line.split("=", 1) for line in out.splitlines() if line)
    assert {"PATH", "LC_ALL"} <= set(env)
    assert set(env) <= ALLOWED_ENV, sorted(set(env) - ALLOWED_ENV)
    assert env["LC_ALL"] == "C"
    assert "LEAKY_TOKEN" not in env
    assert "inherited-value" not in out
    assert secret.decode() not in out
    for directory in env["PATH"].split(":"):
        assert os.path.isabs(directory), directory
    if "DM_DISABLE_UDEV" in env:
        assert env["DM_DISABLE_UDEV"] == "1"


def test_secret_on_stdin_is_not_in_the_child_argv() -> None:
    secret = b"another-secret-never-in-argv"
    out = run([sys.executable, "-c", "import sys; print(sys.argv); sys.stdin.read()"],
              stdin=memoryview(secret))  # fmt: skip
    assert secret.decode() not in out
