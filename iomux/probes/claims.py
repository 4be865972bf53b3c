"""Judge the probes' observations: does the write-up's claim hold on this
kernel, and does this kernel behave as we expect it to? Two questions, kept
apart (issue 14).

The data is ``expected.json`` beside this module, one entry per claim:

- ``predicts``: what the write-up's claim predicts, per API family
  (``linux``, ``freebsd``, ``darwin``; a key may list several:
  ``"freebsd,darwin"``). gVisor offers the Linux ABI, so the claim's Linux
  prediction is what it is judged by. Judged: ``holds``, ``refuted`` or
  ``not measurable``.
- ``expected``: what each kernel (``linux``, ``gvisor``, ``freebsd``,
  ``darwin``) is expected to do, where that is not simply the claim's
  prediction: one entry, or a list of entries that each may carry
  ``versions`` (``{"min": "5.3"}`` inclusive, ``{"below": "5.3"}``
  exclusive; the first entry whose range holds the kernel's version wins, an
  entry without ``versions`` holds for any version). An entry is
  ``{"requires", "checks", "reason"}``, or ``{"as": "linux"}`` /
  ``{"as": "predicts"}``, or ``{"unknown": "why"}`` (nothing can be said:
  the cell is not run). A kernel without an entry is expected to behave like
  its family's reference: gVisor like Linux, the others as the claim
  predicts. Every expectation that differs from Linux's carries a one-line
  ``reason`` (a unit test checks this): a difference is data, never a
  weakened check.

Each record then holds the observation, ``claim_verdict`` (the first
question), ``expected`` and ``matches`` (the second), and ``cell``:
``agrees`` (matches an expectation equal to Linux's), ``expected
difference`` (matches a reasoned expectation that differs from Linux's),
``unexpected difference`` (contradicts its kernel's expectation) or ``not
run``. ``verdict`` (agrees / differs / not measurable) is the second
question in the older words.

An expectation (or a prediction) holds two lists of conditions:
``requires`` (when one fails the claim is *not measurable* here, with the
condition's ``why``; ``{value}`` in it is replaced by the observed value) and
``checks`` (when one fails the claim *differs*). A condition picks one
observed value and tests it:

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
import re
from typing import Any, Dict, List, Optional, Tuple

AGREES = "agrees"
DIFFERS = "differs"
NOT_MEASURABLE = "not measurable"

#: The first question: does the write-up's claim hold here?
HOLDS = "holds"
REFUTED = "refuted"

#: The cell of the kernel x claim grid.
CELL_AGREES = "agrees"
CELL_EXPECTED = "expected difference"
CELL_UNEXPECTED = "unexpected difference"
CELL_NOT_RUN = "not run"
CELLS = (CELL_AGREES, CELL_EXPECTED, CELL_UNEXPECTED, CELL_NOT_RUN)

#: The kernels expected.json speaks of, and the API family each offers.
KERNELS = {"linux": "linux", "gvisor": "linux", "freebsd": "freebsd", "darwin": "darwin"}

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
    for families, expectation in claim.get("predicts", {}).items():
        if os_family in [f.strip() for f in families.split(",")]:
            return dict(expectation)
    return None


def version_key(version: str) -> Tuple[int, ...]:
    """A kernel version's leading dotted numbers: "6.1.0-18-amd64" -> (6, 1, 0).

    gVisor's versions are release dates after Debian's "0.0~":
    "0.0~20221219.0-2+b3" -> (20221219, 0).
    """
    text = version.split("~", 1)[1] if "~" in version else version
    found = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(n) for n in found.group(0).split(".")) if found else ()


def _in_range(versions: Dict[str, str], version: str) -> bool:
    key = version_key(version)
    if "min" in versions and key < version_key(versions["min"]):
        return False
    return not ("below" in versions and key >= version_key(versions["below"]))


#: The version to pass for "the entry that holds for current versions": the
#: first one without a version range.
LATEST = "latest"


class _Unknown(Exception):
    """No expectation can be given for this kernel; the message says why."""


def _entries(claim: Dict[str, Any], kernel: str) -> List[Dict[str, Any]]:
    for kernels, raw in claim.get("expected", {}).items():
        if kernel in [k.strip() for k in kernels.split(",")]:
            return list(raw) if isinstance(raw, list) else [raw]
    return []


def expectation_for(claim: Dict[str, Any], kernel: str, version: Optional[str] = None,
                    platform: Optional[str] = None) -> Dict[str, Any]:
    """The resolved expectation of ``claim`` for ``kernel`` at ``version``.

    ``version`` None (unknown) or LATEST means a current version: the
    entries with a version range are passed over. ``platform`` (``uml``,
    ``native`` or None) picks the entries written for one platform. Returns ``{"requires", "checks",
    "reason"}``. Raises _Unknown when none can be given.
    """
    family = KERNELS.get(kernel, kernel)
    for entry in _entries(claim, kernel):
        # An unknown version is taken to be a current one.
        if "versions" in entry and (version in (LATEST, None)
                                    or not _in_range(entry["versions"], str(version))):
            continue
        # An entry for one platform (User-Mode Linux: "uml") holds only there.
        if "platform" in entry and entry["platform"] != platform:
            continue
        if "unknown" in entry:
            raise _Unknown(f"no expectation for {kernel}: {entry['unknown']}")
        if entry.get("as") == "linux":
            return expectation_for(claim, "linux", LATEST)
        if entry.get("as") == "predicts":
            break
        return {"requires": entry.get("requires", []), "checks": entry.get("checks", []),
                "reason": entry.get("reason")}
    else:
        if kernel != family:
            # A kernel with no entry behaves like its family's reference kernel.
            return expectation_for(claim, family, LATEST)
    predicted = _for_family(claim, family)
    if predicted is None:
        raise _Unknown(f"no expectation for kernel {kernel!r}")
    return {"requires": predicted.get("requires", []), "checks": predicted.get("checks", []),
            "reason": predicted.get("reason")}


def differs_from_linux(claim: Dict[str, Any], expectation: Dict[str, Any]) -> bool:
    """True when ``expectation`` is not the same conditions as Linux's (latest) one."""
    try:
        linux = expectation_for(claim, "linux", LATEST)
    except _Unknown:
        return True
    return bool((linux["requires"], linux["checks"]) !=
                (expectation["requires"], expectation["checks"]))


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


def _label(cond: Dict[str, Any]) -> str:
    if "path" in cond:
        return ".".join(map(str, cond["path"]))
    if "ratio" in cond:
        r = cond["ratio"]
        return f"{r['backend']} t({r['num']})/t({r['den']})"
    return f"{cond['series']['backend']} t({cond['series']['n']})"


def _record(claim: Dict[str, Any], target: str, observed: Any, expected: Any,
            verdict: str, why: str) -> Dict[str, Any]:
    return {"id": claim["id"], "claim": claim["claim"], "target": target,
            "observed": observed, "expected": expected, "verdict": verdict, "why": why}


def _judge(claim: Dict[str, Any], target: str, expectation: Dict[str, Any],
           probes: Dict[str, Any]) -> Dict[str, Any]:
    conds: List[Dict[str, Any]] = expectation.get("checks", [])
    reqs: List[Dict[str, Any]] = expectation.get("requires", [])
    expected = {_label(cond): _test(cond, None)[1] for cond in conds}
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
            why = str(cond.get("why", "precondition failed"))
            return _record(claim, target, observed, expected, NOT_MEASURABLE,
                           why.format(value=value) if "{value}" in why else f"{why} ({label} = {value})")
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


def _quiet_observe(conds: List[Dict[str, Any]], probe: Any) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    if not isinstance(probe, dict):
        return seen
    for cond in conds:
        try:
            label, value = _observe(cond, probe)
        except (_Missing, KeyError, TypeError):
            continue
        seen[label] = value
    return seen


def judge(claim: Dict[str, Any], target: str, kernel: str, kernel_version: Optional[str],
          probes: Dict[str, Any], platform: Optional[str] = None) -> Dict[str, Any]:
    """The record of one claim on one target: both questions, and the grid's cell."""
    family = KERNELS.get(kernel, kernel)
    predicted = _for_family(claim, family)
    if predicted is None:
        first = _record(claim, target, None, None, NOT_MEASURABLE,
                        f"the claim predicts nothing for the {family} API")
    else:
        first = _judge(claim, target, predicted, probes)
    claim_verdict = {AGREES: HOLDS, DIFFERS: REFUTED}.get(first["verdict"], NOT_MEASURABLE)
    reason: Optional[str] = None
    try:
        expectation = expectation_for(claim, kernel, kernel_version, platform)
    except _Unknown as exc:
        second = _record(claim, target, first["observed"], None, NOT_MEASURABLE, str(exc))
        differs = False
    else:
        second = _judge(claim, target, expectation, probes)
        reason = expectation.get("reason")
        differs = differs_from_linux(claim, expectation)
    observed: Dict[str, Any] = {}
    probe = probes.get(claim["probe"])
    try:
        linux_conds = expectation_for(claim, "linux", LATEST)["checks"]
    except _Unknown:
        linux_conds = []
    # Linux's figures too, so a difference reads against what Linux shows.
    observed.update(_quiet_observe(linux_conds, probe))
    for part in (first["observed"], second["observed"]):
        if isinstance(part, dict):
            observed.update(part)
    if second["verdict"] == AGREES and differs:
        # A kernel whose own expectation allows Linux's answer, and gave it,
        # agrees with Linux (a threshold written for a slower platform, say).
        try:
            as_linux = _judge(claim, target, expectation_for(claim, "linux", LATEST), probes)
        except _Unknown:
            as_linux = {"verdict": DIFFERS}
        differs = as_linux["verdict"] != AGREES
    if second["verdict"] == AGREES:
        cell, matches = (CELL_EXPECTED if differs else CELL_AGREES), True
    elif second["verdict"] == DIFFERS:
        cell, matches = CELL_UNEXPECTED, False
    else:
        cell, matches = CELL_NOT_RUN, None
    record = _record(claim, target, observed or None, second["expected"],
                     second["verdict"], second["why"])
    try:
        linux_expected = {_label(c): _test(c, None)[1]
                          for c in expectation_for(claim, "linux", LATEST)["checks"]}
    except _Unknown:
        linux_expected = None
    record.update({
        "kernel": kernel, "kernel_version": kernel_version, "kernel_platform": platform,
        "linux_expected": linux_expected,
        "claim_verdict": claim_verdict, "claim_why": first["why"],
        "predicted": first["expected"],
        "expected_reason": reason if differs else None,
        "matches": matches, "cell": cell,
    })
    return record


def evaluate(target: str, os_family: str, probes: Dict[str, Any],
             expected_path: Optional[str] = None, *, kernel: Optional[str] = None,
             kernel_version: Optional[str] = None,
             kernel_platform: Optional[str] = None) -> List[Dict[str, Any]]:
    """One claim record per claim of ``expected.json``, for one target.

    Parameters: ``target`` names the target (it goes into each record);
    ``os_family`` is ``linux``, ``freebsd`` or ``darwin``; ``probes`` is what
    ``iomux.probes.run()`` returned (the ``"probes"`` value of ``iomux probe
    --json`` is accepted too, as is the whole printed document); ``kernel``
    (default: the os_family) is ``linux``, ``gvisor``, ``freebsd`` or
    ``darwin``, and ``kernel_version`` its version where expectations depend
    on it (``uname -r`` for Linux, the release date for gVisor);
    ``kernel_platform`` is ``uml`` for User-Mode Linux (iomux.facts).

    Returns records ``{id, claim, target, observed, expected, verdict, why}``
    with verdict ``agrees``, ``differs`` or ``not measurable`` against the
    kernel's expectation, plus ``kernel``, ``kernel_version``,
    ``claim_verdict`` (holds, refuted, not measurable), ``claim_why``,
    ``predicted``, ``expected_reason``, ``matches`` and ``cell``.
    """
    if isinstance(probes.get("probes"), dict):
        probes = probes["probes"]
    chosen = kernel or os_family
    return [judge(claim, target, chosen, kernel_version, probes, kernel_platform)
            for claim in load_expected(expected_path)]


def unexpected(records: List[Dict[str, Any]]) -> List[str]:
    """One line per record whose observation contradicts its kernel's expectation."""
    return [f"{r['target']} {r['id']} ({r.get('kernel')} {r.get('kernel_version') or ''}): "
            f"{r['why']}".replace(" ): ", "): ")
            for r in records if r.get("cell") == CELL_UNEXPECTED]
