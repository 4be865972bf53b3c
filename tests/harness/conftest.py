"""What the harness tests share: one store of kept-target records per test session.

The harness runs these tests start (``pytest -p harness.plugin`` in a subprocess)
sweep what dead runs left, sparing the kept targets their store says belong to
this tree (harness.kept_targets). So that the warm-target test's kept container is
spared by every other test's run, not only by its own, every test of one session
(every xdist worker: PYTEST_XDIST_TESTRUNUID is the session's) uses one store,
of the session's own, not the machine's /var/tmp/iomux-kept.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# How make unit's workers share the tests: groups that hold, the long ones first.
from unit_scheduling import pytest_collection_modifyitems, pytest_configure  # noqa: F401

from harness import kept_targets

_SESSION = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"solo-{os.getpid()}"
SESSION_STORE = Path(tempfile.gettempdir()) / f"iomux-test-kept-{_SESSION}"
os.environ.setdefault(kept_targets.STORE_ENV, str(SESSION_STORE))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller (or a run without xdist) removes the session's store."""
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(SESSION_STORE, ignore_errors=True)
