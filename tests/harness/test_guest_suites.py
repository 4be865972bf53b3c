"""harness.guest_suites without a target: the measuring wrapper, run here on this
machine's interpreter, decides the inner suite's xdist workers as it would in a target."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import guest_suites
from harness.drivers.base import TargetError
from harness.drivers.docker.guest_wheels import GUEST_TOOLS, guest_tool_versions
from harness.results import suite_timings_of

# Each test writes down the xdist worker it ran in (PYTEST_XDIST_WORKER; unset
# without xdist) and waits until the other has started too, or 20 s: two workers
# run them side by side, one runs them one after the other.
_INNER_TESTS = '''
import os, time
from pathlib import Path

def _meet(me, other):
    Path(os.environ["MEET_DIR"], me).write_text(os.environ.get("PYTEST_XDIST_WORKER", "-"))
    deadline = time.monotonic() + float(os.environ["MEET_WAIT"])
    while time.monotonic() < deadline and not Path(os.environ["MEET_DIR"], other).exists():
        time.sleep(0.01)

def test_a():
    _meet("a", "b")

def test_b():
    _meet("b", "a")
'''


def _run_wrapper(tmp_path: Path, cap: int, env: dict[str, str] | None = None,
                 wait: float = 20.0) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    suite = tmp_path / "suite"
    meet = tmp_path / "meet"
    suite.mkdir()
    meet.mkdir()
    (suite / "test_inner.py").write_text(_INNER_TESTS)
    full_env = {**os.environ, "MEET_DIR": str(meet), "MEET_WAIT": str(wait), **(env or {})}
    full_env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-c", guest_suites._MEASURE, str(cap), "-p", "no:cacheprovider",
         "-q", str(suite), "--junitxml", str(tmp_path / "inner.xml")],
        cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120)
    measured = guest_suites.suite_cpu(proc.stderr)
    assert measured is not None, proc.stderr
    return proc, measured


def _workers_seen(tmp_path: Path) -> set[str]:
    return {p.read_text() for p in (tmp_path / "meet").iterdir()}


def test_the_inner_suite_runs_on_as_many_workers_as_cpus_up_to_the_cap(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not cpus or cpus < 2:
        pytest.skip(f"this machine has {cpus} CPU: no second worker to see")
    proc, measured = _run_wrapper(tmp_path, cap=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (measured["workers"], measured["cpus"]) == (2, cpus), measured
    assert "serial_because" not in measured
    assert _workers_seen(tmp_path) == {"gw0", "gw1"}
    # xdist's controller writes one JUnit file with every test in it.
    cases = {c.get("name") for c in ET.parse(tmp_path / "inner.xml").getroot().iter("testcase")}
    assert cases == {"test_a", "test_b"}
    assert isinstance(measured["wall_s"], float) and isinstance(measured["cpu_s"], float)


def test_a_cap_of_one_runs_the_suite_in_this_process_and_says_so(tmp_path: Path) -> None:
    proc, measured = _run_wrapper(tmp_path, cap=1, wait=0.2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert measured["workers"] == 1
    assert str(measured["serial_because"]).startswith(("capped at 1 worker", "1 CPU in the target"))
    assert _workers_seen(tmp_path) == {"-"}


def test_without_xdist_the_suite_runs_serially_and_says_why(tmp_path: Path) -> None:
    # A target whose Python has no pytest-xdist (a box's Debian python3-pytest, say):
    # an xdist that cannot be imported, and no plugin autoloading to trip over it.
    shadow = tmp_path / "shadow" / "xdist"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no xdist in this target')\n")
    proc, measured = _run_wrapper(
        tmp_path, cap=2, wait=0.2,
        env={"PYTHONPATH": str(shadow.parent), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert measured["workers"] == 1
    assert measured["serial_because"] == "pytest-xdist is not installed in the target"
    assert _workers_seen(tmp_path) == {"-"}


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guest_suites.INNER_WORKERS_ENV, "3")
    assert guest_suites.inner_workers_cap() == 3
    monkeypatch.setenv(guest_suites.INNER_WORKERS_ENV, "0")
    assert guest_suites.inner_workers_cap() == 1
    monkeypatch.delenv(guest_suites.INNER_WORKERS_ENV)
    # Unset: two per host core shared among the targets the run tests at once (its
    # xdist workers), rounded up, at most the host's cores.
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert guest_suites.inner_workers_cap() == 2
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "1")
    assert guest_suites.inner_workers_cap() == 2
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    assert guest_suites.inner_workers_cap() == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert guest_suites.inner_workers_cap() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert guest_suites.inner_workers_cap() == 6
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "9")
    assert guest_suites.inner_workers_cap() == 2
    monkeypatch.setenv(guest_suites.INNER_WORKERS_ENV, "two")
    with pytest.raises(TargetError, match="IOMUX_INNER_WORKERS='two': not a whole number"):
        guest_suites.inner_workers_cap()


def test_suite_timings_carry_the_workers() -> None:
    tests = [{"suite": "in-guest", "duration": 30.0, "harness_cpu": 0.1},
             {"suite": "faults", "duration": 60.0, "harness_cpu": 0.1}]
    records = {
        "suite_cpu:in-guest": {"wall_s": 29.0, "cpu_s": 9.0, "workers": 2, "cpus": 2},
        "suite_cpu:faults": {"wall_s": 59.0, "cpu_s": 40.0, "workers": 1, "cpus": 1,
                             "serial_because": "1 CPU in the target"}}
    got = suite_timings_of(tests, records)
    assert got["in-guest"]["workers"] == 2 and "serial_because" not in got["in-guest"]
    assert (got["faults"]["workers"], got["faults"]["serial_because"]) == (
        1, "1 CPU in the target")


def test_guest_tool_versions_read_xdists_wheel_name(tmp_path: Path) -> None:
    wheels = [tmp_path / n for n in ("pytest-9.2.0-py3-none-any.whl",
                                     "pytest_xdist-3.8.0-py3-none-any.whl",
                                     "hypothesis-6.140.0-py3-none-any.whl",
                                     "execnet-2.1.2-py3-none-any.whl")]
    assert guest_tool_versions(wheels) == {"pytest": "9.2.0", "pytest-xdist": "3.8.0",
                                           "hypothesis": "6.140.0"}
    assert "pytest-xdist" in GUEST_TOOLS


def test_the_server_start_mode_of_the_run_reaches_the_inner_suites(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_SERVER_START", "exec")
    assert guest_suites.inner_suite_env({"IOMUX_TEST_SCALE": "0.25"}) == {
        "IOMUX_SERVER_START": "exec", "IOMUX_TEST_SCALE": "0.25"}
    monkeypatch.delenv("IOMUX_SERVER_START")
    assert guest_suites.inner_suite_env(None) == {}
    assert guest_suites.inner_suite_env({"IOMUX_TEST_SCALE": "0.25"}) == {"IOMUX_TEST_SCALE": "0.25"}
