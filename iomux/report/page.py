"""report.html: one self-contained page a person can open from the report directory.

Self-contained means inline CSS and plots embedded as base64 PNG: the file can
be mailed, attached to a CI job or opened offline, and it loads nothing from
anywhere. The only links are relative ones to the files beside it
(results.json, summary.md, junit.xml).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional

from iomux.report import model, plots, text

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #1d2330; margin: 24px auto; max-width: 1280px; padding: 0 20px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #dde1e7; padding-bottom: 4px; }
.meta { color: #5b6475; margin: 2px 0; }
.chips span { display: inline-block; padding: 2px 10px; border-radius: 10px; margin: 8px 6px 0 0;
              font-weight: 600; font-size: 13px; }
table { border-collapse: collapse; margin: 6px 0 4px; font-size: 13px; }
th, td { border: 1px solid #dde1e7; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f3f5f8; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.mark { text-align: center; }
td.name, td.nowrap { white-space: nowrap; }
.passed, .agrees { background: #e3f4e8; color: #17602f; }
.failed, .differs, .error { background: #fbe4e4; color: #9b1c1c; }
.notrun, .notmeasurable, .skipped { background: #eef0f3; color: #555e6d; }
.xfailed, .xpassed { background: #fff5d6; color: #7a5b00; }
.yes { color: #17602f; font-weight: 700; }
.no { color: #b8bec9; }
.bad { color: #9b1c1c; font-weight: 700; }
.legend { color: #5b6475; font-size: 12px; margin: 2px 0 0; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; border: 1px solid #e6e9ee; }
figcaption { color: #5b6475; font-size: 12.5px; max-width: 900px; }
details { margin: 6px 0; border: 1px solid #dde1e7; border-radius: 6px; padding: 4px 10px; }
details > summary { cursor: pointer; font-weight: 600; padding: 2px 0; }
details details { border: none; padding: 0; }
pre { background: #f6f8fa; padding: 8px; overflow: auto; font-size: 12px; max-height: 360px; }
.note { color: #7a5b00; background: #fff8e1; padding: 6px 10px; border-radius: 4px; }
footer { margin-top: 32px; color: #5b6475; font-size: 12.5px; }
a { color: #1f5fa8; }
/* At a glance: the verdict, the target x suite grid, the timing bars. Nothing is wider
   than the page: wide tables scroll inside their own box, long text wraps. */
.verdict { font-size: 18px; font-weight: 700; padding: 10px 14px; border-radius: 8px;
           margin: 12px 0 8px; }
.badge { display: inline-block; min-width: 64px; padding: 1px 8px; border-radius: 9px;
         font-weight: 600; font-size: 12.5px; text-align: center; white-space: nowrap; }
.grid td.why { color: #5b6475; font-size: 12.5px; white-space: normal; max-width: 640px; }
.scroll { max-width: 100%; overflow-x: auto; }
td { overflow-wrap: anywhere; }
.bars { margin: 8px 0; }
.bar-row { display: flex; align-items: center; gap: 8px; margin: 3px 0; font-size: 12.5px; }
.bar-row .label { width: 140px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.bar-row .track { flex: 1; display: flex; height: 16px; background: #f3f5f8; border-radius: 3px;
                  overflow: hidden; min-width: 0; }
.bar-row .total { width: 70px; text-align: right; font-variant-numeric: tabular-nums; }
.seg-build { background: #6c8ebf; } .seg-start { background: #82b366; }
.seg-healthy { background: #d6b656; } .seg-test { background: #9673a6; }
.seg-destroy { background: #b85450; } .seg-other { background: #999; }
.key span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; }
"""


def _cls(word: object) -> str:
    return "".join(ch for ch in str(word) if ch.isalnum())


def _table(header: List[str], rows: List[str], numeric_from: Optional[int] = None) -> str:
    cells = "".join(
        f'<th class="num">{escape(h)}</th>' if numeric_from is not None and i >= numeric_from else f"<th>{escape(h)}</th>"
        for i, h in enumerate(header)
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _suite_td(target: Dict[str, Any], suite: str) -> str:
    counts = (target.get("suites") or {}).get(suite)
    if not counts:
        return '<td class="num"></td>'
    failed = counts.get("failed", 0)
    fail_html = f'<span class="bad">{failed}</span>' if failed else str(failed)
    return f'<td class="num">{counts.get("passed", 0)} / {fail_html} / {counts.get("skipped", 0)}</td>'


def _matrix(results: Dict[str, Any]) -> str:
    backends, suites = model.backend_columns(results), model.suite_columns(results)
    header = ["target", "kind", "status", "os", "kernel", "python", *backends, *suites]
    rows = []
    for i, t in enumerate(model.targets(results)):
        offered = set(t.get("backends") or [])
        status = str(t.get("status"))
        cells = [
            f'<td class="name"><a href="#t-{i}">{escape(str(t.get("name")))}</a></td>',
            f"<td>{escape(str(t.get('kind')))}</td>",
            f'<td class="{_cls(status)}">{escape(model.status_text(t))}</td>',
        ]
        cells += [f'<td class="nowrap">{escape(str(t.get(k) or ""))}</td>' for k in ("os", "kernel", "python")]
        cells += [
            '<td class="mark yes" title="offered">&#10003;</td>' if b in offered else '<td class="mark no">&ndash;</td>'
            for b in backends
        ]
        cells += [_suite_td(t, s) for s in suites]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    legend = (
        '<p class="legend">Backends: &#10003; where the target offers the backend. '
        "Suites: passed / failed / skipped tests.</p>"
    )
    return _table(header, rows, numeric_from=6 + len(backends)) + legend


def _badge(status: str) -> str:
    return f'<span class="badge {_cls(status)}">{escape(status)}</span>'


def verdict_text(results: Dict[str, Any]) -> tuple[str, str]:
    """The run's verdict in a few words, and its class: failed if any target failed,
    passed if every target that ran passed (with how many did not run)."""
    counts = text.status_counts(results)
    if counts.get("failed"):
        return f"FAILED: {text.counts_line(results)}", "failed"
    if counts.get("passed"):
        return f"PASSED: {text.counts_line(results)}", "passed"
    return f"NOTHING RAN: {text.counts_line(results)}", "notrun"


def _grid(results: Dict[str, Any]) -> str:
    """Target x suite: a badge per cell, the reason of a target that did not pass in a
    row of its own under it."""
    suites = model.suite_columns(results)
    rows = []
    for i, t in enumerate(model.targets(results)):
        status = str(t.get("status"))
        cells = [f'<td class="name"><a href="#t-{i}">{escape(str(t.get("name")))}</a></td>',
                 f"<td>{escape(str(t.get('kind')))}</td>", f"<td>{_badge(status)}</td>"]
        for suite in suites:
            counts = (t.get("suites") or {}).get(suite) or {}
            ran = counts.get("passed", 0) + counts.get("failed", 0)
            word = ("failed" if counts.get("failed") else "passed" if ran else "not run")
            tip = (f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
                   f"{counts.get('skipped', 0)} skipped") if counts else "no tests"
            cells.append(f'<td title="{escape(tip)}">{_badge(word)}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
        if status != "passed" and t.get("reason"):
            rows.append(f'<tr><td></td><td class="why" colspan="{2 + len(suites)}">'
                        f"{escape(model.status_text(t))}</td></tr>")
    return ('<div class="scroll">' + _table(["target", "kind", "status", *suites], rows)
            .replace("<table>", '<table class="grid" id="verdict-grid">', 1) + "</div>"
            '<p class="legend">A suite is passed when its tests that ran passed, failed when '
            "one failed, not run when none ran. Hover a badge for the counts.</p>")


def _timing_bars(results: Dict[str, Any]) -> str:
    """Per target a bar of its lifecycle steps, to one scale: where the time went."""
    found = [(t, model.total_seconds(t) or 0.0) for t in model.targets(results)]
    longest = max((total for _, total in found), default=0.0)
    if longest <= 0:
        return '<p class="meta">No timings recorded.</p>'
    rows = []
    for t, total in found:
        timings = t.get("timings") or {}
        segments = []
        for step in [*model.PHASES, *sorted(set(timings) - set(model.PHASES))]:
            seconds = timings.get(step)
            if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
                continue
            css = f"seg-{step}" if step in model.PHASES else "seg-other"
            segments.append(f'<div class="{css}" style="width:{100 * seconds / longest:.2f}%" '
                            f'title="{escape(step)} {seconds:.1f} s"></div>')
        rows.append(f'<div class="bar-row"><span class="label">{escape(str(t.get("name")))}'
                    f'</span><div class="track">{"".join(segments)}</div>'
                    f'<span class="total">{total:.1f} s</span></div>')
    key = "".join(f'<span class="seg-{p}"></span>{escape(p)}' for p in model.PHASES)
    return (f'<div class="bars" id="timing-bars">{"".join(rows)}</div>'
            f'<p class="legend key">{key}</p>')


def _timings(results: Dict[str, Any]) -> str:
    rows = [
        "<tr>" + f'<td class="name">{escape(r[0])}</td>' + "".join(f'<td class="num">{escape(c)}</td>' for c in r[1:]) + "</tr>"
        for r in text.timings_rows(results)
    ]
    return _table(["target", *model.PHASES, "total"], rows, numeric_from=1)


def _suite_timings(results: Dict[str, Any]) -> str:
    rows = [
        "<tr>" + "".join(f'<td class="name">{escape(c)}</td>' for c in r[:2])
        + "".join(f'<td class="num">{escape(c)}</td>' for c in r[2:]) + "</tr>"
        for r in text.suite_timing_rows(results)
    ]
    if not rows:
        return '<p class="meta">No suite timings recorded.</p>'
    return _table(text.SUITE_TIMING_HEADER, rows, numeric_from=2)


CLAIMS_CSS = """
.claims-grid td, .claims-grid th { min-width: 90px; }
.claims-grid td.claim-text { min-width: 260px; max-width: 420px; }
.cell-agrees { background: #e3f4e8; color: #17602f; }
.cell-expected { background: #fff2cc; color: #6b4e00; }
.cell-unexpected { background: #f8d0d0; color: #8b1010; font-weight: 600; }
.cell-notrun { background: #eef0f3; color: #555e6d; }
.claims-grid details { border: none; margin: 0; padding: 0; }
.claims-grid details > summary { font-weight: 600; font-size: 12px; }
.claims-grid dl { margin: 4px 0 0; font-size: 11.5px; max-width: 360px; }
.claims-grid dt { font-weight: 600; margin-top: 3px; }
.claims-grid dd { margin: 0 0 0 8px; word-break: break-word; }
.legend span { padding: 1px 6px; border-radius: 3px; margin-right: 6px; }
"""

_CELL_CLASS = {"agrees": "cell-agrees", "expected difference": "cell-expected",
               "unexpected difference": "cell-unexpected", "not run": "cell-notrun"}
_CELL_WORD = {"agrees": "agrees", "expected difference": "expected difference",
              "unexpected difference": "UNEXPECTED", "not run": "not run"}


def _claim_details(record: Dict[str, Any], cell: str) -> str:
    facts = [("observed", model.figure(record.get("observed"), 600)),
             ("expected on this kernel", model.figure(record.get("expected"), 600))]
    if record.get("expected_reason"):
        facts.append(("why it differs from Linux", str(record["expected_reason"])))
    if record.get("why"):
        facts.append(("against the expectation", str(record["why"])))
    facts.append(("the write-up's claim", str(record.get("claim_verdict") or "?")))
    if record.get("claim_why"):
        facts.append(("the claim, in detail", str(record["claim_why"])))
    if record.get("kernel"):
        facts.append(("kernel", f"{record['kernel']} {record.get('kernel_version') or ''}".strip()))
    body = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in facts)
    return f"<details><summary>{escape(_CELL_WORD[cell])}</summary><dl>{body}</dl></details>"


def _claims(results: Dict[str, Any]) -> str:
    """The kernel x claim grid (rows claims, columns targets), then the slowdown section."""
    claim_ids, columns, cells = model.claim_rows(results)
    head = "".join(
        f"<th>{escape(col)}<br><span class=\"meta\">{escape(model.column_kernel(results, col))}</span></th>"
        for col in columns)
    rows = []
    for cid, claim in claim_ids:
        tds = [f'<td class="claim-text"><b>{escape(cid)}</b><br>{escape(claim)}</td>']
        for col in columns:
            record = cells.get((cid, col))
            cell = model.cell_of(record)
            inner = "not run: no record" if record is None else _claim_details(record, cell)
            tds.append(f'<td class="{_CELL_CLASS[cell]}">{inner}</td>')
        rows.append(f"<tr>{''.join(tds)}</tr>")
    legend = (
        '<p class="legend"><span class="cell-agrees">agrees</span> matches an expectation equal '
        'to Linux\'s <span class="cell-expected">expected difference</span> matches a written, '
        'reasoned expectation that differs from Linux\'s <span class="cell-unexpected">unexpected '
        'difference</span> contradicts its kernel\'s expectation <span class="cell-notrun">not '
        "run</span> not measured there (with why). Open a cell for its figures, the expectation, "
        "and whether the write-up's claim holds there.</p>"
    )
    diffs = model.differences(results)
    diff_html = "".join(f"<li>{escape(d)}</li>" for d in diffs) or "<li>none</li>"
    grid = (f"<style>{CLAIMS_CSS}</style>"
            f'<table class="claims-grid"><thead><tr><th>claim</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>{legend}"
            f"<details><summary>Differences from Linux ({len(diffs)})</summary><ul>{diff_html}</ul></details>")
    return grid + _slowdown(results)


def _slowdown(results: Dict[str, Any]) -> str:
    """The slowdown of each kernel against the host: a plot and its figures."""
    host, slow = model.slowdown(results)
    if not slow:
        return ""
    plot, notes = plots.slowdown_plot(results)
    parts = [f"<h3>Slowdown against the host ({escape(str(host))})</h3>"]
    parts += [f'<p class="note">{escape(n)}</p>' for n in notes]
    if plot is not None:
        parts.append(f'<figure><img alt="{escape(plot.title)}" src="{plot.data_uri()}">'
                     f"<figcaption>{escape(plot.caption)}</figcaption></figure>")
    metrics = sorted({k for _, r in slow for k in r})
    rows = [f'<tr><td class="name">{escape(name)}</td>'
            + "".join(f'<td class="num">{escape(f"{r[m]:g}x") if m in r else ""}</td>' for m in metrics)
            + "</tr>" for name, r in slow]
    parts.append(_table(["target", *metrics], rows, numeric_from=1))
    return "".join(parts)


def _plots(results: Dict[str, Any]) -> str:
    drawn, notes = plots.draw(results)
    parts = [f'<p class="note">{escape(n)}</p>' for n in notes]
    for plot in drawn:
        parts.append(
            f"<figure><h3>{escape(plot.title)}</h3>"
            f'<img alt="{escape(plot.title)}" src="{plot.data_uri()}">'
            f"<figcaption>{escape(plot.caption)}</figcaption></figure>"
        )
    if not parts:
        parts.append('<p class="meta">No probe data recorded (wait_cost, level_edge): nothing to plot.</p>')
    return "".join(parts)


def _target_details(index: int, target: Dict[str, Any]) -> str:
    name = str(target.get("name"))
    tests = target.get("tests") or []
    status = str(target.get("status"))
    counts: Dict[str, int] = {}
    for test in tests:
        counts[str(test.get("outcome"))] = counts.get(str(test.get("outcome")), 0) + 1
    count_text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no tests"
    # A target that did not pass opens by itself: that is what the reader came for.
    opened = " open" if status == "failed" else ""
    head = (
        f'<summary id="t-{index}">{escape(name)} &mdash; '
        f'<span class="{_cls(status)}">&nbsp;{escape(status)}&nbsp;</span> &mdash; {escape(count_text)}</summary>'
    )
    facts = [
        ("kind", target.get("kind")), ("reason", target.get("reason")), ("os", target.get("os")),
        ("kernel", target.get("kernel")), ("python", target.get("python")),
        ("backends", ", ".join(target.get("backends") or [])), ("source", target.get("source")),
    ]
    body = ["<table>"] + [
        f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts if v
    ] + ["</table>"]
    # Failures first, then by suite and name, so the interesting rows are on top.
    rank = {"failed": 0, "error": 0, "xpassed": 1}
    ordered = sorted(tests, key=lambda t: (rank.get(str(t.get("outcome")), 2), str(t.get("suite")), str(t.get("name"))))
    rows = [
        f"<tr><td>{escape(str(t.get('suite')))}</td><td>{escape(str(t.get('name')))}</td>"
        f'<td class="{_cls(t.get("outcome"))}">{escape(str(t.get("outcome")))}</td>'
        f'<td class="num">{_duration(t.get("duration"))}</td></tr>'
        for t in ordered
    ]
    if rows:
        body.append(_table(["suite", "test", "outcome", "seconds"], rows, numeric_from=3))
    if isinstance(target.get("probe"), dict):
        raw = json.dumps(target["probe"], indent=2, sort_keys=True, default=str)
        body.append(f"<details><summary>probe output</summary><pre>{escape(raw)}</pre></details>")
    return f"<details{opened}>{head}{''.join(body)}</details>"


def _duration(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def report_html(results: Dict[str, Any], run_dir: Optional[Path] = None) -> str:
    """The whole report.html for a results document.

    Parameters:
        results: a results document (already checked against the schema).
        run_dir: the directory the page will sit in; files found there
            (junit.xml) are linked. None links only results.json and summary.md.
    """
    run_id = str(results.get("run_id", "?"))
    verdict, verdict_cls = verdict_text(results)
    chips = "".join(
        f'<span class="{_cls(k)}">{n} {escape(k)}</span>' for k, n in text.status_counts(results).items()
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>iomux run {escape(run_id)}</title><style>{CSS}</style></head><body>",
        f"<h1>iomux run {escape(run_id)}</h1>",
        *[f'<p class="meta">{escape(m)}</p>' for m in text.meta_lines(results)],
        f'<div class="chips">{chips}</div>',
        f'<div class="verdict {verdict_cls}" id="verdict">{escape(verdict)}</div>',
        _grid(results),
    ]
    # The kernel x claim grid (issue 14 owns _claims), right under the verdict.
    if results.get("claims"):
        parts += ['<section id="claims"><h2>Claims</h2><div class="scroll">', _claims(results),
                  "</div></section>"]
    parts += [
        "<h2>Timings</h2>",
        _timing_bars(results),
        *[f'<p class="meta reused">{escape(line)}</p>' for line in model.reuse_lines(results)],
        "<details><summary>timings in seconds</summary>",
        f'<div class="scroll">{_timings(results)}</div></details>',
        "<details><summary>suite timings in seconds (wall against CPU: waiting or "
        "computing)</summary>",
        f'<div class="scroll" id="suite-timings">{_suite_timings(results)}</div></details>',
        "<h2>Details</h2>",
        "<details><summary>targets &times; backends &times; suites (kind, OS, kernel, "
        "Python; passed / failed / skipped)</summary>",
        f'<div class="scroll">{_matrix(results)}</div></details>',
    ]
    parts += ["<h2>Plots</h2>", _plots(results)]
    parts += ["<h2>Tests per target</h2>"]
    parts += [_target_details(i, t) for i, t in enumerate(model.targets(results))]
    links = ['<a href="results.json">results.json</a>', '<a href="summary.md">summary.md</a>']
    # pytest may write junit.xml after this page (hook order), so the run can
    # also name it in results["junit"] (a file name relative to the report).
    junit = results.get("junit") if isinstance(results.get("junit"), str) else None
    if junit is None and run_dir is not None and (run_dir / "junit.xml").exists():
        junit = "junit.xml"
    if junit:
        links.append(f'<a href="{escape(junit)}">{escape(junit)}</a>')
    parts.append(f"<footer>Files of this run: {' &middot; '.join(links)}</footer>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
