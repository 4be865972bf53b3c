"""The cross-OS suites need the orchestrator: ``pytest -p harness.plugin tests/cross_os``.

Without the plugin (a plain ``pytest tests``) these modules are not collected,
rather than failing for want of the ``target`` fixtures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Ignore this directory's tests unless harness.plugin is loaded."""
    if config.pluginmanager.has_plugin("harness.plugin"):
        return None
    return collection_path.suffix == ".py" and collection_path.name.startswith("test_")


# pytest-testinfra's own plugin also defines a ``host`` fixture (parametrised by
# its --hosts option) and, being loaded after ``-p harness.plugin``, would win;
# a conftest fixture is closer to the tests than either plugin, so this one does.
from harness.running_target import RunningTarget  # noqa: E402


@pytest.fixture(scope="session")
def host(running_target: RunningTarget) -> Any:
    """The pytest-testinfra host of the target (harness.plugin's ``host``), or "not
    run: <why>" for a target the host cannot reach. Session-scoped, so it is set
    up before any function-scoped fixture: the check cannot wait for one."""
    why = running_target.instance.guest.unreachable
    if why:
        pytest.skip(f"not run: {why}")
    import testinfra
    spec, kwargs = running_target.driver.testinfra_spec(running_target.instance)
    return testinfra.get_host(spec, **kwargs)


#: Suites that reach the target from this host (its published ports, testinfra).
FROM_HOST_SUITES = ("black-box", "host")


@pytest.fixture(autouse=True)
def _reachable_from_host(request: pytest.FixtureRequest) -> None:
    """A from-the-host suite is "not run: <why>" on a target the host cannot reach
    (a driver says why in ``instance.guest.unreachable``: gvisor, uml)."""
    marker = request.node.get_closest_marker("suite")
    if marker is None or not marker.args or marker.args[0] not in FROM_HOST_SUITES:
        return
    if "running_target" not in request.fixturenames:
        return
    why = request.getfixturevalue("running_target").instance.guest.unreachable
    if why:
        pytest.skip(f"not run: {why}")


__all__ = ["FROM_HOST_SUITES", "host", "pytest_ignore_collect"]
