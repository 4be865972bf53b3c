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

import suite_hooks  # noqa: E402  (needs the sys.path lines above)
from serverproc import ServerFactory, server_factory  # noqa: E402
from suite_hooks import (  # noqa: E402, F401  (pytest takes a conftest's hooks by name)
    pytest_collection_modifyitems,
    pytest_report_header,
    pytest_terminal_summary,
    pytest_unconfigure,
)


def pytest_configure(config: pytest.Config) -> None:
    """The suite marker (in a target there is no pyproject.toml to declare it), then
    what the server suite's configure does (suite_hooks.pytest_configure)."""
    config.addinivalue_line("markers", "suite(name): the report suite a test counts under")
    suite_hooks.pytest_configure(config)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory of servers; teardown kills what is left and rejects any traceback."""
    yield from server_factory(tmp_path)
