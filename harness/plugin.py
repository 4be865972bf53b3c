"""The pytest plugin behind ``make test-all-os``: ``pytest -p harness.plugin tests/cross_os``.

Who does what under pytest-xdist (``-n N --dist loadgroup``):

controller (the process that owns the terminal; also the only process without xdist)
    reads targets.toml and the ``--targets`` selection, makes the run id and
    ``reports/<run-id>/`` (and points ``reports/latest`` at it), decides which
    targets cannot run here and why, sweeps labelled leftovers of dead runs,
    tails the event log for live progress, collects every test report, and at
    the end writes results.json through ``iomux.report.write_run``.
workers
    collect ``tests/cross_os`` parametrised over the selected targets (one
    ``xdist_group`` per target, so one target's tests stay on one worker), bring
    a target up lazily when its first test asks for ``running_target``, and tear
    it down when the worker moves to another target or its session ends (a
    finalizer, with atexit and SIGTERM as safety nets).

Workers talk to the controller through ``<run dir>/events.jsonl``
(harness.progress) and through each test report's ``user_properties``.

This module holds the hooks, the options, the fixtures and the thin ``Harness``
that ties them together; the work is one level down: harness.runs (run ids,
reports/<run-id>/, the engine checks, the live-run locks and the sweep),
harness.running_target (the target the suites see), harness.results (test reports folded into results.json) and
harness.scheduling (which worker tests which target, under xdist).

The contract a driver fills for the suites is ``Instance.guest``, a typed
``Guest`` record (harness.drivers.base): the interpreter that has pytest, the
in-guest tests directory, a writable scratch directory, the servers' ports and
pids inside the target, and why the host cannot reach it, if it cannot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import IO, Any, Generator, Iterator

import pytest

from harness import results, runs, scheduling
from harness import targets as targets_mod
from harness.drivers import DriverUnavailable, get_driver
from harness.drivers.base import Driver, StepTimeout, Target, TargetError, one_line
from harness.lifecycle import DESTROY_POLICIES, TargetLifecycle, destroy_policy
from harness.progress import EventLog, ProgressView
from harness.running_target import RunningTarget
from harness.scheduling import target_scheduling

TARGET_ARG = "_iomux_target"
BACKEND_ARG = "target_backend"
STATE_KEY = pytest.StashKey["Harness"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """The harness's command-line options."""
    group = parser.getgroup("iomux", "iomux cross-OS targets (harness.plugin)")
    group.addoption("--targets", default=None, metavar="NAMES",
                    help="comma-separated target names from targets.toml (default: all)")
    group.addoption("--destroy", default=None, choices=DESTROY_POLICIES,
                    help="when to destroy a target after its tests (as Molecule's): always "
                         "(the default); never: keep every target, for debugging, and a "
                         "later run of the same tree reuses it; passing: destroy a target "
                         "whose tests all passed, keep a failed one")
    group.addoption("--keep-targets", action="store_true", default=False,
                    help="--destroy=never (local servers stop with the harness)")
    group.addoption("--target-timeout", type=float, default=None, metavar="SECONDS",
                    help="timeout of every lifecycle step (build, start, healthy, destroy), "
                         "instead of the per-step defaults")
    group.addoption("--targets-file", default=None, metavar="PATH",
                    help="the targets file (default: targets.toml at the repository root)")
    group.addoption("--reports-dir", default=None, metavar="DIR",
                    help="where reports/<run-id>/ goes (default: reports/ at the rootdir)")
    group.addoption("--inner-k", default=None, metavar="EXPRESSION",
                    help="a -k expression that selects the tests of the suites run inside "
                         "each target (in-guest, faults; default: all); results.json and "
                         "the summary record it, since such a run checks less")


class Harness:
    """Per-process state of the plugin (controller, worker, or both without xdist)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.is_worker = workerinput is not None
        self.worker = str(workerinput["workerid"]) if workerinput else "main"
        try:
            self.destroy = destroy_policy(config.getoption("destroy"),
                                          bool(config.getoption("keep_targets")))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.timeout: float | None = config.getoption("target_timeout")
        targets_file = config.getoption("targets_file")
        path = Path(targets_file) if targets_file else targets_mod.DEFAULT_PATH
        try:
            declared = targets_mod.load(path)
            self.declared = declared
            names = targets_mod.parse_selection(config.getoption("targets"))
            self.selected = targets_mod.select_targets(declared, names)
            self.cpu_policy = scheduling.cpu_priority_policy()
        except (targets_mod.TargetsError, ValueError) as exc:
            raise pytest.UsageError(str(exc)) from None
        self.by_name = {t.name: t for t in self.selected}
        self.failed_targets: set[str] = set()
        #: set at session finish when the run was stopped (Ctrl-C, SIGTERM)
        self.interrupted = False
        self.lifecycles: dict[str, TargetLifecycle] = {}
        # controller-only state
        self.results_builder = results.ResultsBuilder(self.selected)
        self.view: ProgressView | None = None
        self.results: dict[str, Any] | None = None
        self.summary = ""
        self.old_handlers: dict[int, Any] = {}
        self.out: IO[str] | None = None
        if workerinput is not None:
            shared = workerinput["iomux"]
            self.run_id: str = shared["run_id"]
            self.run_dir = Path(shared["run_dir"])
            self.not_run: dict[str, str] = dict(shared["not_run"])
            self.swept: dict[str, list[str]] = {}
        else:
            self._set_up_run()
        self.live = runs.LiveRun(self.run_id)
        self.events = EventLog(self.run_dir / "events.jsonl", self.worker)

    # -- controller: the run
    def _set_up_run(self) -> None:
        reports = self.config.getoption("reports_dir")
        reports_dir = Path(reports) if reports else self.config.rootpath / "reports"
        self.run_id = runs.new_run_id()
        self.run_dir = runs.make_run_dir(reports_dir, self.run_id)
        # xdist names its testrun_uid after ours, so worker resource names carry it.
        if getattr(self.config.option, "testrunuid", "absent") is None:
            self.config.option.testrunuid = self.run_id
        if getattr(self.config.option, "xmlpath", "absent") is None:
            self.config.option.xmlpath = str(self.run_dir / "junit.xml")
        self.out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
        self.not_run = {}
        self.swept = {}

    def check_engines(self) -> None:
        """Decide which selected targets cannot run here, and why (one line each)."""
        self.not_run.update(runs.check_engines(self.selected, self.run_dir))

    def sweep(self) -> None:
        """The sweep step, once per run, for each kind that will run."""
        self.swept = runs.sweep_dead_runs(self.live, self.selected, self.not_run, self.events,
                                          self.declared)

    def start_view(self) -> None:
        """Start the live progress view."""
        assert self.out is not None
        self.view = ProgressView(self.events.path, self.out, use_rich=self.out.isatty())
        self.view.start()
        for name, reason in self.not_run.items():
            self.events.phase(name, "not run", reason)

    # -- workers: the targets
    def bring_up(self, target: Target) -> RunningTarget:
        """Build, start and wait for ``target`` in this worker."""
        driver = get_driver(target.kind)
        report_dir = self.run_dir / "targets" / target.name
        report_dir.mkdir(parents=True, exist_ok=True)
        lifecycle = TargetLifecycle(driver, target, self.run_id, self.worker, report_dir,
                                    self.events, destroy=self.destroy,
                                    timeout_override=self.timeout)
        self.lifecycles[target.name] = lifecycle
        self._set_cpu_priority(target, driver)
        instance = lifecycle.bring_up()
        return RunningTarget(lifecycle, instance, report_dir, self.events)

    def _set_cpu_priority(self, target: Target, driver: Driver) -> None:
        """Off the critical path, yield the CPU to it (harness.scheduling): nice this
        worker, whose children inherit it, and give the driver the cgroup weight."""
        runnable = {t.name: targets_mod.weight(t) for t in self.selected
                    if t.name not in self.not_run}
        policy = self.cpu_policy
        background = scheduling.in_background(target.name, runnable,
                                              scheduling.targets_at_once(), policy)
        nice = scheduling.yield_cpu() if background else os.getpriority(os.PRIO_PROCESS, 0)
        driver.cpu_shares = scheduling.BACKGROUND_SHARES if background else None
        self.events.emit(target.name, "record", key="cpu_priority",
                         value={"policy": policy, "background": background, "nice": nice,
                                "cpu_shares": driver.cpu_shares})

    def tear_down(self, name: str) -> None:
        """logs-on-failure and destroy for ``name`` in this worker."""
        lifecycle = self.lifecycles.pop(name, None)
        if lifecycle is not None:
            lifecycle.tear_down(failed=name in self.failed_targets)

    def tear_down_all(self) -> None:
        """The end-of-session safety net for targets pytest did not finalize."""
        for name in list(self.lifecycles):
            self.tear_down(name)

    # -- controller: results
    def build_results(self) -> dict[str, Any]:
        """The results document of DESIGN.md section 4 (harness.results)."""
        return self.results_builder.build(
            run_id=self.run_id, events_path=self.events.path, not_run=self.not_run,
            swept=self.swept, destroy=self.destroy, interrupted=self.interrupted,
            inner_selection=self.config.getoption("inner_k"))


#: The harness of this process, for the hooks that are not handed the config.
_CURRENT: list[Harness] = []


def _harness(config: pytest.Config) -> Harness:
    return config.stash[STATE_KEY]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP become KeyboardInterrupt, so pytest unwinds through the
    # fixture finalizers that destroy the targets.
    raise KeyboardInterrupt(f"signal {signum}")


# -- hooks -------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Set up the run (controller) or read it from the controller (worker)."""
    harness = Harness(config)
    config.stash[STATE_KEY] = harness
    _CURRENT[:] = [harness]
    if not harness.is_worker:
        harness.check_engines()
        harness.start_view()
        harness.sweep()
    if threading_is_main():
        # A user's Ctrl-C must tear the targets down whatever this process
        # inherited: a shell starts background jobs (and some CI runners start
        # their steps) with SIGINT ignored, and an ignored disposition survives
        # exec, so Python would never raise KeyboardInterrupt. Set it ourselves.
        harness.old_handlers[signal.SIGINT] = signal.signal(signal.SIGINT,
                                                            signal.default_int_handler)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            harness.old_handlers[signum] = signal.signal(signum, _raise_interrupt)


def threading_is_main() -> bool:
    """Signal handlers can only be set from the main thread."""
    import threading
    return threading.current_thread() is threading.main_thread()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Hand the run to each xdist worker."""
    harness = _harness(node.config)
    node.workerinput["iomux"] = {"run_id": harness.run_id, "run_dir": str(harness.run_dir),
                                 "not_run": harness.not_run}


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``, grouping by target whatever the xdist_group suffix does
    (harness.scheduling says why), the heaviest waiting target first."""
    if config.getvalue("dist") != "loadgroup":
        return None
    selected = _harness(config).selected
    return target_scheduling(config, log, [t.name for t in selected],
                             {t.name: targets_mod.weight(t) for t in selected})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that uses a target over the selected targets."""
    if TARGET_ARG not in metafunc.fixturenames:
        return
    harness = _harness(metafunc.config)
    params = []
    for target in harness.selected:
        marks: list[pytest.MarkDecorator] = [pytest.mark.xdist_group(target.name)]
        if target.name in harness.not_run:
            marks.append(pytest.mark.skip(reason=f"not run: {harness.not_run[target.name]}"))
        params.append(pytest.param(target.name, id=target.name, marks=marks))
    # Session scope: pytest keeps each target's tests together and finalizes a
    # target's fixtures (destroying it) as soon as its last test is done.
    metafunc.parametrize(TARGET_ARG, params, scope="session")
    if BACKEND_ARG in metafunc.fixturenames:
        # Every known backend; those a target does not offer are deselected below.
        metafunc.parametrize(BACKEND_ARG, list(targets_mod.KNOWN_BACKENDS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect backends a target does not offer; label each item with target and suite."""
    harness = _harness(config)
    keep, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        name = params.get(TARGET_ARG)
        if name is None:
            keep.append(item)
            continue
        backend = params.get(BACKEND_ARG)
        if backend is not None and backend not in harness.by_name[name].backends:
            dropped.append(item)
            continue
        marker = item.get_closest_marker("suite")
        suite = str(marker.args[0]) if marker is not None and marker.args else "unknown"
        item.user_properties.append((results.PROP_TARGET, name))
        item.user_properties.append((results.PROP_SUITE, suite))
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Generator[None, object, object]:
    """Mark the CPU clock where a test starts (its phases are measured from here)."""
    results.mark_test_start(item)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember which targets had a failure (their logs are saved before destroy), and
    give each phase's report the harness's CPU seconds since the last phase."""
    report = yield
    results.label_phase(item, report)
    if report.failed:
        props = dict(item.user_properties)
        name = props.get(results.PROP_TARGET)
        if isinstance(name, str):
            _harness(item.config).failed_targets.add(name)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect every test's outcome in the controller."""
    harness = _CURRENT[0] if _CURRENT else None
    if harness is not None and not harness.is_worker:
        harness.results_builder.collect(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Workers: destroy what is left. Controller: write the report and set the exit status."""
    harness = session.config.stash.get(STATE_KEY, None)
    if harness is None:
        return
    harness.tear_down_all()
    if harness.is_worker:
        return
    if harness.view is not None:
        harness.view.stop()
    harness.live.unregister()
    harness.interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    built = harness.build_results()
    table = results.write_report(harness.run_dir, built)
    harness.results = built
    harness.summary = table
    if any(t["status"] == "failed" for t in built["targets"]) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the summary table, the timings and where the report is."""
    harness = config.stash.get(STATE_KEY, None)
    if harness is None or harness.is_worker or harness.results is None:
        return
    terminalreporter.section("iomux targets")
    for line in results.summary_lines(harness.results, harness.summary, harness.run_dir):
        terminalreporter.write_line(line)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last resort: nothing of ours outlives the process."""
    harness = config.stash.get(STATE_KEY, None)
    if harness is None:
        return
    harness.tear_down_all()
    if harness.view is not None:
        harness.view.stop()
    harness.live.unregister()
    for signum, handler in harness.old_handlers.items():
        if handler is not None:  # None: a handler set outside Python, not ours to restore
            signal.signal(signum, handler)
    if harness.out is not None:
        with contextlib.suppress(OSError, ValueError):
            html = harness.run_dir / "report.html"
            if not harness.is_worker and html.exists():
                # The last line of the run, after pytest's own summary: where to look.
                harness.out.write(f"[iomux] report: {html}\n")
            harness.out.close()
    _CURRENT.clear()


# -- fixtures (DESIGN.md section 6) -------------------------------------------

@pytest.fixture(scope="session")
def target(_iomux_target: str, pytestconfig: pytest.Config) -> Target:
    """The targets.toml entry of the target this test runs against."""
    return _harness(pytestconfig).by_name[_iomux_target]


@pytest.fixture(scope="session")
def running_target(target: Target, pytestconfig: pytest.Config) -> Iterator[RunningTarget]:
    """The target, up and healthy; started on first use in this worker, destroyed
    when the worker is done with it."""
    harness = _harness(pytestconfig)
    try:
        running = harness.bring_up(target)
    except (StepTimeout, TargetError, DriverUnavailable) as exc:
        harness.lifecycles.pop(target.name, None)
        if results.is_unavailable(exc):
            # The image or box cannot be had here: not run, never failed.
            why = runs.note_not_run(harness.run_dir, target.name,
                                    exc.args[0] if exc.args else str(exc))
            harness.events.emit(target.name, "not_run", reason=why)
            pytest.skip(f"not run: {why}")
        harness.failed_targets.add(target.name)
        pytest.fail(f"{target.name}: {one_line(exc, results.MESSAGE_LIMIT)}", pytrace=False)
    try:
        yield running
    finally:
        harness.tear_down(target.name)


@pytest.fixture(scope="session")
def host(running_target: RunningTarget) -> Any:
    """The pytest-testinfra host of the target."""
    import testinfra
    spec, kwargs = running_target.driver.testinfra_spec(running_target.instance)
    return testinfra.get_host(spec, **kwargs)
