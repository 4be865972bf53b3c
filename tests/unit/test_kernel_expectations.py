"""tests/server/kernel_expectations.py names real tests, with a reason each.

An entry whose test was renamed would mark nothing and hide nothing, silently: the
table is checked against the test functions the two suites define.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SUITES = (ROOT / "tests" / "server", ROOT / "tests" / "faults")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kernel_expectations", SUITES[0] / "kernel_expectations.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_functions() -> set[str]:
    names = set()
    for suite in SUITES:
        for path in suite.glob("test_*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                    names.add(node.name)
    return names


def test_every_expectation_names_a_test_of_the_two_suites_with_a_reason() -> None:
    table = _load().EXPECTED_FAILURES
    defined = _test_functions()
    assert "test_half_close_with_output_still_pending" in defined  # the walk finds tests
    for family, entries in table.items():
        assert family in {"linux", "gvisor", "freebsd", "darwin"}, family
        for name, entry in entries.items():
            assert name in defined, f"{family}: {name} is no test of tests/server or tests/faults"
            assert entry.reason.startswith(("gVisor", "Linux", "FreeBSD", "macOS")), entry
            assert isinstance(entry.strict, bool)
