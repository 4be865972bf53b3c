"""How make unit's tests are shared among its xdist workers (``-n N --dist loadgroup``).

A plugin (``-p unit_scheduling``; tests/harness/conftest.py loads its hooks), so that
its own tests can run it on a test file of theirs. Two things:

1. **Groups that hold.** ``xdist_group`` keeps a group's tests on one worker (the
   interrupted-runs tests must never run beside the warm-target test, a class's
   booted guest should be booted once). xdist 3.8 marks a group by rewriting
   ``item._nodeid``, which pytest 9 no longer reads (the id lives in ``item._id``,
   harness/scheduling.py), so loadgroup silently degrades to plain load and a
   group's tests spread over every worker. Measured here: TestUMLDriver's uml-6-1
   cases ran on all three workers, each booting its own guest (13 s of set-up
   each). Where xdist's suffix is missing, the id gets it here, as xdist intends
   (``<id>@<group>``; the private ``_id`` is the attribute pytest reads).
2. **The long tests first, longest first** (``@pytest.mark.long(seconds)``). The
   scheduler hands a worker its next test (or group) in collection order whenever
   it runs low: a 75 s test collected last would run on alone while the other
   workers idle. Longest first is the classic greedy order for that. xdist puts
   its groups ahead, the largest first; within them, and among the rest, this
   order holds. Every worker collects and sorts alike, so their collections agree,
   as xdist requires.
"""

from __future__ import annotations

from typing import Any, Sequence

import pytest

LONG_MARKER = ("long(seconds): lasts about that long here, warm; make unit starts it first, "
               "longest first (tests/harness/unit_scheduling.py)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", LONG_MARKER)


def declared_seconds(item: Any) -> float:
    """The seconds an item's ``long`` marker declares; 0 for an unmarked item."""
    marker = item.get_closest_marker("long")
    if marker is None:
        return 0.0
    seconds = marker.args[0] if marker.args else marker.kwargs.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.long needs the seconds the test "
                                f"lasts here, got {marker.args or marker.kwargs or 'nothing'}")
    return float(seconds)


def longest_first(items: Sequence[Any]) -> list[Any]:
    """``items`` with the marked ones first, longest first; the rest in their order."""
    return sorted(items, key=lambda item: -declared_seconds(item))  # stable


def group_suffix(item: Any) -> str:
    """``@<group>`` as xdist 3.8 writes it (its names sorted, joined by "_"), or ""."""
    names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
             for m in item.iter_markers("xdist_group")}
    return f"@{'_'.join(sorted(names))}" if names else ""


@pytest.hookimpl(trylast=True)  # after xdist's own attempt and any plugin that reorders
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if getattr(config.option, "loadgroup", False):  # set on xdist workers under loadgroup
        for item in items:
            suffix = group_suffix(item)
            if suffix and not item.nodeid.endswith(suffix):
                # Only pytest 9 gets here (before it, xdist's suffix holds).
                from _pytest.nodeid import coerce_node_id

                item._id = coerce_node_id(item.nodeid + suffix)
    items[:] = longest_first(items)
