"""Fixtures of the black-box server suite: start iomux servers, always reap them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

# The helper module sits beside this file. pytest's default import mode puts
# this directory on sys.path; --import-mode=importlib does not, so do it here
# (this directory is copied alone into every target).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_expectations import mark_expected_failures
from serverproc import (
    ServerFactory,
    close_fork_server,
    server_factory,
    server_start_header,
    server_start_mode,
    unwind_on_termination,
)


def pytest_configure(config: pytest.Config) -> None:
    """A run ended by SIGTERM or SIGHUP still stops its servers."""
    unwind_on_termination()
    try:
        server_start_mode()
    except ValueError as exc:  # a user's setting: one line, not a traceback
        raise pytest.UsageError(str(exc)) from None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests this kernel is expected to fail (kernel_expectations.py)."""
    mark_expected_failures(items)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory of servers; teardown kills what is left and rejects any traceback."""
    yield from server_factory(tmp_path)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The fork server ends with the session, so that its servers' CPU time is the run's."""
    close_fork_server()


def pytest_report_header(config: pytest.Config) -> str:
    """How this run starts its servers (serverproc.server_start_mode)."""
    return server_start_header()
