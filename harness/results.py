"""Folding the test reports of a run into results.json (DESIGN.md section 4).

The controller collects every phase report of every test (``ResultsBuilder.collect``;
the workers label each with its target, its suite, the harness's CPU seconds and
the lifecycle seconds of that phase, under the ``PROP_*`` user properties), and at
the end of the run folds them with the event log (records, timings, errors, "not
run") into one results document per run (``ResultsBuilder.build``), which
``write_report`` hands to ``iomux.report.write_run``.
"""

from __future__ import annotations

import datetime
import json
import platform
import socket
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from harness import reasons
from harness.drivers.base import Target, TargetUnavailable, one_line
from harness.lifecycle import process_cpu_seconds, steps_cpu_seconds, steps_seconds
from harness.progress import iter_events

PROP_TARGET = "iomux_target"
PROP_SUITE = "iomux_suite"
#: CPU seconds (user + system, the worker and the children it waited for) of one
#: test phase, on the host: the harness's own share, not the target's.
PROP_HARNESS_CPU = "iomux_harness_cpu"
#: Seconds of one test phase spent bringing a target up or down (lifecycle steps),
#: which its suite's timing leaves out: the timings' build/start/... report them.
PROP_LIFECYCLE = "iomux_lifecycle_s"

_CPU_MARK = pytest.StashKey[float]()
_STEPS_MARK = pytest.StashKey[float]()


def now_iso() -> str:
    """The time now, UTC, in ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


#: The longest message of one test in results.json (``one_line``'s cut).
MESSAGE_LIMIT = 300


def _cpu_seconds() -> float:
    """The harness's CPU seconds less those of the lifecycle steps (a build's
    debootstrap, a VM's start): the timings table has those."""
    return process_cpu_seconds() - steps_cpu_seconds()


def mark_test_start(item: pytest.Item) -> None:
    """Mark the CPU clock and the lifecycle seconds where a test starts (its phases
    are measured from here)."""
    item.stash[_CPU_MARK] = _cpu_seconds()
    item.stash[_STEPS_MARK] = steps_seconds()


def label_phase(item: pytest.Item, report: pytest.TestReport) -> None:
    """Give a phase's report the harness's CPU seconds since the last phase of its
    test (``PROP_HARNESS_CPU``), and the lifecycle steps' seconds, if any ran in it
    (``PROP_LIFECYCLE``)."""
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


def suite_timings_of(tests: list[dict[str, Any]], records: dict[str, Any]
                     ) -> dict[str, dict[str, Any]]:
    """Per suite: its tests, their wall seconds (without the lifecycle steps that ran in
    a test's setup or teardown), the harness's CPU seconds on the host,
    and, for a suite run inside the target, that pytest's CPU seconds there (recorded by
    harness.guest_suites as ``suite_cpu:<suite>``; None elsewhere), with the xdist
    workers it ran on there (``workers``; ``serial_because`` when one). Wall against CPU
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
        if isinstance(inner, dict) and isinstance(inner.get("workers"), int):
            # How many xdist workers the suite ran on in the target, and why one.
            entry["workers"] = inner["workers"]
            if inner.get("serial_because"):
                entry["serial_because"] = inner["serial_because"]
    return out


class ResultsBuilder:
    """The controller's record of a run's tests, and the results document made of it."""

    def __init__(self, selected: Sequence[Target]) -> None:
        self.selected = list(selected)
        self.tests: dict[str, dict[str, Any]] = {}
        self.started_wall = time.time()
        self.started = now_iso()

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
            record.setdefault("message", one_line(text, MESSAGE_LIMIT))
        elif report.skipped:
            if record["outcome"] is None:
                record["outcome"] = "xfailed" if xfail else "skipped"
                if isinstance(report.longrepr, tuple):
                    record["message"] = one_line(report.longrepr[2], MESSAGE_LIMIT)
        elif report.when == "call" and record["outcome"] is None:
            record["outcome"] = "xpassed" if xfail else "passed"

    def build(self, *, run_id: str, events_path: Path, not_run: Mapping[str, str],
              swept: dict[str, list[str]], destroy: str, interrupted: bool,
              inner_selection: str | None = None) -> dict[str, Any]:
        """The results document of DESIGN.md section 4: this run's tests and the events
        of ``events_path``; ``not_run`` the targets that could not run here, ``swept``
        what the sweep removed, ``destroy`` the --destroy policy, ``interrupted``
        whether the run was stopped (Ctrl-C, SIGTERM), ``inner_selection`` the --inner-k
        expression the inner suites ran with (None: all their tests)."""
        events = list(iter_events(events_path))
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
            if target.name in not_run:
                status, reason = "not run", not_run[target.name]
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
                status, reason = "not run", (reasons.INTERRUPTED if interrupted
                                             else reasons.NO_TEST_RAN)
            elif interrupted:
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
            "run_id": run_id, "started": self.started, "finished": now_iso(),
            "host": host_facts(), "targets": entries, "claims": claims,
            "run": {
                "wall_seconds": round(wall, 3),
                "slowest_target_seconds": slowest,
                "wall_over_slowest": round(wall / slowest, 3) if slowest else None,
                "overhead_seconds": round(wall - slowest, 3) if slowest else None,
                "swept": swept,
                "keep_targets": destroy == "never",
                "destroy": destroy,
                "inner_selection": inner_selection,
            },
        }


def is_unavailable(exc: BaseException) -> bool:
    """Whether a bring-up error means "cannot be had here" rather than "broken"."""
    return isinstance(exc, TargetUnavailable)


def host_facts() -> dict[str, Any]:
    """The facts of the machine that runs the harness (iomux.facts), or the basics."""
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


def write_report(run_dir: Path, results: dict[str, Any]) -> str:
    """Write the run's report; returns the summary table to print. A report writer
    that fails still leaves results.json, and the table says what happened."""
    try:
        return _write_results(run_dir, results)
    except Exception as exc:  # the report writer's failure must not hide the run's outcome
        (run_dir / "results.json").write_text(json.dumps(results, indent=2,
                                                         default=str) + "\n")
        return f"report writer failed ({type(exc).__name__}: {one_line(exc, MESSAGE_LIMIT)}); " \
               f"results.json written without it"


def summary_lines(results: dict[str, Any], table: str, run_dir: Path) -> list[str]:
    """What the end of a run prints: the summary ``table``, each target's timings
    that ran, and where the report is."""
    lines = table.splitlines()
    for t in results["targets"]:
        if t["status"] == "not run":
            continue
        phases = " ".join(f"{k}={v:.1f}s" for k, v in t["timings"].items()
                          if isinstance(v, (int, float)))
        lines.append(f"  {t['name']}: {t.get('elapsed') or 0:.1f}s ({phases})")
    html = run_dir / "report.html"
    lines.append(f"report: {html if html.exists() else run_dir}")
    return lines
