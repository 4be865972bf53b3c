"""Read-only views of a results document shared by the Markdown, text and HTML writers.

Every writer shows the same matrix; the column order, the cell text and the
way a probe figure is printed are decided here once.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Tuple

# Column order: the backends of DESIGN.md section 1, then any others seen.
KNOWN_BACKENDS = ["select", "poll", "epoll", "epoll-et", "kqueue", "kqueue-et"]
# Suite order: the ones issue 3 and 5 name, then any others seen, alphabetically.
KNOWN_SUITES = ["in-guest", "black-box", "host", "claims", "faults"]
PHASES = ["build", "start", "healthy", "test", "destroy"]
VERDICT_MARK = {"agrees": "agrees", "differs": "DIFFERS", "not measurable": "not measurable"}


def targets(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    found: List[Dict[str, Any]] = results.get("targets") or []
    return found


def backend_columns(results: Dict[str, Any]) -> List[str]:
    """The backend columns of the matrix: every known backend, then any other seen."""
    seen = [b for t in targets(results) for b in t.get("backends") or []]
    return KNOWN_BACKENDS + sorted({b for b in seen if b not in KNOWN_BACKENDS and b != "auto"})


def suite_columns(results: Dict[str, Any]) -> List[str]:
    """The suites any target reported, known ones first in their usual order."""
    seen = {s for t in targets(results) for s in (t.get("suites") or {})}
    return [s for s in KNOWN_SUITES if s in seen] + sorted(seen - set(KNOWN_SUITES))


def status_text(target: Dict[str, Any]) -> str:
    """``passed``, or ``failed: <why>`` / ``not run: <why>``."""
    status = str(target.get("status", "?"))
    reason = target.get("reason")
    if status != "passed" and reason:
        return f"{status}: {reason}"
    return status


def suite_cell(target: Dict[str, Any], suite: str) -> str:
    """``passed/failed/skipped`` for one suite of one target, or an empty cell."""
    counts = (target.get("suites") or {}).get(suite)
    if not counts:
        return ""
    return f"{counts.get('passed', 0)}/{counts.get('failed', 0)}/{counts.get('skipped', 0)}"


def total_seconds(target: Dict[str, Any]) -> Optional[float]:
    """A target's wall time: the harness's ``elapsed`` if recorded, else the sum of its phases.

    None when neither was recorded (a target that did not run).
    """
    elapsed = target.get("elapsed")
    if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool):
        return float(elapsed)
    values = [v for v in (target.get("timings") or {}).values()
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(sum(values)) if values else None


def reuse_line(target: Dict[str, Any]) -> Optional[str]:
    """What became of a kept target the harness tried to take over (``--destroy``),
    in one line; None when none was tried."""
    reuse = target.get("reuse")
    if not isinstance(reuse, dict):
        return None
    name, source = target.get("name"), reuse.get("from_run") or "?"
    if target.get("reused") is True:
        attach, saved = _num(reuse.get("attach_s")), reuse.get("saved_s")
        line = f"{name}: reused the target kept by run {source}"
        if attach is not None:
            line += f", attached in {attach:.1f} s"
        if isinstance(saved, (int, float)) and not isinstance(saved, bool) \
                and math.isfinite(saved):
            # Attaching can cost more than a cached image's build and a container's
            # start (a loaded machine, a warm cache): say so rather than drop it.
            # saved_s is never below zero (harness/warm_targets.py): the surplus is
            # the attach less the first build and start, both recorded beside it.
            first = _num(reuse.get("first_bring_up_s"))
            more = attach - first if attach is not None and first is not None else 0.0
            if saved >= 0.05:
                line += f", saved {saved:.1f} s of build and start"
            elif more >= 0.05:
                line += f", saved nothing: {more:.1f} s more than its first build and start"
            else:
                line += ", saved nothing"
        return line
    why = reuse.get("why") or "unknown"
    if not reuse.get("from_run"):
        return f"{name}: kept targets could not be looked for ({why})"
    return f"{name}: the target kept by run {source} could not be reused ({why}): built and started anew"


def reuse_lines(results: Dict[str, Any]) -> List[str]:
    """``reuse_line`` of every target that has one."""
    return [line for line in (reuse_line(t) for t in targets(results)) if line]


def figure(value: Any, limit: int = 60) -> str:
    """A measured value as a short human string: numbers to 3 significant figures."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.3g}"
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict):
        text = ", ".join(f"{k}={figure(v)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(figure(v) for v in value) + "]"
    else:
        text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def claim_rows(results: Dict[str, Any]) -> Tuple[List[Tuple[str, str]], List[str], Dict[Tuple[str, str], Dict[str, Any]]]:
    """The kernel x claim grid: rows (id, claim text), target columns, and (id, target) -> record.

    Columns are every target in the order of ``results["targets"]`` (so a target
    that did not run shows as such), then any target named only by a claim; a
    later record for the same (id, target) wins.
    """
    rows: List[Tuple[str, str]] = []
    cells: Dict[Tuple[str, str], Dict[str, Any]] = {}
    columns = [str(t.get("name")) for t in targets(results)]
    for record in results.get("claims") or []:
        cid, target = str(record.get("id")), str(record.get("target"))
        if cid not in [r[0] for r in rows]:
            rows.append((cid, str(record.get("claim", ""))))
        if target not in columns:
            columns.append(target)
        cells[(cid, target)] = record
    return rows, columns, cells


#: The grid's cells (iomux.probes.claims.CELLS), and how an older record's verdict maps to one.
CELL_AGREES, CELL_EXPECTED, CELL_UNEXPECTED, CELL_NOT_RUN = (
    "agrees", "expected difference", "unexpected difference", "not run")
_LEGACY_CELL = {"agrees": CELL_AGREES, "differs": CELL_UNEXPECTED, "not measurable": CELL_NOT_RUN}


def cell_of(record: Optional[Dict[str, Any]]) -> str:
    """The grid cell of a claim record: agrees, expected/unexpected difference, or not run."""
    if record is None:
        return CELL_NOT_RUN
    cell = record.get("cell")
    if cell in (CELL_AGREES, CELL_EXPECTED, CELL_UNEXPECTED, CELL_NOT_RUN):
        return str(cell)
    return _LEGACY_CELL.get(str(record.get("verdict")), CELL_NOT_RUN)


def claim_cell(record: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    """(cell, text) of one grid cell; the cell is one of the four of ``cell_of``."""
    cell = cell_of(record)
    if record is None:
        return cell, "not run: no record"
    observed = figure(record.get("observed"))
    why = record.get("why")
    claim = record.get("claim_verdict")
    suffix = f"; claim {claim}" if claim else ""
    if cell == CELL_AGREES:
        return cell, f"{observed} (agrees{suffix})"
    if cell == CELL_EXPECTED:
        return cell, f"{observed} (expected difference: {record.get('expected_reason') or '?'}{suffix})"
    if cell == CELL_UNEXPECTED:
        text = f"{observed} (UNEXPECTED, expected {figure(record.get('expected'))})"
        return cell, f"{text}: {why}" if why else text
    return cell, f"not run: {why}" if why else "not run"


def column_kernel(results: Dict[str, Any], column: str) -> str:
    """``gvisor 0.0~20221219.0-2+b3`` for a grid column: the kernel its records were judged as."""
    for record in results.get("claims") or []:
        if str(record.get("target")) == column and record.get("kernel"):
            version = record.get("kernel_version")
            return f"{record['kernel']} {version}" if version else str(record["kernel"])
    for t in targets(results):
        if str(t.get("name")) == column and t.get("kernel"):
            return str(t.get("kernel"))
    return ""


def _picked(record: Dict[str, Any], labels: List[str]) -> str:
    # The whole figure, nested lists included (figure() shortens each part):
    # a difference line is read for its detail.
    observed = record.get("observed")
    if isinstance(observed, dict):
        chosen = {k: v for k, v in observed.items() if k in labels} or observed
        return ", ".join(f"{k}={_whole(v)}" for k, v in chosen.items())
    return _whole(observed)


def _whole(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_whole(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_whole(v)}" for k, v in value.items()) + "}"
    return figure(value, 1000)


def differences(results: Dict[str, Any]) -> List[str]:
    """One line per claim cell that differs from Linux, expected or not.

    ``gvisor-2022 halfclose-events: <observed> (linux: <observed>)``, the
    Linux figure from the first target judged as Linux whose cell agrees;
    an unexpected difference is marked UNEXPECTED, an expected one gives its reason.
    """
    rows, columns, cells = claim_rows(results)
    lines: List[str] = []
    for cid, _ in rows:
        reference = next((cells[(cid, c)] for c in columns if (cid, c) in cells
                          and cells[(cid, c)].get("kernel") == "linux"
                          and cell_of(cells[(cid, c)]) == CELL_AGREES), None)
        for col in columns:
            record = cells.get((cid, col))
            cell = cell_of(record)
            if record is None or cell not in (CELL_EXPECTED, CELL_UNEXPECTED):
                continue
            labels = [k for r in (record, reference) if r is not None
                      and isinstance(r.get("expected"), dict) for k in r["expected"]]
            line = f"{col} {cid}: {_picked(record, labels)}"
            if reference is not None:
                line += f" (linux: {_picked(reference, labels)})"
            elif isinstance(record.get("linux_expected"), dict):
                # No Linux target in this run: Linux's expectation in words instead.
                words = ", ".join(f"{k} {v}" for k, v in record["linux_expected"].items())
                line += f" (linux expects: {words})"
            if cell == CELL_UNEXPECTED:
                line += f" UNEXPECTED: {record.get('why')}"
            else:
                line += f" [{record.get('expected_reason')}]"
            lines.append(line)
    return lines


def _num(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _slowdown_figures(target: Dict[str, Any]) -> Dict[str, float]:
    """The figures of one target the slowdown is computed from (seconds; smaller is faster)."""
    out: Dict[str, float] = {}
    wait = probe_section(target, "wait_cost")
    if wait is not None:
        counts = wait.get("idle_counts")
        backends = wait.get("backends")
        if isinstance(counts, list) and isinstance(backends, dict):
            for backend, n, label in (("epoll", 0, "epoll_wait, 1 fd"), ("poll", 1000, "poll, 1000 fds")):
                series = backends.get(backend)
                if n in counts and isinstance(series, list) and len(series) == len(counts):
                    v = _num(series[counts.index(n)])
                    if v is not None:
                        out[label] = v
    reg = probe_section(target, "registration")
    if reg is not None and isinstance(reg.get("epoll"), dict):
        v = _num(reg["epoll"].get("per_fd_s"))
        if v is not None:
            out["epoll_ctl per fd"] = v
    probe = target.get("probe")
    if isinstance(probe, dict):
        v = _num(probe.get("probe_wall_s"))
        if v is not None:
            out["probe suite wall"] = v
    return out


def _test_durations(target: Dict[str, Any]) -> Dict[str, float]:
    # Test ids carry the target's name ("test_behaviour_suite[debian-12]"):
    # without it, the same test on two targets has the same key.
    name = str(target.get("name"))
    return {str(t.get("name")).replace(name, "*"): float(t["duration"])
            for t in target.get("tests") or []
            if t.get("suite") == "in-guest" and t.get("outcome") == "passed" and _num(t.get("duration"))}


def slowdown(results: Dict[str, Any]) -> Tuple[Optional[str], List[Tuple[str, Dict[str, float]]]]:
    """(host target name, [(target, figure -> slowdown against the host)]) for every other target.

    The host is the first ``local`` target (the harness's own kernel); the
    figures are what the suites already measure: the probes' wait and
    registration timings, the probe suite's wall time, and the median ratio
    of the durations of in-guest tests both ran ("in-guest tests"). None and
    [] when there is no host target with figures.
    """
    host = next((t for t in targets(results) if t.get("kind") == "local"), None)
    if host is None:
        return None, []
    base = _slowdown_figures(host)
    base_tests = _test_durations(host)
    out: List[Tuple[str, Dict[str, float]]] = []
    for t in targets(results):
        if t is host:
            continue
        mine = _slowdown_figures(t)
        ratios = {k: round(v / base[k], 2) for k, v in mine.items() if k in base}
        pairs = sorted(d / base_tests[k] for k, d in _test_durations(t).items() if k in base_tests)
        if pairs:
            ratios["in-guest tests (median)"] = round(pairs[len(pairs) // 2], 2)
        if ratios:
            out.append((str(t.get("name")), ratios))
    return str(host.get("name")), out


def probe_section(target: Dict[str, Any], name: str) -> Optional[Dict[str, Any]]:
    """One probe's recorded output (DESIGN.md section 7), or None when absent.

    Accepts the probe dict under ``probe["probes"][name]`` (what ``iomux probe
    --json`` prints) and, for leniency, directly under ``probe[name]``.
    """
    probe = target.get("probe")
    if not isinstance(probe, dict):
        return None
    probes = probe.get("probes")
    holder: Dict[str, Any] = probes if isinstance(probes, dict) else probe
    section = holder.get(name)
    return section if isinstance(section, dict) else None
