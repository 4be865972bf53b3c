"""iomux check HOST:PORT: one echo round trip, for health checks.

Exit 0 with ``ok HOST:PORT round trip N ms`` on stdout when the server echoed
exactly what we sent; otherwise a RuntimeFailure (one line, exit 1). The probe
line is non-empty and newline-terminated so that a ``--line-mode`` server
echoes it too.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Tuple

from iomux.errors import RuntimeFailure, UsageError


def parse_address(text: str) -> Tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into a host and a port.

    Raises:
        UsageError: no port, or a port that is not 1..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"bad address {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"bad address {text!r}: port {port_text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"bad address {text!r}: port must be 1..65535")
    return host, port


def round_trip(host: str, port: int, timeout: float) -> float:
    """Connect, send one line, read it back; return the seconds it took.

    Raises:
        RuntimeFailure: no connection, a wrong or short echo, or the timeout.
    """
    payload = b"iomux-check " + os.urandom(8).hex().encode() + b"\n"
    where = f"{host}:{port}"
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(len(payload) - len(got))
                if not chunk:
                    break
                got += chunk
    except socket.timeout:
        raise RuntimeFailure(f"check {where} failed: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise RuntimeFailure(f"check {where} failed: {exc.strerror or exc}") from None
    if got != payload:
        raise RuntimeFailure(
            f"check {where} failed: sent {len(payload)} bytes, got {len(got)} bytes back"
            + (" that differ" if len(got) == len(payload) else "")
        )
    return time.monotonic() - start


def main(address: str, timeout: float) -> int:
    """Run the check and print its one line; return 0 (failures raise)."""
    if timeout <= 0:
        raise UsageError("--timeout must be positive")
    host, port = parse_address(address)
    elapsed = round_trip(host, port, timeout)
    print(f"ok {host}:{port} round trip {elapsed * 1000:.1f} ms", flush=True)
    return 0
