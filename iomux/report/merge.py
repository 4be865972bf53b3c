"""``iomux report merge``: one matrix from the results of several machines.

Each CI matrix job runs some targets and uploads its results.json; merging
them gives the side-by-side view the project exists for.

Rules (also in DESIGN.md section 4):
- targets and claims are concatenated in input order; each target records the
  run it came from in ``source``;
- a target name found in more than one input is kept every time, renamed
  ``NAME@RUN_ID`` everywhere it occurs (claims included), because two machines
  running "debian-12" on different kernels is exactly what a reader wants to see;
- ``merged_from`` lists every input (run id, path, host); merging a merged
  file lists its original inputs, so merges compose;
- ``started`` is the earliest start, ``finished`` the latest finish.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from iomux.report import text
from iomux.report.schema import ResultsError, validate
from iomux.report.write import write_all

DEFAULT_OUT = "merged-report"


def merge(results_list: List[Dict[str, Any]], paths: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Combine several results documents into one.

    Parameters:
        results_list: results documents (each following the schema).
        paths: where each came from, for ``merged_from``; defaults to ``<input N>``.

    Returns:
        A new results document; the inputs are not modified.
    """
    sources: List[Dict[str, Any]] = []
    for i, doc in enumerate(results_list):
        path = paths[i] if paths is not None else f"<input {i + 1}>"
        if doc.get("merged_from"):
            sources += [dict(s) for s in doc["merged_from"]]
        else:
            sources.append({"run_id": str(doc.get("run_id")), "path": path, "host": doc.get("host") or {}})

    names: Dict[str, int] = {}
    for doc in results_list:
        for t in doc.get("targets") or []:
            names[str(t.get("name"))] = names.get(str(t.get("name")), 0) + 1

    targets: List[Dict[str, Any]] = []
    claims: List[Dict[str, Any]] = []
    used: set[str] = set()
    for doc in results_list:
        run_id = str(doc.get("run_id"))
        renamed: Dict[str, str] = {}
        for t in doc.get("targets") or []:
            target = dict(t)
            name = str(target.get("name"))
            target.setdefault("source", run_id)
            if names[name] > 1:
                new = f"{name}@{target['source']}"
                # The same run given twice still gets distinct names.
                suffix = 2
                while new in used:
                    new, suffix = f"{name}@{target['source']}#{suffix}", suffix + 1
                renamed[name] = new
                target["name"] = new
            used.add(str(target["name"]))
            targets.append(target)
        for c in doc.get("claims") or []:
            claim = dict(c)
            claim["target"] = renamed.get(str(claim.get("target")), claim.get("target"))
            claims.append(claim)

    run_ids = [s["run_id"] for s in sources]
    run_id = "merged-" + "+".join(run_ids)
    if len(run_id) > 80:
        run_id = f"merged-{len(run_ids)}-runs-{run_ids[0]}"
    starts = [d.get("started") for d in results_list]
    ends = [d.get("finished") for d in results_list]
    return {
        "run_id": run_id,
        "started": _extreme(starts, min) or str(starts[0] if starts else ""),
        "finished": _extreme(ends, max),
        "host": {"hosts": [s.get("host") or {} for s in sources]},
        "merged_from": sources,
        "targets": targets,
        "claims": claims,
    }


def _extreme(values: List[Any], pick: Any) -> Optional[str]:
    parsed = [(text.parse_time(v), v) for v in values]
    usable = [(p, v) for p, v in parsed if p is not None]
    # Aware and naive times cannot be compared; fall back to the first given.
    if not usable or len({p.tzinfo is None for p, _ in usable}) > 1:
        return values[0] if values and isinstance(values[0], str) else None
    chosen: str = pick(usable, key=lambda pv: pv[0])[1]
    return chosen


def _load(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ResultsError(f"{path}: not a JSON file: {exc}") from None
    try:
        validate(doc)
    except ResultsError as exc:
        raise ResultsError(f"{path}: not an iomux results file: {exc}") from None
    if not isinstance(doc, dict):  # unreachable once validated; keeps the type checker honest
        raise ResultsError(f"{path}: not an iomux results file")
    return doc


def out_paths(out: Optional[str]) -> tuple[Path, str]:
    """(directory, results file name) for ``-o OUT``.

    OUT ending in ``.json`` names the merged results file, with summary.md and
    report.html beside it; any other OUT is a directory that gets results.json.
    No OUT means ``./merged-report/results.json``.
    """
    target = Path(out if out else DEFAULT_OUT)
    if target.suffix == ".json":
        return target.parent, target.name
    return target, "results.json"


def merge_main(paths: List[str], out: Optional[str]) -> int:
    """The ``iomux report merge A.json B.json ... [-o OUT]`` command.

    Parameters:
        paths: the results.json files to merge (at least one).
        out: where to write (see ``out_paths``); None for ./merged-report/.

    Returns:
        The exit status: 0 written; 2 a bad input (missing, not JSON, not
        following the schema), reported as one ``iomux: error:`` line on stderr;
        1 the output could not be written.
    """
    if not paths:
        print("iomux: error: report merge needs at least one results.json", file=sys.stderr)
        return 2
    try:
        docs = [_load(p) for p in paths]
    except ResultsError as exc:
        print(f"iomux: error: {exc}", file=sys.stderr)
        return 2
    merged = merge(docs, paths)
    directory, name = out_paths(out)
    try:
        write_all(directory, merged, name)
    except ResultsError as exc:
        # Inputs were valid, so this is our bug; still one line, not a traceback.
        print(f"iomux: error: merged results are invalid: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"iomux: error: cannot write {directory}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(text.summary_table(merged))
    print(f"merged {len(paths)} files ({len(merged['targets'])} targets) into {directory / name}, "
          f"{directory / 'summary.md'}, {directory / 'report.html'}")
    return 0
