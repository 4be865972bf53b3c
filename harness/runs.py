"""The runs: a run's directory, what it cannot run, and the live runs of this machine.

Every run of the harness gets a run id (``<UTC stamp>-<6 hex>``) and a directory
``reports/<run-id>/`` that holds its event log, its targets' logs and its report;
``reports/latest`` points at the newest one. Before any target starts, the
controller decides which targets cannot run here (``check_engines``; one line
each, the whole story in ``targets/<name>/not-run.log``). While a run is alive it
holds a lock file in ``LIVE_DIR``, whatever its reports directory, so that the
sweep (``sweep_dead_runs``) knows which runs are dead (their resources may go) and
which are still going (never touch theirs). The controller does all of this; the
workers are handed the run id, the directory and the not-run targets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Mapping, Sequence

from harness import reasons
from harness.drivers import DriverUnavailable, UnknownKind, get_driver
from harness.drivers.base import Driver, Target
from harness.kept_targets import current_hashes as kept_hashes
from harness.lifecycle import sweep_leftovers
from harness.progress import EventLog
from harness.targets import unavailable_reasons

#: Where every harness run on this machine registers itself while it is alive
#: (a file held under flock), whatever its reports directory: a sweep must not
#: remove the containers of another engineer's run that is still going.
LIVE_DIR = Path(tempfile.gettempdir()) / "iomux-harness-runs"


def new_run_id() -> str:
    """A fresh run id: the UTC time it starts and six random hex digits."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{stamp}-{uuid.uuid4().hex[:6]}"


def make_run_dir(reports_dir: Path, run_id: str) -> Path:
    """Make ``reports_dir/<run_id>/`` and point ``reports_dir/latest`` at it."""
    run_dir = reports_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = reports_dir / "latest"
    tmp = reports_dir / f".latest-{run_id}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(run_id)
    os.replace(tmp, latest)  # atomic: a reader never sees no "latest"
    return run_dir


def note_not_run(run_dir: Path, name: str, reason: str) -> str:
    """The one line a not-run target shows everywhere (harness.reasons.fit); the
    whole story goes to the target's log, targets/<name>/not-run.log."""
    line = reasons.fit(reason)
    detail = getattr(line, "detail", "") or getattr(reason, "detail", "")
    if detail:
        log = run_dir / "targets" / name / "not-run.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"not run: {line}\n{detail}\n")
    return str(line)


def check_engines(selected: Sequence[Target], run_dir: Path) -> dict[str, str]:
    """Which of ``selected`` cannot run here, and why (one line each, the whole story
    in ``run_dir``'s not-run logs): target name -> reason. The checks are
    ``harness.targets.unavailable_reasons``', the ones ``make targets`` shows."""
    return {name: note_not_run(run_dir, name, reason)
            for name, reason in unavailable_reasons(selected).items() if reason}


class LiveRun:
    """This run's lock file in ``LIVE_DIR``, held under flock while the run is alive."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._live_fd: int | None = None

    def register(self) -> list[str] | None:
        """Register this run as alive; return the dead runs to sweep (None: every run)."""
        LIVE_DIR.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            LIVE_DIR.chmod(0o1777)
        others_alive = False
        stale: list[str] = []
        for lock in LIVE_DIR.glob("*.lock"):
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                others_alive = True  # its owner still holds it
            else:
                stale.append(lock.stem)  # killed without cleaning up: sweep its resources
                with contextlib.suppress(OSError):
                    lock.unlink()
            finally:
                os.close(fd)
        self._live_fd = os.open(LIVE_DIR / f"{self.run_id}.lock",
                                os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._live_fd, fcntl.LOCK_EX)
        return stale if others_alive else None

    def unregister(self) -> None:
        """This run is over: its lock goes, so no later sweep waits on it."""
        if self._live_fd is not None:
            with contextlib.suppress(OSError):
                (LIVE_DIR / f"{self.run_id}.lock").unlink()
            os.close(self._live_fd)
            self._live_fd = None


def sweep_dead_runs(live: LiveRun, selected: Sequence[Target], not_run: Mapping[str, str],
                    events: EventLog, declared: Sequence[Target] = ()) -> dict[str, list[str]]:
    """The sweep step, once per run: register ``live`` as alive, then remove the
    leftovers of the dead runs (of every run, when no other is alive) for each kind
    of ``selected`` that will run (each driver is given those targets of its kind:
    a docker target's own engine is swept too). Returns what each kind's sweep removed."""
    stale = live.register()
    drivers: dict[str, Driver] = {}
    for target in selected:
        if target.name not in not_run and target.kind not in drivers:
            with contextlib.suppress(UnknownKind, DriverUnavailable):
                drivers[target.kind] = get_driver(target.kind)
    running = [t for t in selected if t.name not in not_run]
    try:
        # Kept targets of this tree and recipe (any of ``declared``) are spared.
        current: dict[str, str] | None = kept_hashes(declared, drivers)
    except OSError:  # a tree that cannot be read spares no kept target
        current = None
    return sweep_leftovers(drivers, stale, events, targets=running, current=current)
