"""Who owns a resource, and one holder at a time: what every kind's driver (and the
harness's run locks and kept-target store) uses to tell a live run from a dead one.

- ``owner_label`` names this process as ``<hostname>:<pid>:<start ticks>``; the
  start time (field 22 of /proc/PID/stat, clock ticks since boot) tells a reused
  pid from the process that made a resource.
- ``exclusive_lock`` is an ``flock`` the kernel drops when its holder dies, even
  of SIGKILL, so a killed run never leaves a lock held.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from harness.drivers.base import StepTimeout

# -- an exclusive file lock ------------------------------------------------------------

@contextlib.contextmanager
def exclusive_lock(path: Path, timeout: float | None = None,
                   poll: float = 1.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (made if absent) for the block.

    One holder at a time across xdist workers and concurrent runs on this host;
    the kernel drops the lock when its holder dies, even of SIGKILL.

    Parameters: ``timeout`` None waits as long as it takes; otherwise the lock is
    tried every ``poll`` seconds until ``timeout``. Raises StepTimeout naming the
    file when the lock was not had in time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        if timeout is None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StepTimeout(f"waiting for {path.name}: timed out after "
                                          f"{timeout:g}s") from None
                    time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -- who owns a resource ---------------------------------------------------------------

def _process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks (Linux), so a reused pid is not
    taken for the owner; "" where /proc has no answer."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but is not reaped yet (state Z or X in /proc):
    a kill -9'd harness worker stays so for a second or more, and is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def owner_label() -> str:
    """This process as a resource owner: ``<hostname>:<pid>:<process start ticks>``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def pid_alive(pid: int, started: str = "") -> bool:
    """Whether process ``pid`` of this host may still be running (and, given
    ``started``, is the process that started then, not a reuse of its pid).

    A process we may not signal counts as alive; a zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _zombie(pid):
        return False
    return not started or _process_start(pid) in ("", started)


def owner_alive(owner: str) -> bool:
    """Whether the owner recorded by ``owner_label`` may still be running.

    Owners on other hosts (a shared remote engine) and labels we cannot parse
    (compose's "compose", a hand-made container) count as alive: only
    resources of a run that provably died here are swept without a run id."""
    host, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return True
    return pid_alive(int(pid_text), started)
