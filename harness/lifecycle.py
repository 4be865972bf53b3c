"""One target's life, as a declared sequence of steps (in the manner of Molecule).

    sweep -> build -> start -> healthy -> test -> logs-on-failure -> destroy

``SEQUENCE`` is the whole policy, as data: where each step runs, when it runs,
and its default timeout. ``sweep`` runs once per run, in the controller, before
any worker starts (``sweep_leftovers``); the others run in the worker that owns
the target (``TargetLifecycle``). ``test`` is pytest itself.

Every external step runs under a watchdog: a driver is asked to honour the
timeout it is given, and if it does not, the watchdog raises ``StepTimeout``
naming the target and the step anyway, so a hung engine can never hang the run.
Destroy always runs (on a failed test, a failed start and Ctrl-C), unless
``--keep-targets`` asks to keep the target for debugging.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

# The watchdog lives with the drivers, which call it too, and is re-exported for
# the plugin. Every call here passes this module's GRACE (a test shortens it).
from harness.drivers import DriverUnavailable, UnknownKind, base, driver_class
from harness.drivers.base import GRACE as GRACE
from harness.drivers.base import Driver, ExecResult, Instance, StepTimeout, Target, TargetError
from harness.drivers.base import call_with_timeout as call_with_timeout
from harness.progress import EventLog

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the sequence."""

    name: str
    #: the word the progress view shows while the step runs
    phase: str
    #: "controller" (once per run) or "worker" (per target per worker)
    where: str
    #: "always", "on-failure" or "unless-kept"
    when: str
    #: seconds; 0 means the step has no timeout of its own (pytest runs the tests)
    timeout: float


SEQUENCE: tuple[Step, ...] = (
    Step("sweep", "sweeping", "controller", "always", 180),
    # A cold docker build includes debootstrap of a base image: minutes, not seconds.
    Step("build", "building", "worker", "always", 1800),
    Step("start", "starting", "worker", "always", 300),
    Step("healthy", "waiting", "worker", "always", 120),
    Step("test", "testing", "worker", "always", 0),
    Step("logs", "saving logs", "worker", "on-failure", 120),
    Step("destroy", "tearing down", "worker", "unless-kept", 300),
)
STEPS: Mapping[str, Step] = {step.name: step for step in SEQUENCE}


def kind_timeouts(kind: str) -> Mapping[str, float]:
    """The kind's own step timeouts (its driver's ``step_timeouts``), where it is
    slower than the sequence; none for a kind whose driver does not import here."""
    try:
        return driver_class(kind).step_timeouts
    except (UnknownKind, DriverUnavailable):
        return {}


def step_timeouts(target: Target, override: float | None = None) -> dict[str, float]:
    """Timeouts of each step for ``target``: the sequence's, the kind's, the
    target's ``[target.timeouts]`` table, then ``--target-timeout`` for all."""
    timeouts = {step.name: step.timeout for step in SEQUENCE}
    timeouts.update(kind_timeouts(target.kind))
    declared = target.options.get("timeouts", {})
    if isinstance(declared, Mapping):
        for name, value in declared.items():
            if name in timeouts and isinstance(value, (int, float)):
                timeouts[name] = float(value)
    if override is not None:
        timeouts = {name: (override if value else 0.0) for name, value in timeouts.items()}
    return timeouts


#: Seconds this process has spent in lifecycle steps (build, start, healthy, logs,
#: destroy) of every target, so far; see steps_seconds().
_STEP_SECONDS = [0.0]


def steps_seconds() -> float:
    """Seconds this process has spent in lifecycle steps so far. A target comes up in
    the setup of its first test and goes in the teardown of its last, so the plugin
    takes the difference over a test phase out of that phase's suite timing."""
    return _STEP_SECONDS[0]


class TargetLifecycle:
    """Bring one target up, tear it down, and say what happened on the event log."""

    def __init__(self, driver: Driver, target: Target, run_id: str, worker: str,
                 report_dir: Path, events: EventLog | None, keep: bool = False,
                 timeout_override: float | None = None) -> None:
        self.driver = driver
        self.target = target
        self.run_id = run_id
        self.worker = worker
        self.report_dir = report_dir
        self.events = events
        self.keep = keep
        self.timeouts = step_timeouts(target, timeout_override)
        self.instance: Instance | None = None
        self.timings: dict[str, float] = {}
        self.build_facts: dict[str, Any] = {}
        self.steps_run: list[str] = []
        self._test_started: float | None = None
        self._torn_down = False

    # -- plumbing
    def _emit(self, type_: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(self.target.name, type_, **fields)

    def _phase(self, phase: str, detail: str = "") -> None:
        if self.events is not None:
            self.events.phase(self.target.name, phase, detail)

    def _step(self, name: str, fn: Callable[[], T]) -> T:
        step = STEPS[name]
        self.steps_run.append(name)
        self._phase(step.phase)
        started = time.monotonic()
        label = f"{self.target.name}: {name}"
        try:
            return call_with_timeout(label, self.timeouts[name], fn,
                                     finish_on_interrupt=name == "start", grace=GRACE)
        except (StepTimeout, TargetError) as exc:
            self._emit("error", step=name, message=base.one_line(exc, limit=None))
            raise
        except Exception as exc:
            # A driver's own exception type becomes one line that names the step.
            self._emit("error", step=name, message=base.one_line(exc, limit=None))
            raise TargetError(f"{label}: {type(exc).__name__}: {base.one_line(exc, limit=None)}") from exc
        finally:
            seconds = time.monotonic() - started
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            _STEP_SECONDS[0] += seconds
            self._emit("timing", step=name, seconds=round(seconds, 3))

    # -- the sequence
    def bring_up(self) -> Instance:
        """build -> start -> healthy. On a failure after start, saves logs and destroys
        before re-raising, so a target that never became healthy is not left behind."""
        _LIVE.add(self)
        try:
            facts = self._step("build", lambda: self.driver.build(self.target,
                                                                  self.timeouts["build"]))
            self.build_facts = dict(facts or {})
            self._emit("record", key="build", value=self.build_facts)
            self._phase("built", "cached" if self.build_facts.get("cached") else "")

            def start() -> Instance:
                # Kept in the step's own thread: after a Ctrl-C the return value
                # is lost, and tear_down must still find the instance to destroy.
                started = self.driver.start(self.target, self.run_id, self.worker,
                                            self.timeouts["start"])
                self.instance = started
                return started

            instance = self._step("start", start)
            self._step("healthy", lambda: self.driver.wait_healthy(
                instance, self.timeouts["healthy"]))
        except BaseException:
            self.tear_down(failed=True)
            raise
        self._phase("healthy")
        self._test_started = time.monotonic()
        self._phase("testing")
        return instance

    def exec(self, argv: Sequence[str], timeout: float = 120,
             user: str | None = None) -> ExecResult:
        """Run a command in the target under a watchdog that names it."""
        if self.instance is None:
            raise TargetError(f"{self.target.name}: exec before start")
        instance = self.instance
        label = f"{self.target.name}: exec {' '.join(argv[:3])}"
        return call_with_timeout(label, timeout, lambda: self.driver.exec(
            instance, argv, timeout, user), grace=GRACE)

    def tear_down(self, failed: bool) -> None:
        """logs-on-failure -> destroy (unless kept). Safe to call more than once; never
        raises for a failed destroy (it is reported on the event log instead)."""
        if self._torn_down:
            return
        self._torn_down = True
        _LIVE.discard(self)
        if self._test_started is not None:
            seconds = time.monotonic() - self._test_started
            self.timings["test"] = self.timings.get("test", 0.0) + seconds
            self._emit("timing", step="test", seconds=round(seconds, 3))
        instance = self.instance
        if instance is None:
            self._phase("failed" if failed else "done")
            return
        if failed:
            dest = self.report_dir / "logs"
            try:
                saved = self._step("logs", lambda: self.driver.save_logs(instance, dest))
                self._emit("record", key="logs", value=[str(p) for p in saved])
            except Exception:
                pass  # already on the event log; destroying matters more
        if self.keep:
            self._phase("kept", instance.resource_name)
            return
        try:
            self._step("destroy", lambda: self.driver.destroy(instance,
                                                              self.timeouts["destroy"]))
        except Exception:
            self._phase("failed", "destroy failed; the next run's sweep removes it")
            return
        self._phase("failed" if failed else "done")


#: Lifecycles brought up in this process and not yet torn down: the atexit
#: safety net destroys them if pytest never got to its finalizers.
_LIVE: set[TargetLifecycle] = set()


@atexit.register
def _destroy_leftovers() -> None:
    for lifecycle in list(_LIVE):
        lifecycle.tear_down(failed=True)


def sweep_leftovers(drivers: Mapping[str, Driver], stale_runs: Sequence[str] | None,
                    events: EventLog | None = None,
                    targets: Sequence[Target] = ()) -> dict[str, list[str]]:
    """The ``sweep`` step: each driver removes labelled resources of earlier runs.

    ``stale_runs`` None means no other run is alive, so everything labelled as ours
    goes; otherwise only the resources of those (dead) runs do, so that a sweep
    never pulls a container from under another engineer's run that is still going.
    Each driver is given the run's ``targets`` of its kind (a docker target may
    name its own engine, which is swept too).
    Returns kind -> what was removed (errors are one line each, never raised)."""
    removed: dict[str, list[str]] = {}
    timeout = STEPS["sweep"].timeout
    for kind, driver in drivers.items():
        if events is not None:
            events.phase(f"<{kind}>", "sweeping")
        found: list[str] = []
        of_kind = [t for t in targets if t.kind == kind]
        try:
            if stale_runs is None:
                found += call_with_timeout(f"sweep {kind}", timeout, functools.partial(
                    driver.sweep, None, of_kind), grace=GRACE)
            else:
                for run in stale_runs:
                    found += call_with_timeout(f"sweep {kind}", timeout, functools.partial(
                        driver.sweep, run, of_kind), grace=GRACE)
        except Exception as exc:
            found.append(f"sweep failed: {base.one_line(exc, limit=None)}")
        removed[kind] = found
        if events is not None:
            events.phase(f"<{kind}>", "done", f"swept {len(found)}" if found else "nothing to sweep")
    return removed
