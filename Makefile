# Quick start: `make demo` runs the default sweep, `make test` runs the test suite. Both create
# .venv and install the project first if needed (torch and torchvision come from this machine's
# local wheel store through pip; do not use uv or poetry, which download several GB).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
# Keep large activations mapped between operations (REFERENCE.md: ~2x faster on this CPU).
export GLIBC_TUNABLES ?= glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=4294967295

.PHONY: demo test test-fast install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/probesweep run

# two workers (pytest-xdist), each module in one: a Ray test keeps the two cores 65-80% busy, and
# the other worker's tests take the rest (tests/conftest.py orders the modules, longest first)
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: install-test
	$(PYTEST)

# the development loop: no Ray, no servers, no browser, no full-size network (tests marked slow or
# full_size are left out; make test runs them)
test-fast: install-test
	$(PYTEST) -m "not slow and not full_size"

clean:
	rm -rf $(VENV) mlflow.db mlartifacts ray_results
