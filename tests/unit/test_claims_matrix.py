"""The kernel x claim matrix (issue 14): expected.json's kernel dimension, the
two questions per cell, and the claims suite failing on an unexpected
difference.

The observations under claims_data/ were recorded here with ``iomux probe
--json``: on the host (Linux 6.18) and under gVisor 20221219 and 20240729
(``runsc --rootless --network=none do``). The contradicting observation of
the last tests is of our own making: gVisor 2022's recording with one
answer replaced by Linux's.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List

import pytest

from iomux import facts
from iomux.probes import claims

DATA = Path(__file__).resolve().parent / "claims_data"
REPO = Path(__file__).resolve().parents[2]
GVISOR_2022 = "0.0~20221219.0-2+b3"
GVISOR_2024 = "0.0~20240729.0-4+b7"


def _recorded(name: str) -> Dict[str, Any]:
    doc: Dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return doc


def _by_id(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {r["id"]: r for r in records}


def _versions_to_try(claim: Dict[str, Any]) -> List[Any]:
    # Every boundary of every range, and "current" (None).
    found: List[Any] = [None]
    for raw in claim.get("expected", {}).values():
        for entry in raw if isinstance(raw, list) else [raw]:
            for bound in (entry.get("versions") or {}).values():
                found += [bound, bound + ".0.1" if "." in bound else str(int(bound) - 1)]
    return found


# -- expected.json as data ---------------------------------------------------------

def test_every_difference_from_linux_has_a_one_line_reason() -> None:
    for claim in claims.load_expected():
        for kernel in claims.KERNELS:
            for version, platform in [(v, p) for v in _versions_to_try(claim)
                                      for p in ("native", "uml")]:
                try:
                    exp = claims.expectation_for(claim, kernel, version, platform)
                except claims._Unknown as exc:
                    assert str(exc), (claim["id"], kernel)
                    continue
                if claims.differs_from_linux(claim, exp):
                    reason = exp.get("reason")
                    assert isinstance(reason, str) and reason.strip(), (claim["id"], kernel, version)
                    assert "\n" not in reason and len(reason) <= 200, (claim["id"], kernel)


def test_kernel_keys_and_version_ranges_are_known() -> None:
    for claim in claims.load_expected():
        for key, raw in claim.get("expected", {}).items():
            assert {k.strip() for k in key.split(",")} <= set(claims.KERNELS), (claim["id"], key)
            for entry in raw if isinstance(raw, list) else [raw]:
                assert set(entry.get("versions") or {}) <= {"min", "below"}, claim["id"]
                assert set(entry) <= {"versions", "platform", "reason", "requires", "checks",
                                      "as", "unknown"}
                if "as" in entry:
                    assert entry["as"] in ("linux", "predicts"), claim["id"]


def test_version_key_reads_linux_and_gvisor_versions() -> None:
    assert claims.version_key("6.1.0-18-amd64") == (6, 1, 0)
    assert claims.version_key("6.12.0um1") == (6, 12, 0)
    assert claims.version_key("4.19.0") < claims.version_key("4.20") < claims.version_key("5.3")
    assert claims.version_key(GVISOR_2022) == (20221219, 0)
    assert claims.version_key(GVISOR_2022) < claims.version_key("20240729")
    assert claims.version_key(GVISOR_2024) >= claims.version_key("20240729")


# -- recorded observations ---------------------------------------------------------

def test_host_recording_agrees_everywhere_it_can_be_measured() -> None:
    got = _by_id(claims.evaluate("local", "linux", _recorded("linux-6.18-host"),
                                 kernel="linux", kernel_version="6.18.44"))
    cells = {cid: r["cell"] for cid, r in got.items()}
    assert set(cells.values()) <= {claims.CELL_AGREES, claims.CELL_NOT_RUN}, cells
    # Below 4 cores, whether workers scale is not measurable, and says why.
    assert got["workers-scale"]["cell"] == claims.CELL_NOT_RUN
    assert got["workers-scale"]["why"].startswith("2 cores")
    assert got["event-loop-one-core"]["cell"] == claims.CELL_AGREES


@pytest.mark.parametrize(("recording", "version", "least"),
                         [("gvisor-20221219", GVISOR_2022, 8), ("gvisor-20240729", GVISOR_2024, 7)])
def test_gvisor_recordings_show_only_expected_differences(recording: str, version: str,
                                                          least: int) -> None:
    records = claims.evaluate("gvisor", "linux", _recorded(recording), kernel="gvisor",
                              kernel_version=version)
    assert claims.unexpected(records) == []
    expected = [r for r in records if r["cell"] == claims.CELL_EXPECTED]
    assert len(expected) >= least, [r["id"] for r in expected]
    for r in expected:
        assert r["matches"] is True and r["expected_reason"], r["id"]
        # A difference from Linux refutes the claim where the claim is Linux's answer.
        assert r["claim_verdict"] == claims.REFUTED, r["id"]


def test_the_two_questions_are_kept_apart() -> None:
    got = _by_id(claims.evaluate("gvisor", "linux", _recorded("gvisor-20221219"),
                                 kernel="gvisor", kernel_version=GVISOR_2022))
    half = got["halfclose-events"]
    assert half["claim_verdict"] == claims.REFUTED and "EPOLLRDHUP" in half["claim_why"]
    assert half["matches"] is True and half["verdict"] == claims.AGREES
    assert half["cell"] == claims.CELL_EXPECTED
    assert half["observed"]["halfclose.epoll.events"] == ["EPOLLIN"]
    # gVisor 2024 sets EPOLLRDHUP: the same claim agrees with Linux there.
    got24 = _by_id(claims.evaluate("gvisor", "linux", _recorded("gvisor-20240729"),
                                   kernel="gvisor", kernel_version=GVISOR_2024))
    assert got24["halfclose-events"]["cell"] == claims.CELL_AGREES
    assert got24["halfclose-events"]["claim_verdict"] == claims.HOLDS


def test_linux_version_ranges() -> None:
    doc = _recorded("linux-6.18-host")
    nopidfd = copy.deepcopy(doc)
    nopidfd["probes"]["nonfile_events"]["process_exit"]["pidfd"] = {
        "available": False, "why": "pidfd_open failed: ENOSYS"}
    old = _by_id(claims.evaluate("old", "linux", nopidfd, kernel="linux", kernel_version="4.19.0"))
    assert old["nonfile-process-exit"]["cell"] == claims.CELL_EXPECTED
    assert "5.3" in old["nonfile-process-exit"]["expected_reason"]
    new = _by_id(claims.evaluate("new", "linux", nopidfd, kernel="linux", kernel_version="6.1.0"))
    assert new["nonfile-process-exit"]["cell"] == claims.CELL_UNEXPECTED


# -- a contradicting observation of our own making fails the claims judgement -------

def _contradicting() -> Dict[str, Any]:
    doc = _recorded("gvisor-20221219")
    # Linux's answer where gVisor 2022 is expected to give its own.
    doc["probes"]["halfclose_reset"]["halfclose"]["epoll"]["events"] = ["EPOLLIN", "EPOLLRDHUP"]
    return doc


def test_a_contradicted_expectation_is_an_unexpected_difference() -> None:
    records = claims.evaluate("gvisor-2022", "linux", _contradicting(), kernel="gvisor",
                              kernel_version=GVISOR_2022)
    got = _by_id(records)
    assert got["halfclose-events"]["cell"] == claims.CELL_UNEXPECTED
    assert got["halfclose-events"]["matches"] is False
    # The write-up's claim holds on this observation: the second question fails alone.
    assert got["halfclose-events"]["claim_verdict"] == claims.HOLDS
    bad = claims.unexpected(records)
    assert len(bad) == 1 and bad[0].startswith("gvisor-2022 halfclose-events")
    assert "EPOLLRDHUP" in bad[0]


def _claims_suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "cross_os_test_claims", REPO / "tests" / "cross_os" / "test_claims.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_claims_suite_fails_and_names_the_unexpected_difference() -> None:
    suite = _claims_suite()
    records = claims.evaluate("gvisor-2022", "linux", _contradicting(), kernel="gvisor",
                              kernel_version=GVISOR_2022)
    run = suite.ProbeRun(0, 1.0, "", _contradicting(), {r["id"]: r for r in records})
    with pytest.raises(AssertionError, match="gvisor-2022 halfclose-events"):
        suite.test_no_unexpected_difference(run)
    with pytest.raises(AssertionError, match="unexpected difference"):
        suite.test_claim_matches_kernel_expectation(run, "halfclose-events")
    # The untouched recording passes the same tests.
    good = claims.evaluate("gvisor-2022", "linux", _recorded("gvisor-20221219"),
                           kernel="gvisor", kernel_version=GVISOR_2022)
    suite.test_no_unexpected_difference(suite.ProbeRun(
        0, 1.0, "", _recorded("gvisor-20221219"), {r["id"]: r for r in good}))


def test_the_claims_suite_fails_when_the_detected_kernel_is_not_the_declared_one() -> None:
    from harness.drivers.base import Target

    suite = _claims_suite()
    doc = _recorded("linux-6.18-host")
    target = Target(name="gvisor-2022", kind="gvisor", os_family="linux",
                    backends=("epoll",), options={"kernel": "gvisor"})
    run = suite.ProbeRun(0, 1.0, "", doc, {"x": {}})
    with pytest.raises(AssertionError, match="declares kernel 'gvisor' but the probe run detected 'linux'"):
        suite.test_detected_kernel_is_the_declared_one(run, target)
    suite.test_detected_kernel_is_the_declared_one(run, Target(
        name="local", kind="local", os_family="linux", backends=("epoll",)))


# -- kernel identity ---------------------------------------------------------------

def test_gvisor_is_told_by_its_fixed_uname(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.uname()
    fake = type(real)((real.sysname, real.nodename, facts.GVISOR_RELEASE,
                       facts.GVISOR_VERSION, real.machine))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "uname", lambda: fake)
    assert facts.kernel_identity()["family"] == "gvisor"


def test_this_kernel_is_identified() -> None:
    found = facts.collect()
    assert found["kernel_family"] in ("linux", "gvisor", "freebsd", "darwin")
    assert found["kernel_evidence"]
    if sys.platform.startswith("linux") and found["kernel"] != facts.GVISOR_RELEASE:
        assert found["kernel_family"] == "linux"


def test_records_match_the_results_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO / "iomux" / "report" / "results.schema.json").read_text())
    claim_schema = {"$ref": "#/$defs/claim", "$defs": schema["$defs"]}
    for name, version in (("gvisor-20221219", GVISOR_2022), ("linux-6.18-host", "6.18.44")):
        for record in claims.evaluate("t", "linux", _recorded(name),
                                      kernel="gvisor" if "gvisor" in name else "linux",
                                      kernel_version=version):
            jsonschema.validate(record, claim_schema)


# -- the report: grid, differences, slowdown ---------------------------------------

def _results() -> Dict[str, Any]:
    def target(name: str, kind: str, recording: str, kernel: str, version: str,
               test_s: float) -> Dict[str, Any]:
        doc = _recorded(recording)
        doc["probe_wall_s"] = 10.0 if kind == "local" else 20.0
        return {"name": name, "kind": kind, "status": "passed", "reason": None, "os": "linux",
                "kernel": doc.get("kernel"), "python": "3.11", "backends": ["epoll"],
                "suites": {"in-guest": {"passed": 1, "failed": 0, "skipped": 0}},
                "tests": [{"suite": "in-guest", "name": f"test_in_guest.py::test_behaviour_suite[{name}]",
                           "outcome": "passed", "duration": test_s}],
                "timings": {"build": 0.0, "start": 0.1, "healthy": 0.1, "test": 1.0, "destroy": 0.1},
                "probe": doc, "_kernel": (kernel, version)}
    tlist = [target("local", "local", "linux-6.18-host", "linux", "6.18.44", 10.0),
             target("gvisor-2022", "gvisor", "gvisor-20221219", "gvisor", GVISOR_2022, 40.0)]
    records: List[Dict[str, Any]] = []
    for t in tlist:
        kernel, version = t.pop("_kernel")
        records += claims.evaluate(t["name"], "linux", t["probe"], kernel=kernel,
                                   kernel_version=version)
    return {"run_id": "r1", "started": "2026-12-01T20:00:00+00:00",
            "finished": "2026-12-01T20:01:00+00:00", "host": {}, "targets": tlist, "claims": records}


def test_summary_lists_every_difference_from_linux_on_one_line() -> None:
    from iomux.report import model, text

    results = _results()
    md = text.summary_md(results)
    diffs = model.differences(results)
    expected = [r for r in results["claims"] if r["cell"] == claims.CELL_EXPECTED]
    assert len(diffs) == len(expected) >= 8
    half = next(d for d in diffs if d.startswith("gvisor-2022 halfclose-events: "))
    assert "'EPOLLIN'" not in half and "[EPOLLIN]" in half
    assert "(linux: halfclose.epoll.events=[EPOLLIN, EPOLLRDHUP]" in half
    for line in diffs:
        assert f"- {line}"[:60] in md
    assert "## Differences from Linux" in md and "## Slowdown against the host (local)" in md


def test_report_grid_cells_are_coloured_and_open_to_their_figures(tmp_path: Path) -> None:
    from iomux.report import model, page, write

    results = _results()
    write.write_run(tmp_path, results)
    html = (tmp_path / "report.html").read_text()
    grid = page._claims(results)
    assert grid.count('<td class="cell-expected">') == len(model.differences(results))
    assert '<td class="cell-agrees">' in grid and '<td class="cell-notrun">' in grid
    assert "<details><summary>expected difference</summary>" in grid
    assert "why it differs from Linux" in grid and "the write-up&#x27;s claim" in grid
    assert "Slowdown against the host" in html
    host, slow = model.slowdown(results)
    assert host == "local" and slow[0][0] == "gvisor-2022"
    assert slow[0][1]["in-guest tests (median)"] == 4.0
    assert slow[0][1]["probe suite wall"] == 2.0
    assert slow[0][1]["epoll_wait, 1 fd"] > 1.0


def test_an_unexpected_difference_is_red_in_the_grid() -> None:
    from iomux.report import page

    results = _results()
    records = claims.evaluate("gvisor-2022", "linux", _contradicting(), kernel="gvisor",
                              kernel_version=GVISOR_2022)
    results["claims"] = [r for r in results["claims"] if r["target"] != "gvisor-2022"] + records
    grid = page._claims(results)
    assert grid.count('<td class="cell-unexpected">') == 1
    assert "<summary>UNEXPECTED</summary>" in grid


def test_merge_keeps_the_new_record_fields(tmp_path: Path) -> None:
    from iomux.report import merge_main

    a, b = _results(), _results()
    b["run_id"] = "r2"
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    out = tmp_path / "m.json"
    assert merge_main([str(pa), str(pb)], str(out)) == 0
    merged = json.loads(out.read_text())
    cells = {(r["target"], r["id"]): r["cell"] for r in merged["claims"]}
    assert cells[("gvisor-2022@r2", "halfclose-events")] == claims.CELL_EXPECTED
    assert "Differences from Linux" in (tmp_path / "summary.md").read_text()


def test_a_platform_entry_holds_only_on_its_platform() -> None:
    doc = _recorded("linux-6.18-host")
    slow = copy.deepcopy(doc)
    # UML-like figures: a fixed 50 us per call that hides select's scan.
    slow["probes"]["wait_cost"]["backends"]["select"] = [5.1e-05, 6.5e-05, 1.29e-04, None]
    uml = _by_id(claims.evaluate("uml", "linux", slow, kernel="linux", kernel_version="6.12.113",
                                 kernel_platform="uml"))
    assert uml["select-poll-cost-grows"]["cell"] == claims.CELL_EXPECTED
    assert "ptrace" in uml["select-poll-cost-grows"]["expected_reason"]
    assert uml["select-poll-cost-grows"]["claim_verdict"] == claims.REFUTED
    native = _by_id(claims.evaluate("vm", "linux", slow, kernel="linux", kernel_version="6.12.113",
                                    kernel_platform="native"))
    assert native["select-poll-cost-grows"]["cell"] == claims.CELL_UNEXPECTED
    # A UML run that happens to show Linux's answer agrees with Linux.
    same = _by_id(claims.evaluate("uml", "linux", doc, kernel="linux", kernel_version="6.12.113",
                                  kernel_platform="uml"))
    assert same["select-poll-cost-grows"]["cell"] == claims.CELL_AGREES
    assert same["select-poll-cost-grows"]["expected_reason"] is None
