"""Claim: kqueue watches non-file events (process exit, timers, signals) natively,
while Linux needs fds made for them: signalfd, timerfd, eventfd, pidfd
(write-up: "Linux支持很多补充的系统调用, 比如signalfd(), eventfd()和timerfd_create() ...
kqueue()中, 通用的kevent支持各种非文件类型描述符 ... EVFILT_PROC ... NOTE_EXIT").

Facts this probe relies on:
- kqueue: EVFILT_PROC with NOTE_EXIT (ident = pid), EVFILT_TIMER (data = ms),
  EVFILT_SIGNAL (ident = signal number; counts deliveries even when a handler
  or SIG_IGN takes the signal).
- Linux: pidfd_open(2) (kernel 5.3, os.pidfd_open since Python 3.9) becomes
  readable when the process exits; timerfd_create(2) (kernel 2.6.25) is in
  os only from Python 3.13, so older Pythons reach it through ctypes here;
  signalfd(2) is not in Python's standard library at all, so the stdlib way
  is signal.set_wakeup_fd (the C handler writes the signal number to an fd).
- Latency is measured from the trigger (a byte that lets a child exit, the
  timer's due time, kill()) to the wait returning.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List

from iomux.probes._common import (
    EPOLL_NAMES,
    NO_KQUEUE,
    SEL,
    ProbeContext,
    Result,
    has_epoll,
    has_kqueue,
    mask_names,
    unavailable,
)

SAMPLES = 3
TIMER_S = 0.02

# A child that says it is ready, then exits when its stdin gives it a byte.
CHILD = "import sys; sys.stdout.write('r\\n'); sys.stdout.flush(); sys.stdin.read(1)"


def _samples(fn: Callable[[], Dict[str, Any]], n: int) -> Result:
    runs = [fn() for _ in range(n)]
    lat = [r["latency_s"] for r in runs if r.get("latency_s") is not None]
    out: Result = {"available": True, "samples": len(runs),
                   "latency_s": statistics.median(lat) if lat else None}
    out.update({k: v for k, v in runs[-1].items() if k != "latency_s"})
    return out


def _child() -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    assert p.stdout is not None
    p.stdout.readline()
    return p


def _release(p: subprocess.Popen[bytes]) -> float:
    assert p.stdin is not None
    t0 = time.perf_counter()
    p.stdin.write(b"x")
    p.stdin.flush()
    return t0


def _epoll_wait_fd(fd: int, timeout: float) -> tuple[float, List[str]]:
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
        evs = ep.poll(timeout)
        t1 = time.perf_counter()
        return t1, mask_names(evs[0][1], EPOLL_NAMES) if evs else []
    finally:
        ep.close()


# -- process exit -------------------------------------------------------------

def _kq_proc() -> Dict[str, Any]:
    p = _child()
    kq = SEL.kqueue()
    try:
        kq.control([SEL.kevent(p.pid, SEL.KQ_FILTER_PROC,
                                  SEL.KQ_EV_ADD | SEL.KQ_EV_ONESHOT,
                                  SEL.KQ_NOTE_EXIT)], 0, 0)
        t0 = _release(p)
        evs = kq.control(None, 1, 5.0)
        t1 = time.perf_counter()
        got = bool(evs) and evs[0].fflags & SEL.KQ_NOTE_EXIT != 0
        return {"latency_s": t1 - t0 if got else None, "reported": got,
                "filter": "EVFILT_PROC", "fflags": ["NOTE_EXIT"] if got else []}
    finally:
        kq.close()
        p.wait(5)


def _pidfd() -> Dict[str, Any]:
    p = _child()
    try:
        fd = os.pidfd_open(p.pid)
    except OSError:
        _release(p)
        p.wait(5)
        raise
    try:
        t0 = _release(p)
        t1, names = _epoll_wait_fd(fd, 5.0)
        return {"latency_s": t1 - t0 if names else None, "reported": bool(names),
                "events": names, "via": "os.pidfd_open + epoll"}
    finally:
        os.close(fd)
        p.wait(5)


def _process_exit(samples: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    out["kqueue"] = _samples(_kq_proc, samples) if has_kqueue() else unavailable(NO_KQUEUE)
    if not hasattr(os, "pidfd_open"):
        out["pidfd"] = unavailable("no os.pidfd_open (Linux 5.3+, Python 3.9+ only)")
    elif not has_epoll():
        out["pidfd"] = unavailable("no select.epoll to wait on a pidfd")
    else:
        try:
            out["pidfd"] = _samples(_pidfd, samples)
        except OSError as exc:
            out["pidfd"] = unavailable(f"pidfd_open failed: {exc.strerror} "
                                       "(kernel older than 5.3?)")
    return out


# -- timers -------------------------------------------------------------------

def _kq_timer() -> Dict[str, Any]:
    kq = SEL.kqueue()
    try:
        t0 = time.perf_counter()
        kq.control([SEL.kevent(1, SEL.KQ_FILTER_TIMER,
                                  SEL.KQ_EV_ADD | SEL.KQ_EV_ONESHOT,
                                  0, int(TIMER_S * 1000))], 0, 0)
        evs = kq.control(None, 1, 5.0)
        t1 = time.perf_counter()
        return {"latency_s": (t1 - t0 - TIMER_S) if evs else None, "reported": bool(evs),
                "filter": "EVFILT_TIMER", "period_s": TIMER_S}
    finally:
        kq.close()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timerfd_open(seconds: float) -> tuple[int, str]:
    """A timerfd due in ``seconds``: os.timerfd_* on 3.13+, else libc via ctypes."""
    if hasattr(os, "timerfd_create"):
        pos: Any = os  # os.timerfd_* exist from Python 3.13 on
        fd: int = pos.timerfd_create(time.CLOCK_MONOTONIC,
                                     flags=pos.TFD_NONBLOCK | pos.TFD_CLOEXEC)
        pos.timerfd_settime(fd, initial=seconds)
        return fd, "os.timerfd_create"
    libc = ctypes.CDLL(None, use_errno=True)
    tfd_nonblock, tfd_cloexec = os.O_NONBLOCK, 0o2000000  # Linux: TFD_* = O_*
    fd = libc.timerfd_create(time.CLOCK_MONOTONIC, tfd_nonblock | tfd_cloexec)
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    spec = _Itimerspec(_Timespec(0, 0), _Timespec(int(seconds), int(seconds % 1 * 1e9)))
    if libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
        os.close(fd)
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return fd, "libc timerfd_create via ctypes (os.timerfd_create needs Python 3.13)"


def _timerfd() -> Dict[str, Any]:
    t0 = time.perf_counter()
    fd, via = _timerfd_open(TIMER_S)
    try:
        t1, names = _epoll_wait_fd(fd, 5.0)
        return {"latency_s": (t1 - t0 - TIMER_S) if names else None, "reported": bool(names),
                "events": names, "via": via + " + epoll", "period_s": TIMER_S}
    finally:
        os.close(fd)


def _timer(samples: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    out["kqueue"] = _samples(_kq_timer, samples) if has_kqueue() else unavailable(NO_KQUEUE)
    if not sys.platform.startswith("linux"):
        out["timerfd"] = unavailable("timerfd_create is Linux-only")
    elif not has_epoll():
        out["timerfd"] = unavailable("no select.epoll to wait on a timerfd")
    else:
        try:
            out["timerfd"] = _samples(_timerfd, samples)
        except (OSError, AttributeError) as exc:
            out["timerfd"] = unavailable(f"timerfd_create failed: {exc}")
    return out


# -- signals ------------------------------------------------------------------

def _kq_signal() -> Dict[str, Any]:
    kq = SEL.kqueue()
    old = signal.signal(signal.SIGUSR1, lambda s, f: None)
    try:
        kq.control([SEL.kevent(signal.SIGUSR1, SEL.KQ_FILTER_SIGNAL, SEL.KQ_EV_ADD)],
                   0, 0)
        t0 = time.perf_counter()
        os.kill(os.getpid(), signal.SIGUSR1)
        evs = kq.control(None, 1, 5.0)
        t1 = time.perf_counter()
        return {"latency_s": t1 - t0 if evs else None, "reported": bool(evs),
                "filter": "EVFILT_SIGNAL", "deliveries": evs[0].data if evs else 0}
    finally:
        signal.signal(signal.SIGUSR1, old)
        kq.close()


def _wakeup_fd() -> Dict[str, Any]:
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    old = signal.signal(signal.SIGUSR1, lambda s, f: None)
    old_fd = signal.set_wakeup_fd(w.fileno())
    try:
        t0 = time.perf_counter()
        os.kill(os.getpid(), signal.SIGUSR1)
        if has_epoll():
            t1, names = _epoll_wait_fd(r.fileno(), 5.0)
        else:
            ready = select.select([r], [], [], 5.0)[0]
            t1, names = time.perf_counter(), (["readable"] if ready else [])
        return {"latency_s": t1 - t0 if names else None, "reported": bool(names),
                "events": names, "via": "signal.set_wakeup_fd + " +
                ("epoll" if has_epoll() else "select")}
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGUSR1, old)
        r.close()
        w.close()


def _signal(samples: int) -> Dict[str, Any]:
    if threading.current_thread() is not threading.main_thread():
        why = "signal handlers can only be set from the main thread"
        return {"kqueue": unavailable(why), "wakeup_fd": unavailable(why)}
    out: Dict[str, Any] = {}
    out["kqueue"] = _samples(_kq_signal, samples) if has_kqueue() else unavailable(NO_KQUEUE)
    out["wakeup_fd"] = _samples(_wakeup_fd, samples)
    if sys.platform.startswith("linux"):
        out["signalfd"] = unavailable("the kernel has signalfd(2) but Python's standard "
                                      "library does not expose it")
    return out


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Which mechanism delivers process exit, timers and signals here, and how fast."""
    out: Dict[str, Any] = {}
    for name, fn in (("process_exit", _process_exit), ("timer", _timer), ("signal", _signal)):
        # Whether a mechanism reports the event is exact and is what the claims judge;
        # the latency samples are extra. Past the budget (a slow kernel, a loaded
        # machine) each kind still gets one sample, well under a second, rather than
        # leaving its claim with nothing observed.
        samples = 1 if ctx.expired() else SAMPLES
        try:
            out[name] = fn(samples)
        except Exception as exc:  # record and go on with the other event kinds
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    out["mechanisms"] = {k: sorted(m for m, rec in v.items()
                                   if isinstance(rec, dict) and rec.get("reported"))
                         for k, v in out.items() if isinstance(v, dict) and "error" not in v}
    return out


