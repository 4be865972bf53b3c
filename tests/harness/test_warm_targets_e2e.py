"""Warm targets end to end, on the real Docker engine: ``--destroy=never`` twice, then
``--destroy=always`` (``pytest -p harness.plugin tests/cross_os`` in a subprocess).

The second run takes over the container the first one kept, instead of building
and starting one; the third takes it over too and destroys it, so that nothing
of the first run is left. A small selection of the suites keeps it quick. The
kept records go to a directory of the test's own (IOMUX_KEPT_DIR).

Between the first and the second run the kept container's owner has exited, so a
sweep that does not read these records (another checkout's harness, or a test that
sweeps the engine directly) may remove it; the test then skips rather than fail,
unless its own runs' sweep did it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_plugin_e2e import load_results, run_harness

from harness.drivers.base import LABEL_RUN
from harness.drivers.docker import DockerDriver

_DRIVER = DockerDriver()
_REASON = _DRIVER.unavailable_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=str(_REASON)), pytest.mark.slow,
              # test_interrupted_runs' runs sweep the engine with a store of their own
              pytest.mark.xdist_group("interrupted-runs")]

QUICK = "round_trip or probe"


def run(tmp_path: Path, policy: str) -> tuple[dict[str, Any], dict[str, Any]]:
    proc, reports = run_harness(
        tmp_path, "--targets", "debian-12", f"--destroy={policy}", "-k", QUICK,
        env={"IOMUX_KEPT_DIR": str(tmp_path / "kept")})
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


def test_a_kept_container_is_reused_then_destroyed(tmp_path: Path) -> None:
    first_run, first = run(tmp_path, "never")
    try:
        assert "reused" not in first and first["timings"]["start"] is not None
        assert len(list((tmp_path / "kept").glob("*.json"))) == 1
        assert leftovers(first_run["run_id"])  # kept

        kept = leftovers(first_run["run_id"])
        if not kept:
            pytest.skip("a concurrent sweep removed the kept container before the second run")
        second_run, second = run(tmp_path, "never")
        swept = " ".join(str(s) for s in second_run["run"]["swept"].get("docker", []))
        assert not any(k.split()[1] in swept for k in kept), swept  # its own sweep spares it
        if second.get("reused") is False and "gone" in second["reuse"]["why"]:
            pytest.skip("a concurrent sweep removed the kept container during the second run")
        assert second["reused"] is True, second.get("reuse")
        reuse = second["reuse"]
        assert reuse["from_run"] == first_run["run_id"]
        # Taken over, not built nor started: its bring-up is the attach alone.
        assert second["timings"]["build"] is None and second["timings"]["start"] is None
        assert second["timings"]["attach"] < 10
        assert reuse["saved_s"] == pytest.approx(
            first["timings"]["build"] + first["timings"]["start"] - reuse["attach_s"], abs=0.5)
        summary = (tmp_path / "reports" / "latest" / "summary.md").read_text()
        assert f"reused the target kept by run {first_run['run_id']}" in summary
        assert "saved" in (tmp_path / "reports" / "latest" / "report.html").read_text()

        _, third = run(tmp_path, "always")
        assert third["reused"] is True and third["timings"]["destroy"] is not None
        assert not list((tmp_path / "kept").glob("*.json"))
        assert leftovers(first_run["run_id"]) == []
    finally:
        _DRIVER.sweep(first_run["run_id"])  # whatever a failed assertion left
