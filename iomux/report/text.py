"""summary.md and the plain-text table printed at the end of a run."""

from __future__ import annotations

import datetime
import textwrap
from typing import Any, Dict, List, Optional

from iomux.report import model


def _md(text: object) -> str:
    # A pipe or a newline inside a cell would break the Markdown table.
    return " ".join(str(text).split()).replace("|", "\\|")


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def parse_time(value: Any) -> Optional[datetime.datetime]:
    """An ISO 8601 time of a results document, or None when it is missing or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        # Python 3.9's fromisoformat does not take the "Z" suffix.
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def wall_seconds(results: Dict[str, Any]) -> Optional[float]:
    """finished - started in seconds, or None when either is missing or unreadable."""
    start, end = parse_time(results.get("started")), parse_time(results.get("finished"))
    if start is None or end is None or (start.tzinfo is None) != (end.tzinfo is None):
        return None
    return (end - start).total_seconds()


def speed_line(results: Dict[str, Any]) -> Optional[str]:
    """Run wall time against the slowest single target (issue 3: at most 1.5x when warm).

    Uses the harness's own figures (``results["run"]``: wall_seconds,
    slowest_target_seconds, overhead_seconds) when present, else started/finished
    against the longest target total.
    """
    if "merged_from" in results:
        # A merged report's wall time spans machines and CI queues: not a speed figure.
        return None
    given = results.get("run")
    run: Dict[str, Any] = given if isinstance(given, dict) else {}
    wall, slowest = _number(run.get("wall_seconds")), _number(run.get("slowest_target_seconds"))
    if wall is None or not slowest:
        wall = wall_seconds(results)
        totals = [s for s in (model.total_seconds(t) for t in model.targets(results)) if s]
        slowest = max(totals) if totals else None
    if wall is None or not slowest:
        return None
    line = f"run wall time {wall:.1f} s; slowest target {slowest:.1f} s; ratio {wall / slowest:.2f}x"
    overhead = _number(run.get("overhead_seconds"))
    if overhead is not None and wall > 0:
        line += f"; harness overhead {overhead:.1f} s ({100 * overhead / wall:.0f}% of the run)"
    return line


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def host_line(host: Any) -> str:
    """A one-line description of the harness host from whatever facts it recorded."""
    if not isinstance(host, dict):
        return ""
    parts = []
    for keys in (("hostname", "node", "name"), ("distribution", "os", "system"), ("kernel", "release"), ("python",)):
        for key in keys:
            if isinstance(host.get(key), (str, int, float)):
                parts.append(str(host[key]))
                break
    return " ".join(parts)


def status_counts(results: Dict[str, Any]) -> Dict[str, int]:
    """Targets per status, in the order passed, failed, not run (then any other)."""
    counts: Dict[str, int] = {}
    for t in model.targets(results):
        counts[str(t.get("status"))] = counts.get(str(t.get("status")), 0) + 1
    order = ["passed", "failed", "not run"]
    keys = [k for k in order if k in counts] + sorted(set(counts) - set(order))
    return {k: counts[k] for k in keys}


def counts_line(results: Dict[str, Any]) -> str:
    """``2 passed, 1 not run`` over the targets."""
    return ", ".join(f"{n} {k}" for k, n in status_counts(results).items()) or "no targets"


def meta_lines(results: Dict[str, Any]) -> List[str]:
    """The lines under a report's title: times, harness host, merged inputs, speed."""
    lines = [f"started {results.get('started', '?')}, finished {results.get('finished') or '?'}"]
    host = host_line(results.get("host"))
    if host:
        lines.append(f"harness host: {host}")
    for source in results.get("merged_from") or []:
        lines.append(f"merged from run {source.get('run_id')} ({source.get('path')})")
    speed = speed_line(results)
    if speed:
        lines.append(speed)
    selection = (results.get("run") or {}).get("inner_selection")
    if selection:
        lines.append(f"inner suites: only the tests that -k {selection!r} selects (--inner-k)")
    return lines


def matrix(results: Dict[str, Any]) -> tuple[List[str], List[List[str]]]:
    """Header and rows of the targets x backends x suites matrix (cells as plain text)."""
    backends, suites = model.backend_columns(results), model.suite_columns(results)
    header = ["target", "kind", "status", "os", "kernel", "python", *backends]
    header += [f"{s} (p/f/s)" for s in suites]
    rows = []
    for t in model.targets(results):
        offered = set(t.get("backends") or [])
        row = [str(t.get("name")), str(t.get("kind")), model.status_text(t)]
        row += [str(t.get(k) or "") for k in ("os", "kernel", "python")]
        row += ["yes" if b in offered else "-" for b in backends]
        row += [model.suite_cell(t, s) for s in suites]
        rows.append(row)
    return header, rows


def timings_rows(results: Dict[str, Any]) -> List[List[str]]:
    rows = []
    for t in model.targets(results):
        timings = t.get("timings") or {}
        cells = [_seconds(timings.get(p)) for p in model.PHASES]
        total = model.total_seconds(t)
        rows.append([str(t.get("name")), *cells, _seconds(total)])
    return rows


SUITE_TIMING_HEADER = ["target", "suite", "tests", "wall", "harness CPU", "target CPU",
                       "CPU/wall", "workers"]


def suite_timing_rows(results: Dict[str, Any]) -> List[List[str]]:
    """Per target and suite: tests, wall seconds, the harness's CPU seconds on the host,
    the suite's own CPU seconds in the target (in-guest suites), CPU over wall:
    near 0 a suite waits, near 1 (or more, with children) it computes; and the xdist
    workers an in-guest suite ran on in the target."""
    rows = []
    for t in model.targets(results):
        for suite, entry in sorted((t.get("suite_timings") or {}).items()):
            wall = _number(entry.get("wall_s"))
            inner = _number(entry.get("target_cpu_s"))
            cpu = inner if inner is not None else _number(entry.get("harness_cpu_s"))
            share = f"{cpu / wall:.2f}" if cpu is not None and wall else ""
            rows.append([str(t.get("name")), suite, str(entry.get("tests", "")), _seconds(wall),
                         _seconds(entry.get("harness_cpu_s")), _seconds(inner), share,
                         str(entry.get("workers", ""))])
    return rows


def _seconds(value: Any) -> str:
    number = _number(value)
    return "" if number is None else f"{number:.1f}"


def failed_tests(results: Dict[str, Any]) -> List[str]:
    """``target: suite: test name (outcome)`` for every failed or errored test."""
    lines = []
    for t in model.targets(results):
        for test in t.get("tests") or []:
            if test.get("outcome") in ("failed", "error"):
                lines.append(f"{t.get('name')}: {test.get('suite')}: {test.get('name')} ({test.get('outcome')})")
    return lines


def claims_md(results: Dict[str, Any]) -> List[str]:
    """The claims part of summary.md: the kernel x claim grid, the differences from Linux, the slowdown."""
    claim_ids, columns, cells = model.claim_rows(results)
    lines = ["", "## Claims: kernel x claim", ""]
    lines.append(
        "Each cell: the figure this target observed and how it stands against its kernel's "
        "expectation: agrees (the expectation is Linux's), expected difference (a written, "
        "reasoned expectation that differs from Linux's), UNEXPECTED (contradicts the "
        "expectation), or not run (with why). \"claim\" says whether the write-up's claim "
        "holds there."
    )
    lines.append("")
    header = ["claim", *[f"{c} ({model.column_kernel(results, c)})" if model.column_kernel(results, c)
                         else c for c in columns]]
    rows = []
    for cid, text in claim_ids:
        row = [f"{cid}: {text}" if text else cid]
        row += [model.claim_cell(cells.get((cid, col)))[1] for col in columns]
        rows.append(row)
    lines += _md_table(header, rows)
    diffs = model.differences(results)
    lines += ["", "## Differences from Linux", ""]
    lines += [f"- {_md(d)}" for d in diffs] or ["- none"]
    host, slow = model.slowdown(results)
    if slow:
        lines += ["", f"## Slowdown against the host ({host})", ""]
        lines.append("Each figure: the target's time over the host's for the same measurement "
                     "(1.0 = as fast as the host).")
        lines.append("")
        for name, ratios in slow:
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:g}x" for k, v in ratios.items()))
    return lines


def summary_md(results: Dict[str, Any]) -> str:
    """The whole summary.md of a run: matrix, timings, claims and failed tests."""
    lines = [f"# iomux run {results.get('run_id', '?')}", ""]
    lines += [f"- {line}" for line in meta_lines(results)]
    lines.append(f"- targets: {counts_line(results)}")
    lines += ["", "## Targets x backends x suites", ""]
    lines.append(
        "Backends: `yes` where the target offers the backend. "
        "Suites: passed/failed/skipped tests."
    )
    lines.append("")
    header, rows = matrix(results)
    lines += _md_table(header, rows)

    lines += ["", "## Timings (seconds)", ""]
    lines += _md_table(["target", *model.PHASES, "total"], timings_rows(results))
    reused = model.reuse_lines(results)
    if reused:
        lines += ["", "Kept targets taken over (`--destroy`):", ""]
        lines += [f"- {_md(line)}" for line in reused]
    suite_rows = suite_timing_rows(results)
    if suite_rows:
        lines += ["", "## Suite timings (seconds)", ""]
        lines += _md_table(SUITE_TIMING_HEADER, suite_rows)

    if results.get("claims"):
        lines += claims_md(results)

    failed = failed_tests(results)
    if failed:
        lines += ["", "## Failed tests", ""]
        lines += [f"- {_md(f)}" for f in failed]
    return "\n".join(lines) + "\n"


#: The terminal summary fits this many columns; longer reasons go under the table.
WIDTH = 120
KERNEL_WIDTH = 18


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "~"


def summary_table(results: Dict[str, Any]) -> str:
    """The short plain-text table printed at the end of a run, at most 120 columns.

    Parameters:
        results: a results document (the schema of results.schema.json).

    Returns:
        Aligned columns: target, kind, status, kernel, passed/failed/skipped per
        suite, build and total seconds; under the table, one line per target that
        did not pass with its reason (``name: not run: why``, wrapped at 120
        columns); then the run's wall time against its slowest target. No
        trailing newline.
    """
    suites = model.suite_columns(results)
    header = ["target", "kind", "status", "kernel", *suites, "build s", "total s"]
    rows = []
    reasons = []
    for t in model.targets(results):
        status = str(t.get("status"))
        row = [str(t.get("name")), str(t.get("kind")), status,
               _clip(str(t.get("kernel") or "-"), KERNEL_WIDTH)]
        row += [model.suite_cell(t, s) or "-" for s in suites]
        row += [_seconds((t.get("timings") or {}).get("build")) or "-", _seconds(model.total_seconds(t)) or "-"]
        rows.append(row)
        if status != "passed":
            reasons.append(f"{t.get('name')}: {model.status_text(t)}")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    for reason in reasons:
        lines += textwrap.wrap(reason, WIDTH, subsequent_indent="    ", break_on_hyphens=False)
    notes = []
    saved = [t for t in model.targets(results) if t.get("reused") is True]
    if saved:
        notes.append("reused: " + ", ".join(
            f"{t.get('name')} (saved {_seconds((t.get('reuse') or {}).get('saved_s')) or '?'} s)"
            for t in saved))
    if suites:
        notes.append("suites: passed/failed/skipped")
    speed = speed_line(results)
    if speed:
        notes.append(speed)
    notes.append(f"targets: {counts_line(results)}")
    joined = "; ".join(notes)
    lines += [joined] if len(joined) <= WIDTH else notes
    return "\n".join(lines)
