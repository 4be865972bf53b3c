"""Claim: edge-triggered mode notifies once per change, level-triggered again and
again while the condition holds (write-up: "ET仅当状态发生变化时才会通知 ... LT只要还有没有
处理的事情就会一直通知").

Facts this probe relies on:
- epoll with EPOLLET, and kqueue with EV_CLEAR, report a readiness *change*:
  a byte left unread is reported by the first wait only. Without them
  (level-triggered: epoll's default, kqueue's default, select, poll) every
  wait reports the fd for as long as the byte sits there.
- EPOLL_CTL_ADD of an already-ready fd queues one event even in ET mode, so the
  byte may be written before or after registering; we write it after.
- A listening socket is readable while its accept queue is non-empty; kqueue's
  EVFILT_READ ``data`` is the queue length, so it is recorded too.

Method: three waits. "byte": one unread byte on a socketpair. "listen": ten
connections pending on a listener, one accepted after the first wait.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from iomux.probes._common import (
    NO_EPOLL,
    NO_KQUEUE,
    NO_POLL,
    SEL,
    ProbeContext,
    has_epoll,
    has_kqueue,
)

WAITS = 3
PENDING = 10
MODES = ["select", "poll", "epoll", "epoll-et", "kqueue", "kqueue-et"]

Wait = Callable[[float], Tuple[bool, Optional[int]]]


def _make(mode: str, fd: int) -> Tuple[Wait, Callable[[], None]]:
    """A wait function that says whether ``fd`` was reported (and kqueue's data)."""
    if mode == "select":
        return (lambda t: (bool(select.select([fd], [], [], t)[0]), None)), (lambda: None)
    if mode == "poll":
        p = select.poll()
        p.register(fd, select.POLLIN)
        return (lambda t: (bool(p.poll(int(t * 1000))), None)), (lambda: None)
    if mode.startswith("epoll"):
        ep = select.epoll()
        ep.register(fd, select.EPOLLIN | (select.EPOLLET if mode == "epoll-et" else 0))
        return (lambda t: (bool(ep.poll(t)), None)), ep.close
    kq = SEL.kqueue()
    flags = SEL.KQ_EV_ADD | (SEL.KQ_EV_CLEAR if mode == "kqueue-et" else 0)
    kq.control([SEL.kevent(fd, SEL.KQ_FILTER_READ, flags)], 0, 0)

    def kwait(t: float) -> Tuple[bool, Optional[int]]:
        evs = kq.control(None, 4, t)
        return (bool(evs), evs[0].data if evs else None)

    return kwait, kq.close


def _available(mode: str) -> Optional[str]:
    if mode == "poll" and not hasattr(select, "poll"):
        return NO_POLL
    if mode.startswith("epoll") and not has_epoll():
        return NO_EPOLL
    if mode.startswith("kqueue") and not has_kqueue():
        return NO_KQUEUE
    return None


def _byte(mode: str) -> Dict[str, Any]:
    a, b = socket.socketpair()
    try:
        wait, close = _make(mode, a.fileno())
        try:
            b.send(b"x")
            hits = [wait(1.0 if i == 0 else 0.0)[0] for i in range(WAITS)]
        finally:
            close()
        return {"notified": sum(hits), "per_wait": hits}
    finally:
        a.close()
        b.close()


def _listen(mode: str) -> Dict[str, Any]:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    clients: List[socket.socket] = []
    accepted: List[socket.socket] = []
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(PENDING + 6)
        for _ in range(PENDING):
            clients.append(socket.create_connection(lst.getsockname()[:2], timeout=5))
        # Loopback completes the handshake during connect(); the short sleep only
        # guards slow VMs, where a late arrival would be a second edge.
        time.sleep(0.05)
        wait, close = _make(mode, lst.fileno())
        hits: List[bool] = []
        data: List[Optional[int]] = []
        try:
            for i in range(WAITS):
                hit, d = wait(1.0 if i == 0 else 0.0)
                hits.append(hit)
                data.append(d)
                if i == 0 and hit:
                    accepted.append(lst.accept()[0])
        finally:
            close()
        out: Dict[str, Any] = {"notified": sum(hits), "per_wait": hits, "pending": PENDING,
                               "accepted": len(accepted)}
        if mode.startswith("kqueue"):
            out["kevent_data"] = data
        return out
    finally:
        for s in clients + accepted:
            s.close()
        lst.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Notifications over three waits, per mode, for an unread byte and a backlog."""
    byte: Dict[str, Optional[int]] = {}
    listen: Dict[str, Optional[int]] = {}
    detail: Dict[str, Any] = {"byte": {}, "listen": {}}
    notes: Dict[str, str] = {}
    for mode in MODES:
        why = _available(mode)
        if why is not None:
            byte[mode] = listen[mode] = None
            notes[mode] = why
            continue
        b = _byte(mode)
        li = _listen(mode)
        byte[mode] = b["notified"]
        listen[mode] = li["notified"]
        detail["byte"][mode] = b
        detail["listen"][mode] = li
    return {"waits": WAITS, "byte": byte, "listen": listen, "detail": detail, "notes": notes}
