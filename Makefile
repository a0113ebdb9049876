# luks-ephemeral-csi: the two commands a newcomer runs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv lint test test-unit test-host test-node demo proto manifests e2e-kind bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test-unit: venv
	$(PY) -m pytest -q tests/unit

# The host tier: the fscrypt host layer on a real ext4 image, natively (no VM): wherever ext4
# has encryption; what needs quotas skips, saying so, on kernels without them.
test-host: venv
	$(PY) -m pytest -q -p no:cacheprovider -rs tests/host

# The real-kernel tier (and the host tier again, with quotas): directly where this kernel has device-mapper, else inside a VM.
test-node: venv
	-$(PY) tools/csi_sanity.py
	$(PY) tools/vmrun.py --timeout 7200 -- $(PY) -m pytest -q -p no:cacheprovider --timeout 1200 -rs tests/node tests/host

test: lint test-unit test-host test-node

demo: venv
	$(PY) tools/vmrun.py -- $(PY) tools/demo.py

# Benchmarks are not tests: ratios against baselines measured in the same (VM) run.
# Quick look: make bench BENCH_ARGS="--cycles 2 --concurrency 4 --volumes 4"
bench: venv
	$(PY) tools/vmrun.py --scratch 16G --timeout 10800 -- $(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/report.py

proto: venv
	$(PY) tools/gen_proto.py

manifests: venv
	$(PY) tools/render_manifests.py

# needs docker + kind; E2E_REQUIRED=1 turns "skip" into "fail"
e2e-kind: venv
	E2E_REQUIRED=1 $(PY) -m pytest -q -p no:cacheprovider -rs tests/e2e

clean:
	rm -rf $(VENV) .vmrun .mypy_cache .ruff_cache .pytest_cache
