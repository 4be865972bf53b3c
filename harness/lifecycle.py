"""One target's life, as a declared sequence of steps (in the manner of Molecule).

    sweep -> attach | build -> start -> healthy -> test -> logs-on-failure -> keep | destroy

``SEQUENCE`` is the whole policy, as data: where each step runs, when it runs,
and its default timeout; ``TargetLifecycle`` and ``sweep_leftovers`` run what
it says. ``sweep`` runs once per run, in the controller, before any worker
starts; the others run in the worker that owns the target. ``test`` is pytest
itself: the steps before it are ``bring_up``, those after it ``tear_down``.

Every external step runs under a watchdog: a driver is asked to honour the
timeout it is given, and if it does not, the watchdog raises ``StepTimeout``
naming the target and the step anyway, so a hung engine can never hang the run.
Destroy runs on a passed test, a failed test, a failed start and Ctrl-C, unless
``--destroy`` keeps the target (``never``; ``passing`` when a test failed).

A kept target of a keepable kind leaves a record (harness.kept_targets); a later
run of the same tree and recipe takes it over (``attach``) instead of building
and starting it again, and checks it is healthy as it would a new one: a kept
target that does not answer is destroyed, and a new one built and started.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

# The watchdog lives with the drivers, which call it too, and is re-exported for
# the plugin. Every call here passes this module's GRACE (a test shortens it).
from harness import kept_targets
from harness.drivers import DriverUnavailable, UnknownKind, base, driver_class
from harness.drivers.base import GRACE as GRACE
from harness.drivers.base import Driver, ExecResult, Instance, StepTimeout, Target, TargetError
from harness.drivers.base import call_with_timeout as call_with_timeout
from harness.progress import EventLog
from harness.warm_targets import KeptTargetSteps

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the sequence."""

    name: str
    #: the word the progress view shows while the step runs
    phase: str
    #: "controller" (once per run) or "worker" (per target per worker)
    where: str
    #: when it runs: one of WHEN
    when: str
    #: seconds; 0 means the step has no timeout of its own (pytest runs the tests)
    timeout: float


#: The values of ``Step.when``.
WHEN: Mapping[str, str] = {
    "always": "every time",
    "if-reusable": "when a kept target of the same tree and recipe was claimed",
    "unless-attached": "unless a kept target was taken over",
    "on-failure": "when a test of the target, or its bring-up, failed",
    "if-kept": "when --destroy keeps the target (never; passing and it failed)",
    "unless-kept": "unless --destroy keeps the target",
}

SEQUENCE: tuple[Step, ...] = (
    Step("sweep", "sweeping", "controller", "always", 180),
    Step("attach", "attaching", "worker", "if-reusable", 120),
    # A cold docker build includes debootstrap of a base image: minutes, not seconds.
    Step("build", "building", "worker", "unless-attached", 1800),
    Step("start", "starting", "worker", "unless-attached", 300),
    Step("healthy", "waiting", "worker", "always", 120),
    Step("test", "testing", "worker", "always", 0),
    Step("logs", "saving logs", "worker", "on-failure", 120),
    Step("keep", "keeping", "worker", "if-kept", 60),
    Step("destroy", "tearing down", "worker", "unless-kept", 300),
)
STEPS: Mapping[str, Step] = {step.name: step for step in SEQUENCE}
_TEST = [step.name for step in SEQUENCE].index("test")
#: The worker's steps before the tests (bring_up) and after them (tear_down).
UP_STEPS = tuple(step for step in SEQUENCE[:_TEST] if step.where == "worker")
DOWN_STEPS = tuple(step for step in SEQUENCE[_TEST + 1:] if step.where == "worker")

#: ``--destroy`` (Molecule's option): ``always`` destroys every target after its
#: tests; ``never`` keeps every one, for debugging or for a later run to reuse;
#: ``passing`` destroys a target whose tests all passed and keeps a failed one.
DESTROY_POLICIES = ("always", "never", "passing")


def destroys(policy: str, failed: bool) -> bool:
    """Whether ``--destroy=policy`` destroys a target that ``failed`` (or not)."""
    if policy not in DESTROY_POLICIES:
        raise ValueError(f"--destroy={policy}: choose one of {', '.join(DESTROY_POLICIES)}")
    return policy == "always" or (policy == "passing" and not failed)


def destroy_policy(chosen: str | None, keep_targets: bool) -> str:
    """``--destroy`` (default always), with ``--keep-targets`` as ``never``; raises
    ValueError, one line, when the two disagree."""
    if keep_targets:
        if chosen not in (None, "never"):
            raise ValueError(f"--keep-targets is --destroy=never, not --destroy={chosen}")
        return "never"
    return chosen or "always"



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
#: destroy) of every target, so far, and the CPU seconds it and its children used
#: meanwhile; see steps_seconds().
_STEP_SECONDS = [0.0]
_STEP_CPU = [0.0]


def process_cpu_seconds() -> float:
    """This process's CPU seconds and its reaped children's (a build's debootstrap)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def steps_seconds() -> float:
    """Seconds this process has spent in lifecycle steps so far. A target comes up in
    the setup of its first test and goes in the teardown of its last, so the plugin
    takes the difference over a test phase out of that phase's suite timing."""
    return _STEP_SECONDS[0]


def steps_cpu_seconds() -> float:
    """CPU seconds (process_cpu_seconds) used while lifecycle steps ran, so far: what
    the plugin takes out of a phase's harness CPU, as steps_seconds out of its wall.
    An xdist worker runs one target's test at a time, so that CPU is the step's."""
    return _STEP_CPU[0]


class TargetLifecycle(KeptTargetSteps):
    """Bring one target up, tear it down, and say what happened on the event log.

    ``destroy`` is the ``--destroy`` policy (``keep`` True is ``never``, the old
    ``--keep-targets``)."""

    def __init__(self, driver: Driver, target: Target, run_id: str, worker: str,
                 report_dir: Path, events: EventLog | None, keep: bool = False,
                 timeout_override: float | None = None, destroy: str | None = None) -> None:
        self.driver = driver
        self.target = target
        self.run_id = run_id
        self.worker = worker
        self.report_dir = report_dir
        self.events = events
        self.destroy = destroy or ("never" if keep else "always")
        destroys(self.destroy, False)  # an unknown policy fails here, not at the end
        self.timeouts = step_timeouts(target, timeout_override)
        self.instance: Instance | None = None
        self.timings: dict[str, float] = {}
        self.build_facts: dict[str, Any] = {}
        self.steps_run: list[str] = []
        #: whether the target running is a kept one taken over (attach)
        self.reused = False
        self._claimed = None
        self._kept_hash = None
        self._healthy = False
        self._test_started: float | None = None
        self._torn_down = False

    @property
    def keep(self) -> bool:
        """Whether ``--destroy`` keeps every target (never), as ``--keep-targets`` did."""
        return self.destroy == "never"

    # -- plumbing
    def _emit(self, type_: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(self.target.name, type_, **fields)

    def _phase(self, phase: str, detail: str = "") -> None:
        if self.events is not None:
            self.events.phase(self.target.name, phase, detail)

    def _step(self, name: str, fn: Callable[[], T], errors: bool = True) -> T:
        """Run ``fn`` as step ``name`` under its watchdog, timed. ``errors`` False keeps
        a failure off the event log (a kept target that cannot be reused is no failure)."""
        step = STEPS[name]
        self.steps_run.append(name)
        self._phase(step.phase)
        started, cpu_started = time.monotonic(), process_cpu_seconds()
        label = f"{self.target.name}: {name}"
        try:
            return call_with_timeout(label, self.timeouts[name], fn,
                                     finish_on_interrupt=name in ("start", "attach"), grace=GRACE)
        except (StepTimeout, TargetError) as exc:
            if errors:
                self._emit("error", step=name, message=base.one_line(exc, limit=None))
            raise
        except Exception as exc:
            # A driver's own exception type becomes one line that names the step.
            if errors:
                self._emit("error", step=name, message=base.one_line(exc, limit=None))
            raise TargetError(f"{label}: {type(exc).__name__}: {base.one_line(exc, limit=None)}") from exc
        finally:
            seconds = time.monotonic() - started
            self.timings[name] = self.timings.get(name, 0.0) + seconds
            _STEP_SECONDS[0] += seconds
            _STEP_CPU[0] += max(0.0, process_cpu_seconds() - cpu_started)
            self._emit("timing", step=name, seconds=round(seconds, 3))

    def _runs(self, step: Step, failed: bool = False) -> bool:
        """Whether ``step`` runs now, by its ``when``."""
        kept = not destroys(self.destroy, failed)
        decided = {"always": True, "if-reusable": self._claimed is not None,
                   "unless-attached": not self.reused, "on-failure": failed,
                   "if-kept": kept, "unless-kept": not kept}
        if step.when not in decided:
            raise ValueError(f"step {step.name}: unknown when {step.when!r}; known: "
                             f"{', '.join(WHEN)}")
        return decided[step.when]

    # -- the sequence
    def bring_up(self) -> Instance:
        """The steps before ``test``: attach to a kept target, or build and start one;
        then healthy. A kept target that fails its health check is destroyed and a new
        one brought up. On a failure after start, saves logs and destroys (unless
        ``--destroy`` keeps it) before re-raising, so nothing is left behind."""
        _LIVE.add(self)
        try:
            self._claim()
            try:
                self._run_up()
            except (StepTimeout, TargetError):
                if not self.reused:
                    raise
                self._give_up_reuse("not healthy")
                self._run_up()
        except BaseException:
            self.tear_down(failed=True)
            raise
        assert self.instance is not None  # start or attach set it, or raised
        self._healthy = True
        self._phase("healthy")
        self._test_started = time.monotonic()
        self._phase("testing")
        return self.instance

    def _run_up(self) -> None:
        handlers: dict[str, Callable[[], None]] = {
            "attach": self._attach, "build": self._build, "start": self._start,
            "healthy": self._wait_healthy}
        for step in UP_STEPS:
            if self._runs(step):
                handlers[step.name]()

    def _build(self) -> None:
        facts = self._step("build", lambda: self.driver.build(self.target,
                                                              self.timeouts["build"]))
        self.build_facts = dict(facts or {})
        self._emit("record", key="build", value=self.build_facts)
        self._phase("built", "cached" if self.build_facts.get("cached") else "")

    def _start(self) -> None:
        def start() -> Instance:
            # Kept in the step's own thread: after a Ctrl-C the return value
            # is lost, and tear_down must still find the instance to destroy.
            started = self.driver.start(self.target, self.run_id, self.worker,
                                        self.timeouts["start"])
            self.instance = started
            return started

        self._step("start", start)
        # A kind may time the parts of its start (instance.data["start_steps"]: part ->
        # seconds; the vagrant kind's vagrant_up, ssh_config, sync and provision), and
        # the event log gets them.
        steps = self.instance.data.get("start_steps") if self.instance is not None else None
        if steps:
            self._emit("record", key="start_steps", value=steps)

    def _wait_healthy(self) -> None:
        instance = self.instance
        assert instance is not None  # start or attach set it
        self._step("healthy", lambda: self.driver.wait_healthy(
            instance, self.timeouts["healthy"]), errors=not self.reused)
        if self.reused:
            self._record_reuse()

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
        """The steps after ``test``: logs on failure, then keep or destroy, as
        ``--destroy`` says. Safe to call more than once; never raises for a failed
        destroy (it is reported on the event log instead)."""
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
        handlers: dict[str, Callable[[Instance, bool], tuple[str, str] | None]] = {
            "logs": self._save_logs, "keep": self._keep, "destroy": self._destroy}
        # Each step may name the phase the target ends in (kept, a failed destroy).
        final = ("failed" if failed else "done", "")
        for step in DOWN_STEPS:
            if self._runs(step, failed):
                final = handlers[step.name](instance, failed) or final
        self._phase(*final)

    def _save_logs(self, instance: Instance, failed: bool) -> tuple[str, str] | None:
        dest = self.report_dir / "logs"
        try:
            saved = self._step("logs", lambda: self.driver.save_logs(instance, dest))
            self._emit("record", key="logs", value=[str(p) for p in saved])
        except Exception:
            pass  # already on the event log; destroying matters more
        return None

    def _destroy(self, instance: Instance, failed: bool) -> tuple[str, str] | None:
        try:
            self._step("destroy", lambda: self.driver.destroy(instance,
                                                              self.timeouts["destroy"]))
        except Exception:
            return "failed", "destroy failed; the next run's sweep removes it"
        if self._claimed is not None:
            kept_targets.drop(self._claimed)
        return None


#: Lifecycles brought up in this process and not yet torn down: the atexit
#: safety net destroys them if pytest never got to its finalizers.
_LIVE: set[TargetLifecycle] = set()


@atexit.register
def _destroy_leftovers() -> None:
    for lifecycle in list(_LIVE):
        lifecycle.tear_down(failed=True)


def sweep_leftovers(drivers: Mapping[str, Driver], stale_runs: Sequence[str] | None,
                    events: EventLog | None = None,
                    targets: Sequence[Target] = (),
                    current: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """The ``sweep`` step: each driver removes labelled resources of earlier runs.

    ``stale_runs`` None means no other run is alive, so everything labelled as ours
    goes; otherwise only the resources of those (dead) runs do, so that a sweep
    never pulls a container from under another engineer's run that is still going.
    Each driver is given the run's ``targets`` of its kind (a docker target may
    name its own engine, which is swept too).
    ``current`` (target name -> kept hash, harness.kept_targets) spares kept targets
    of the current tree and recipe, and those a live run has taken over; the other
    kept ones are swept as any leftover. None: no kept target is spared.
    Returns kind -> what was removed (errors are one line each, never raised)."""
    removed: dict[str, list[str]] = {}
    timeout = STEPS["sweep"].timeout
    spare: dict[str, set[str]] = {}
    stale: list[kept_targets.KeptRecord] = []
    keepable = [kind for kind, driver in drivers.items() if driver.keepable]
    if current is not None and keepable:
        try:
            spare, stale = kept_targets.judge(current, keepable)
        except Exception as exc:  # an unreadable store spares nothing
            removed["kept"] = [f"kept records unreadable: {base.one_line(exc, limit=None)}"]
    for kind, driver in drivers.items():
        if events is not None:
            events.phase(f"<{kind}>", "sweeping")
        found: list[str] = []
        of_kind = [t for t in targets if t.kind == kind]
        sweep = functools.partial(driver.sweep, targets=of_kind,
                                  spare=frozenset(spare.get(kind, ())))
        try:
            if stale_runs is None:
                found += call_with_timeout(f"sweep {kind}", timeout, sweep, grace=GRACE)
            else:
                for run in stale_runs:
                    found += call_with_timeout(f"sweep {kind}", timeout,
                                               functools.partial(sweep, run), grace=GRACE)
        except Exception as exc:
            found.append(f"sweep failed: {base.one_line(exc, limit=None)}")
        removed[kind] = found
        if events is not None:
            events.phase(f"<{kind}>", "done", f"swept {len(found)}" if found else "nothing to sweep")
    # The stale records whose resources were swept: all of them, or those of dead runs.
    kept_targets.forget([r for r in stale if stale_runs is None or r.run_id in stale_runs])
    return removed
