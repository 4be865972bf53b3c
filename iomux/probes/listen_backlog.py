"""How many connections a listener with backlog 0 or 1 completes before
anyone calls accept() (issue 14).

Facts this probe relies on:
- Linux: the accept queue is full when its length is *greater* than the
  backlog (sk_acceptq_is_full: ``sk_ack_backlog > sk_max_ack_backlog``), so
  backlog 0 holds 1 connection and backlog 1 holds 2. A SYN that meets a
  full queue is dropped (the client retries it after 1 s), not refused
  (unless net.ipv4.tcp_abort_on_overflow).
- FreeBSD: solisten() takes backlog 0 as 0, and sonewconn() refuses a new
  connection when ``sol_qlen > 3 * sol_qlimit / 2``: backlog 0 holds 1, and
  backlog 1 holds 2 (3/2 rounds down to 1).
- macOS: XNU's solisten() and sonewconn() limits for a backlog of 0 were not
  read closely enough here to predict a count; expected.json says so.
- gVisor's netstack keeps its own accept queue with its own limit.

Method: listen(backlog), open CONNECTS non-blocking connects one after
another, wait SETTLE_S, count how many the listener then hands out with
non-blocking accept() ("accepted"), and how many clients saw their connect
complete ("connected", which can exceed "accepted" where a kernel answers a
SYN while its queue is full and drops the final ACK).
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import Any, Dict, List

from iomux.probes._common import ProbeContext, errno_name

CONNECTS = 5
SETTLE_S = 0.3


def _one(backlog: int) -> Dict[str, Any]:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    clients: List[socket.socket] = []
    accepted: List[socket.socket] = []
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(backlog)
        addr = lst.getsockname()[:2]
        immediate: List[str] = []
        for _ in range(CONNECTS):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            rc = c.connect_ex(addr)
            immediate.append(errno.errorcode.get(rc, str(rc)) if rc else "0")
            clients.append(c)
            time.sleep(0.01)
        time.sleep(SETTLE_S)
        writable = select.select([], clients, [], 0)[1]
        connected = 0
        refused = 0
        for c in writable:
            err = c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                connected += 1
            else:
                refused += 1
        lst.setblocking(False)
        while True:
            try:
                accepted.append(lst.accept()[0])
            except BlockingIOError:
                break
            except OSError as exc:
                return {"backlog": backlog, "error": errno_name(exc)}
        return {"backlog": backlog, "connects": CONNECTS, "accepted": len(accepted),
                "connected": connected, "refused": refused,
                "pending": CONNECTS - connected - refused, "connect_returned": immediate}
    finally:
        for s in clients + accepted:
            s.close()
        lst.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Connections completed and accepted for backlog 0 and 1, before any accept()."""
    return {"settle_s": SETTLE_S, "backlog_0": _one(0), "backlog_1": _one(1)}
