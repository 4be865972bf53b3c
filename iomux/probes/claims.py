"""Judge the probes' observations against the claims' expected values.

The expected values are data (``expected.json`` beside this module): one entry
per claim, with an expectation per OS family. An expectation holds two lists of
conditions: ``requires`` (when one fails the claim is *not measurable* here,
with the condition's ``why``) and ``checks`` (when one fails the claim
*differs*). A condition picks one observed value and tests it:

- ``{"path": ["select", "first_failing_fd"], ...}``: a value inside the probe's dict;
- ``{"ratio": {"backend": "epoll", "num": 10000, "den": 0}, ...}``: wait_cost's
  time at ``num`` idle fds over its time at ``den`` idle fds;
- ``{"series": {"backend": "select", "n": 10000}, ...}``: wait_cost's time at ``n``;

and the test is one of ``equals``, ``in``, ``startswith``, ``includes`` (list
holds all), ``excludes`` (list holds none), ``min``, ``max``. A value that is
missing (mechanism absent, probe skipped it) makes the claim not measurable,
unless the condition says ``"missing": "differs"`` (the claim predicts the
mechanism exists).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

AGREES = "agrees"
DIFFERS = "differs"
NOT_MEASURABLE = "not measurable"

_HERE = os.path.dirname(os.path.abspath(__file__))


class _Missing(Exception):
    """An observed value that is not there; the message says why."""


def load_expected(path: Optional[str] = None) -> List[Dict[str, Any]]:
    """The claims of ``expected.json`` (or of ``path``), as a list of dicts."""
    with open(path or os.path.join(_HERE, "expected.json"), encoding="utf-8") as f:
        data = json.load(f)
    claims: List[Dict[str, Any]] = data["claims"]
    return claims


def _for_family(claim: Dict[str, Any], os_family: str) -> Optional[Dict[str, Any]]:
    for families, expectation in claim.get("expected", {}).items():
        if os_family in [f.strip() for f in families.split(",")]:
            return dict(expectation)
    return None


def _walk(data: Any, path: List[Any]) -> Any:
    here = data
    for key in path:
        if isinstance(here, dict) and key in here:
            here = here[key]
            continue
        if isinstance(here, list) and isinstance(key, int) and -len(here) <= key < len(here):
            here = here[key]
            continue
        if isinstance(here, dict) and here.get("available") is False:
            raise _Missing(str(here.get("why") or "not available"))
        if isinstance(here, dict) and isinstance(here.get("why"), str):
            # A record that left the value out says why (no strace, say).
            raise _Missing(here["why"])
        if isinstance(here, dict) and "error" in here:
            raise _Missing(f"failed: {here['error']}")
        raise _Missing(f"{'.'.join(map(str, path))} was not recorded")
    return here


def _series(probe: Dict[str, Any], backend: str, n: int) -> Any:
    counts = probe.get("idle_counts")
    if not isinstance(counts, list) or n not in counts:
        raise _Missing(f"wait cost at {n} idle fds was not measured "
                       f"(idle counts {counts})")
    values = _walk(probe, ["backends", backend])
    if not isinstance(values, list) or len(values) != len(counts):
        raise _Missing(f"no wait-cost series for {backend}")
    return values[counts.index(n)]


def _number(probe: Dict[str, Any], backend: str, n: int) -> float:
    value = _series(probe, backend, n)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        note = (probe.get("notes") or {}).get(backend)
        raise _Missing(f"{backend} at {n} idle fds: {note or 'no figure'}")
    return float(value)


def _observe(cond: Dict[str, Any], probe: Dict[str, Any]) -> Tuple[str, Any]:
    """(label, observed value) of one condition; raises _Missing."""
    if "ratio" in cond:
        r = cond["ratio"]
        label = f"{r['backend']} t({r['num']})/t({r['den']})"
        num, den = _number(probe, r["backend"], r["num"]), _number(probe, r["backend"], r["den"])
        if den <= 0:
            raise _Missing(f"{r['backend']} at {r['den']} idle fds took no measurable time")
        return label, round(num / den, 3)
    if "series" in cond:
        s = cond["series"]
        return f"{s['backend']} t({s['n']})", _series(probe, s["backend"], s["n"])
    path = cond["path"]
    value = _walk(probe, path)
    if value is None and not ("equals" in cond and cond["equals"] is None):
        # Probes record null where a mechanism is absent (level_edge's
        # kqueue on Linux) and say why in "notes" under the mechanism's name.
        parent = _walk(probe, path[:-1])
        notes = probe.get("notes")
        why = parent.get("why") if isinstance(parent, dict) else None
        why = why or (notes.get(path[-1]) if isinstance(notes, dict) else None)
        raise _Missing(str(why or f"{'.'.join(map(str, path))} is null"))
    return ".".join(map(str, path)), value


def _test(cond: Dict[str, Any], value: Any) -> Tuple[bool, str]:
    """(holds, the expectation in words) for one condition."""
    if "equals" in cond:
        want = cond["equals"]
        if isinstance(want, bool) or want is None:
            return value is want, f"== {json.dumps(want)}"
        return value == want and not isinstance(value, bool), f"== {json.dumps(want)}"
    if "in" in cond:
        return value in cond["in"], f"one of {cond['in']}"
    if "startswith" in cond:
        return isinstance(value, str) and value.startswith(cond["startswith"]), \
            f"starts with {cond['startswith']!r}"
    words: List[str] = []
    ok = True
    if "includes" in cond:
        ok = ok and isinstance(value, list) and all(x in value for x in cond["includes"])
        words.append(f"includes {cond['includes']}")
    if "excludes" in cond:
        ok = ok and isinstance(value, list) and not any(x in value for x in cond["excludes"])
        words.append(f"excludes {cond['excludes']}")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if "min" in cond:
        ok = ok and numeric and value >= cond["min"]
        words.append(f">= {cond['min']}")
    if "max" in cond:
        ok = ok and numeric and value <= cond["max"]
        words.append(f"<= {cond['max']}")
    return bool(ok), " and ".join(words) or "anything"


def _record(claim: Dict[str, Any], target: str, observed: Any, expected: Any,
            verdict: str, why: str) -> Dict[str, Any]:
    return {"id": claim["id"], "claim": claim["claim"], "target": target,
            "observed": observed, "expected": expected, "verdict": verdict, "why": why}


def _judge(claim: Dict[str, Any], target: str, os_family: str,
           probes: Dict[str, Any]) -> Dict[str, Any]:
    expectation = _for_family(claim, os_family)
    if expectation is None:
        return _record(claim, target, None, None, NOT_MEASURABLE,
                       f"no expectation for OS family {os_family!r}")
    conds: List[Dict[str, Any]] = expectation.get("checks", [])
    reqs: List[Dict[str, Any]] = expectation.get("requires", [])
    expected: Dict[str, str] = {}
    for cond in conds:
        label = (".".join(map(str, cond["path"])) if "path" in cond else
                 f"{cond['ratio']['backend']} t({cond['ratio']['num']})/t({cond['ratio']['den']})"
                 if "ratio" in cond else
                 f"{cond['series']['backend']} t({cond['series']['n']})")
        expected[label] = _test(cond, None)[1]
    name = claim["probe"]
    probe = probes.get(name)
    if not isinstance(probe, dict):
        return _record(claim, target, None, expected, NOT_MEASURABLE,
                       f"probe {name} was not run")
    if "error" in probe and not any("path" in c and c["path"][:1] == ["error"] for c in conds):
        why = f"probe {name} failed: {probe['error']}"
        return _record(claim, target, None, expected, NOT_MEASURABLE, why)
    observed: Dict[str, Any] = {}
    for cond in reqs:
        try:
            label, value = _observe(cond, probe)
        except _Missing as exc:
            return _record(claim, target, observed or None, expected, NOT_MEASURABLE, str(exc))
        observed[label] = value
        if not _test(cond, value)[0]:
            return _record(claim, target, observed, expected, NOT_MEASURABLE,
                           f"{cond.get('why', 'precondition failed')} ({label} = {value})")
    failures: List[str] = []
    missing: List[str] = []
    for cond in conds:
        try:
            label, value = _observe(cond, probe)
        except _Missing as exc:
            if cond.get("missing") == DIFFERS:
                failures.append(f"{exc}")
            else:
                missing.append(str(exc))
            continue
        observed[label] = value
        holds, words = _test(cond, value)
        if not holds:
            failures.append(f"{label} = {json.dumps(value)}, expected {words}")
    if failures:
        return _record(claim, target, observed, expected, DIFFERS, "; ".join(failures))
    if missing:
        return _record(claim, target, observed or None, expected, NOT_MEASURABLE,
                       "; ".join(missing))
    return _record(claim, target, observed, expected, AGREES, "")


def evaluate(target: str, os_family: str, probes: Dict[str, Any],
             expected_path: Optional[str] = None) -> List[Dict[str, Any]]:
    """One claim record per claim of ``expected.json``, for one target.

    Parameters: ``target`` names the target (it goes into each record);
    ``os_family`` is ``linux``, ``freebsd`` or ``darwin``; ``probes`` is what
    ``iomux.probes.run()`` returned (the ``"probes"`` value of ``iomux probe
    --json`` is accepted too, as is the whole printed document).

    Returns records ``{id, claim, target, observed, expected, verdict, why}``
    with verdict ``agrees``, ``differs`` or ``not measurable``.
    """
    if isinstance(probes.get("probes"), dict):
        probes = probes["probes"]
    return [_judge(claim, target, os_family, probes) for claim in load_expected(expected_path)]
