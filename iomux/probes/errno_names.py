"""The errno *names* common socket failures produce (issue 5). Numbers differ
between kernels (ECONNRESET is 104 on Linux, 54 on FreeBSD and macOS), so only
names are recorded, via errno.errorcode.

Facts this probe relies on:
- Writing to a connection whose peer has closed: the first send succeeds (the
  peer answers it with a RST); a later send fails with EPIPE (Linux reports
  EPIPE once the RST arrives in CLOSE_WAIT; the BSDs check "can't send more"
  before the pending error). Python ignores SIGPIPE, so it shows as an error.
- After a peer's RST (SO_LINGER {on, 0}), send and recv fail with ECONNRESET.
- connect() to a loopback port nobody listens on fails with ECONNREFUSED.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any, Callable, Dict, List, TypeVar

from iomux.probes._common import ProbeContext, errno_name, tcp_pair

SENDS = 4
T = TypeVar("T")


def _sends(sock: socket.socket) -> List[str]:
    seen: List[str] = []
    for _ in range(SENDS):
        try:
            sock.send(b"x")
            seen.append("ok")
        except OSError as exc:
            seen.append(errno_name(exc))
            break
        # Give the peer's RST time to come back over loopback.
        time.sleep(0.02)
    return seen


def _first_error(seq: List[str]) -> str | None:
    return next((s for s in seq if s != "ok"), None)


def _recv(sock: socket.socket) -> str:
    try:
        return "eof" if sock.recv(16) == b"" else "data"
    except OSError as exc:
        return errno_name(exc)


def _after_peer(reset: bool, act: Callable[[socket.socket], T]) -> T:
    """``act`` on a client whose peer has closed (``reset``: with a RST)."""
    client, server = tcp_pair()
    try:
        if reset:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()
        if reset:
            time.sleep(0.02)
        return act(client)
    finally:
        client.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Errno names for write-after-close, write/read after reset, and a refused connect."""
    out: Dict[str, Any] = {}
    for key, reset in (("write_after_peer_close", False), ("write_after_peer_reset", True)):
        seq = _after_peer(reset, _sends)
        out[key] = {"sends": seq, "first_error": _first_error(seq)}
    out["read_after_peer_reset"] = _after_peer(True, _recv)

    # A port that was just free: bind, note it, close, then connect to it.
    probe_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe_sock.bind(("127.0.0.1", 0))
    port = probe_sock.getsockname()[1]
    probe_sock.close()
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(5)
    try:
        c.connect(("127.0.0.1", port))
        out["connect_closed_port"] = "connected (something listens there)"
    except OSError as exc:
        out["connect_closed_port"] = errno_name(exc)
    finally:
        c.close()
    return out
