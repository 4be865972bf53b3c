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

The contract a driver fills in ``Instance.data`` for the suites:
``python`` (interpreter in the target that has pytest; default ``python3``),
``tests_dir`` (the in-guest copy of tests/server), ``scratch_dir`` (a writable
directory in the target; default ``/tmp``), ``guest_ports`` (backend -> port
the server listens on inside the target; default ``BACKEND_PORTS``) and
optionally ``server_pids`` (backend -> pid inside the target).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import os
import platform
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import IO, Any, Generator, Iterator, Sequence

import pytest

from harness import reasons
from harness import targets as targets_mod
from harness.drivers import KINDS, DriverUnavailable, UnknownKind, get_driver
from harness.drivers.base import Driver, ExecResult, Instance, StepTimeout, Target, TargetError
from harness.kept_targets import current_hashes as kept_hashes
from harness.lifecycle import (
    DESTROY_POLICIES,
    TargetLifecycle,
    call_with_timeout,
    steps_seconds,
    sweep_leftovers,
)
from harness.progress import EventLog, ProgressView, iter_events

TARGET_ARG = "_iomux_target"
BACKEND_ARG = "target_backend"
PROP_TARGET = "iomux_target"
PROP_SUITE = "iomux_suite"
#: CPU seconds (user + system, the worker and the children it waited for) of one
#: test phase, on the host: the harness's own share, not the target's.
PROP_HARNESS_CPU = "iomux_harness_cpu"
#: Seconds of one test phase spent bringing a target up or down (lifecycle steps),
#: which its suite's timing leaves out: the timings' build/start/... report them.
PROP_LIFECYCLE = "iomux_lifecycle_s"
STATE_KEY = pytest.StashKey["Harness"]()

#: Where every harness run on this machine registers itself while it is alive
#: (a file held under flock), whatever its reports directory: a sweep must not
#: remove the containers of another engineer's run that is still going.
LIVE_DIR = Path(tempfile.gettempdir()) / "iomux-harness-runs"


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


def destroy_policy(config: pytest.Config) -> str:
    """``--destroy``, with ``--keep-targets`` as ``never``; a contradiction is a usage error."""
    chosen: str | None = config.getoption("destroy")
    if config.getoption("keep_targets"):
        if chosen not in (None, "never"):
            raise pytest.UsageError(f"--keep-targets is --destroy=never, not --destroy={chosen}")
        return "never"
    return chosen or "always"


def get_module_name(kind: str) -> str:
    """The driver module of ``kind`` (for a reason that names it)."""
    return KINDS.get(kind, f"harness.drivers.{kind}")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _one_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""


class RunningTarget:
    """A target that is up, as the cross-OS suites see it (DESIGN.md section 6)."""

    def __init__(self, lifecycle: TargetLifecycle, instance: Instance, report_dir: Path,
                 events: EventLog) -> None:
        self._lifecycle = lifecycle
        self.instance = instance
        self.report_dir = report_dir
        self._events = events
        self._started: dict[str, tuple[str, int]] = {}

    @property
    def target(self) -> Target:
        """The targets.toml entry."""
        return self._lifecycle.target

    @property
    def driver(self) -> Driver:
        """The driver of the target's kind."""
        return self._lifecycle.driver

    def exec(self, argv: Sequence[str], timeout: float = 120,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` (a list, never a shell string) inside the target."""
        return self._lifecycle.exec(list(argv), timeout, user)

    def echo_address(self, backend: str) -> tuple[str, int]:
        """127.0.0.1 and the host port that reaches ``backend``'s echo server.

        A driver that starts only the ``auto`` server with the target (docker)
        offers ``start_backend_server``; it is called once per backend, here."""
        starter = getattr(self.driver, "start_backend_server", None)
        if starter is not None and backend != "auto" and backend not in self._started:
            if backend not in self.target.backends:
                raise TargetError(f"{self.target.name}: does not offer backend {backend}; "
                                  f"offered: {', '.join(self.target.backends)}")
            address = call_with_timeout(f"{self.target.name}: start {backend} server", 60,
                                        lambda: starter(self.instance, backend))
            self._started[backend] = (str(address[0]), int(address[1]))
        try:
            return self.instance.echo_ports[backend]
        except KeyError:
            offered = ", ".join(sorted(self.instance.echo_ports)) or "none"
            raise TargetError(f"{self.target.name}: no echo port for {backend}; "
                              f"offered: {offered}") from None

    @property
    def started_backends(self) -> list[str]:
        """Backends whose servers are known to be up: every echo port, unless the driver
        starts them on demand, in which case ``auto`` and those asked for so far."""
        if getattr(self.driver, "start_backend_server", None) is None:
            return sorted(self.instance.echo_ports)
        return sorted({"auto", *self._started} & set(self.instance.echo_ports))

    def copy_from(self, path: str, dest: Path, timeout: float = 120) -> Path:
        """Copy a file out of the target."""
        return call_with_timeout(f"{self.target.name}: copy {path}", timeout,
                                 lambda: self.driver.copy_from(self.instance, path, dest,
                                                               timeout))

    def record(self, key: str, value: object) -> None:
        """Put ``value`` under ``key`` in this target's entry of results.json."""
        self._events.emit(self.target.name, "record", key=key, value=value)


def suite_timings_of(tests: list[dict[str, Any]], records: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
    """Per suite: its tests, their wall seconds (without the lifecycle steps that ran in
    a test's setup or teardown), the harness's CPU seconds on the host,
    and, for a suite run inside the target, that pytest's CPU seconds there (recorded by
    harness.guest_suites as ``suite_cpu:<suite>``; None elsewhere). Wall against CPU
    says whether a suite computes or waits (DESIGN.md section 6)."""
    out: dict[str, dict[str, Any]] = {}
    for t in tests:
        entry = out.setdefault(t["suite"], {"tests": 0, "wall_s": 0.0, "harness_cpu_s": 0.0,
                                            "target_cpu_s": None})
        # Less the target's bring-up or tear-down that ran inside this test's setup
        # or teardown (the lifecycle timings report those).
        entry["wall_s"] += max(0.0, float(t.get("duration") or 0.0)
                               - float(t.get("lifecycle") or 0.0))
        entry["harness_cpu_s"] += float(t.get("harness_cpu") or 0.0)
    for suite, entry in out.items():
        entry["wall_s"] = round(entry["wall_s"], 3)
        entry["harness_cpu_s"] = round(entry["harness_cpu_s"], 3)
        inner = records.get(f"suite_cpu:{suite}")
        if isinstance(inner, dict) and isinstance(inner.get("cpu_s"), (int, float)):
            entry["target_cpu_s"] = round(float(inner["cpu_s"]), 3)
    return out


class Harness:
    """Per-process state of the plugin (controller, worker, or both without xdist)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.is_worker = workerinput is not None
        self.worker = str(workerinput["workerid"]) if workerinput else "main"
        self.destroy = destroy_policy(config)
        #: --keep-targets, as before --destroy (results.json's run.keep_targets)
        self.keep = self.destroy == "never"
        self.timeout: float | None = config.getoption("target_timeout")
        targets_file = config.getoption("targets_file")
        path = Path(targets_file) if targets_file else targets_mod.DEFAULT_PATH
        try:
            declared = targets_mod.load(path)
            self.declared = declared
            names = targets_mod.parse_selection(config.getoption("targets"))
            self.selected = targets_mod.select_targets(declared, names)
        except targets_mod.TargetsError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.by_name = {t.name: t for t in self.selected}
        self.failed_targets: set[str] = set()
        #: set at session finish when the run was stopped (Ctrl-C, SIGTERM)
        self.interrupted = False
        self.lifecycles: dict[str, TargetLifecycle] = {}
        # controller-only state
        self.tests: dict[str, dict[str, Any]] = {}
        self.view: ProgressView | None = None
        self.results: dict[str, Any] | None = None
        self.summary = ""
        self.old_handlers: dict[int, Any] = {}
        self.out: IO[str] | None = None
        self._live_fd: int | None = None
        self.started_wall = time.time()
        self.started = _now_iso()
        if workerinput is not None:
            shared = workerinput["iomux"]
            self.run_id: str = shared["run_id"]
            self.run_dir = Path(shared["run_dir"])
            self.not_run: dict[str, str] = dict(shared["not_run"])
            self.swept: dict[str, list[str]] = {}
        else:
            self._set_up_run()
        self.events = EventLog(self.run_dir / "events.jsonl", self.worker)

    # -- controller: the run
    def _set_up_run(self) -> None:
        reports = self.config.getoption("reports_dir")
        reports_dir = Path(reports) if reports else self.config.rootpath / "reports"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.run_id = f"{stamp}-{uuid.uuid4().hex[:6]}"
        self.run_dir = reports_dir / self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        latest = reports_dir / "latest"
        tmp = reports_dir / f".latest-{self.run_id}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.run_id)
        os.replace(tmp, latest)  # atomic: a reader never sees no "latest"
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
        kind_reason: dict[str, str | None] = {}
        for target in self.selected:
            try:
                driver = get_driver(target.kind)
                if target.kind not in kind_reason:
                    kind_reason[target.kind] = call_with_timeout(
                        f"{target.kind} engine check", 60, driver.unavailable_reason)
                reason = kind_reason[target.kind] or call_with_timeout(
                    f"{target.name} image/box check", 120,
                    functools.partial(driver.target_unavailable_reason, target))
            except (UnknownKind, DriverUnavailable) as exc:
                reason = reasons.driver_missing(get_module_name(target.kind), exc)
            except Exception as exc:  # a driver's check that breaks means "cannot run"
                reason = reasons.engine_check_failed(target.kind, exc)
            if reason:
                self.not_run[target.name] = self.note_not_run(target.name, reason)

    def note_not_run(self, name: str, reason: str) -> str:
        """The one line a not-run target shows everywhere (harness.reasons.fit); the
        whole story goes to the target's log, targets/<name>/not-run.log."""
        line = reasons.fit(reason)
        detail = getattr(line, "detail", "") or getattr(reason, "detail", "")
        if detail:
            log = self.run_dir / "targets" / name / "not-run.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:
                fh.write(f"not run: {line}\n{detail}\n")
        return str(line)

    def register_live(self) -> list[str] | None:
        """Register this run as alive; return the dead runs to sweep (None: every run)."""
        LIVE_DIR.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            LIVE_DIR.chmod(0o1777)
        others_alive = False
        stale: list[str] = []
        for lock in LIVE_DIR.glob("*.lock"):
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                others_alive = True  # its owner still holds it
            else:
                stale.append(lock.stem)  # killed without cleaning up: sweep its resources
                with contextlib.suppress(OSError):
                    lock.unlink()
            finally:
                os.close(fd)
        self._live_fd = os.open(LIVE_DIR / f"{self.run_id}.lock",
                                os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._live_fd, fcntl.LOCK_EX)
        return stale if others_alive else None

    def unregister_live(self) -> None:
        """This run is over: its lock goes, so no later sweep waits on it."""
        if self._live_fd is not None:
            with contextlib.suppress(OSError):
                (LIVE_DIR / f"{self.run_id}.lock").unlink()
            os.close(self._live_fd)
            self._live_fd = None

    def sweep(self) -> None:
        """The sweep step, once per run, for each kind that will run."""
        stale = self.register_live()
        drivers: dict[str, Driver] = {}
        for target in self.selected:
            if target.name not in self.not_run and target.kind not in drivers:
                with contextlib.suppress(UnknownKind, DriverUnavailable):
                    drivers[target.kind] = get_driver(target.kind)
        try:
            current: dict[str, str] | None = kept_hashes(self.declared, drivers)
        except OSError:  # a tree that cannot be read spares no kept target
            current = None
        self.swept = sweep_leftovers(drivers, stale, self.events, current)

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
        instance = lifecycle.bring_up()
        return RunningTarget(lifecycle, instance, report_dir, self.events)

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
    def collect(self, report: pytest.TestReport) -> None:
        """Fold one phase report of one test into its record."""
        props = dict(report.user_properties)
        name = props.get(PROP_TARGET)
        if not isinstance(name, str):
            return
        nodeid = report.nodeid
        if nodeid.rfind("@") > nodeid.rfind("]"):  # an xdist group suffix, not part of an id
            nodeid = nodeid.rsplit("@", 1)[0]
        record = self.tests.setdefault(nodeid, {
            "target": name, "suite": str(props.get(PROP_SUITE) or "unknown"),
            "name": nodeid.split("/")[-1], "outcome": None, "duration": 0.0,
            "harness_cpu": 0.0, "lifecycle": 0.0,
        })
        record["duration"] = round(record["duration"] + report.duration, 4)
        cpu = props.get(PROP_HARNESS_CPU)
        if isinstance(cpu, (int, float)):
            record["harness_cpu"] = round(record["harness_cpu"] + cpu, 4)
        steps = props.get(PROP_LIFECYCLE)
        if isinstance(steps, (int, float)):
            record["lifecycle"] = round(record["lifecycle"] + steps, 4)
        xfail = hasattr(report, "wasxfail")
        if report.failed:
            record["outcome"] = "failed" if report.when == "call" else "error"
            crash = getattr(report.longrepr, "reprcrash", None)
            text = getattr(crash, "message", None) or report.longreprtext.strip()
            record.setdefault("message", _one_line(text))
        elif report.skipped:
            if record["outcome"] is None:
                record["outcome"] = "xfailed" if xfail else "skipped"
                if isinstance(report.longrepr, tuple):
                    record["message"] = _one_line(report.longrepr[2])
        elif report.when == "call" and record["outcome"] is None:
            record["outcome"] = "xpassed" if xfail else "passed"

    def build_results(self) -> dict[str, Any]:
        """The results document of DESIGN.md section 4."""
        events = list(iter_events(self.events.path))
        per: dict[str, dict[str, Any]] = {
            t.name: {"records": {}, "timings": {}, "errors": [], "first": None, "last": None}
            for t in self.selected}
        for event in events:
            info = per.get(str(event.get("target")))
            if info is None:
                continue
            when = float(event.get("t", 0))
            info["first"] = when if info["first"] is None else min(info["first"], when)
            info["last"] = when if info["last"] is None else max(info["last"], when)
            kind = event.get("type")
            if kind == "record":
                info["records"][event["key"]] = event.get("value")
            elif kind == "timing":
                step = str(event["step"])
                info["timings"][step] = round(info["timings"].get(step, 0.0)
                                              + float(event["seconds"]), 3)
            elif kind == "error":
                info["errors"].append(f"{event.get('step')}: {event.get('message')}")
            elif kind == "not_run":
                info["not_run"] = str(event.get("reason") or "not available here")

        claims: list[Any] = []
        entries = []
        for target in self.selected:
            info = per[target.name]
            records: dict[str, Any] = info["records"]
            tests = [dict(r) for r in self.tests.values() if r["target"] == target.name]
            for t in tests:
                if t["outcome"] is None:  # set up, never finished: Ctrl-C or a dead worker
                    t["outcome"], t["message"] = "error", "did not finish (interrupted)"
            # Before the in-guest wrappers give way to their inner tests: a wrapper's
            # duration and harness CPU are its whole suite's.
            suite_timings = suite_timings_of(tests, records)
            # Each in-guest runner records its inner tests as "inner_tests:<suite>".
            inner = [t for key, value in records.items()
                     if key.startswith("inner_tests") and isinstance(value, list)
                     for t in value]
            if inner:
                # The in-guest wrapper test is replaced by the tests it ran inside.
                wrappers = {str(t.get("via")) for t in inner}
                tests = [t for t in tests if t["name"] not in wrappers] + [
                    {k: v for k, v in t.items() if k != "via"} for t in inner]
            for t in tests:
                t.pop("target", None)
                t.pop("harness_cpu", None)
                t.pop("lifecycle", None)
            for t in tests:
                if t["suite"] in suite_timings:
                    suite_timings[t["suite"]]["tests"] += 1
            suites: dict[str, dict[str, int]] = {}
            for t in tests:
                counts = suites.setdefault(t["suite"], {"passed": 0, "failed": 0, "skipped": 0})
                bucket = {"passed": "passed", "xpassed": "passed", "failed": "failed",
                          "error": "failed"}.get(t["outcome"], "skipped")
                counts[bucket] += 1
            failures = [t for t in tests if t["outcome"] in ("failed", "error")]
            reason: str | None = None
            if target.name in self.not_run:
                status, reason = "not run", self.not_run[target.name]
            elif info.get("not_run") and not any(
                    t["outcome"] in ("passed", "xpassed", "failed", "error") for t in tests):
                status, reason = "not run", info["not_run"]
            elif failures or info["errors"]:
                status = "failed"
                parts = list(dict.fromkeys(info["errors"]))[:1]
                if failures:
                    first = failures[0]
                    parts.append(f"{len(failures)} of {len(tests)} tests failed, first "
                                 f"{first['name']}: {first.get('message', '')}".rstrip(": "))
                reason = "; ".join(parts)
            elif not any(t["outcome"] in ("passed", "xpassed") for t in tests):
                status, reason = "not run", (reasons.INTERRUPTED if self.interrupted
                                             else reasons.NO_TEST_RAN)
            elif self.interrupted:
                # Ctrl-C or SIGTERM: its remaining tests never ran, so no pass.
                status, reason = "failed", (f"interrupted: the run was stopped before it "
                                            f"finished ({len(tests)} tests had run)")
            else:
                status = "passed"
            probe = records.get("probe") if isinstance(records.get("probe"), dict) else None
            timings: dict[str, float | None] = {
                step: info["timings"].get(step)
                for step in ("build", "start", "healthy", "test", "destroy")}
            for step, seconds in info["timings"].items():
                timings.setdefault(step, seconds)
            entry: dict[str, Any] = {
                "name": target.name, "kind": target.kind, "status": status, "reason": reason,
                "os": records.get("os") or target.os_family,
                "kernel": records.get("kernel"),
                "python": records.get("python") or target.python,
                "backends": list(records.get("backends") or target.backends),
                "suites": suites, "tests": tests, "timings": timings,
                "suite_timings": suite_timings,
                "elapsed": (round(info["last"] - info["first"], 3)
                            if info["first"] is not None and status != "not run" else None),
            }
            if probe is not None:
                entry["probe"] = probe
            if isinstance(records.get("build"), dict):
                entry["build"] = records["build"]
            for key, value in records.items():
                if key.startswith(("inner_tests", "suite_cpu:")):
                    continue
                if key not in ("probe", "build", "os", "kernel", "python",
                               "backends", "claims"):
                    entry.setdefault(key, value)
            if isinstance(records.get("claims"), list):
                claims += records["claims"]
            entries.append(entry)

        finished_wall = time.time()
        wall = finished_wall - self.started_wall
        ran = [e["elapsed"] for e in entries if e.get("elapsed")]
        slowest = max(ran) if ran else None
        return {
            "run_id": self.run_id, "started": self.started, "finished": _now_iso(),
            "host": _host_facts(), "targets": entries, "claims": claims,
            "run": {
                "wall_seconds": round(wall, 3),
                "slowest_target_seconds": slowest,
                "wall_over_slowest": round(wall / slowest, 3) if slowest else None,
                "overhead_seconds": round(wall - slowest, 3) if slowest else None,
                "swept": self.swept,
                "keep_targets": self.keep,
                "destroy": self.destroy,
            },
        }


def _is_unavailable(exc: BaseException) -> bool:
    """Whether a bring-up error means "cannot be had here" rather than "broken"."""
    if isinstance(exc, DriverUnavailable):
        return True
    try:
        from harness.images import ImageUnavailable
    except ImportError:
        return False
    return isinstance(exc, ImageUnavailable)


def _host_facts() -> dict[str, Any]:
    try:
        from iomux import facts
        collected = facts.collect()
        if isinstance(collected, dict):
            return collected
    except Exception:  # the facts module belongs to another piece; fall back to the basics
        pass
    return {"os": platform.system().lower(), "kernel": platform.release(),
            "python": platform.python_version(), "machine": platform.machine(),
            "hostname": socket.gethostname()}


def _write_results(run_dir: Path, results: dict[str, Any]) -> str:
    """Write the run's report; returns the summary table to print."""
    try:
        from iomux.report import summary_table, write_run
    except ImportError:  # the report module is another piece; until it exists, a minimal file
        pass
    else:
        write_run(run_dir, results)
        return str(summary_table(results))
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    lines = [f"{'target':<12} {'kind':<8} {'status':<8} suites"]
    for t in results["targets"]:
        suites = " ".join(f"{s}={c['passed']}/{c['failed']}/{c['skipped']}"
                          for s, c in t["suites"].items())
        why = f"  ({t['reason']})" if t["reason"] else ""
        lines.append(f"{t['name']:<12} {t['kind']:<8} {t['status']:<8} {suites}{why}")
    return "\n".join(lines)


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


def target_of_nodeid(nodeid: str, names: Sequence[str]) -> str | None:
    """The target a test id belongs to: its ``@group`` suffix when xdist added one,
    else the target name its parameter id starts with (ours is parametrised first)."""
    if nodeid.rfind("@") > nodeid.rfind("]"):
        return nodeid.rsplit("@", 1)[1]
    last = nodeid.rsplit("::", 1)[-1]
    if "[" not in last or not last.endswith("]"):
        return None
    ids = last[last.index("[") + 1:-1]
    found = [n for n in names if ids == n or ids.startswith(n + "-")]
    if not found:
        found = [n for n in names if f"-{n}-" in f"-{ids}-"]
    return max(found, key=len) if found else None


def heaviest_first(waiting: list[str], weights: dict[str, float]) -> str:
    """The target (xdist scope) to start next: the heaviest still waiting (longest
    processing time first, so the longest target does not begin last and the run end
    on it alone); ties keep the collection's order, which is targets.toml's."""
    return max(waiting, key=lambda s: (weights.get(s, 1.0), -waiting.index(s)))


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``, grouping by target whatever the xdist_group suffix does.

    xdist 3.8 marks a group by rewriting ``item._nodeid``, which pytest 9 no longer
    reads (the node id lives in ``item._id``), so its loadgroup silently degrades
    to plain load and one target's tests spread over every worker, each bringing
    the target up again. This scheduler finds the target in the test id instead."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    selected = _harness(config).selected
    names = [t.name for t in selected]
    weights = {t.name: targets_mod.weight(t) for t in selected}

    class TargetScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return target_of_nodeid(nodeid, names) or nodeid

        def _assign_work_unit(self, node: Any) -> None:
            if self.workqueue:
                self.workqueue.move_to_end(heaviest_first(list(self.workqueue), weights),
                                           last=False)
            super()._assign_work_unit(node)

    return TargetScheduling(config, log)


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
        item.user_properties.append((PROP_TARGET, name))
        item.user_properties.append((PROP_SUITE, suite))
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


_CPU_MARK = pytest.StashKey[float]()
_STEPS_MARK = pytest.StashKey[float]()


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Generator[None, object, object]:
    """Mark the CPU clock where a test starts (its phases are measured from here)."""
    item.stash[_CPU_MARK] = _cpu_seconds()
    item.stash[_STEPS_MARK] = steps_seconds()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember which targets had a failure (their logs are saved before destroy), and
    give each phase's report the harness's CPU seconds since the last phase."""
    report = yield
    now = _cpu_seconds()
    mark = item.stash.get(_CPU_MARK, None)
    if mark is not None:
        report.user_properties.append((PROP_HARNESS_CPU, round(now - mark, 4)))
    item.stash[_CPU_MARK] = now
    steps_now = steps_seconds()
    steps_mark = item.stash.get(_STEPS_MARK, None)
    if steps_mark is not None and steps_now > steps_mark:
        report.user_properties.append((PROP_LIFECYCLE, round(steps_now - steps_mark, 4)))
    item.stash[_STEPS_MARK] = steps_now
    if report.failed:
        props = dict(item.user_properties)
        name = props.get(PROP_TARGET)
        if isinstance(name, str):
            _harness(item.config).failed_targets.add(name)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect every test's outcome in the controller."""
    harness = _CURRENT[0] if _CURRENT else None
    if harness is not None and not harness.is_worker:
        harness.collect(report)


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
    harness.unregister_live()
    harness.interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
    results = harness.build_results()
    try:
        table = _write_results(harness.run_dir, results)
    except Exception as exc:  # the report writer's failure must not hide the run's outcome
        (harness.run_dir / "results.json").write_text(json.dumps(results, indent=2,
                                                                 default=str) + "\n")
        table = f"report writer failed ({type(exc).__name__}: {_one_line(exc)}); " \
                f"results.json written without it"
    harness.results = results
    harness.summary = table
    if any(t["status"] == "failed" for t in results["targets"]) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the summary table, the timings and where the report is."""
    harness = config.stash.get(STATE_KEY, None)
    if harness is None or harness.is_worker or harness.results is None:
        return
    tr = terminalreporter
    tr.section("iomux targets")
    for line in harness.summary.splitlines():
        tr.write_line(line)
    for t in harness.results["targets"]:
        if t["status"] == "not run":
            continue
        phases = " ".join(f"{k}={v:.1f}s" for k, v in t["timings"].items()
                          if isinstance(v, (int, float)))
        tr.write_line(f"  {t['name']}: {t.get('elapsed') or 0:.1f}s ({phases})")
    html = harness.run_dir / "report.html"
    tr.write_line(f"report: {html if html.exists() else harness.run_dir}")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Last resort: nothing of ours outlives the process."""
    harness = config.stash.get(STATE_KEY, None)
    if harness is None:
        return
    harness.tear_down_all()
    if harness.view is not None:
        harness.view.stop()
    harness.unregister_live()
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
        if _is_unavailable(exc):
            # The image or box cannot be had here: not run, never failed.
            why = harness.note_not_run(target.name, exc.args[0] if exc.args else str(exc))
            harness.events.emit(target.name, "not_run", reason=why)
            pytest.skip(f"not run: {why}")
        harness.failed_targets.add(target.name)
        pytest.fail(f"{target.name}: {_one_line(exc)}", pytrace=False)
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
