# iomux: every entry point a person or CI uses. Each target sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TARGETS ?=
PYTEST_ARGS ?=

.PHONY: help venv lint typecheck check unit test test-all-os bench compose-up compose-down clean

help:
	@echo "make test         lint, type check, unit + behaviour tests, then every target (make test-all-os)"
	@echo "make test-all-os  run the suites on every target of targets.toml (TARGETS=a,b for a subset)"
	@echo "make bench        benchmarks: JSON under bench/out/, a table on stdout"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check iomux harness tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck

# The host-only tests: the server on every backend this kernel has, the pieces, the harness.
unit: $(STAMP)
	$(PY) -m pytest -n 2 tests/unit tests/server tests/harness $(PYTEST_ARGS)

test: check unit test-all-os

test-all-os: $(STAMP)
	$(PY) -m pytest -p harness.plugin tests/cross_os $(if $(TARGETS),--targets $(TARGETS)) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) reports .mypy_cache .ruff_cache .pytest_cache
