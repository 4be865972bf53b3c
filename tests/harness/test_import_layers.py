"""The import contracts of pyproject.toml (make importlint): they hold on this tree, and
each one breaks on the arrow it forbids, run over a copy of the tree with that arrow in."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CONTRACTS = ("harness-layers", "driver-layers", "harness-acyclic", "iomux-standalone")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(),
                                reason="lint-imports not installed (pip install -e '.[dev]')")


def lint_imports(tree: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` over ``tree`` (its pyproject.toml; its packages first on the path)."""
    args = [a for c in contracts for a in ("--contract", c)]
    return subprocess.run([str(LINT_IMPORTS), "--no-logo", "--no-cache", *args], cwd=tree,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the packages and pyproject.toml, to put an arrow in."""
    for package in ("iomux", "harness"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(module: Path, line: str) -> None:
    """Put ``line`` after the module's ``from __future__`` import (or at its top)."""
    text = module.read_text()
    future = "from __future__ import annotations\n"
    if future in text:
        text = text.replace(future, f"{future}{line}  # noqa\n", 1)
    else:
        text = f"{line}  # noqa\n{text}"
    module.write_text(text)


def test_the_contracts_hold_on_this_tree() -> None:
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in proc.stdout


def test_the_copy_holds_before_an_arrow_is_put_in(tree: Path) -> None:
    proc = lint_imports(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("module,line,broken", [
    # drivers.base -> the plugin: up three layers (and a cycle)
    ("harness/drivers/base.py", "import harness.plugin", "harness-layers"),
    # the lifecycle -> the plugin: up one
    ("harness/lifecycle.py", "from harness import plugin", "harness-layers"),
    # the shared floor of the drivers -> one kind
    ("harness/drivers/base.py", "import harness.drivers.docker.driver", "driver-layers"),
    # one kind -> another kind of the same layer
    ("harness/drivers/local.py", "import harness.drivers.vagrant.driver", "driver-layers"),
    # a cycle inside one kind's package: engine <-> driver
    ("harness/drivers/docker/engine.py", "import harness.drivers.docker.driver",
     "harness-acyclic"),
    # the server package -> the harness
    ("iomux/__init__.py", "import harness.reasons", "iomux-standalone"),
])
def test_an_arrow_that_points_up_breaks_its_contract(tree: Path, module: str, line: str,
                                                     broken: str) -> None:
    add_import(tree / module, line)
    proc = lint_imports(tree, broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BROKEN" in proc.stdout and "0 kept, 1 broken" in proc.stdout, proc.stdout
