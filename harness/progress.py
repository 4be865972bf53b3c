"""Live per-target progress, and the event log that carries it between processes.

Under pytest-xdist the targets are brought up in worker processes, but only the
controller owns the terminal. Workers therefore append one JSON object per line
to ``<run dir>/events.jsonl`` (``EventLog.emit``); the controller tails that file
in a thread (``ProgressView``) and prints a line whenever a target changes phase
(building, starting, healthy, testing, tearing down), with the seconds since
that target's first event, plus a heartbeat naming what is still going on.
A plain file survives a crashed worker, needs no channel of its own, and is
also the record the controller builds results.json from at the end.

On a terminal the lines are coloured with rich; otherwise they are plain text.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator

#: The phases a target passes through, in order, and the style each is shown in.
PHASE_STYLES: dict[str, str] = {
    "sweeping": "dim",
    "building": "cyan",
    "built": "cyan",
    "starting": "cyan",
    "waiting": "cyan",
    "healthy": "green",
    "testing": "blue",
    "saving logs": "yellow",
    "tearing down": "magenta",
    "done": "bold green",
    "failed": "bold red",
    "kept": "yellow",
    "not run": "dim",
}

#: How often the view prints the targets still in progress, in seconds.
HEARTBEAT = 30.0


class EventLog:
    """Append-only JSON-lines file shared by the controller and every worker."""

    def __init__(self, path: Path, worker: str) -> None:
        self.path = path
        self.worker = worker

    def emit(self, target: str, type_: str, **fields: Any) -> None:
        """Append one event; ``type_`` is ``phase``, ``timing``, ``record`` or ``error``."""
        event = {"t": time.time(), "target": target, "worker": self.worker, "type": type_}
        event.update(fields)
        line = (json.dumps(event, default=str) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One write() of an O_APPEND file under an exclusive lock: lines from
        # several processes never interleave, however long they are.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)

    def phase(self, target: str, phase: str, detail: str = "") -> None:
        """Say that ``target`` entered ``phase`` (one of PHASE_STYLES)."""
        self.emit(target, "phase", phase=phase, detail=detail)


def read_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Whole lines of ``path`` from ``offset``; returns them and the offset after them."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    events = []
    for raw in data[:end].splitlines():
        try:
            events.append(json.loads(raw))
        except ValueError:
            continue  # a torn line (a crashed writer) is dropped, not fatal
    return events, offset + end


def iter_events(path: Path) -> Iterator[dict[str, Any]]:
    """Every event in the file."""
    yield from read_events(path)[0]


class ProgressView:
    """Tail the event log in a thread and print each target's phase changes."""

    def __init__(self, path: Path, out: IO[str], use_rich: bool,
                 interval: float = 0.5, heartbeat: float = HEARTBEAT) -> None:
        self.path = path
        self.out = out
        self.interval = interval
        self.heartbeat = heartbeat
        self._offset = 0
        self._first: dict[str, float] = {}
        self._current: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write: Callable[[str, str, str, float, str], None] = self._plain
        if use_rich:
            try:
                from rich.console import Console
            except ImportError:  # rich is a dev dependency; plain lines do without it
                pass
            else:
                self._console = Console(file=out, highlight=False, soft_wrap=True)
                self._write = self._rich

    def _plain(self, target: str, phase: str, worker: str, elapsed: float, detail: str) -> None:
        extra = f"  {detail}" if detail else ""
        self.out.write(f"[iomux] {target:<12} {phase:<13} {elapsed:7.1f}s  ({worker}){extra}\n")
        self.out.flush()

    def _rich(self, target: str, phase: str, worker: str, elapsed: float, detail: str) -> None:
        from rich.markup import escape
        style = PHASE_STYLES.get(phase, "")
        extra = f"  [dim]{escape(detail)}[/]" if detail else ""
        self._console.print(
            f"[bold]\\[iomux][/] {escape(target):<12} [{style}]{escape(phase):<13}[/] "
            f"{elapsed:7.1f}s  [dim]({escape(worker)})[/]{extra}")

    def poll(self) -> None:
        """Print whatever phase changes were appended since the last call."""
        events, self._offset = read_events(self.path, self._offset)
        for event in events:
            target = str(event.get("target", "?"))
            now = float(event.get("t", time.time()))
            first = self._first.setdefault(target, now)
            if event.get("type") != "phase":
                continue
            phase = str(event.get("phase", "?"))
            self._current[target] = phase
            self._write(target, phase, str(event.get("worker", "?")), now - first,
                        str(event.get("detail", "")))

    def _still_going(self) -> None:
        busy = [(t, p) for t, p in self._current.items()
                if p not in ("done", "failed", "kept", "not run")]
        if busy:
            now = time.time()
            parts = ", ".join(f"{t} {p} {now - self._first[t]:.0f}s" for t, p in busy)
            self.out.write(f"[iomux] still running: {parts}\n")
            self.out.flush()

    def _loop(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(self.interval):
            try:
                self.poll()
                if time.monotonic() - last_beat >= self.heartbeat:
                    last_beat = time.monotonic()
                    self._still_going()
            except (OSError, ValueError):
                pass  # the terminal went away: progress is a nicety, never fatal

    def start(self) -> None:
        """Start tailing in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="iomux-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop tailing, after printing what is left in the file."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            self.poll()
