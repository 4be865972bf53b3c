"""Warm targets end to end, on the real Docker engine: ``--destroy=never`` twice, then
``--destroy=always`` (``pytest -p harness.plugin tests/cross_os`` in a subprocess).

The second run takes over the container the first one kept, instead of building
and starting one; the third takes it over too and destroys it, so that nothing
of the first run is left. A small selection of the suites keeps it quick. The
kept records go to the test session's store (conftest.py), which every
harness run of the session reads: between the first and the second run the kept
container's owner has exited, and their sweeps spare it for that store's record.
The one test that sweeps the engine directly, without a store, is in this test's
xdist group, so it never runs at the same time.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pytest
from test_plugin_e2e import load_results, run_harness

from harness import kept_targets
from harness.drivers.base import LABEL_RUN
from harness.drivers.docker.driver import DockerDriver
from iomux.report import model

_DRIVER = DockerDriver()
_REASON = _DRIVER.unavailable_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=str(_REASON)), pytest.mark.slow,
              # test_interrupted_runs' runs sweep the engine with a store of their own
              pytest.mark.xdist_group("interrupted-runs")]

QUICK = "round_trip or probe"


def run(tmp_path: Path, policy: str) -> tuple[dict[str, Any], dict[str, Any]]:
    proc, reports = run_harness(
        tmp_path, "--targets", "debian-12", f"--destroy={policy}", "-k", QUICK)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    results = load_results(reports)
    assert results["run"]["destroy"] == policy
    assert results["run"]["keep_targets"] is (policy == "never")
    target: dict[str, Any] = results["targets"][0]
    assert target["status"] == "passed", target["reason"]
    return results, target


def leftovers(run_id: str) -> list[str]:
    client = _DRIVER.client()
    labels = {"label": [f"{LABEL_RUN}={run_id}"]}
    return ([f"container {c.name}" for c in client.containers.list(all=True, filters=labels)]
            + [f"network {n.name}" for n in client.networks.list(filters=labels)])


def records_of(run_id: str) -> list[kept_targets.KeptRecord]:
    """The session store's records of what ``run_id`` kept."""
    return [r for r in kept_targets.records() if r.kept_by_run == run_id]


def test_a_kept_container_is_reused_then_destroyed(tmp_path: Path) -> None:
    first_run, first = run(tmp_path, "never")
    try:
        assert "reused" not in first and first["timings"]["start"] is not None
        assert len(records_of(first_run["run_id"])) == 1
        kept = leftovers(first_run["run_id"])
        assert kept  # kept
        second_run, second = run(tmp_path, "never")
        swept = " ".join(str(s) for s in second_run["run"]["swept"].get("docker", []))
        assert not any(k.split()[1] in swept for k in kept), swept  # its own sweep spares it
        assert second["reused"] is True, second.get("reuse")
        reuse = second["reuse"]
        assert reuse["from_run"] == first_run["run_id"]
        # Taken over, not built nor started: its bring-up is the attach alone.
        assert second["timings"]["build"] is None and second["timings"]["start"] is None
        assert second["timings"]["attach"] < 10
        # The seconds saved, never below zero: from a cached image, the first run's
        # build and start (about 0.8 s) can be shorter than the attach, and then the
        # page says "saved nothing" (model.reuse_line), as a cold .ci/run found.
        first_bring_up = first["timings"]["build"] + first["timings"]["start"]
        assert reuse["saved_s"] == pytest.approx(
            max(0.0, first_bring_up - reuse["attach_s"]), abs=0.5)
        summary = (tmp_path / "reports" / "latest" / "summary.md").read_text()
        assert f"reused the target kept by run {first_run['run_id']}" in summary
        line = model.reuse_line(second)
        assert line and ", saved " in line, line
        assert html.escape(line) in (tmp_path / "reports" / "latest" / "report.html").read_text()

        _, third = run(tmp_path, "always")
        assert third["reused"] is True and third["timings"]["destroy"] is not None
        assert records_of(first_run["run_id"]) == []
        assert leftovers(first_run["run_id"]) == []
    finally:
        _DRIVER.sweep(first_run["run_id"])  # whatever a failed assertion left
