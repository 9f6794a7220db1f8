# The two commands (see README): `make run` runs the main job, `make test` runs the tests.
# Both create the virtual environment first when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# The torch build, remembered in the venv once chosen: `default` is PyPI's (CUDA 13: GPUs
# sm_75 and newer, and the CPU); `cu126` is PyTorch's CUDA 12.6 build (sm_50 to sm_90: a V100).
TORCH ?= $(shell cat $(VENV)/torch-build 2>/dev/null || echo default)

.PHONY: install system-deps run test lint mlflow-ui

$(VENV)/.installed-$(TORCH): pyproject.toml
	@# pip keeps 2.14.1+cu126 as satisfying torch==2.14.1, so another build needs a new venv.
	if [ -f $(VENV)/torch-build ] && [ "$$(cat $(VENV)/torch-build)" != "$(TORCH)" ]; then rm -rf $(VENV); fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) scripts/install_torch.py $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed*
	echo $(TORCH) >$(VENV)/torch-build
	touch $@

install: $(VENV)/.installed-$(TORCH)

run: install
	$(PY) sweeps/encoder_bench.py $(ARGS)

# Debian's Chromium, SLURM, munge and shellcheck, which some tests drive for real; installed
# with apt (through sudo unless root) only when asked. Without them, `make test` skips those
# tests and says so.
system-deps:
	tests/system_deps.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

mlflow-ui: install
	$(PY) -m artefact ui
