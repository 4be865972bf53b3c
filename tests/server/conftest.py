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

from serverproc import ServerFactory, server_factory
from suite_hooks import (  # noqa: F401  (pytest takes a conftest's hooks by name)
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_report_header,
    pytest_terminal_summary,
    pytest_unconfigure,
)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory of servers; teardown kills what is left and rejects any traceback."""
    yield from server_factory(tmp_path)
