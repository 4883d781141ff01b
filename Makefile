# Two entry points: `make demo` trains with the learned optimizer, `make test` runs the suite.
# Both build .venv on first use; torch 2.13.0 goes in first so that no CUDA build is pulled in,
# and the fused CPU kernel is compiled then, not in the first training step (a failure is not fatal).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	-$(VENV)/bin/lightning-lopt-build-kernel
	touch $@

# The suite also needs Triton (the [gpu] extra, the version torch 2.13.0's CUDA build pins): it runs
# the GPU kernels in Triton's interpreter on the CPU (tests/test_triton.py). The demo does not.
$(VENV)/.test-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet triton==3.7.1
	touch $@

.PHONY: install install-test demo test bench-speed
install: $(VENV)/.installed
install-test: $(VENV)/.test-installed

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-lopt fit -c configs/mnist1d_hrnn.yaml

test: $(VENV)/.test-installed
	$(PY) -m pytest -q -n 2 tests

bench-speed: $(VENV)/.installed
	$(PY) -m lightning_lopt.bench.speed
