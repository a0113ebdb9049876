#!/usr/bin/env python3
"""Regenerate the Python gRPC stubs for ``csi/proto/csi.proto``.

Usage::

    python tools/gen_proto.py              # rewrite the committed stubs in place
    python tools/gen_proto.py --out DIR    # write them under DIR/csi/proto/ instead
    python tools/gen_proto.py --check      # exit 1 if the committed stubs are stale

protoc is run in-process through ``grpc_tools`` (the version pinned in the
``dev`` extra), so the output only depends on that pin. The proto is always
handed to protoc by its path relative to the repository root, which is what
ends up in the generated code (module imports, descriptor file name); that
keeps a regeneration into a scratch directory byte-identical to the
committed files.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = "csi/proto/csi.proto"
STUB_DIR = "csi/proto"
STUBS = ("csi_pb2.py", "csi_pb2_grpc.py", "csi_pb2.pyi")


class ProtocError(RuntimeError):
    """protoc reported a failure (its diagnostics went to stderr)."""


def generate(out_dir: Path, repo_root: Path = REPO_ROOT) -> None:
    """Compile the CSI proto, writing the stubs under ``out_dir/csi/proto/``."""
    out = str(out_dir)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    with importlib.resources.as_file(well_known) as well_known_dir:
        argv = [
            "grpc_tools.protoc",
            f"--proto_path={repo_root}",
            f"--proto_path={well_known_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            PROTO,
        ]
        status = int(protoc.main(argv))
    if status != 0:
        raise ProtocError(f"protoc failed with status {status} on {PROTO}")


def stale_stubs(repo_root: Path = REPO_ROOT) -> list[str]:
    """Return the committed stubs (repo-relative) that differ from a fresh build.

    A missing stub counts as stale. An empty list means everything is current.
    """
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gen_proto-") as tmp:
        generate(Path(tmp), repo_root)
        for name in STUBS:
            fresh = Path(tmp) / STUB_DIR / name
            committed = repo_root / STUB_DIR / name
            if not committed.is_file() or committed.read_bytes() != fresh.read_bytes():
                stale.append(f"{STUB_DIR}/{name}")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="output root; stubs go to OUT/csi/proto/ (default: the repository)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and fail if the committed stubs differ",
    )
    args = parser.parse_args(argv)

    try:
        if args.check:
            stale = stale_stubs()
            if stale:
                print("stale generated files (run tools/gen_proto.py):", file=sys.stderr)
                for path in stale:
                    print(f"  {path}", file=sys.stderr)
                return 1
            print("generated stubs are up to date")
            return 0

        out_dir: Path = args.out
        out_dir.mkdir(parents=True, exist_ok=True)
        generate(out_dir)
    except ProtocError as exc:
        print(exc, file=sys.stderr)
        return 2
    for name in STUBS:
        print(out_dir / STUB_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
