"""What a peer's half-close and a peer's reset look like to each mechanism
(issue 5; the write-up does not cover it, but every echo server must tell a
half-close from a reset).

Facts this probe relies on:
- Linux: shutdown(SHUT_WR) by the peer (a FIN) gives EPOLLIN|EPOLLRDHUP
  (EPOLLRDHUP since 2.6.17; POLLRDHUP for poll); a reset gives
  EPOLLIN|EPOLLERR|EPOLLHUP|EPOLLRDHUP, and recv() then fails with ECONNRESET.
- kqueue: a FIN sets EV_EOF on EVFILT_READ; a reset sets EV_EOF with the
  socket error in ``fflags`` (an errno, spelled here by name).
- SO_LINGER {on, 0} makes close() send a RST instead of a FIN.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from typing import Any, Dict, List, Tuple

from iomux.probes._common import (
    EPOLL_NAMES,
    KQ_FLAG_NAMES,
    NO_EPOLL,
    NO_KQUEUE,
    NO_POLL,
    POLL_NAMES,
    SEL,
    ProbeContext,
    Result,
    errno_name,
    has_epoll,
    has_kqueue,
    kq_filter_name,
    mask_names,
    tcp_pair,
    unavailable,
)


def _trigger(kind: str, client: socket.socket) -> None:
    if kind == "halfclose":
        client.shutdown(socket.SHUT_WR)
    else:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()


def _recv_outcome(sock: socket.socket) -> str:
    sock.setblocking(False)
    try:
        data = sock.recv(16)
    except OSError as exc:
        return errno_name(exc)
    return "eof" if data == b"" else f"{len(data)} bytes"


def _observe(mech: str, kind: str) -> Result:
    client, server = tcp_pair()
    try:
        fd = server.fileno()
        if mech == "epoll":
            ep = select.epoll()
            try:
                ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
                _trigger(kind, client)
                evs = ep.poll(2.0)
            finally:
                ep.close()
            rec: Result = {"events": mask_names(evs[0][1], EPOLL_NAMES) if evs else [],
                           "registered": ["EPOLLIN", "EPOLLRDHUP"]}
        elif mech == "poll":
            p = select.poll()
            want = select.POLLIN | getattr(select, "POLLRDHUP", 0)
            p.register(fd, want)
            _trigger(kind, client)
            pevs = p.poll(2000)
            rec = {"events": mask_names(pevs[0][1], POLL_NAMES) if pevs else [],
                   "registered": mask_names(want, POLL_NAMES)}
        else:
            kq = SEL.kqueue()
            try:
                kq.control([SEL.kevent(fd, SEL.KQ_FILTER_READ, SEL.KQ_EV_ADD)], 0, 0)
                _trigger(kind, client)
                kevs = kq.control(None, 4, 2.0)
            finally:
                kq.close()
            if kevs:
                ev = kevs[0]
                eof = bool(ev.flags & SEL.KQ_EV_EOF)
                rec = {"filter": kq_filter_name(ev.filter),
                       "flags": mask_names(ev.flags, KQ_FLAG_NAMES),
                       # With EV_EOF, fflags holds the socket error (0 for a clean FIN).
                       "fflags": (errno.errorcode.get(ev.fflags, str(ev.fflags))
                                  if eof and ev.fflags else ev.fflags),
                       "data": ev.data}
            else:
                rec = {"filter": None, "flags": [], "fflags": None, "data": None}
        rec["recv"] = _recv_outcome(server)
        return rec
    finally:
        client.close()
        server.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Event names for a peer's shutdown(SHUT_WR) and a peer's RST, per mechanism."""
    mechs: List[Tuple[str, bool, str]] = [("epoll", has_epoll(), NO_EPOLL),
                                          ("poll", hasattr(select, "poll"), NO_POLL),
                                          ("kqueue", has_kqueue(), NO_KQUEUE)]
    out: Dict[str, Any] = {"halfclose": {}, "reset": {}}
    for kind in ("halfclose", "reset"):
        for mech, ok, why in mechs:
            out[kind][mech] = _observe(mech, kind) if ok else unavailable(why)
    return out
