"""Event bits after both sides of a connection have shut down, and whether
ERR and PRI stay set after a reset (issue 14).

Facts this probe relies on:
- Linux tcp_poll(): EPOLLHUP once both directions are shut (sk_shutdown ==
  SHUTDOWN_MASK) or the socket is closed; EPOLLIN|EPOLLRDHUP once the read
  half is shut (the peer's FIN, or our own SHUT_RD); EPOLLOUT whenever this
  side has shut its own sending half (a write then fails at once with EPIPE
  rather than block); EPOLLERR while sk_err is set; EPOLLPRI while urgent
  (MSG_OOB) data is marked (tp->urg_data). A RST sets sk_err = ECONNRESET
  and closes the socket; reading SO_ERROR (sock_error() swaps it for 0)
  clears it, so EPOLLERR goes, EPOLLHUP stays, and a recv() then sees EOF.
  The reset does not clear urg_data, so EPOLLPRI stays set after it.
- kqueue (FreeBSD, macOS): EVFILT_READ gets EV_EOF when the peer's FIN
  arrived, with fflags = the socket error after a reset; EVFILT_WRITE gets
  EV_EOF once this side cannot send any more.
- gVisor's netstack has its own readiness code (its endpoint's Readiness()),
  written to match Linux's but not derived from it; EPOLLRDHUP in particular
  is its own decision.

Method: loopback TCP pairs. "both_shut_wr": each side calls shutdown(SHUT_WR)
and the server side's events are read. "own_shut_rdwr": the server side
alone calls shutdown(SHUT_RDWR). "oob_then_reset": the peer sends one urgent
byte (events read), then resets (SO_LINGER 0 + close; events read), then the
server side reads SO_ERROR (events read again), then recv() (its outcome).
"""

from __future__ import annotations

import errno
import select
import socket
import struct
import time
from typing import Any, Callable, Dict, List

from iomux.probes._common import (
    EPOLL_NAMES,
    KQ_FLAG_NAMES,
    NO_EPOLL,
    NO_KQUEUE,
    POLL_NAMES,
    SEL,
    ProbeContext,
    Result,
    errno_name,
    has_epoll,
    has_kqueue,
    mask_names,
    tcp_pair,
    unavailable,
)

SETTLE_S = 0.05


def _epoll_events(fd: int) -> List[str]:
    ep = select.epoll()
    try:
        want = (select.EPOLLIN | select.EPOLLOUT | select.EPOLLPRI | select.EPOLLRDHUP)
        ep.register(fd, want)
        evs = ep.poll(1.0)
    finally:
        ep.close()
    return mask_names(evs[0][1], EPOLL_NAMES) if evs else []


def _poll_events(fd: int) -> List[str]:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT | select.POLLPRI | getattr(select, "POLLRDHUP", 0))
    evs = p.poll(1000)
    return mask_names(evs[0][1], POLL_NAMES) if evs else []


def _kqueue_events(fd: int) -> Dict[str, Any]:
    kq = SEL.kqueue()
    try:
        changes = [SEL.kevent(fd, SEL.KQ_FILTER_READ, SEL.KQ_EV_ADD),
                   SEL.kevent(fd, SEL.KQ_FILTER_WRITE, SEL.KQ_EV_ADD)]
        kevs = kq.control(changes, 4, 1.0)
    finally:
        kq.close()
    out: Dict[str, Any] = {}
    for ev in kevs:
        key = "read" if ev.filter == SEL.KQ_FILTER_READ else "write"
        eof = bool(ev.flags & SEL.KQ_EV_EOF)
        out[key] = {"flags": mask_names(ev.flags, KQ_FLAG_NAMES),
                    # With EV_EOF, fflags holds the socket error (0 for a clean FIN).
                    "fflags": (errno.errorcode.get(ev.fflags, str(ev.fflags))
                               if eof and ev.fflags else ev.fflags)}
    return out


def _mechs() -> Dict[str, Callable[[int], Any]]:
    found: Dict[str, Callable[[int], Any]] = {}
    if has_epoll():
        found["epoll"] = _epoll_events
    if hasattr(select, "poll"):
        found["poll"] = _poll_events
    if has_kqueue():
        found["kqueue"] = _kqueue_events
    return found


def _both_shut_wr(look: Callable[[int], Any]) -> Any:
    client, server = tcp_pair()
    try:
        client.shutdown(socket.SHUT_WR)
        server.shutdown(socket.SHUT_WR)
        time.sleep(SETTLE_S)
        return look(server.fileno())
    finally:
        client.close()
        server.close()


def _own_shut_rdwr(look: Callable[[int], Any]) -> Any:
    client, server = tcp_pair()
    try:
        server.shutdown(socket.SHUT_RDWR)
        time.sleep(SETTLE_S)
        return look(server.fileno())
    finally:
        client.close()
        server.close()


def _oob_then_reset(look: Callable[[int], Any]) -> Result:
    client, server = tcp_pair()
    try:
        client.send(b"!", socket.MSG_OOB)
        time.sleep(SETTLE_S)
        rec: Result = {"after_oob": look(server.fileno())}
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        time.sleep(SETTLE_S)
        rec["after_reset"] = look(server.fileno())
        err = server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        rec["so_error"] = errno.errorcode.get(err, str(err)) if err else 0
        rec["after_so_error"] = look(server.fileno())
        server.setblocking(False)
        try:
            data = server.recv(16)
            rec["recv"] = "eof" if data == b"" else f"{len(data)} bytes"
        except OSError as exc:
            rec["recv"] = errno_name(exc)
        return rec
    finally:
        server.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Event bits per mechanism for both-sides shutdown, own SHUT_RDWR, and urgent data then reset."""
    mechs = _mechs()
    out: Dict[str, Any] = {}
    for scenario, run in (("both_shut_wr", _both_shut_wr), ("own_shut_rdwr", _own_shut_rdwr),
                          ("oob_then_reset", _oob_then_reset)):
        out[scenario] = {}
        for mech in ("epoll", "poll", "kqueue"):
            if mech not in mechs:
                out[scenario][mech] = unavailable(NO_EPOLL if mech == "epoll" else
                                                  NO_KQUEUE if mech == "kqueue" else
                                                  "no select.poll in this Python")
                continue
            out[scenario][mech] = run(mechs[mech])
    return out
