"""iomux.report: the schema, summary.md, report.html, the end-of-run table and merge."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from iomux import report
from iomux.report import ResultsError, schema

REPO = Path(__file__).resolve().parents[2]

# Shapes of DESIGN.md section 7, with figures as a Linux kernel gives them.
LINUX_PROBE = {
    "facts": {"os": "linux", "kernel": "6.1.0-18-amd64"},
    "probes": {
        "wait_cost": {
            "idle_counts": [0, 100, 1000, 10000],
            "backends": {
                "select": [8.7e-07, 6.4e-06, 6.0e-05, None],
                "poll": [5.1e-07, 5.2e-06, 4.8e-05, 6.7e-04],
                "epoll": [6.4e-07, 6.5e-07, 6.3e-07, 6.3e-07],
                "kqueue": [None, None, None, None],
            },
            "notes": {"kqueue": "no select.kqueue on this kernel",
                      "select": "stops at n=10000: ValueError"},
        },
        "level_edge": {
            "waits": 3,
            "byte": {"select": 3, "poll": 3, "epoll": 3, "epoll-et": 1, "kqueue": None, "kqueue-et": None},
            "listen": {"select": 3, "poll": 3, "epoll": 3, "epoll-et": 1, "kqueue": None, "kqueue-et": None},
        },
    },
}


def _target(name: str, kind: str = "docker", status: str = "passed", reason: str | None = None,
            probe: Dict[str, Any] | None = None, failed: int = 0) -> Dict[str, Any]:
    tests: List[Dict[str, Any]] = [
        {"suite": "in-guest", "name": f"test_echo[{b}]", "outcome": "passed", "duration": 0.21}
        for b in ("select", "poll", "epoll", "epoll-et")
    ]
    tests.append({"suite": "in-guest", "name": "test_kqueue_only", "outcome": "skipped", "duration": 0.0})
    tests += [{"suite": "black-box", "name": f"test_round_trip[{b}]", "outcome": "passed", "duration": 0.05}
              for b in ("select", "poll", "epoll")]
    tests += [{"suite": "black-box", "name": f"test_half_close[{i}]", "outcome": "failed", "duration": 1.5}
              for i in range(failed)]
    tests.append({"suite": "host", "name": "test_runs_as_non_root", "outcome": "passed", "duration": 0.4})
    target: Dict[str, Any] = {
        "name": name, "kind": kind, "status": status, "reason": reason,
        "os": "linux", "kernel": "6.1.0-18-amd64", "python": "3.11.2",
        "backends": ["select", "poll", "epoll", "epoll-et"],
        "suites": {
            "in-guest": {"passed": 4, "failed": 0, "skipped": 1},
            "black-box": {"passed": 3, "failed": failed, "skipped": 0},
            "host": {"passed": 1, "failed": 0, "skipped": 0},
        },
        "tests": tests,
        "timings": {"build": 12.5, "start": 0.8, "healthy": 1.1, "test": 20.4, "destroy": 0.6},
    }
    if probe is not None:
        target["probe"] = probe
    if kind == "vagrant":
        target["backends"] = ["select", "poll", "kqueue", "kqueue-et"]
    if status == "not run":
        target.update(os=None, kernel=None, python=None, suites={}, tests=[],
                      timings={"build": None, "start": None, "healthy": None, "test": None, "destroy": None})
    return target


def sample(run_id: str = "20261127T140000Z-a1b2", probe: bool = True) -> Dict[str, Any]:
    """A realistic run: two containers (one failed), one VM that could not run."""
    return {
        "run_id": run_id,
        "started": "2026-11-27T14:00:00+00:00",
        "finished": "2026-11-27T14:00:40+00:00",
        "host": {"hostname": "ci-runner-1", "os": "linux", "kernel": "6.1.0-18-amd64", "python": "3.11.2"},
        "targets": [
            _target("debian-12", probe=LINUX_PROBE if probe else None),
            _target("debian-13", status="failed", reason="1 test failed", failed=1,
                    probe=LINUX_PROBE if probe else None),
            _target("freebsd-14", kind="vagrant", status="not run",
                    reason="vagrant executable was not found on PATH"),
        ],
        "claims": [
            {"id": "fd-setsize", "claim": "select() is limited to FD_SETSIZE fds", "target": "debian-12",
             "observed": 1024, "expected": 1024, "verdict": "agrees", "why": None},
            {"id": "level-edge", "claim": "ET notifies once, LT on every wait", "target": "debian-12",
             "observed": {"epoll": 3, "epoll-et": 1}, "expected": {"epoll": 3, "epoll-et": 1},
             "verdict": "agrees", "why": None},
            {"id": "level-edge", "claim": "ET notifies once, LT on every wait", "target": "debian-13",
             "observed": {"epoll": 3, "epoll-et": 2}, "expected": {"epoll": 3, "epoll-et": 1},
             "verdict": "differs", "why": "a late connection arrived as a second edge"},
            {"id": "kqueue-batch", "claim": "kqueue batches changes in one kevent() call",
             "target": "freebsd-14", "observed": None, "expected": 1,
             "verdict": "not measurable", "why": "target did not run"},
        ],
    }


# ---------------------------------------------------------------- the schema

def test_schema_file_is_packaged_and_valid_draft_2020_12() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(schema.load_schema())
    # One file: the package data the DESIGN names; no stale copy elsewhere.
    assert (REPO / "iomux" / "report" / "results.schema.json").is_file()


@pytest.fixture(params=["jsonschema", "builtin"])
def validator(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a schema test with jsonschema and again with the stdlib fallback."""
    if request.param == "jsonschema":
        pytest.importorskip("jsonschema")
    else:
        # None in sys.modules makes `import jsonschema` raise ImportError.
        monkeypatch.setitem(sys.modules, "jsonschema", None)
    return str(request.param)


def test_schema_accepts_a_realistic_run(validator: str) -> None:
    report.validate(sample())


def test_schema_accepts_extra_fields_later_issues_add(validator: str) -> None:
    doc = sample()
    doc["faults"] = [{"id": "x"}]
    doc["targets"][0]["faults"] = {"killed": 1}
    doc["targets"][0]["suites"]["faults"] = {"passed": 1, "failed": 0, "skipped": 0, "error": 0}
    report.validate(doc)


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda d: d["targets"][1].__setitem__("status", "bogus"), "/targets/1/status"),
        (lambda d: d["targets"][2].__setitem__("reason", None), "/targets/2/reason"),
        (lambda d: d["targets"][0]["suites"]["host"].__setitem__("failed", -1), "/targets/0/suites/host/failed"),
        (lambda d: d["targets"][0]["tests"][0].__setitem__("outcome", "ok"), "/targets/0/tests/0/outcome"),
        (lambda d: d["claims"][0].__setitem__("verdict", "maybe"), "/claims/0/verdict"),
        (lambda d: d["targets"][0].pop("kind"), "/targets/0"),
        (lambda d: d.pop("run_id"), "(document root)"),
    ],
)
def test_schema_rejects_and_names_the_place(validator: str, mutate: Any, where: str) -> None:
    doc = sample()
    mutate(doc)
    with pytest.raises(ResultsError) as info:
        report.validate(doc)
    message = str(info.value)
    assert message.startswith(where + ":"), message
    assert "\n" not in message


# ---------------------------------------------------------------- write_run

def test_write_run_writes_the_three_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "reports" / "run-1"
    report.write_run(run_dir, sample())
    assert sorted(p.name for p in run_dir.iterdir()) == ["report.html", "results.json", "summary.md"]
    assert json.loads((run_dir / "results.json").read_text()) == sample()


def test_write_run_refuses_a_bad_status_and_keeps_the_data(tmp_path: Path) -> None:
    doc = sample()
    doc["targets"][0]["status"] = "skipped"
    with pytest.raises(ResultsError, match=r"/targets/0/status: 'skipped' is not one of"):
        report.write_run(tmp_path, doc)
    assert not (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "results.invalid.json").read_text())["targets"][0]["status"] == "skipped"


def test_write_run_refuses_what_json_cannot_hold(tmp_path: Path) -> None:
    doc = sample()
    doc["targets"][0]["timings"]["build"] = float("nan")
    with pytest.raises(ResultsError, match="cannot be written as JSON"):
        report.write_run(tmp_path, doc)


# ---------------------------------------------------------------- summary.md and the table

def test_summary_md_has_matrix_reasons_counts_and_claims(tmp_path: Path) -> None:
    report.write_run(tmp_path, sample())
    md = (tmp_path / "summary.md").read_text()
    matrix = md.split("## Targets x backends x suites")[1].split("## Timings")[0]
    rows = {line.split("|")[1].strip(): line for line in matrix.splitlines() if line.startswith("| ")}
    assert "not run: vagrant executable was not found on PATH" in rows["freebsd-14"]
    assert "failed: 1 test failed" in rows["debian-13"]
    # Per suite passed/failed/skipped, in the header's suite order.
    header = rows["target"]
    assert "in-guest (p/f/s) | black-box (p/f/s) | host (p/f/s)" in header
    assert rows["debian-13"].rstrip(" |").endswith("4/0/1 | 3/1/0 | 1/0/0")
    # Backend marks: epoll offered, kqueue not.
    cells = [c.strip() for c in rows["debian-12"].split("|")[1:-1]]
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert cells[columns.index("epoll")] == "yes"
    assert cells[columns.index("kqueue")] == "-"
    # Claims x targets, each cell marked.
    assert "## Claims" in md
    claim_row = next(line for line in md.splitlines() if line.startswith("| level-edge"))
    assert "(agrees)" in claim_row
    # Records without a "cell" (before issue 14): differs reads as an unexpected difference.
    assert "UNEXPECTED, expected epoll=3, epoll-et=1" in claim_row
    assert "not run: target did not run" in md
    assert "debian-13: black-box: test_half_close[0] (failed)" in md


def test_summary_md_without_claims_has_no_claims_table() -> None:
    doc = sample()
    del doc["claims"]
    assert "## Claims" not in report.summary_md(doc)


def test_markdown_cells_escape_pipes() -> None:
    doc = sample()
    doc["targets"][2]["reason"] = "a | b\nc"
    md = report.summary_md(doc)
    assert "not run: a \\| b c" in md


def test_summary_table_is_aligned_and_complete() -> None:
    table = report.summary_table(sample())
    lines = table.splitlines()
    assert lines[0].split() == ["target", "kind", "status", "kernel", "in-guest", "black-box", "host", "build", "s", "total", "s"]
    # The reasons go under the table, one line each, so the table stays narrow.
    assert "freebsd-14: not run: vagrant executable was not found on PATH" in lines
    assert "debian-13: failed: 1 test failed" in lines
    assert re.search(r"debian-13\s+docker\s+failed\s+6\.1\.0-18-amd64\s+4/0/1\s+3/1/0\s+1/0/0\s+12\.5\s+35\.4", table)
    assert max(len(line) for line in lines) <= 120
    # Wall time 40 s against the slowest target's 35.4 s.
    assert "run wall time 40.0 s; slowest target 35.4 s; ratio 1.13x" in table
    assert "targets: 1 passed, 1 failed, 1 not run" in table
    # Columns line up: every row's status column starts where the header's does.
    start = lines[0].index("status")
    assert all(line[start - 2:start] == "  " for line in lines[1:4])


def test_summary_prefers_the_harness_figures(validator: str) -> None:
    doc = sample()
    doc["run"] = {"wall_seconds": 50.0, "slowest_target_seconds": 40.0,
                  "wall_over_slowest": 1.25, "overhead_seconds": 10.0}
    doc["targets"][0]["elapsed"] = 40.0
    report.validate(doc)
    table = report.summary_table(doc)
    assert "run wall time 50.0 s; slowest target 40.0 s; ratio 1.25x; harness overhead 10.0 s (20% of the run)" in table
    assert re.search(r"debian-12 .* 12\.5\s+40\.0$", table, re.M)


# ---------------------------------------------------------------- report.html

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|<link\b|<script\b|@import|url\(""", re.I)


def test_report_html_is_self_contained_with_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report.write_run(tmp_path, sample())
    html = (tmp_path / "report.html").read_text()
    assert not EXTERNAL.search(html), EXTERNAL.search(html)
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 2
    import base64

    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "Wait cost against idle fds" in html and "Level- against edge-triggered" in html
    # The matrix, the claims and the per-target test lists (collapsible).
    assert "not run: vagrant executable was not found on PATH" in html
    assert 'class="cell-unexpected"' in html and 'class="cell-agrees"' in html
    assert html.count("<details") >= 3
    assert "test_half_close[0]" in html
    assert 'href="junit.xml"' not in html


def test_report_html_without_probe_data_has_no_images() -> None:
    from iomux.report import page

    html = page.report_html(sample(probe=False))
    assert "data:image/png" not in html
    assert "nothing to plot" in html


def test_report_html_says_when_matplotlib_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from iomux.report import page

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    html = page.report_html(sample())
    assert "plots not drawn: matplotlib is not installed" in html
    assert "data:image/png" not in html


def test_report_html_tolerates_malformed_probe_output() -> None:
    pytest.importorskip("matplotlib")
    from iomux.report import page

    doc = sample()
    doc["targets"][0]["probe"] = {"probes": {"wait_cost": {"idle_counts": [0, 1], "backends": {"epoll": [1]}},
                                             "level_edge": {"error": "OSError: boom"}}}
    html = page.report_html(doc)
    assert "debian-12: wait_cost[epoll] does not match idle_counts" in html
    assert "debian-12: the level_edge probe failed: OSError: boom" in html
    # debian-13's probe is intact: both plots are still drawn from it.
    assert html.count("data:image/png;base64,") == 2


def test_a_failing_plot_becomes_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from iomux.report import page, plots

    def broken(series: Any) -> Any:
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "_wait_cost_plot", broken)
    doc = sample()
    doc["targets"][1]["probe"] = {"probes": {"wait_cost": {"idle_counts": [0], "backends": {"epoll": [None]}}}}
    html = page.report_html(doc)
    assert "wait cost plot not drawn: RuntimeError: no fonts" in html
    assert "debian-13: wait_cost measured nothing" in html
    assert html.count("data:image/png;base64,") == 1  # level/edge is still drawn


def test_report_html_links_junit_and_escapes(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text("<testsuites/>")
    doc = sample(probe=False)
    doc["targets"][2]["reason"] = "<script>alert(1)</script>"
    report.write_run(tmp_path, doc)
    html = (tmp_path / "report.html").read_text()
    assert 'href="junit.xml"' in html
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_report_html_links_junit_named_by_the_run() -> None:
    # pytest may write junit.xml after the report: the run can name it instead.
    from iomux.report import page

    doc = sample(probe=False)
    assert 'href="junit.xml"' not in page.report_html(doc)
    doc["junit"] = "junit.xml"
    assert '<a href="junit.xml">junit.xml</a>' in page.report_html(doc)


# ---------------------------------------------------------------- merge

def test_merge_keeps_both_targets_of_one_name() -> None:
    a, b = sample("run-a"), sample("run-b")
    b["targets"] = [*b["targets"][:1], _target("alpine-3.20")]
    b["claims"] = b["claims"][:1]
    merged = report.merge([a, b], ["a.json", "b.json"])
    names = [t["name"] for t in merged["targets"]]
    assert names == ["debian-12@run-a", "debian-13", "freebsd-14", "debian-12@run-b", "alpine-3.20"]
    assert [t["source"] for t in merged["targets"]] == ["run-a"] * 3 + ["run-b"] * 2
    # Claims follow their target's new name.
    assert [c["target"] for c in merged["claims"]] == [
        "debian-12@run-a", "debian-12@run-a", "debian-13", "freebsd-14", "debian-12@run-b"]
    assert [s["run_id"] for s in merged["merged_from"]] == ["run-a", "run-b"]
    assert merged["run_id"] == "merged-run-a+run-b"
    report.validate(merged)
    # Merging a merge lists the original runs, and the inputs are untouched.
    again = report.merge([merged, sample("run-c")])
    assert [s["run_id"] for s in again["merged_from"]] == ["run-a", "run-b", "run-c"]
    assert a == sample("run-a")


def test_merge_main_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = []
    for run_id in ("run-a", "run-b"):
        path = tmp_path / f"{run_id}.json"
        path.write_text(json.dumps(sample(run_id)))
        paths.append(str(path))
    out = tmp_path / "merged" / "all.json"
    assert report.merge_main(paths, str(out)) == 0
    merged = json.loads(out.read_text())
    assert len(merged["targets"]) == 6
    assert (out.parent / "summary.md").is_file()
    html = (out.parent / "report.html").read_text()
    assert 'href="all.json"' in html
    assert "debian-12@run-b" in (out.parent / "summary.md").read_text()
    assert "merged 2 files (6 targets)" in capsys.readouterr().out


def test_merge_main_default_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(sample()))
    monkeypatch.chdir(tmp_path)
    assert report.merge_main([str(path)], None) == 0
    assert (tmp_path / "merged-report" / "results.json").is_file()
    assert report.merge_main([str(path)], "other") == 0
    assert (tmp_path / "other" / "report.html").is_file()


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (None, "cannot read: No such file or directory"),
        ("{not json", "not a JSON file"),
        ("[]", "not an iomux results file: (document root)"),
        ("BAD_STATUS", "not an iomux results file: /targets/0/status"),
    ],
)
def test_merge_main_bad_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expect: str
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(sample()))
    bad = tmp_path / "bad.json"
    if content == "BAD_STATUS":
        doc = sample()
        doc["targets"][0]["status"] = "green"
        content = json.dumps(doc)
    if content is not None:
        bad.write_text(content)
    out = tmp_path / "out"
    assert report.merge_main([str(good), str(bad)], str(out)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"iomux: error: {bad}: {expect}"), lines[0]
    assert not out.exists()


def test_merge_main_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert report.merge_main([], None) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ---------------------------------------------------------------- standard library only

def test_package_works_with_the_standard_library_only(tmp_path: Path) -> None:
    """Without site-packages (no jsonschema, no matplotlib) the report still works."""
    script = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from iomux import report
doc = json.loads(sys.stdin.read())
report.write_run(Path({str(tmp_path)!r}), doc)
doc["targets"][0]["status"] = "nope"
try:
    report.write_run(Path({str(tmp_path / 'bad')!r}), doc)
except report.ResultsError as exc:
    print("refused:", exc)
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in ("jsonschema", "matplotlib")))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script], input=json.dumps(sample()), capture_output=True,
        text=True, timeout=60, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: results do not follow results.schema.json: /targets/0/status: 'nope'" in proc.stdout
    assert "loaded: []" in proc.stdout
    html = (tmp_path / "report.html").read_text()
    assert "plots not drawn: matplotlib is not installed" in html
    assert "data:image/png" not in html


def test_sample_is_not_mutated_by_writers(tmp_path: Path) -> None:
    doc = sample()
    before = copy.deepcopy(doc)
    report.write_run(tmp_path, doc)
    report.summary_table(doc)
    assert doc == before


def test_suite_timings_say_whether_a_suite_waits_or_computes(tmp_path: Path,
                                                             validator: str) -> None:
    doc = sample()
    doc["targets"][0]["suite_timings"] = {
        "in-guest": {"tests": 5, "wall_s": 40.0, "harness_cpu_s": 0.5, "target_cpu_s": 30.0,
                     "workers": 2},
        "black-box": {"tests": 3, "wall_s": 8.0, "harness_cpu_s": 0.4, "target_cpu_s": None},
    }
    report.write_run(tmp_path, doc)
    md = (tmp_path / "summary.md").read_text()
    table = md.split("## Suite timings (seconds)")[1]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| debian-12")]
    # The in-guest suite's own CPU in the target is its measure; elsewhere the harness's.
    assert ["debian-12", "black-box", "3", "8.0", "0.4", "", "0.05", ""] in rows
    assert ["debian-12", "in-guest", "5", "40.0", "0.5", "30.0", "0.75", "2"] in rows
    assert not [line for line in table.splitlines() if line.startswith("| debian-13")]
    page = (tmp_path / "report.html").read_text()
    assert 'id="suite-timings"' in page and "<td class=\"num\">0.75</td>" in page
    broken = json.loads(json.dumps(doc))
    broken["targets"][0]["suite_timings"]["in-guest"].pop("target_cpu_s")
    with pytest.raises(ResultsError, match=r"^/targets/0/suite_timings/in-guest"):
        report.validate(broken)
    broken = json.loads(json.dumps(doc))
    broken["targets"][0]["suite_timings"]["in-guest"]["workers"] = 0
    with pytest.raises(ResultsError, match=r"^/targets/0/suite_timings/in-guest/workers"):
        report.validate(broken)


def test_a_reuse_that_saved_nothing_is_said_not_dropped() -> None:
    from iomux.report import model

    def target(first: float | None, saved: float) -> dict[str, object]:
        # As harness/warm_targets.py records it: saved_s = max(0, first - attach).
        return {"name": "debian-12", "reused": True,
                "reuse": {"reused": True, "from_run": "r1", "attach_s": 1.2,
                          "first_bring_up_s": first, "saved_s": saved}}
    assert model.reuse_line(target(41.2, 40.0)) == (
        "debian-12: reused the target kept by run r1, attached in 1.2 s, "
        "saved 40.0 s of build and start")
    # A cached image builds in 0.2 s and a container starts in 0.4 s: attaching
    # for 1.2 s saved nothing, and the line says by how much.
    assert model.reuse_line(target(0.6, 0.0)) == (
        "debian-12: reused the target kept by run r1, attached in 1.2 s, "
        "saved nothing: 0.6 s more than its first build and start")
    assert model.reuse_line(target(None, 0.0)) == (
        "debian-12: reused the target kept by run r1, attached in 1.2 s, saved nothing")


def test_a_run_of_a_selection_of_the_inner_suites_says_so() -> None:
    doc = sample()
    assert "--inner-k" not in report.summary_md(doc)
    doc.setdefault("run", {})["inner_selection"] = "round_trip or sha256"
    md = report.summary_md(doc)
    assert "- inner suites: only the tests that -k 'round_trip or sha256' selects (--inner-k)" in md
    from iomux.report import page
    assert "only the tests that -k" in page.report_html(doc)
