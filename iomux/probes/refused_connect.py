"""What a connect to a closed port looks like, beyond the errno (issue 14).

Facts this probe relies on:
- A loopback SYN to a port nobody listens on is answered by a RST. Linux,
  FreeBSD and macOS then fail a blocking connect() with ECONNREFUSED.
- A non-blocking connect() returns EINPROGRESS (the RST is handled after
  connect() has returned), or ECONNREFUSED where the loopback answer is
  processed before the call returns (FreeBSD's kern_connectat then hands
  back so_error and clears it, so SO_ERROR reads 0). Linux then reports EPOLLOUT|EPOLLERR|
  EPOLLHUP on the socket (the connection is closed: HUP; sk_err: ERR), and
  SO_ERROR gives ECONNREFUSED once, then 0.
- A connected UDP socket that sends to a closed port gets an ICMP port
  unreachable back; Linux (and the BSDs, for a connected socket) report it as
  ECONNREFUSED on the next recv()/send().
- gVisor's netstack generates and handles its own RSTs and ICMP on its
  loopback; whether a UDP socket learns of the ICMP is its own code's choice.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Any, Dict

from iomux.probes._common import (
    EPOLL_NAMES,
    POLL_NAMES,
    ProbeContext,
    errno_name,
    has_epoll,
    mask_names,
)


def _closed_port(kind: int) -> int:
    s = socket.socket(socket.AF_INET, kind)
    try:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


def _nonblocking_tcp() -> Dict[str, Any]:
    port = _closed_port(socket.SOCK_STREAM)
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        c.setblocking(False)
        rc = c.connect_ex(("127.0.0.1", port))
        out: Dict[str, Any] = {"connect_returned": errno.errorcode.get(rc, str(rc)) if rc else "0"}
        if has_epoll():
            ep = select.epoll()
            try:
                ep.register(c.fileno(), select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP)
                evs = ep.poll(2.0)
            finally:
                ep.close()
            out["epoll_events"] = mask_names(evs[0][1], EPOLL_NAMES) if evs else []
        elif hasattr(select, "poll"):
            p = select.poll()
            p.register(c.fileno(), select.POLLIN | select.POLLOUT)
            pevs = p.poll(2000)
            out["poll_events"] = mask_names(pevs[0][1], POLL_NAMES) if pevs else []
        err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        out["so_error"] = errno.errorcode.get(err, str(err)) if err else 0
        err2 = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        out["so_error_again"] = errno.errorcode.get(err2, str(err2)) if err2 else 0
        return out
    finally:
        c.close()


def _blocking_tcp() -> str:
    port = _closed_port(socket.SOCK_STREAM)
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(5)
    try:
        c.connect(("127.0.0.1", port))
        return "connected (something listens there)"
    except OSError as exc:
        return errno_name(exc)
    finally:
        c.close()


def _udp() -> Dict[str, Any]:
    port = _closed_port(socket.SOCK_DGRAM)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        u.connect(("127.0.0.1", port))
        u.send(b"x")
        time.sleep(0.05)
        u.setblocking(False)
        try:
            u.recv(16)
            recv = "data"
        except OSError as exc:
            recv = errno_name(exc)
        return {"recv_after_send": recv}
    finally:
        u.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Blocking and non-blocking connect to a closed TCP port, and a connected UDP send there."""
    return {"tcp_blocking": _blocking_tcp(), "tcp_nonblocking": _nonblocking_tcp(), "udp": _udp()}
