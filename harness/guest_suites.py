"""Running a pytest suite inside a target and filing each inner test in the report.

The in-guest behaviour suite (tests/server) and the fault suite (tests/faults)
run the same way: pytest inside the target with a JUnit file, the file brought
back, and each inner test recorded under the report suite it belongs to
(``record("inner_tests:<suite>", ...)``), in place of the one wrapper test.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from harness.drivers.base import TargetError, one_line
from harness.results import MESSAGE_LIMIT
from harness.running_target import RunningTarget
from harness.scheduling import targets_at_once

#: The behaviour suite takes about a minute here; a VM under emulation is slower.
INNER_TIMEOUT = 1800.0

#: Runs the inner pytest in this process (``pytest.main``, as ``-m pytest`` would; a
#: timeout still kills the one process) and prints, as its last line on stderr, its wall
#: seconds, the CPU seconds of the process and of every child it waited for (the xdist
#: workers and the echo servers the tests start): os.times(), POSIX, so the same on
#: every kernel; and how many xdist workers it ran on, and why.
#: Its first argument caps the workers (inner_workers_cap); it runs as many as the
#: target has CPUs, up to that cap, where pytest-xdist is installed there (the docker
#: images have it, guest_wheels.GUEST_TOOLS; the boxes' Debian and FreeBSD packages
#: need not). The suites wait more than they compute (a container's in-guest suite:
#: 49 s of wall for 6.6 CPU seconds), so a second worker halves what waiting costs.
#: Python 3.9-compatible, since it runs on the target's interpreter.
CPU_MARKER = "IOMUX-SUITE-CPU "
_MEASURE = (
    "import json, os, sys, time\n"
    "t = time.monotonic()\n"
    "cap, args = int(sys.argv[1]), sys.argv[2:]\n"
    "if hasattr(os, 'sched_getaffinity'):\n"
    "    cpus = len(os.sched_getaffinity(0))\n"
    "else:\n"
    "    cpus = os.cpu_count() or 1\n"
    "import pytest\n"
    "try:\n"
    "    import xdist\n"
    "    why = ''\n"
    "except ImportError:\n"
    "    why = 'pytest-xdist is not installed in the target'\n"
    "workers = 1 if why else min(cap, cpus)\n"
    "if workers > 1:\n"
    "    args = ['-n', str(workers)] + args\n"
    "elif not why:\n"
    "    why = '1 CPU in the target' if cpus == 1 else ('capped at 1 worker: the host\\'s '\n"
    "           'cores are shared by the targets tested at once (IOMUX_INNER_WORKERS)')\n"
    "rc = int(pytest.main(args))\n"
    "c = os.times()\n"
    "sys.stdout.flush()\n"
    f"sys.stderr.write({CPU_MARKER!r} + json.dumps({{'wall_s': time.monotonic() - t, "
    "'cpu_s': c.user + c.system + c.children_user + c.children_system, "
    "'workers': workers, 'cpus': cpus, 'serial_because': why}) + '\\n')\n"
    "sys.exit(rc)\n")

#: IOMUX_INNER_WORKERS caps an inner suite's xdist workers. By default the host's cores
#: are shared among the targets the run tests at once (its xdist workers): every
#: target's CPUs here are the host's (a container's, gVisor's sandbox's) or fewer (a
#: VM's vCPUs). Measured here, 2 cores: debian-12 alone, 2 inner workers, tests 133 s
#: -> 75 s; the whole matrix (3 targets at a time) with 2 inner workers each took
#: 1,087 s against 757 s serially, the VM's single TCG thread starved by gVisor's
#: suites (then CPU-bound, 1.4-1.7 CPU/wall): its start 314 s against 169 s.
INNER_WORKERS_ENV = "IOMUX_INNER_WORKERS"


#: Inner workers per host core shared among the targets tested at once: with one, a
#: container's fault suite spent 28 CPU-s in 61 s of wall and its in-guest suite 5 in
#: 25-29 s (2026-12-07), so two share a core's worth. The whole matrix on 2 cores,
#: 3 targets at once: 482 and 493 s of wall with 2 inner workers against 550 and 600 s
#: with 1 (containers' tests 96-102 s -> 58-81 s). Before the critical-path priority
#: (harness.scheduling) 2 had starved the VM instead (1,087 s against 757 s).
WORKERS_PER_CORE = 2


def inner_workers_cap() -> int:
    """The most xdist workers an inner suite may run on (INNER_WORKERS_ENV, else
    WORKERS_PER_CORE for each of the host's cores shared among the targets tested at
    once, rounded up, and never more than the host's cores)."""
    raw = os.environ.get(INNER_WORKERS_ENV, "")
    try:
        if raw:
            return max(1, int(raw))
        at_once = targets_at_once()
    except ValueError:
        raise TargetError(f"{INNER_WORKERS_ENV}={raw!r}: not a whole number") from None
    cores = os.cpu_count() or 1
    return max(1, min(cores, -(-WORKERS_PER_CORE * cores // at_once)))


#: Settings of the suites' own that a run passes on to every target's inner suites, so
#: that they hold in a target as on the host: how servers start (tests/server/serverproc.py,
#: IOMUX_SERVER_START=exec gives each its own interpreter, as before the fork server).
PASSED_ON_ENV = ("IOMUX_SERVER_START",)


def inner_suite_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an inner suite gets beyond the target's own: PASSED_ON_ENV where
    this run has them set, then ``extra`` (the target's, IOMUX_TEST_SCALE)."""
    passed = {k: os.environ[k] for k in PASSED_ON_ENV if os.environ.get(k)}
    return {**passed, **(extra or {})}


def suite_cpu(stderr: str) -> dict[str, Any] | None:
    """The wall and CPU seconds and the workers the measuring wrapper printed, or None."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(CPU_MARKER):
            try:
                found = json.loads(line[len(CPU_MARKER):])
            except ValueError:
                return None
            out: dict[str, Any] = {k: round(float(found[k]), 3) for k in ("wall_s", "cpu_s")
                                   if isinstance(found.get(k), (int, float))}
            for key in ("workers", "cpus"):
                if isinstance(found.get(key), int):
                    out[key] = found[key]
            if isinstance(found.get("serial_because"), str) and found["serial_because"]:
                out["serial_because"] = found["serial_because"]
            return out
    return None


def target_python(rt: RunningTarget) -> str:
    """The interpreter inside the target that has iomux and pytest."""
    return rt.instance.guest.python


def tail(text: str, lines: int = 15) -> str:
    """The last lines of a command's output, for a failure message."""
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_junit(path: Path, via: str, suite: str = "in-guest") -> list[dict[str, Any]]:
    """One ``{suite, name, outcome, duration, via}`` per <testcase> of a JUnit XML file."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        name = f"{classname}::{case.get('name', '?')}" if classname else case.get("name", "?")
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = child.get("message", "")
                break
            if child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = child.get("message", "")
        entry: dict[str, Any] = {"suite": suite, "name": name, "outcome": outcome,
                                 "duration": round(float(case.get("time") or 0), 4), "via": via}
        if message:
            entry["message"] = one_line(message, MESSAGE_LIMIT)
        tests.append(entry)
    return tests


def run_inner_suite(running_target: RunningTarget, request: pytest.FixtureRequest,
                    tmp_path: Path, suite: str, tests_dir: str,
                    env: dict[str, str] | None = None) -> None:
    """Run pytest on ``tests_dir`` inside the target; report each inner test under ``suite``."""
    scratch = running_target.instance.guest.scratch_dir
    inner_xml = f"{scratch}/iomux-{suite}.xml"
    python = target_python(running_target)
    argv = [python, "-c", _MEASURE, str(inner_workers_cap()), "-p", "no:cacheprovider", "-q",
            tests_dir, "--junitxml", inner_xml]
    selection = request.config.getoption("inner_k", None)
    if selection:
        # --inner-k: a selection of the suite (the harness's own end-to-end tests run
        # one); selecting nothing is pytest's exit status 5, a failure below.
        argv += ["-k", selection]
    env = inner_suite_env(env)
    if env:
        # env(1) takes NAME=VALUE words as data: no shell is involved.
        argv = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *argv]
    result = running_target.exec(argv, timeout=INNER_TIMEOUT)
    (running_target.report_dir / f"{suite}.txt").write_text(result.stdout + result.stderr)
    measured = suite_cpu(result.stderr)
    if measured:
        running_target.record(f"suite_cpu:{suite}", measured)
    # pytest's exit status: 0 all passed, 1 some failed; anything else means the
    # suite itself could not run (usage error, no tests, internal error).
    assert result.rc in (0, 1), (f"inner pytest exited {result.rc}:\n"
                                 f"{tail(result.stdout + result.stderr)}")
    try:
        local_xml = running_target.copy_from(inner_xml, tmp_path / f"{suite}.xml")
    except TargetError:
        # Docker's archive API reads the container's root filesystem, not the
        # tmpfs mounted on /tmp (the root is read-only), so read it through exec.
        cat = running_target.exec([target_python(running_target), "-c",
                                   "import sys; sys.stdout.write(open(sys.argv[1]).read())",
                                   inner_xml], timeout=60)
        assert cat.rc == 0, f"cannot read {inner_xml} in the target: {tail(cat.stderr)}"
        local_xml = tmp_path / f"{suite}.xml"
        local_xml.write_text(cat.stdout)
    via = request.node.nodeid
    if via.rfind("@") > via.rfind("]"):  # an xdist group suffix
        via = via.rsplit("@", 1)[0]
    via = via.split("/")[-1]  # the name the plugin files this test under
    inner = parse_junit(local_xml, via, suite)
    assert inner, f"the {suite} suite ran no test"
    running_target.record(f"inner_tests:{suite}", inner)
    failed = [f"{t['name']}: {t.get('message', '')}" for t in inner
              if t["outcome"] in ("failed", "error")]
    if failed:
        pytest.fail(f"{len(failed)} of {len(inner)} {suite} tests failed:\n  "
                    + "\n  ".join(failed), pytrace=False)
    assert result.rc == 0, tail(result.stdout)
