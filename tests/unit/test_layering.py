"""The package's layering, read from the source with ``ast``: wire types stay at the edge.

The servicers (and the server, the RPC glue and the protobuf conversion next to them) speak
gRPC and protobuf; the lifecycle, capacity and cluster modules work on plain values and never
import the wire, not even through another module. Only the host and the tools run processes.
Every module under ``csi/`` is checked, so a new module is covered without touching this file;
the allow-lists below are the whole exception list, and every entry must name a real module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import csi

PACKAGE = Path(csi.__file__).parent

# Modules that may import grpc or protobuf: they translate between the wire and the core.
WIRE_SIDE = frozenset(
    {
        "csi.__main__",  # builds the gRPC server and registers the servicers
        "csi.server",  # the gRPC server and its logging interceptor
        "csi.rpc",  # DriverError -> gRPC status
        "csi.wire",  # protobuf messages -> plain values (capabilities)
        "csi.node",
        "csi.controller",
        "csi.identity",
        "csi.logs",  # sanitises request messages (csi_secret fields) for the RPC log
    }
)
# The generated stubs, and the tools: clients that call the driver's socket from outside.
WIRE_PACKAGES = ("csi.proto", "csi.tools")
WIRE_IMPORTS = ("grpc", "google.protobuf", "csi.proto")

# Packages whose modules may run processes.
PROCESS_PACKAGES = ("csi.host", "csi.tools")
PROCESS_IMPORTS = ("subprocess",)
PROCESS_CALLS = ("system", "popen", "fork", "exec", "spawn", "posix_spawn")  # os.<prefix>...

SERVICERS = ("csi.node", "csi.controller", "csi.identity")
SERVICER_WIRING = frozenset({"csi.__main__"})  # the one place the servicers are put together


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    """Every module under csi/, by dotted name."""
    return {
        module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts
    }


MODULES = all_modules()


def within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every name ``module`` imports, anywhere in it (functions and TYPE_CHECKING blocks
    included): ``import a.b`` gives ``a.b``, ``from a import b`` gives ``a`` and ``a.b`` (``b``
    may be a submodule), relative imports are resolved, and ``importlib.import_module`` /
    ``__import__`` with a literal name count too."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args:
            func, first = node.func, node.args[0]
            dynamic = (isinstance(func, ast.Name) and func.id == "__import__") or (
                isinstance(func, ast.Attribute) and func.attr == "import_module"
            )
            if dynamic and isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
    return names


def direct_imports(module: str) -> set[str]:
    path = MODULES[module]
    return imports_of(path.read_text(), module, is_package=path.name == "__init__.py")


def is_wire_import(name: str) -> bool:
    last = name.rpartition(".")[2]
    return within(name, WIRE_IMPORTS) or last.endswith(("_pb2", "_pb2_grpc"))


def is_wire_module(module: str) -> bool:
    return module in WIRE_SIDE or within(module, WIRE_PACKAGES)


def csi_modules_imported(module: str) -> set[str]:
    """The csi modules that importing ``module`` runs directly, its packages' ``__init__``
    included."""
    found: set[str] = set()
    for name in direct_imports(module):
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in MODULES:
                found.add(candidate)
    found.discard(module)
    return found


def reachable(module: str) -> dict[str, list[str]]:
    """Every csi module importing ``module`` ends up running, with one import chain to it."""
    chains: dict[str, list[str]] = {module: [module]}
    todo = [module]
    while todo:
        current = todo.pop()
        for imported in sorted(csi_modules_imported(current)):
            if imported not in chains:
                chains[imported] = [*chains[current], imported]
                todo.append(imported)
    del chains[module]
    return chains


def listing(problem: str, offenders: list[str]) -> str:
    return "\n  ".join([problem + ":", *offenders])


def core_modules() -> list[str]:
    return [m for m in MODULES if not is_wire_module(m)]


def test_the_walk_sees_the_package_and_every_allow_listed_module_exists() -> None:
    assert {"csi", "csi.volumes", "csi.kube", "csi.host.linux", "csi.proto.csi_pb2"} <= set(
        MODULES
    )
    named = WIRE_SIDE | set(WIRE_PACKAGES) | set(PROCESS_PACKAGES) | set(SERVICERS)
    named |= SERVICER_WIRING
    gone = sorted(named - set(MODULES))
    assert not gone, f"an allow-list names modules that do not exist: {gone}"


def test_the_import_finder_sees_every_form() -> None:
    source = (
        "import grpc.aio\n"
        "from . import node\n"
        "from ..proto import csi_pb2\n"
        "from csi.pods import PodRef\n"
        "import importlib\n"
        "def later() -> None:\n"
        "    import subprocess\n"
        "    importlib.import_module('csi.controller')\n"
    )
    names = imports_of(source, "csi.host.linux")
    assert {"grpc.aio", "csi.host.node", "csi.proto.csi_pb2", "csi.pods.PodRef",
            "subprocess", "csi.controller"} <= names  # fmt: skip
    assert "csi.node" in imports_of("from . import node\n", "csi.kube")
    assert "csi.host.runner" in imports_of("from . import runner\n", "csi.host", is_package=True)
    assert is_wire_import("csi.proto.csi_pb2") and is_wire_import("grpc.aio")
    assert is_wire_import("other_pb2") and not is_wire_import("csi.params")


def test_only_the_wire_side_imports_grpc_or_protobuf() -> None:
    offenders = sorted(
        f"{module} imports {name}"
        for module in core_modules()
        for name in direct_imports(module)
        if is_wire_import(name)
    )
    assert not offenders, listing("core modules must take plain values, not messages", offenders)


def test_no_core_module_reaches_the_wire_side_through_another_module() -> None:
    offenders = sorted(
        " -> ".join(chain)
        for module in core_modules()
        for target, chain in reachable(module).items()
        if is_wire_module(target)
    )
    assert not offenders, listing("importing a core module loads grpc or protobuf", offenders)


def test_only_the_host_and_the_tools_run_processes() -> None:
    offenders = sorted(
        f"{module} imports {name}"
        for module in MODULES
        if not within(module, PROCESS_PACKAGES)
        for name in direct_imports(module)
        if within(name, PROCESS_IMPORTS)
    )
    for module in MODULES:
        if within(module, PROCESS_PACKAGES):
            continue
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and node.attr.startswith(PROCESS_CALLS)
            ):
                offenders.append(f"{module} calls os.{node.attr}")
    assert not offenders, listing("run commands through csi.host, not from here", offenders)


def test_servicers_are_imported_only_where_they_are_wired() -> None:
    offenders = sorted(
        f"{module} imports {servicer}"
        for module in MODULES
        if module not in SERVICER_WIRING
        for servicer in csi_modules_imported(module)
        if servicer in SERVICERS
    )
    assert not offenders, listing("a servicer is an edge: share via a neutral module", offenders)


def test_kube_imports_no_servicer() -> None:
    chains = reachable("csi.kube")
    offenders = [" -> ".join(chains[s]) for s in SERVICERS if s in chains]
    assert not offenders, listing("the cluster client must not load a servicer", offenders)
