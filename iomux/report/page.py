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


def _timings(results: Dict[str, Any]) -> str:
    rows = [
        "<tr>" + f'<td class="name">{escape(r[0])}</td>' + "".join(f'<td class="num">{escape(c)}</td>' for c in r[1:]) + "</tr>"
        for r in text.timings_rows(results)
    ]
    return _table(["target", *model.PHASES, "total"], rows, numeric_from=1)


def _claims(results: Dict[str, Any]) -> str:
    claim_ids, columns, cells = model.claim_rows(results)
    rows = []
    for cid, claim in claim_ids:
        tds = [f"<td><b>{escape(cid)}</b><br>{escape(claim)}</td>"]
        for col in columns:
            record = cells.get((cid, col))
            verdict, cell = model.claim_cell(record)
            tip = ""
            if record is not None:
                tip = f"expected: {model.figure(record.get('expected'), 200)}"
            tds.append(f'<td class="{_cls(verdict) or "notrun"}" title="{escape(tip)}">{escape(cell)}</td>')
        rows.append(f"<tr>{''.join(tds)}</tr>")
    legend = (
        '<p class="legend">Each cell: the figure the target observed; green agrees with the claim '
        "for its OS family, red differs (with the expected value), grey could not be measured "
        "there (with why). Hover a cell for the expected value.</p>"
    )
    return _table(["claim", *columns], rows) + legend


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
        "<h2>Targets &times; backends &times; suites</h2>",
        _matrix(results),
        "<h2>Timings (seconds)</h2>",
        _timings(results),
    ]
    if results.get("claims"):
        parts += ["<h2>Claims</h2>", _claims(results)]
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
