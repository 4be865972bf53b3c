"""Writing a run's report directory: results.json, summary.md, report.html."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Dict

from iomux.report import page, text
from iomux.report.schema import SCHEMA_FILE, ResultsError, validate


def _atomic_write(path: Path, content: str) -> None:
    # Temp file + rename: a reader (CI artefact upload, a person refreshing the
    # page) never sees half a file, and a crash leaves the old one intact.
    # Not mkstemp: its files are mode 0600, and a report is meant to be read by
    # others (a web server, a CI artefact collector); open() honours the umask.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(content)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def checked(results: Dict[str, Any]) -> Dict[str, Any]:
    """A JSON round trip of ``results``, checked against the schema.

    Raises:
        ResultsError: the document cannot be written as JSON or breaks the schema.
    """
    try:
        doc: Dict[str, Any] = json.loads(json.dumps(results, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ResultsError(f"results cannot be written as JSON: {exc}") from None
    validate(doc)
    return doc


def write_all(run_dir: Path, results: Dict[str, Any], results_name: str = "results.json") -> None:
    """Check ``results`` and write results_name, summary.md and report.html into run_dir."""
    try:
        doc = checked(results)
    except ResultsError as exc:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Keep what the run produced, so a harness bug does not cost the results.
        bad = run_dir / "results.invalid.json"
        _atomic_write(bad, json.dumps(results, indent=2, default=repr) + "\n")
        raise ResultsError(f"results do not follow {SCHEMA_FILE}: {exc} (kept as {bad})") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(run_dir / results_name, json.dumps(doc, indent=2) + "\n")
    _atomic_write(run_dir / "summary.md", text.summary_md(doc))
    html = page.report_html(doc, run_dir)
    if results_name != "results.json":
        html = html.replace('href="results.json"', f'href="{results_name}"')
    _atomic_write(run_dir / "report.html", html)


def write_run(run_dir: Path, results: Dict[str, Any]) -> None:
    """Write a run's report: results.json (schema-checked), summary.md and report.html.

    Parameters:
        run_dir: the run's report directory (``reports/<run-id>/``); created if
            missing. junit.xml already in it is linked from report.html, so call
            this after pytest has written it where possible.
        results: the run's results, following iomux/report/results.schema.json.

    Raises:
        ResultsError: the results break the schema; the message names the place
            in the document (``/targets/0/status: ...``). Nothing but
            ``results.invalid.json`` is written then.
        OSError: the directory cannot be written.
    """
    write_all(Path(run_dir), results)
