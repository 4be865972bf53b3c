"""The pytest hooks of the server and fault suites, in one place: each suite's
conftest.py imports them by name (pytest takes a conftest's hooks from its
namespace), and adds what is its own (the fault suite's marker, the fixtures).

When both directories run in one session, both conftests register these hooks;
each is harmless twice (the second close finds no fork server, and the header
says it once).
"""

from __future__ import annotations

from typing import List

import pytest
from kernel_expectations import mark_expected_failures
from serverproc import (
    close_fork_server,
    pump_gap_summary,
    server_start_header,
    server_start_mode,
    unwind_on_termination,
)


def pytest_configure(config: pytest.Config) -> None:
    """A run ended by SIGTERM or SIGHUP still stops its servers; a bad
    IOMUX_SERVER_START is one line, not a traceback."""
    unwind_on_termination()
    try:
        server_start_mode()
    except ValueError as exc:  # a user's setting
        raise pytest.UsageError(str(exc)) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    """The fork server ends with the session, so that its servers' CPU time is the run's."""
    close_fork_server()


def pytest_report_header(config: pytest.Config) -> List[str]:
    """How this run starts its servers (serverproc.server_start_mode), once a session."""
    if getattr(config, "_iomux_start_header_shown", False):
        return []
    setattr(config, "_iomux_start_header_shown", True)  # noqa: B010  (pytest.Config has no such slot)
    return [server_start_header()]


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Mark the tests this kernel is expected to fail (kernel_expectations.py)."""
    mark_expected_failures(items)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The longest healthy gap in a transfer on this kernel, beside pump's stall
    window (serverproc.pump): the figure that sizes the window. Once a session."""
    config = terminalreporter.config
    if getattr(config, "_iomux_gap_shown", False):
        return
    setattr(config, "_iomux_gap_shown", True)  # noqa: B010  (pytest.Config has no such slot)
    line = pump_gap_summary()
    if line is not None:
        terminalreporter.write_line(line)
