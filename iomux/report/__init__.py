"""iomux.report: the report of a cross-OS run, and merging reports from several machines.

A run's report directory (``reports/<run-id>/``) holds:

- ``results.json``, checked against ``results.schema.json`` (package data
  beside this file; the one schema of DESIGN.md section 4);
- ``summary.md``, the targets x backends x suites matrix and the claims table;
- ``report.html``, the same tables, the test lists and two plots, self-contained.

Everything here is standard library only, except the plots, which import
matplotlib lazily and are replaced by a note when it is missing, and schema
checking, which uses jsonschema when it is installed and a small built-in
checker otherwise.
"""

from __future__ import annotations

from iomux.report.merge import merge, merge_main
from iomux.report.schema import ResultsError, load_schema, validate
from iomux.report.text import summary_md, summary_table
from iomux.report.write import write_run

__all__ = [
    "ResultsError",
    "load_schema",
    "merge",
    "merge_main",
    "summary_md",
    "summary_table",
    "validate",
    "write_run",
]
