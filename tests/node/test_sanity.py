"""The official CSI conformance suite, csi-sanity (kubernetes-csi/csi-test v5.4.0), against the
real driver process in ``all`` mode on the real kernel: Identity, Controller and Node services,
every stage, publish, expand, unpublish and unstage through loop + dm-crypt + ext4.

The suite is built offline from the source tarball by tools/csi_sanity.py: on the host before
the VM boots (inside the VM, under emulation, the build would take well over half an hour, so
there a missing binary is a skip). Without the tarball this test skips; under CI=true both are
failures instead. Features the driver does not offer (snapshots, clones, ListVolumes,
ControllerPublishVolume, ModifyVolume, group snapshots) are the suite's own skips.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

from tests.node.conftest import REPO, Driver, crypt_mappings, loops_on, mountpoints

MiB = 1024**2
VOLUME_SIZE = 64 * MiB
EXPAND_SIZE = 128 * MiB
SUITE_TIMEOUT_MIN = 50  # ginkgo's own limit; the subprocess gets a few minutes more
SUMMARY = re.compile(
    r"Ran (?P<ran>\d+) of (?P<total>\d+) Specs in (?P<seconds>[\d.]+) seconds\s*\n"
    r"(?P<verdict>SUCCESS|FAIL)! -- (?P<passed>\d+) Passed \| (?P<failed>\d+) Failed \| "
    r"(?P<pending>\d+) Pending \| (?P<skipped>\d+) Skipped"
)
RESULTS = REPO / ".cache" / "csi-sanity"  # shared with the host: survives the throwaway VM
NOT_PASSED = ("failed", "panicked", "timedout", "interrupted", "aborted")


def _tool() -> ModuleType:
    """tools/csi_sanity.py, imported by path (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("csi_sanity", REPO / "tools" / "csi_sanity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI: {reason}")
    pytest.skip(reason=reason)


@dataclass(frozen=True)
class Outcome:
    ran: int
    total: int
    passed: int
    failed: int
    pending: int
    skipped: int
    seconds: float

    @property
    def line(self) -> str:
        return (f"csi-sanity v5.4.0: Ran {self.ran} of {self.total} Specs in "
                f"{self.seconds:.0f} s: {self.passed} Passed | {self.failed} Failed | "
                f"{self.pending} Pending | {self.skipped} Skipped")  # fmt: skip


class SummaryLine:
    """A pytest plugin registered at run time: prints the suite's counts in the terminal
    summary, where they show even under ``-q`` (stdout of a passing test does not)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def sanity_binary() -> Path:
    tool = _tool()
    tarball = tool.tarball_path()
    if not tarball.is_file():
        _unavailable(f"csi-sanity source {tarball} does not exist (csi-test v5.4.0 with its "
                     "vendored modules, as a tarball)")  # fmt: skip
    if os.environ.get("VMRUN_GUEST") == "1" and not tool.binary_path(tarball).is_file():
        _unavailable("csi-sanity is not built, and building it under the VM's emulation takes "
                     "well over half an hour: run `.venv/bin/python tools/csi_sanity.py` on the "
                     "host first")  # fmt: skip
    try:
        return Path(tool.ensure_built(tarball))
    except tool.BuildError as exc:
        _unavailable(f"csi-sanity could not be built: {exc}")


@pytest.fixture
def summary(request: pytest.FixtureRequest) -> SummaryLine:
    name = "csi-sanity-summary"
    plugin = request.config.pluginmanager.get_plugin(name)
    if plugin is None:
        plugin = SummaryLine()
        request.config.pluginmanager.register(plugin, name)
    assert isinstance(plugin, SummaryLine)
    return plugin


def not_passed(junit: Path) -> list[str]:
    """``name: message`` of every spec that did not pass, from ginkgo's JUnit report."""
    if not junit.exists():
        return []
    found = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.get("status") in NOT_PASSED:
            detail = case.find("failure")
            if detail is None:
                detail = case.find("error")
            message = (detail.get("message", "") if detail is not None else "").strip()
            found.append(f"{case.get('name')}: {message[:500]}")
    return found


def leftovers(d: Driver) -> list[str]:
    """What the suite's volumes could leave after it deleted them all."""
    found = [f"mapping {m}" for m in crypt_mappings()]
    found += [f"loop {line}" for line in loops_on(d.data_dir)]
    found += [f"mount {m}" for m in mountpoints() if m.startswith(str(d.kubelet_root) + "/")]
    records = d.state_dir / "volumes"
    found += [f"record {p}" for p in sorted(records.iterdir())] if records.is_dir() else []
    found += [f"file {p}" for p in sorted(d.data_dir.iterdir())
              if p.name != "lost+found"]  # fmt: skip
    return found


@pytest.mark.timeout(SUITE_TIMEOUT_MIN * 60 + 600)
def test_csi_sanity(
    sanity_binary: Path, d: Driver, summary: SummaryLine, record_property: Any
) -> None:
    before = leftovers(d)
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_path, junit = RESULTS / "last-run.log", RESULTS / "last-run.xml"
    junit.unlink(missing_ok=True)
    argv = [
        str(sanity_binary),
        f"--csi.endpoint={d.endpoint}",
        # csi-sanity creates (and removes) these for each spec; the driver refuses any target
        # outside its kubelet root
        f"--csi.mountdir={d.kubelet_root}/sanity-target",
        f"--csi.stagingdir={d.kubelet_root}/sanity-staging",
        f"--csi.testvolumesize={VOLUME_SIZE}",
        f"--csi.testvolumeexpandsize={EXPAND_SIZE}",
        f"--ginkgo.timeout={SUITE_TIMEOUT_MIN}m",
        f"--ginkgo.junit-report={junit}",
        "--ginkgo.no-color",
    ]
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                              timeout=SUITE_TIMEOUT_MIN * 60 + 300, check=False)  # fmt: skip
    elapsed = time.monotonic() - started
    output = log_path.read_text(errors="replace")
    match = SUMMARY.search(output)
    assert match is not None, (f"csi-sanity printed no summary (exit {proc.returncode}); "
                               f"its log is {log_path}:\n{output[-4000:]}")  # fmt: skip
    counts = {k: int(v) for k, v in match.groupdict().items() if k not in ("seconds", "verdict")}
    outcome = Outcome(**counts, seconds=elapsed)
    summary.lines.append(outcome.line)
    record_property("csi_sanity", outcome.line)
    print(outcome.line)
    failures = not_passed(junit)
    assert outcome.failed == 0 and proc.returncode == 0 and not failures, (
        f"{outcome.line} (exit {proc.returncode}); log {log_path}\n"
        + "\n".join(failures)
        + f"\n--- driver log (tail) ---\n{d.log()[-6000:]}"
    )
    assert outcome.passed > 0, outcome.line
    left = [item for item in leftovers(d) if item not in before]
    assert left == [], f"{outcome.line}; the suite's volumes left {left}"
