"""Whether the kernel spreads connections between two listeners on one port
(issue 5; the basis of ``iomux serve --workers N``).

Facts this probe relies on:
- Linux 3.9+: SO_REUSEPORT on every listener of a port makes the kernel pick
  one listener per connection by a hash of the 4-tuple, so connections from
  varying client ports spread roughly evenly.
- FreeBSD 12+: SO_REUSEPORT only lets the sockets share the port (the last
  bound one takes the connections); SO_REUSEPORT_LB (0x00010000) balances.
  Python defines socket.SO_REUSEPORT_LB only from 3.12 on FreeBSD.
- macOS: SO_REUSEPORT shares the port without balancing.
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Any, Dict, List, Optional, Tuple

from iomux.probes._common import ProbeContext, errno_name, unavailable
from iomux.workers import FREEBSD_SO_REUSEPORT_LB

FULL_CONNS = 1000



def _option() -> Tuple[Optional[str], Optional[int]]:
    if sys.platform.startswith("freebsd"):
        return "SO_REUSEPORT_LB", getattr(socket, "SO_REUSEPORT_LB", FREEBSD_SO_REUSEPORT_LB)
    if hasattr(socket, "SO_REUSEPORT"):
        return "SO_REUSEPORT", socket.SO_REUSEPORT
    return None, None


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Counts of connections each of two same-port listeners accepted."""
    name, opt = _option()
    if name is None or opt is None:
        return unavailable("no SO_REUSEPORT in this Python's socket module")
    listeners: List[socket.socket] = []
    counts = [0, 0]
    made = 0
    want = ctx.size(FULL_CONNS, 20)
    out: Dict[str, Any] = {"option": name, "connections_wanted": want}
    try:
        port = 0
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listeners.append(s)
            s.setsockopt(socket.SOL_SOCKET, opt, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                out.update({"bound": len(listeners) - 1,
                            "why": f"second bind failed: {errno_name(exc)}"})
                return out
            s.listen(64)
            s.setblocking(False)
            port = s.getsockname()[1]
        while made < want:
            if made % 50 == 0 and ctx.expired():
                out["note"] = f"time budget ran out after {made} connections"
                break
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            made += 1
            ready = select.select(listeners, [], [], 2.0)[0]
            for s in ready:
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                conn.close()
                counts[listeners.index(s)] += 1
            c.close()
    finally:
        for s in listeners:
            s.close()
    total = sum(counts)
    out.update({"bound": 2, "connections": made, "accepted": counts,
                "share_first": counts[0] / total if total else None,
                "min_share": min(counts) / total if total else None})
    return out
