"""How make unit's workers share the tests (unit_scheduling.py): its groups hold under
xdist, and the long tests start first, longest first."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from unit_scheduling import declared_seconds, group_suffix, longest_first

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class _Item:
    def __init__(self, nodeid: str, *args: Any, groups: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        self.nodeid = nodeid
        self.marker = pytest.mark.long(*args, **kwargs).mark if (args or kwargs) else None
        self.groups = [pytest.mark.xdist_group(g).mark for g in groups]

    def get_closest_marker(self, name: str) -> Any:
        return self.marker if name == "long" else None

    def iter_markers(self, name: str) -> list[Any]:
        return self.groups if name == "xdist_group" else []


def test_marked_items_go_first_longest_first_and_the_rest_keep_their_order() -> None:
    items = [_Item("a"), _Item("b", 19), _Item("c"), _Item("d", seconds=75), _Item("e"),
             _Item("f", 23.5)]
    assert [i.nodeid for i in longest_first(items)] == ["d", "f", "b", "a", "c", "e"]


@pytest.mark.parametrize("args", [(), (0,), (-3,), ("75",), (True,)])
def test_a_long_marker_without_its_seconds_is_a_usage_error(args: tuple[Any, ...]) -> None:
    item = _Item("t", *args) if args else _Item("t", seconds=None)
    with pytest.raises(pytest.UsageError, match=r"^t: @pytest.mark.long needs the seconds"):
        declared_seconds(item)


def test_the_group_suffix_is_the_one_xdist_writes() -> None:
    assert group_suffix(_Item("t")) == ""
    assert group_suffix(_Item("t", groups=("b", "a"))) == "@a_b"


_SUITE = '''
import os, pytest

def _note(name):
    with open(os.environ["WHERE"], "a") as out:
        out.write(f"{name} {os.environ.get('PYTEST_XDIST_WORKER', '-')}\\n")

@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    _note(f"grouped-{i}")

@pytest.mark.parametrize("i", range(6))
def test_free(i):
    _note(f"free-{i}")

@pytest.mark.long(5)
def test_medium():
    _note("medium")

@pytest.mark.long(30)
def test_longest():
    _note("longest")
'''


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(_SUITE))
    env = {**os.environ, "PYTHONPATH": str(HERE), "WHERE": str(tmp_path / "where")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "unit_scheduling",
                           "-p", "no:cacheprovider", "--strict-markers",
                           *args, "test_suite.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_a_group_runs_on_one_worker_under_loadgroup(tmp_path: Path) -> None:
    proc = _run(tmp_path, "-n", "3", "--dist", "loadgroup", "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    where = dict(line.split() for line in (tmp_path / "where").read_text().splitlines())
    assert len(where) == 14, where
    grouped = {w for name, w in where.items() if name.startswith("grouped-")}
    assert len(grouped) == 1, f"the group's tests ran on {sorted(grouped)}"
    # The free tests spread: the run really had several workers to spread over.
    assert len(set(where.values())) > 1, where


def test_the_long_tests_are_collected_first_longest_first(tmp_path: Path) -> None:
    proc = _run(tmp_path, "--collect-only", "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids[:2] == ["test_suite.py::test_longest", "test_suite.py::test_medium"], ids
    assert ids[2:8] == [f"test_suite.py::test_grouped[{i}]" for i in range(6)], ids


def test_make_unit_loads_it_and_its_long_tests_come_first() -> None:
    # The real suite, collected in an order that puts the shorter long test first.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/harness/test_setup_engines.py", "tests/harness/test_vagrant.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert ids[:2] == [
        "tests/harness/test_vagrant.py::test_full_cycle_up_check_exec_provision_destroy",
        "tests/harness/test_setup_engines.py::test_make_test_all_os_as_a_user_who_may_not_install",
    ], ids[:4]
    assert len(ids) > 2, "nothing collected beyond the long tests"
