"""Claim: epoll needs one call per registration, kqueue batches many changes into
one kevent() (write-up: "当有100个文件描述符来注册事件时, 需要进行一百次的epoll.register()
... kqueue()可以在单个kevent中注册多个事件").

Facts this probe relies on:
- select.epoll.register() is one epoll_ctl(EPOLL_CTL_ADD) system call.
- select.kqueue.control(changelist, 0, 0) hands the whole changelist to one
  kevent() call (CPython copies it into one C array). CPython calls kevent()
  even for an empty changelist, so the zero-fd baseline child makes no
  control() call at all: the difference is the batch's one call.
- System calls are counted from outside the process, by strace(1) on Linux and
  truss(1) on FreeBSD, in a child that registers N fds, minus a child that
  registers none (interpreter start-up noise). Where no tracer works (no
  binary, ptrace forbidden, macOS's dtruss needing root) the count is left out
  with the reason, never guessed. The child's own exit status is judged, not
  the tracer's (truss exits 0 whatever the child did): a child that failed
  makes the count "not measurable" with its last error line, never 0.
- The traced child registers the write-up's own 100 fds (TRACED_FDS), not the
  1000 that are timed: the count is exact at any size, and each of the
  child's system calls costs two ptrace stops. strace 5.3 and later also
  takes --seccomp-bpf, so that the child stops only at the traced call (it
  implies --kill-on-exit; a filter of the target's own that denies or kills
  outranks strace's SECCOMP_RET_TRACE, but container profiles allow
  epoll_ctl: strace/strace#274). A count that fails is "not measurable" with
  why, as above.
  Measured in debian-vm under TCG (one child, alone): 1000 fds 6.6 s, 100 fds
  2.5 s, 100 fds with the filter 0.9 s, the zero-fd baseline 1.3 s; the
  probe's share of the suite's budget there is about 5.5 s, and its 1000-fd
  count always timed out.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from iomux.probes._common import (
    NO_EPOLL,
    NO_KQUEUE,
    SEL,
    IdleSockets,
    ProbeContext,
    child_argv,
    child_failure,
    has_epoll,
    has_kqueue,
    raise_nofile,
    unavailable,
)

FULL_FDS = 1000
REPEATS = 5
#: fds the traced child registers: the write-up's figure (see the module docstring).
TRACED_FDS = 100
#: The first strace with --seccomp-bpf.
SECCOMP_BPF_SINCE = (5, 3)

# The child the tracer watches: make N idle fds, register them, exit. With
# N = 0 (the baseline) it makes the mechanism's object but no call on it.
CHILD = """
import select, socket, sys
n, mech = int(sys.argv[1]), sys.argv[2]
socks = [socket.socketpair() for _ in range((n + 1) // 2)]
fds = [s.fileno() for pair in socks for s in pair][:n]
if mech == "epoll":
    ep = select.epoll()
    for fd in fds:
        ep.register(fd, select.EPOLLIN)
else:
    kq = select.kqueue()
    if fds:
        kq.control([select.kevent(fd, select.KQ_FILTER_READ, select.KQ_EV_ADD) for fd in fds], 0, 0)
"""


def _time_epoll(fds: List[int]) -> float:
    ep = select.epoll()
    try:
        t0 = time.perf_counter()
        for fd in fds:
            ep.register(fd, select.EPOLLIN)
        return time.perf_counter() - t0
    finally:
        ep.close()


def _time_kqueue(fds: List[int], batched: bool) -> float:
    kq = SEL.kqueue()
    try:
        changes = [SEL.kevent(fd, SEL.KQ_FILTER_READ, SEL.KQ_EV_ADD) for fd in fds]
        t0 = time.perf_counter()
        if batched:
            kq.control(changes, 0, 0)
        else:
            for ch in changes:
                kq.control([ch], 0, 0)
        return time.perf_counter() - t0
    finally:
        kq.close()


def _parse_counts(text: str, syscall: str) -> Optional[int]:
    # strace -c: "% time seconds usecs/call calls [errors] syscall";
    # truss -c:  "syscall seconds calls errors". The name's position tells which.
    for line in text.splitlines():
        tokens = line.split()
        if not tokens:
            continue
        try:
            if tokens[-1] == syscall and len(tokens) >= 5:
                return int(tokens[3])
            if tokens[0] == syscall and len(tokens) >= 3:
                return int(tokens[2])
        except ValueError:
            continue
    return None


def _tracer(syscall: str) -> Tuple[Optional[List[str]], str]:
    strace = shutil.which("strace")
    if strace:
        return [strace, *_strace_filter(strace), "-f", "-c", "-e", f"trace={syscall}", "-o"], "strace"
    truss = shutil.which("truss")
    if truss and sys.platform.startswith("freebsd"):
        return [truss, "-f", "-c", "-o"], "truss"
    return None, "no strace or truss on this system (macOS dtruss needs root and SIP off)"


def _strace_filter(strace: str) -> List[str]:
    """``["--seccomp-bpf"]`` where this strace has it (``strace -V``: "strace -- version 6.1")."""
    try:
        out = subprocess.run([strace, "-V"], capture_output=True, text=True, timeout=10,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["--seccomp-bpf"] if strace_version(out) >= SECCOMP_BPF_SINCE else []


def strace_version(text: str) -> Tuple[int, ...]:
    """The version ``strace -V`` printed, as numbers; () if it printed none."""
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return ()


def _run_traced(argv: List[str], timeout: float) -> Optional[subprocess.CompletedProcess[str]]:
    """Run a tracer and its child to the end, or kill both and return None.

    A tracer that is killed detaches its tracees, which run on (ptrace(2): the
    tracer's exit detaches; truss, and strace without --seccomp-bpf, ask for no
    PTRACE_O_EXITKILL).
    The child is in the tracer's process group, so the tracer runs in a session
    of its own and a timeout kills the group, then waits: a child that outlived
    its tracer wrote its status file into the temporary directory while it was
    being removed (rmtree: "Directory not empty", seen under TCG in the VM).
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        _wait_group_gone(proc.pid)
        return None
    except BaseException:  # Ctrl-C, say: leave nothing running
        _kill_group(proc)
        proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_group_gone(pgid: int, seconds: float = 5.0) -> None:
    """Wait until no process of the group is left (the killed tracee, now a
    child of init, is gone once init reaps it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def _count(mech: str, syscall: str, n: int, timeout: float) -> Dict[str, Any]:
    prefix, tool = _tracer(syscall)
    if prefix is None:
        return {"syscalls": None, "why": tool}
    counts: List[int] = []
    with tempfile.TemporaryDirectory(prefix="iomux-probe-") as tmp:
        for size in (0, n):
            out = os.path.join(tmp, f"trace-{size}.txt")
            status = os.path.join(tmp, f"status-{size}.txt")
            argv = [*prefix, out, *child_argv(status, CHILD, str(size), mech)]
            proc = _run_traced(argv, max(1.0, timeout))
            if proc is None:
                return {"syscalls": None, "tool": tool, "why": f"{tool} timed out"}
            try:
                with open(out) as f:
                    text = f.read()
            except OSError:
                text = ""
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            if proc.returncode != 0 and not os.path.exists(status):
                # The child never ran to its end: ptrace refused, say.
                return {"syscalls": None, "tool": tool,
                        "why": f"{tool} exited {proc.returncode}: {last}"}
            why = child_failure(status, proc.stderr)
            if why is not None:
                return {"syscalls": None, "tool": tool, "why": why}
            if proc.returncode != 0:
                return {"syscalls": None, "tool": tool,
                        "why": f"{tool} exited {proc.returncode}: {last}"}
            counts.append(_parse_counts(text, syscall) or 0)
    calls = counts[1] - counts[0]
    return {"syscalls": calls, "syscalls_per_fd": calls / n, "baseline": counts[0],
            "tool": tool, "syscall": syscall, "fds": n}


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Time per registered fd, and system calls per batch, for epoll and kqueue."""
    raise_nofile()
    n = ctx.size(FULL_FDS, 50)
    pool = IdleSockets()
    out: Dict[str, Any] = {"fds": n, "repeats": REPEATS}
    try:
        fds = pool.grow_to(n)
        if has_epoll():
            times = [_time_epoll(fds) for _ in range(REPEATS)]
            out["epoll"] = {"calls": "one epoll.register() per fd",
                            "per_fd_s": statistics.median(times) / n}
        else:
            out["epoll"] = unavailable(NO_EPOLL)
        if has_kqueue():
            batched = [_time_kqueue(fds, True) for _ in range(REPEATS)]
            single = [_time_kqueue(fds, False) for _ in range(REPEATS)]
            out["kqueue"] = {"calls": "one kqueue.control() with a changelist of all fds",
                             "per_fd_s": statistics.median(batched) / n,
                             "per_fd_one_by_one_s": statistics.median(single) / n}
        else:
            out["kqueue"] = unavailable(NO_KQUEUE)
    finally:
        pool.close()
    # The traced children (an interpreter start each, under ptrace) are the
    # slow part; each may use what is left of the allowance.
    for mech, syscall in (("epoll", "epoll_ctl"), ("kqueue", "kevent")):
        rec = out[mech]
        if rec.get("available") is False:
            continue
        if ctx.left() <= 0:
            rec.update({"syscalls": None, "why": "time budget ran out before tracing"})
            continue
        rec.update(_count(mech, syscall, min(n, TRACED_FDS), ctx.left()))
    return out
