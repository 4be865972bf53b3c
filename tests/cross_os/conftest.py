"""The cross-OS suites need the orchestrator: ``pytest -p harness.plugin tests/cross_os``.

Without the plugin (a plain ``pytest tests``) these modules are not collected,
rather than failing for want of the ``target`` fixtures.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Ignore this directory's tests unless harness.plugin is loaded."""
    if config.pluginmanager.has_plugin("harness.plugin"):
        return None
    return collection_path.suffix == ".py" and collection_path.name.startswith("test_")


# pytest-testinfra's own plugin also defines a ``host`` fixture (parametrised by
# its --hosts option) and, being loaded after ``-p harness.plugin``, would win;
# a conftest fixture is closer to the tests than either plugin, so this one does.
from harness.plugin import host  # noqa: E402

__all__ = ["host", "pytest_ignore_collect"]
