"""Which socket options a socket from accept() inherits from its listener
(issue 14: TCP_NODELAY, SO_KEEPALIVE, SO_RCVBUF, SO_SNDBUF).

Facts this probe relies on:
- Linux: the child socket is a clone of the listener (sk_clone_lock copies
  the struct sock: sk_rcvbuf, sk_sndbuf, the SOCK_KEEPOPEN flag and the
  SOCK_RCVBUF_LOCK/SNDBUF_LOCK "user set it" bits; inet_csk_clone_lock copies
  tcp_sock, so nonagle (TCP_NODELAY) comes along too). Every option set on
  the listener shows on the accepted socket.
- FreeBSD and macOS: sonewconn() copies so_options (SO_KEEPALIVE among them)
  and the buffer sizes (soreserve with the listener's hiwat), and
  tcp_newtcpcb copies t_flags' TF_NODELAY from the listener's tcpcb
  (FreeBSD syncache_socket: "tp->t_flags = sototcpcb(lso)->t_flags &
  (TF_NOPUSH|TF_NODELAY)").
- gVisor's netstack builds the accepted endpoint from the listener's
  options in its own code, not by copying the socket; which options survive
  is that code's choice, so each is read back, not assumed.

Method: a listener with TCP_NODELAY=1, SO_KEEPALIVE=1 and explicit buffer
sizes, and a plain listener; accept one connection from each and read every
option back from the accepted sockets. A buffer size counts as inherited when
the accepted socket reports the listener's (read back) value and the plain
listener's child does not.
"""

from __future__ import annotations

import socket
from typing import Any, Dict

from iomux.probes._common import ProbeContext, Result, tcp_pair

#: Sizes set on the listener: distinct, within every kernel's default limits
#: (Linux net.core.rmem_max 212992 allows them after doubling: 2*48 KiB).
RCVBUF = 49152
SNDBUF = 40960

_OPTIONS = {
    "TCP_NODELAY": (socket.IPPROTO_TCP, socket.TCP_NODELAY),
    "SO_KEEPALIVE": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "SO_RCVBUF": (socket.SOL_SOCKET, socket.SO_RCVBUF),
    "SO_SNDBUF": (socket.SOL_SOCKET, socket.SO_SNDBUF),
}


def _read(sock: socket.socket) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for name, (level, opt) in _OPTIONS.items():
        value = sock.getsockopt(level, opt)
        out[name] = int(bool(value)) if name in ("TCP_NODELAY", "SO_KEEPALIVE") else int(value)
    return out


def _accepted(configure: bool) -> Dict[str, Result]:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if configure:
            lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        listener = _read(lst)
        client, server = tcp_pair(lst)
        try:
            return {"listener": listener, "accepted": _read(server)}
        finally:
            client.close()
            server.close()
    finally:
        lst.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Options of accepted sockets for a configured and a plain listener, and what was inherited."""
    set_ = _accepted(True)
    plain = _accepted(False)
    inherited: Dict[str, bool] = {}
    for name in _OPTIONS:
        got = set_["accepted"][name]
        if name in ("TCP_NODELAY", "SO_KEEPALIVE"):
            inherited[name] = got == 1
        else:
            inherited[name] = got == set_["listener"][name] and got != plain["accepted"][name]
    return {"set_on_listener": {"TCP_NODELAY": 1, "SO_KEEPALIVE": 1,
                                "SO_RCVBUF": RCVBUF, "SO_SNDBUF": SNDBUF},
            "listener": set_["listener"], "accepted": set_["accepted"],
            "plain_listener": plain["listener"], "plain_accepted": plain["accepted"],
            "inherited": inherited}
