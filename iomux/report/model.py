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
    """The claims table: rows (id, claim text), target columns, and (id, target) -> record.

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


def claim_cell(record: Optional[Dict[str, Any]]) -> Tuple[str, str]:
    """(verdict, text) of one claims cell; verdict is '' where nothing was recorded."""
    if record is None:
        return "", "no record"
    verdict = str(record.get("verdict", ""))
    observed = figure(record.get("observed"))
    why = record.get("why")
    if verdict == "agrees":
        return verdict, f"{observed} (agrees)"
    if verdict == "differs":
        text = f"{observed} (DIFFERS, expected {figure(record.get('expected'))})"
        return verdict, f"{text}: {why}" if why else text
    return verdict, f"not measurable: {why}" if why else "not measurable"


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
