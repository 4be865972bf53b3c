"""Default socket buffer sizes, and whether setsockopt(SO_RCVBUF/SO_SNDBUF)
doubles the value asked for (issue 14).

Facts this probe relies on:
- Linux: setsockopt(SO_RCVBUF, n) stores 2*n ("to allow space for
  bookkeeping overhead", socket(7)) and getsockopt returns the doubled value;
  n is capped at net.core.rmem_max / wmem_max first. A fresh TCP socket
  reports tcp_rmem[1] / tcp_wmem[1] (131072 / 16384 by default); a UDP
  socket reports net.core.rmem_default / wmem_default (212992).
- FreeBSD and macOS: getsockopt returns the value set (sbreserve stores
  sb_hiwat = n); defaults are net.inet.tcp.recvspace / sendspace (65536 /
  32768 on FreeBSD 13+, 131072 / 131072 on macOS).
- gVisor's netstack keeps its own defaults (1 MiB for TCP receive and send,
  tcp_rmem/tcp_wmem as its /proc shows) and emulates Linux's doubling on
  setsockopt; its limits are its own, not the host's sysctls.

Method: read SO_RCVBUF/SO_SNDBUF of a fresh TCP socket, of both ends of a
connected loopback pair and of a fresh UDP socket; then set 32768 on a fresh
TCP socket and read back. ``factor`` is read back / asked for.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, Optional

from iomux.probes._common import ProbeContext, tcp_pair

ASK = 32768


def _bufs(sock: socket.socket) -> Dict[str, int]:
    return {"SO_RCVBUF": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            "SO_SNDBUF": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)}


def _proc(path: str) -> Optional[str]:
    # Linux and gVisor publish their TCP defaults here; the BSDs do not.
    try:
        with open(path, encoding="ascii") as f:
            return " ".join(f.read().split())
    except OSError:
        return None


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Default buffer sizes per socket kind, and the read-back factor of a set size."""
    out: Dict[str, Any] = {"asked": ASK}
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        out["tcp_fresh"] = _bufs(tcp)
    finally:
        tcp.close()
    client, server = tcp_pair()
    try:
        out["tcp_connected_client"] = _bufs(client)
        out["tcp_accepted"] = _bufs(server)
    finally:
        client.close()
        server.close()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        out["udp_fresh"] = _bufs(udp)
    finally:
        udp.close()
    readback: Dict[str, int] = {}
    factor: Dict[str, float] = {}
    for name, opt in (("SO_RCVBUF", socket.SO_RCVBUF), ("SO_SNDBUF", socket.SO_SNDBUF)):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, ASK)
            readback[name] = s.getsockopt(socket.SOL_SOCKET, opt)
        finally:
            s.close()
        factor[name] = round(readback[name] / ASK, 3)
    out["set_readback"] = readback
    out["factor"] = factor
    out["sysctl"] = {key: _proc(path) for key, path in (
        ("net.ipv4.tcp_rmem", "/proc/sys/net/ipv4/tcp_rmem"),
        ("net.ipv4.tcp_wmem", "/proc/sys/net/ipv4/tcp_wmem"),
        ("net.core.rmem_max", "/proc/sys/net/core/rmem_max"),
        ("net.core.wmem_max", "/proc/sys/net/core/wmem_max"))}
    return out
