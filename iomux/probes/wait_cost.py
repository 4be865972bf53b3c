"""Claim: select's cost grows with the number of fds, epoll's does not
(write-up: "epoll()不会随着fd的数目增长而降低效率, 在select()中需要用轮询来找到就绪的fd").

Facts this probe relies on:
- select() and poll() hand the kernel the whole fd list on every call and the
  kernel polls each fd, so a wait costs O(watched fds). CPython's select()
  also rebuilds its fd_set from the Python lists on every call (Python-side
  O(n)); select.poll keeps its pollfd array between calls.
- epoll_wait() and kevent() only walk the ready list, so a wait costs
  O(ready fds) however many idle fds are registered.
- select() raises ValueError once any fd number reaches FD_SETSIZE (1024), so
  its line stops there: recorded as null with the error.

Method: one socketpair with a byte waiting (the one active fd) plus N idle
socketpair ends; each wait has timeout 0 and must report exactly the active
fd. Waits are timed in batches and the median per-wait time is kept. (Not the
fastest batch: on the host's own kernel the fastest batches of t(0) and
t(10000) differ by 1.3x, cache effects a median evens out.)
Every point of every backend's line is then timed again, one batch per point
in turn over several rounds, so that a burst of load from elsewhere on the
machine falls on all the points alike instead of on one of them (each claim is
a ratio of two points). Each point's figure is the first point's median times
the median over rounds of the point's ratio to the first point in the same
round: a pair of batches a few milliseconds apart sees the same load.
(gVisor's systrap platform, measured here with two CPU burners beside it: a
wait takes 2-3 us while a core is free and 25-85 us while none is, switching
between the two within a run. Each point's own median then falls on either
side of that gap, so t(10000)/t(0) of separate medians read 1.06 in a probe
run and 1.39 in a matrix run; over 16 runs under load the paired ratio read
0.968-1.005, separate medians 0.964-1.015, the fastest batches up to 1.515.)
"""

from __future__ import annotations

import select
import socket
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

from iomux.probes._common import (
    NO_EPOLL,
    NO_KQUEUE,
    NO_POLL,
    SEL,
    IdleSockets,
    ProbeContext,
    has_epoll,
    has_kqueue,
    median_per_call,
    nofile_soft,
    open_fd_count,
    raise_nofile,
)

IDLE_COUNTS = [0, 100, 1000, 10000]
BACKENDS = ["select", "poll", "epoll", "kqueue"]
BATCH = 10


class _Waiter:
    """One backend watching the active fd plus a growing set of idle fds."""

    def __init__(self, kind: str, active: int) -> None:
        self.kind = kind
        self.active = active
        self.fds: List[int] = [active]
        self._poll: Any = None
        if kind == "poll":
            self._poll = select.poll()
            self._poll.register(active, select.POLLIN)
        elif kind == "epoll":
            self._poll = select.epoll()
            self._poll.register(active, select.EPOLLIN)
        elif kind == "kqueue":
            self._poll = SEL.kqueue()
            self._poll.control([SEL.kevent(active, SEL.KQ_FILTER_READ,
                                              SEL.KQ_EV_ADD)], 0, 0)

    def add(self, fds: List[int]) -> None:
        self.fds.extend(fds)
        if self.kind == "poll":
            for fd in fds:
                self._poll.register(fd, select.POLLIN)
        elif self.kind == "epoll":
            for fd in fds:
                self._poll.register(fd, select.EPOLLIN)
        elif self.kind == "kqueue":
            self._poll.control([SEL.kevent(fd, SEL.KQ_FILTER_READ, SEL.KQ_EV_ADD)
                                for fd in fds], 0, 0)

    def wait_fn(self) -> Callable[[], int]:
        if self.kind == "select":
            fds = self.fds
            return lambda: len(select.select(fds, [], [], 0)[0])
        if self.kind == "poll":
            p = self._poll
            return lambda: len(p.poll(0))
        if self.kind == "epoll":
            ep = self._poll
            return lambda: len(ep.poll(0, 8))
        kq = self._poll
        return lambda: len(kq.control(None, 8, 0))

    def close(self) -> None:
        if self.kind in ("epoll", "kqueue"):
            self._poll.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Median seconds per wait, per backend, at each idle-fd count."""
    raise_nofile()
    avail = {"select": (True, ""), "poll": (hasattr(select, "poll"), NO_POLL),
             "epoll": (has_epoll(), NO_EPOLL), "kqueue": (has_kqueue(), NO_KQUEUE)}
    counts = IDLE_COUNTS if ctx.scale >= 1.0 else sorted({ctx.size(n, 0) for n in IDLE_COUNTS})
    series: Dict[str, List[Optional[float]]] = {b: [] for b in BACKENDS}
    waits: Dict[str, List[int]] = {b: [] for b in BACKENDS}
    notes: Dict[str, str] = {b: why for b, (ok, why) in avail.items() if not ok}
    room = nofile_soft() - open_fd_count() - 64
    a, b = socket.socketpair()
    b.send(b"x")
    pool = IdleSockets()
    waiters = {k: _Waiter(k, a.fileno()) for k, (ok, _) in avail.items() if ok}
    added = 0
    try:
        cells_left = len(counts) * len(waiters)
        for n in counts:
            if n > room:
                for k in BACKENDS:
                    series[k].append(None)
                    waits[k].append(0)
                notes[f"n={n}"] = f"RLIMIT_NOFILE soft={nofile_soft()} leaves room for {room} fds"
                cells_left -= len(waiters)
                continue
            if ctx.expired():
                for k in BACKENDS:
                    series[k].append(None)
                    waits[k].append(0)
                notes[f"n={n}"] = "time budget ran out before this size"
                cells_left -= len(waiters)
                continue
            fresh = pool.grow_to(n)[added:]
            added = n
            for k in BACKENDS:
                w = waiters.get(k)
                if w is None:
                    series[k].append(None)
                    waits[k].append(0)
                    continue
                try:
                    w.add(fresh)
                    fn = w.wait_fn()
                    ready = fn()
                except ValueError as exc:
                    # select() past FD_SETSIZE: the line stops here.
                    series[k].append(None)
                    waits[k].append(0)
                    notes.setdefault(k, f"stops at n={n}: ValueError: {exc} "
                                        f"(highest fd {max(w.fds)})")
                    cells_left -= 1
                    continue
                if ready != 1:
                    notes[f"{k} n={n}"] = f"reported {ready} ready fds, expected 1"
                # Each cell gets an equal share of the time that is left.
                share = max(0.02, ctx.left() / max(1, cells_left))
                per_wait, calls = median_per_call(fn, BATCH, max_batches=ctx.size(40, 3),
                                                  min_batches=3, seconds=share)
                series[k].append(per_wait)
                waits[k].append(calls)
                cells_left -= 1
        _retime_series(ctx, pool, a.fileno(), counts, series, notes)
    finally:
        for w in waiters.values():
            w.close()
        pool.close()
        a.close()
        b.close()
    return {"idle_counts": counts, "backends": series, "waits_timed": waits, "notes": notes,
            "unit": "seconds per wait (median), timeout 0, 1 ready fd"}


def paired_medians(times: List[List[float]]) -> List[float]:
    """Per point, from ``times[point][round]`` (seconds per wait, every point timed
    once in every round): the first point's median, and for each other point
    that median times the median over rounds of its ratio to the first point's
    batch of the same round.

    A burst of load that slows one round slows both batches of its pairs, so it
    moves no ratio; a separate median per point moves with whichever side of
    a bimodal load its middle batch happens to fall on.
    """
    base = statistics.median(times[0])
    out = [base]
    for row in times[1:]:
        ratios = [t / b for t, b in zip(row, times[0]) if b > 0]
        out.append(base * statistics.median(ratios) if ratios else statistics.median(row))
    return out


def _retime_series(ctx: ProbeContext, pool: IdleSockets, active: int, counts: List[int],
                   series: Dict[str, List[Optional[float]]], notes: Dict[str, str]) -> None:
    """Time every measured point of each backend's line again, one batch per point in
    turn, and keep each point's paired median (``paired_medians``).

    The first pass times the points one after another, so a burst of load from
    elsewhere (other targets of a matrix on the same cores) can fall on one point
    and not its neighbour, and a claim's ratio of two points moves with it. In
    rounds that visit every point, such a burst falls on all of them alike."""
    for k in BACKENDS:
        points = [i for i, v in enumerate(series[k]) if v is not None]
        if len(points) < 2:
            continue
        waiters: List[_Waiter] = []
        try:
            for i in points:
                w = _Waiter(k, active)
                w.add(pool.grow_to(counts[i]))
                waiters.append(w)
            fns = [w.wait_fn() for w in waiters]
            times: List[List[float]] = [[] for _ in points]
            end = time.monotonic() + max(0.2, min(2.0, ctx.left() / 4))
            rounds = 0
            while rounds < 5 or (time.monotonic() < end and rounds < ctx.size(200, 20)):
                # Start each round one point further on, so no point always follows
                # the same neighbour.
                for j in range(len(points)):
                    at = (j + rounds) % len(points)
                    fn = fns[at]
                    t0 = time.perf_counter()
                    for _ in range(BATCH):
                        fn()
                    times[at].append((time.perf_counter() - t0) / BATCH)
                rounds += 1
            for at, value in enumerate(paired_medians(times)):
                series[k][points[at]] = value
            notes[f"{k} re-timed"] = (f"n={', '.join(str(counts[i]) for i in points)} "
                                      f"re-timed in {rounds} rounds of {BATCH} waits each")
        finally:
            for w in waiters:
                w.close()
