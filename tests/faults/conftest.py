"""Fixtures of the fault suite: servers (reusing tests/server's helper), the suite marker.

The fault suite sits beside tests/server and imports its ``serverproc`` helper
(the black-box way of starting ``iomux serve``) and its ``kernel_expectations``
instead of copying them; in a
target, both directories are copied side by side (/opt/iomux/tests/server and
/opt/iomux/tests/faults), so the sibling path works there too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

_HERE = Path(__file__).resolve().parent
# pytest's default import mode puts this directory on sys.path; --import-mode=importlib
# does not, and the sibling helper is never on it: add both, helper last.
for _path in (_HERE, _HERE.parent / "server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from kernel_expectations import mark_expected_failures  # noqa: E402
from serverproc import (  # noqa: E402  (needs the sys.path lines above)
    ServerFactory,
    close_fork_server,
    server_factory,
    server_start_header,
    server_start_mode,
    unwind_on_termination,
)


def pytest_configure(config: pytest.Config) -> None:
    # In a target there is no pyproject.toml to declare the marker.
    config.addinivalue_line("markers", "suite(name): the report suite a test counts under")
    unwind_on_termination()  # a run ended by SIGTERM or SIGHUP still stops its servers
    try:
        server_start_mode()
    except ValueError as exc:  # a user's setting: one line, not a traceback
        raise pytest.UsageError(str(exc)) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    """The fork server ends with the session, so that its servers' CPU time is the run's."""
    close_fork_server()


def pytest_report_header(config: pytest.Config) -> str:
    """How this run starts its servers (serverproc.server_start_mode)."""
    return str(server_start_header())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests this kernel is expected to fail (../server/kernel_expectations.py)."""
    mark_expected_failures(items)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory of servers; teardown kills what is left and rejects any traceback."""
    yield from server_factory(tmp_path)
