"""What every probe shares: a time budget, fd limits, socket helpers, and event
masks spelled by symbolic name.

Probes record observations, never verdicts (iomux.probes.claims judges them),
and spell every kernel bit by name because the numbers differ between kernels:
EV_EOF is 0x8000 on FreeBSD and macOS, EPOLLRDHUP only exists on Linux.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import select
import socket
import statistics
import sys
import time
from typing import Any, Callable, Dict, Optional

#: FD_SETSIZE of CPython's select(): the C macro CPython was compiled with.
#: 1024 on Linux (glibc), FreeBSD and macOS; CPython does not raise it.
FD_SETSIZE = 1024

Result = Dict[str, Any]


@dataclasses.dataclass
class ProbeContext:
    """The sizes and the time a probe may use.

    ``scale`` multiplies the full sizes of the issue (10,000 fds, 1,000
    connections...); ``deadline`` is a ``time.monotonic()`` value the probe
    must stop growing its sizes at. Probes record the sizes they really used.
    """

    scale: float
    deadline: float

    def left(self) -> float:
        """Seconds left before the deadline (negative once it has passed)."""
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return self.left() <= 0.0

    def size(self, full: int, minimum: int = 1) -> int:
        """``full`` scaled down by ``scale``, never below ``minimum``."""
        return max(minimum, int(full * self.scale))


def unavailable(why: str) -> Result:
    """The record of a mechanism this kernel or this Python does not offer."""
    return {"available": False, "why": why}


def errno_name(exc: BaseException) -> str:
    """The symbolic errno of an OSError (``"EPIPE"``), or the exception's type."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    return type(exc).__name__


def raise_nofile() -> Result:
    """Raise RLIMIT_NOFILE's soft limit as far as the hard limit allows.

    Returns ``{"soft_before", "soft", "hard"}`` (None for unlimited).
    macOS refuses RLIM_INFINITY as a soft limit (it caps at
    kern.maxfilesperproc), so smaller values are tried in turn.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    candidates = [hard, 1 << 20, 1 << 16, 24576, 12288, 10240]
    for want in candidates:
        if want == resource.RLIM_INFINITY and sys.platform == "darwin":
            continue
        if hard != resource.RLIM_INFINITY and want > hard:
            continue
        if soft != resource.RLIM_INFINITY and want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            continue
        soft = want
        break

    def show(v: int) -> int | None:
        return None if v == resource.RLIM_INFINITY else v

    return {"soft_before": show(before), "soft": show(soft), "hard": show(hard)}


def nofile_soft() -> int:
    """The current soft RLIMIT_NOFILE (a large number for unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def open_fd_count() -> int:
    """How many fds this process has open now (an estimate where /dev/fd is thin)."""
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d))
        except OSError:
            continue
    return 16


class IdleSockets:
    """A growing pool of idle socketpair ends: fds that never become readable."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def grow_to(self, n: int) -> list[int]:
        """Make at least ``n`` idle fds and return the first ``n`` of them."""
        while len(self.socks) < n:
            a, b = socket.socketpair()
            self.socks.extend((a, b))
        return [s.fileno() for s in self.socks[:n]]

    def close(self) -> None:
        """Close every socket of the pool."""
        for s in self.socks:
            s.close()
        self.socks.clear()


def tcp_pair(listener: socket.socket | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair ``(client, server side)``."""
    own = listener is None
    lst = listener or socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if own:
            lst.bind(("127.0.0.1", 0))
            lst.listen(8)
        client = socket.create_connection(lst.getsockname()[:2], timeout=5)
        server, _ = lst.accept()
        client.settimeout(None)
        return client, server
    finally:
        if own:
            lst.close()


def median_per_call(fn: Callable[[], object], batch: int, max_batches: int,
                    min_batches: int, seconds: float) -> tuple[float, int]:
    """Median seconds per call of ``fn``, timed in batches of ``batch`` calls.

    Stops after ``max_batches`` or once ``seconds`` have gone (but never before
    ``min_batches``). Returns (median seconds per call, calls made)."""
    times: list[float] = []
    end = time.monotonic() + seconds
    while len(times) < max_batches and (len(times) < min_batches or time.monotonic() < end):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - t0) / batch)
    return statistics.median(times), len(times) * batch


# Symbolic names, in the order a person reads them. Only names this Python's
# select module defines are used, so a name missing on a kernel never appears.
EPOLL_NAMES = ("EPOLLIN", "EPOLLPRI", "EPOLLOUT", "EPOLLERR", "EPOLLHUP", "EPOLLRDHUP",
               "EPOLLRDNORM", "EPOLLRDBAND", "EPOLLWRNORM", "EPOLLWRBAND", "EPOLLMSG",
               "EPOLLET", "EPOLLONESHOT", "EPOLLEXCLUSIVE")
POLL_NAMES = ("POLLIN", "POLLPRI", "POLLOUT", "POLLERR", "POLLHUP", "POLLNVAL", "POLLRDHUP",
              "POLLRDNORM", "POLLRDBAND", "POLLWRNORM", "POLLWRBAND", "POLLMSG")
KQ_FLAG_NAMES = ("KQ_EV_ADD", "KQ_EV_DELETE", "KQ_EV_ENABLE", "KQ_EV_DISABLE",
                 "KQ_EV_ONESHOT", "KQ_EV_CLEAR", "KQ_EV_EOF", "KQ_EV_ERROR")
KQ_FILTER_NAMES = ("KQ_FILTER_READ", "KQ_FILTER_WRITE", "KQ_FILTER_AIO", "KQ_FILTER_VNODE",
                   "KQ_FILTER_PROC", "KQ_FILTER_SIGNAL", "KQ_FILTER_TIMER")


def _kernel_name(py_name: str) -> str:
    # select.KQ_EV_EOF is the kernel's EV_EOF, select.KQ_FILTER_READ is EVFILT_READ.
    if py_name.startswith("KQ_FILTER_"):
        return "EVFILT_" + py_name[len("KQ_FILTER_"):]
    if py_name.startswith("KQ_"):
        return py_name[len("KQ_"):]
    return py_name


def mask_names(mask: int, names: tuple[str, ...]) -> list[str]:
    """Spell ``mask`` as the names of its bits; unnamed bits appear as hex."""
    out: list[str] = []
    rest = mask
    for name in names:
        bit: Optional[int] = getattr(select, name, None)
        if bit and mask & bit == bit:
            out.append(_kernel_name(name))
            rest &= ~bit
    if rest:
        out.append(hex(rest))
    return out


def kq_filter_name(value: int) -> str:
    """EVFILT_READ and friends by name (the filters are small negative numbers)."""
    for name in KQ_FILTER_NAMES:
        if getattr(select, name, None) == value:
            return _kernel_name(name)
    return str(value)


def has_kqueue() -> bool:
    """True where this Python offers select.kqueue (FreeBSD, macOS, the other BSDs)."""
    return hasattr(select, "kqueue")


def has_epoll() -> bool:
    """True where this Python offers select.epoll (Linux)."""
    return hasattr(select, "epoll")


NO_KQUEUE = "no select.kqueue on this kernel"
NO_EPOLL = "no select.epoll on this kernel"
NO_POLL = "no select.poll in this Python"


#: The select module seen as Any: typeshed hides the kqueue names on Linux and
#: the epoll names on the BSDs, and the probes use whichever the kernel has.
SEL: Any = select


# A probe's child run under a tracer reports its own exit status in a file:
# the tracer's status is not the child's (FreeBSD's truss exits 0 whatever
# the child did; Linux's strace passes the child's on, but exits 1 for its
# own failures too), so a child that failed is never read as a count of 0.
CHILD_RUNNER = """
import sys, traceback
path, code = sys.argv[1], sys.argv[2]
del sys.argv[1:3]
status = 0
try:
    exec(compile(code, "<probe child>", "exec"), {"__name__": "__main__"})
except SystemExit as exc:
    status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
except BaseException:
    traceback.print_exc()
    status = 1
with open(path, "w") as f:
    f.write(str(status))
sys.exit(status)
"""


def child_argv(status_path: str, code: str, *args: str) -> list[str]:
    """argv running ``code`` in a fresh interpreter that writes its exit status to ``status_path``."""
    return [sys.executable, "-c", CHILD_RUNNER, status_path, code, *args]


def child_failure(status_path: str, stderr: str) -> Optional[str]:
    """None if the child of ``child_argv`` exited 0, else why it failed (its last stderr line)."""
    try:
        with open(status_path, encoding="utf-8") as f:
            status = f.read().strip()
    except OSError:
        status = ""
    if status == "0":
        return None
    last = (stderr.strip().splitlines() or ["no message"])[-1]
    what = f"exited {status}" if status else "left no exit status (killed?)"
    return f"the probe's child {what}: {last}"
