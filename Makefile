# The two commands (see README): `make run` runs the main job, `make test` runs the tests.
# Both create the virtual environment first when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install system-deps run test lint mlflow-ui

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

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
