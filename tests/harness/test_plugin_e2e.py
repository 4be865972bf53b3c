"""The orchestrator end to end: ``pytest -p harness.plugin tests/cross_os`` in a subprocess.

The in-guest behaviour suite is deselected here (``make test-all-os`` runs it);
everything else runs for real against the ``local`` target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
LEAN = "not behaviour_suite"
#: --inner-k: one test of each fault-suite file, run inside the target (each such file
#: has its own fixtures and helpers to prove; the whole suite is the matrix's work).
INNER_FAULTS = "partial_writes_sha256 or slicing_sends_one_byte or every_client_gets_exactly"


def run_harness(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], Path]:
    reports = tmp_path / "reports"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p", "no:cacheprovider",
         "tests/cross_os", "--reports-dir", str(reports), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env, check=False)
    return proc, reports


def load_results(reports: Path) -> dict[str, Any]:
    latest = reports / "latest"
    assert latest.is_symlink()
    results: dict[str, Any] = json.loads((latest / "results.json").read_text())
    assert (latest / "junit.xml").exists()
    assert (latest / "events.jsonl").exists()
    return results


@pytest.mark.long(23)
def test_local_passes_and_a_missing_engine_is_not_run(tmp_path: Path) -> None:
    closed = tmp_path / "no-docker.sock"  # nothing listens here
    proc, reports = run_harness(
        tmp_path, "--targets", "local,debian-12", "-n", "2", "--dist", "loadgroup", "-k", LEAN,
        "--inner-k", INNER_FAULTS, env={"DOCKER_HOST": f"unix://{closed}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = load_results(reports)
    for key in ("run_id", "started", "finished", "host", "targets", "claims"):
        assert key in results
    assert (reports / "latest").resolve().name == results["run_id"]
    assert results["run"]["inner_selection"] == INNER_FAULTS
    by_name = {t["name"]: t for t in results["targets"]}
    assert list(by_name) == ["local", "debian-12"]

    local = by_name["local"]
    for key in ("name", "kind", "status", "reason", "os", "kernel", "python", "backends",
                "suites", "tests", "timings"):
        assert key in local
    assert local["status"] == "passed", local["reason"]
    assert local["kernel"] == os.uname().release
    suites = local["suites"]
    assert {"in-guest", "black-box", "host"} <= set(suites)  # later issues add suites
    assert suites["black-box"]["passed"] >= 4 * len(local["backends"])
    # test_host's four, and test_hardening's checks that apply to a local target
    assert suites["host"]["failed"] == 0 and suites["host"]["passed"] >= 4
    assert suites["in-guest"]["passed"] == 1  # the probe; the behaviour suite was deselected
    # The fault suite ran inside the target, only what --inner-k selected: each of the
    # selected tests on every backend of this kernel, and nothing else.
    faults = [t["name"] for t in local["tests"] if t["suite"] == "faults"]
    chosen = INNER_FAULTS.split(" or ")
    assert all(any(c in name for c in chosen) for name in faults), faults
    assert all(any(c in name for name in faults) for c in chosen), faults
    assert suites["faults"]["failed"] == 0 and suites["faults"]["passed"] >= len(chosen)
    ours = [t for t in local["tests"] if t["suite"] in ("in-guest", "black-box", "host")]
    assert all(t["duration"] >= 0 and t["outcome"] in ("passed", "skipped") for t in ours)
    assert all(t["outcome"] == "passed" for t in ours if t["suite"] != "host")
    assert local["timings"]["build"] is not None and local["timings"]["destroy"] is not None
    # Per suite: its tests, wall, the harness's CPU, and the target's CPU for a suite
    # run inside the target (the fault suite here; the behaviour suite is deselected).
    timing = local["suite_timings"]
    assert set(timing) == set(suites)
    for name, entry in timing.items():
        assert entry["tests"] == sum(suites[name].values()), (name, entry, suites[name])
        assert entry["wall_s"] >= 0 and entry["harness_cpu_s"] >= 0
    # The target's bring-up ran inside its first test's setup: the suites' walls leave
    # it out, so together they fit in the lifecycle's "test" step.
    assert sum(e["wall_s"] for e in timing.values()) <= local["timings"]["test"] + 1.0
    assert timing["faults"]["target_cpu_s"] > 0 and timing["faults"]["wall_s"] > 0
    assert timing["black-box"]["target_cpu_s"] is None
    assert timing["black-box"]["harness_cpu_s"] > 0

    docker = by_name["debian-12"]
    assert docker["status"] == "not run"
    assert docker["reason"].startswith("no Docker engine (")
    assert all(t["outcome"] == "skipped" for t in docker["tests"])
    assert "not run: no Docker engine (" in proc.stdout


def test_suite_timings_leave_out_the_lifecycle_and_keep_the_wrappers_time() -> None:
    from harness.results import suite_timings_of
    tests = [
        # The first test's setup brought the target up (7 s of its 10 s).
        {"suite": "black-box", "duration": 10.0, "harness_cpu": 0.5, "lifecycle": 7.0},
        {"suite": "black-box", "duration": 2.0, "harness_cpu": 0.25, "lifecycle": 0.0},
        # The in-guest wrapper: its whole suite's time, before its inner tests replace it.
        {"suite": "faults", "duration": 40.0, "harness_cpu": 1.0},
    ]
    records = {"suite_cpu:faults": {"wall_s": 39.5, "cpu_s": 30.0}}
    got = suite_timings_of(tests, records)
    assert got["black-box"] == {"tests": 0, "wall_s": 5.0, "harness_cpu_s": 0.75,
                                "target_cpu_s": None}
    assert got["faults"] == {"tests": 0, "wall_s": 40.0, "harness_cpu_s": 1.0,
                             "target_cpu_s": 30.0}


def test_a_failing_target_fails_the_run(tmp_path: Path) -> None:
    # kqueue on Linux: the server refuses the backend, so the target never gets healthy.
    other = "kqueue" if sys.platform.startswith("linux") else "epoll"
    targets = tmp_path / "targets.toml"
    targets.write_text(f'[[target]]\nname = "broken"\nkind = "local"\nos_family = "host"\n'
                       f'backends = ["select", "{other}"]\n')
    proc, reports = run_harness(tmp_path, "--targets-file", str(targets), "-n", "1",
                                "--dist", "loadgroup", "-k", "round_trip or probe")
    assert proc.returncode == 1, proc.stdout[-3000:]
    target = load_results(reports)["targets"][0]
    assert target["status"] == "failed"
    assert "healthy" in target["reason"]
    assert target["suites"]["black-box"]["failed"] >= 1
    assert list((reports / "latest" / "targets" / "broken" / "logs").glob("*.log"))


def test_unknown_target_is_a_one_line_usage_error(tmp_path: Path) -> None:
    proc, _ = run_harness(tmp_path, "--targets", "local,nope")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "Traceback" not in proc.stderr
    assert "unknown target(s) nope; known targets: local, debian-12" in proc.stderr


def test_a_target_off_the_critical_path_is_tested_in_the_background(tmp_path: Path) -> None:
    # Two local targets side by side: the heavier is the run's critical path and keeps
    # the run's priority; the lighter one's worker is niced (harness.scheduling).
    targets = tmp_path / "targets.toml"
    targets.write_text("".join(
        f'[[target]]\nname = "{name}"\nkind = "local"\nos_family = "host"\n'
        f'backends = ["select"]\nweight = {weight}\n' for name, weight in
        (("light", 1), ("heavy", 3))))
    proc, reports = run_harness(tmp_path, "--targets-file", str(targets), "-n", "2",
                                "--dist", "loadgroup", "-k", "round_trip")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    by_name = {t["name"]: t for t in load_results(reports)["targets"]}
    started_at = os.getpriority(os.PRIO_PROCESS, 0)
    assert by_name["heavy"]["cpu_priority"] == {
        "policy": "critical-path", "background": False, "nice": started_at,
        "cpu_shares": None}
    assert by_name["light"]["cpu_priority"] == {
        "policy": "critical-path", "background": True, "nice": max(started_at, 10),
        "cpu_shares": 110}
    # IOMUX_CPU_PRIORITY=equal: both at the run's own priority; a wrong value is one line.
    proc, reports = run_harness(tmp_path, "--targets-file", str(targets), "-n", "2",
                                "--dist", "loadgroup", "-k", "round_trip",
                                env={"IOMUX_CPU_PRIORITY": "equal"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    priorities = [t["cpu_priority"] for t in load_results(reports)["targets"]]
    assert [(p["policy"], p["background"], p["nice"]) for p in priorities] == [
        ("equal", False, started_at)] * 2
    proc, _ = run_harness(tmp_path, "--targets-file", str(targets), "-k", "round_trip",
                          env={"IOMUX_CPU_PRIORITY": "fast"})
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "Traceback" not in proc.stderr
    assert "IOMUX_CPU_PRIORITY='fast': use one of critical-path, equal" in proc.stderr
