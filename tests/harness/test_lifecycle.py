"""The lifecycle sequence (harness/lifecycle.py), driven by a fake driver."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Collection, Sequence

import pytest

from harness import lifecycle
from harness.drivers.base import (
    Driver,
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
)
from harness.lifecycle import SEQUENCE, TargetLifecycle, step_timeouts, sweep_leftovers
from harness.progress import EventLog, iter_events

TARGET = Target(name="fake-1", kind="fake", os_family="linux", backends=("select",))


class FakeDriver(Driver):
    """Records every call; ``fail`` maps a step to the exception it raises,
    ``hang`` maps a step to the seconds it sleeps first."""

    kind = "fake"

    def __init__(self, fail: dict[str, BaseException] | None = None,
                 hang: dict[str, float] | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail or {}
        self.hang = hang or {}
        self.timeouts: dict[str, float] = {}

    def _call(self, step: str, timeout: float | None = None) -> None:
        self.calls.append(step)
        if timeout is not None:
            self.timeouts[step] = timeout
        time.sleep(self.hang.get(step, 0))
        if step in self.fail:
            raise self.fail[step]

    def unavailable_reason(self) -> str | None:
        return None

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        self._call("sweep")
        return [f"thing-of-{run_id or 'any'}"]

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        self._call("build", timeout)
        return {"cached": False, "seconds": 0.0}

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        self._call("start", timeout)
        return Instance(target=target, run_id=run_id, resource_name=f"fake-{worker}")

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        self._call("healthy", timeout)

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        self._call("exec", timeout)
        return ExecResult(argv=list(argv), rc=0, stdout="", stderr="")

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        return "local://", {}

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        return dest

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        self._call("logs")
        return []

    def destroy(self, instance: Instance, timeout: float) -> None:
        self._call("destroy", timeout)


def make(tmp_path: Path, driver: FakeDriver, keep: bool = False,
         override: float | None = None) -> tuple[TargetLifecycle, EventLog]:
    events = EventLog(tmp_path / "events.jsonl", "gw9")
    return TargetLifecycle(driver, TARGET, "run-1", "gw9", tmp_path, events, keep=keep,
                           timeout_override=override), events


def phases(events: EventLog) -> list[str]:
    return [e["phase"] for e in iter_events(events.path) if e["type"] == "phase"]


def test_the_declared_sequence() -> None:
    assert [s.name for s in SEQUENCE] == ["sweep", "attach", "build", "start", "healthy",
                                          "test", "logs", "keep", "destroy"]
    assert {s.name: s.where for s in SEQUENCE}["sweep"] == "controller"
    assert {s.name: s.when for s in SEQUENCE}["logs"] == "on-failure"
    assert {s.when for s in SEQUENCE} <= set(lifecycle.WHEN)


def test_passing_target_runs_in_order_and_is_destroyed(tmp_path: Path) -> None:
    driver = FakeDriver()
    life, events = make(tmp_path, driver)
    life.bring_up()
    life.tear_down(failed=False)
    life.tear_down(failed=False)  # twice is harmless
    assert driver.calls == ["build", "start", "healthy", "destroy"]
    assert phases(events) == ["building", "built", "starting", "waiting", "healthy", "testing",
                              "tearing down", "done"]
    assert set(life.timings) == {"build", "start", "healthy", "test", "destroy"}


def test_the_parts_of_a_start_a_driver_times_reach_the_event_log(tmp_path: Path) -> None:
    class PartsDriver(FakeDriver):
        def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
            inst = super().start(target, run_id, worker, timeout)
            inst.data["start_steps"] = {"up": 1.5, "sync": 0.5}
            return inst

    for driver, want in ((PartsDriver(), [{"up": 1.5, "sync": 0.5}]), (FakeDriver(), [])):
        life, events = make(tmp_path / driver.__class__.__name__, driver)
        life.bring_up()
        life.tear_down(failed=False)
        records = [e["value"] for e in iter_events(events.path)
                   if e["type"] == "record" and e["key"] == "start_steps"]
        assert records == want


def test_failed_tests_save_logs_before_destroy(tmp_path: Path) -> None:
    driver = FakeDriver()
    life, events = make(tmp_path, driver)
    life.bring_up()
    life.tear_down(failed=True)
    assert driver.calls[-2:] == ["logs", "destroy"]
    assert phases(events)[-1] == "failed"


def test_unhealthy_target_is_destroyed_and_the_error_names_the_step(tmp_path: Path) -> None:
    driver = FakeDriver(fail={"healthy": TargetError("healthy: it fell over")})
    life, events = make(tmp_path, driver)
    with pytest.raises(TargetError, match="healthy: it fell over"):
        life.bring_up()
    assert driver.calls == ["build", "start", "healthy", "logs", "destroy"]
    errors = [e for e in iter_events(events.path) if e["type"] == "error"]
    assert errors[0]["step"] == "healthy"


def test_a_foreign_exception_becomes_one_line_naming_target_and_step(tmp_path: Path) -> None:
    driver = FakeDriver(fail={"start": RuntimeError("engine said no\nsecond line")})
    life, _ = make(tmp_path, driver)
    with pytest.raises(TargetError) as info:
        life.bring_up()
    assert str(info.value) == "fake-1: start: RuntimeError: engine said no"
    assert "destroy" not in driver.calls  # nothing was started to destroy


def test_ctrl_c_during_bring_up_still_destroys(tmp_path: Path) -> None:
    driver = FakeDriver(fail={"healthy": KeyboardInterrupt()})
    life, _ = make(tmp_path, driver)
    with pytest.raises(KeyboardInterrupt):
        life.bring_up()
    assert driver.calls[-1] == "destroy"


def test_a_hung_driver_times_out_naming_the_step(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "GRACE", 0.2)
    driver = FakeDriver(hang={"build": 3.0})
    life, _ = make(tmp_path, driver, override=0.2)
    started = time.monotonic()
    with pytest.raises(StepTimeout) as info:
        life.bring_up()
    assert time.monotonic() - started < 2.5
    assert str(info.value).startswith("fake-1: build: timed out after 0.2s")


def test_timeouts_are_handed_to_the_driver(tmp_path: Path) -> None:
    driver = FakeDriver()
    life, _ = make(tmp_path, driver)
    life.bring_up()
    life.tear_down(failed=False)
    assert driver.timeouts == {k: step_timeouts(TARGET)[k]
                               for k in ("build", "start", "healthy", "destroy")}
    vm = Target(name="vm", kind="vagrant", os_family="linux", backends=("select",),
                options={"timeouts": {"healthy": 42}})
    assert step_timeouts(vm)["healthy"] == 42
    assert step_timeouts(vm)["start"] > step_timeouts(TARGET)["start"]
    assert step_timeouts(vm, override=5)["build"] == 5
    assert step_timeouts(vm, override=5)["test"] == 0  # pytest's, never overridden


def test_keep_targets_skips_destroy(tmp_path: Path) -> None:
    driver = FakeDriver()
    life, events = make(tmp_path, driver, keep=True)
    life.bring_up()
    life.tear_down(failed=False)
    assert "destroy" not in driver.calls
    assert phases(events)[-1] == "kept"


def test_a_failed_destroy_is_reported_not_raised(tmp_path: Path) -> None:
    driver = FakeDriver(fail={"destroy": TargetError("destroy: stuck")})
    life, events = make(tmp_path, driver)
    life.bring_up()
    life.tear_down(failed=False)
    assert phases(events)[-1] == "failed"


def test_the_atexit_net_destroys_what_pytest_did_not(tmp_path: Path) -> None:
    driver = FakeDriver()
    life, _ = make(tmp_path, driver)
    life.bring_up()
    lifecycle._destroy_leftovers()
    assert driver.calls[-1] == "destroy"
    assert life not in lifecycle._LIVE


def test_sweep_everything_or_only_dead_runs(tmp_path: Path) -> None:
    driver = FakeDriver()
    assert sweep_leftovers({"fake": driver}, None) == {"fake": ["thing-of-any"]}
    assert sweep_leftovers({"fake": driver}, ["r1", "r2"]) == {"fake": ["thing-of-r1",
                                                                      "thing-of-r2"]}
    broken = FakeDriver(fail={"sweep": RuntimeError("no engine\nmore")})
    assert sweep_leftovers({"fake": broken}, None) == {"fake": ["sweep failed: no engine"]}


def test_progress_view_prints_phase_changes(tmp_path: Path) -> None:
    import io

    from harness.progress import ProgressView
    events = EventLog(tmp_path / "events.jsonl", "gw3")
    out = io.StringIO()
    view = ProgressView(events.path, out, use_rich=False)
    events.phase("debian-12", "building")
    events.emit("debian-12", "timing", step="build", seconds=1.0)
    events.phase("debian-12", "testing", "cached")
    view.poll()
    view.poll()  # nothing new: nothing printed twice
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["[iomux]", "debian-12", "building"]
    assert "(gw3)" in lines[1] and lines[1].endswith("cached")
    with open(events.path, "a") as fh:
        fh.write('{"t": 1, "target": "x", "type": "phase", "pha')  # a torn last line waits
    view.poll()
    assert len(out.getvalue().splitlines()) == 2


def test_the_cpu_a_step_and_its_children_use_is_counted_apart(tmp_path: Path) -> None:
    """A build's debootstrap is a child of the worker: its CPU is the step's, and the
    suite timings' harness CPU (results._cpu_seconds) leaves it out."""
    import subprocess
    import sys

    from harness import results

    class BusyBuild(FakeDriver):
        def build(self, target: Target, timeout: float) -> dict[str, Any]:
            subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                            "while time.process_time() - t < 0.5: pass"], check=True)
            return super().build(target, timeout)

    life, _ = make(tmp_path, BusyBuild())
    steps_before, harness_before = lifecycle.steps_cpu_seconds(), results._cpu_seconds()
    life.bring_up()
    life.tear_down(failed=False)
    assert lifecycle.steps_cpu_seconds() - steps_before >= 0.45
    assert results._cpu_seconds() - harness_before < 0.3
