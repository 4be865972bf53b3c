"""Behaviour probes: measure, on the kernel at hand, each claim of the
select/epoll/kqueue write-up (issue 5).

Each probe is one module with ``probe(ctx: ProbeContext) -> dict`` and returns
what it observed (numbers, and event masks by symbolic name), never a verdict;
``iomux.probes.claims`` compares the observations with ``expected.json``.

The whole suite must finish within 60 s even in a VM that runs Python ten
times slower than a laptop, so each probe gets a share of a time budget and
grows its sizes only while its share lasts; every probe records the sizes it
really used, and ``elapsed_s``.
"""

from __future__ import annotations

import importlib
import os
import time
import traceback
from typing import Any, Dict, List, Optional

from iomux.probes._common import ProbeContext

#: Probe names, in run order, with each one's share of the time budget. The
#: cheap, exact probes go first; the two that time a server go last.
_SHARES: Dict[str, float] = {
    "fd_setsize": 0.06,
    "wait_cost": 0.24,
    "level_edge": 0.04,
    "registration": 0.12,
    "nonfile_events": 0.08,
    "halfclose_reset": 0.04,
    "accept_flags": 0.02,
    "sockopt_inherit": 0.01,
    "buffer_sizes": 0.01,
    "shutdown_events": 0.03,
    "listen_backlog": 0.03,
    "refused_connect": 0.01,
    "reuseport": 0.10,
    "errno_names": 0.04,
    "cores": 0.26,
}

#: Every probe name ``run`` knows, in run order.
PROBES: List[str] = list(_SHARES)

#: Seconds the whole suite may take by default (the issue's limit is 60 s).
DEFAULT_BUDGET = 45.0


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        return default


def run(names: Optional[List[str]] = None, *, budget: Optional[float] = None,
        scale: Optional[float] = None) -> Dict[str, Any]:
    """Run the named probes (all of them for None) and return their observations.

    Parameters: ``names`` is a list of names from ``PROBES`` (unknown names get
    an ``{"error": ...}`` record); ``budget`` is the seconds the whole run may
    take (default ``IOMUX_PROBE_BUDGET`` or 45); ``scale`` in (0, 1] shrinks the
    full sizes of the issue (default ``IOMUX_PROBE_SCALE`` or 1).

    Returns a dict keyed by probe name. A probe that crashes is recorded as
    ``{"error": "Type: message", "elapsed_s": s}``; the others still run.
    """
    chosen = PROBES if names is None else list(names)
    total = budget if budget is not None else _env_float("IOMUX_PROBE_BUDGET", DEFAULT_BUDGET)
    factor = scale if scale is not None else _env_float("IOMUX_PROBE_SCALE", 1.0)
    factor = min(1.0, max(0.001, factor))
    share_sum = sum(_SHARES.get(n, 0.0) for n in chosen) or 1.0
    end = time.monotonic() + total
    out: Dict[str, Any] = {}
    for i, name in enumerate(chosen):
        if name not in _SHARES:
            out[name] = {"error": f"unknown probe {name!r}; known: {', '.join(PROBES)}"}
            continue
        # A probe gets its share of what is left, so one that ran long
        # shortens the ones after it rather than the run overshooting.
        left = max(0.0, end - time.monotonic())
        rest = sum(_SHARES.get(n, 0.0) for n in chosen[i:]) or share_sum
        allowance = left * _SHARES[name] / rest
        ctx = ProbeContext(scale=factor, deadline=time.monotonic() + allowance)
        t0 = time.monotonic()
        try:
            module = importlib.import_module(f"iomux.probes.{name}")
            result: Dict[str, Any] = dict(module.probe(ctx))
        except Exception as exc:  # one broken probe must not lose the others' figures
            last = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" at {last[0].name}:{last[0].lineno}" if last else ""
            result = {"error": f"{type(exc).__name__}: {exc}{where}"}
        result["elapsed_s"] = round(time.monotonic() - t0, 4)
        result["allowance_s"] = round(allowance, 3)
        out[name] = result
    return out
