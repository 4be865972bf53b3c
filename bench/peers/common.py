"""What every Python peer shares: its command line and the ready-file handshake."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys


def parse_args(name: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The peers' common command line: ``--host``, ``--port``, ``--ready-file``."""
    parser = argparse.ArgumentParser(prog=name, description=f"{name} echo server (bench peer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", default=None)
    return parser.parse_args(argv)


def announce(name: str, sock: socket.socket, ready_file: str | None) -> None:
    """Print the ready line and write the ready file (temp file + rename, as iomux does)."""
    host, port = sock.getsockname()[:2]
    print(
        f"listening on {host}:{port} backend={name} pid={os.getpid()}", file=sys.stderr, flush=True
    )
    if ready_file:
        info = {"host": host, "port": port, "backend": name, "pid": os.getpid(), "workers": 1}
        tmp = f"{ready_file}.tmp"
        with open(tmp, "w") as fh:
            json.dump(info, fh)
        os.replace(tmp, ready_file)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket the event loop adopts; bound here so the port is known up front."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock
