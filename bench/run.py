#!/usr/bin/env python3
"""`make bench`: measure the real driver on the real kernel, against baselines, in one run.

    python bench/run.py [--cycles 20] [--out bench/results.json] [--phases latency,...]

The entry point only: the bench is the ``bench`` package (``--help`` and bench/cli.py say
what it measures).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
