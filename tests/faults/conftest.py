"""Fixtures of the fault suite: servers (reusing tests/server's helper), the suite marker.

The fault suite sits beside tests/server and imports its ``serverproc`` helper
(the black-box way of starting ``iomux serve``) instead of copying it; in a
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

from kernel_expectations import EXPECTED_FAILURES  # noqa: E402
from serverproc import ServerFactory, server_factory  # noqa: E402  (needs the sys.path lines above)

from iomux.facts import kernel_identity  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # In a target there is no pyproject.toml to declare the marker.
    config.addinivalue_line("markers", "suite(name): the report suite a test counts under")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests this kernel is expected to fail, with their reasons
    (kernel_expectations.py); every other test must pass everywhere."""
    family = str(kernel_identity().get("family"))
    expected = EXPECTED_FAILURES.get(family, {})
    for item in items:
        name = getattr(item, "originalname", item.name)
        if name in expected:
            entry = expected[name]
            item.add_marker(pytest.mark.xfail(reason=f"{family}: {entry.reason}",
                                              strict=entry.strict))


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """A factory of servers; teardown kills what is left and rejects any traceback."""
    yield from server_factory(tmp_path)
