"""The two measurements that are not throughput: idle connections' memory, workers' spread."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import time
from pathlib import Path

from bench import procs
from bench.procs import ServerSpec

# The server's SIGUSR1 line (docs/DESIGN.md section 1).
_STATS = re.compile(r"stats open=(\d+) accepted=(\d+) refused=(\d+)")
_BATCH = 200


def raise_nofile(want: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit towards ``want``; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def open_echoed(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` connections and echo one byte on each, so the server has accepted them all.

    In batches: a connect only waits for the kernel's handshake, so without a round
    trip a slow accept loop could leave a full backlog, and then SYNs are dropped
    and retried a second later.
    """
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            batch = [
                socket.create_connection(("127.0.0.1", port), timeout=10)
                for _ in range(min(_BATCH, count - len(socks)))
            ]
            socks += batch
            for s in batch:
                s.sendall(b"x")
            for s in batch:
                if s.recv(1) != b"x":
                    raise OSError("connection closed before its echo")
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def idle_connections(spec: ServerSpec, count: int, goal_mib: int = 32) -> dict[str, object]:
    """RSS of the server holding ``count`` idle connections (goal: at most ``goal_mib`` MiB)."""
    limit = raise_nofile(count + 64)
    if limit < count + 64:
        count = limit - 64
    server = procs.start(spec, cpu=None, nofile=count + 64)
    try:
        rss_before, _ = procs.rss_bytes(server.pid)
        t0 = time.monotonic()
        socks = open_echoed(server.port, count)
        try:
            setup = time.monotonic() - t0
            time.sleep(0.5)
            rss, hwm = procs.rss_bytes(server.pid)
            alive = server.proc.poll() is None
        finally:
            for s in socks:
                s.close()
    finally:
        server.stop()
    goal = goal_mib * 1024 * 1024
    return {
        "server": spec.name,
        "connections": count,
        "connect_and_echo_s": round(setup, 3),
        "rss_before_mib": round(rss_before / 2**20, 2),
        "rss_mib": round(rss / 2**20, 2),
        "hwm_mib": round(hwm / 2**20, 2),
        "bytes_per_conn": round((rss - rss_before) / count) if count else None,
        "server_alive": alive,
        "goal": f"rss <= {goal_mib} MiB",
        "met": alive and rss <= goal,
    }


def _socket_fds(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                n += 1
        except OSError:
            continue
    return n


def _stats_line(server: procs.Server, pid: int, timeout: float = 3.0) -> tuple[int, int] | None:
    """SIGUSR1 one worker and parse the stats line it writes: (open, accepted)."""
    offset = server.stderr_size()
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = _STATS.search(server.stderr_text(offset))
        if m:
            return int(m.group(1)), int(m.group(2))
        time.sleep(0.05)
    return None


def workers_spread(spec: ServerSpec, count: int, workers: int = 2) -> dict[str, object]:
    """Open ``count`` connections to ``--workers N`` and report how many each worker accepted."""
    raise_nofile(count + 64)
    server = procs.start(spec, cpu=None, extra=["--workers", str(workers)], nofile=count + 64)
    try:
        socks = open_echoed(server.port, count)
        try:
            kids = procs.children(server.pid)
            # With --workers the ready file may name the supervisor or a worker; the
            # workers are whichever of its children (or itself) serve.
            pids = kids or [server.pid]
            per_worker: dict[str, dict[str, object]] = {}
            for pid in pids:
                stats = _stats_line(server, pid)
                # The listener and the spare fd (if any) are sockets too: the /proc count
                # is a cross-check, the stats line is the figure.
                per_worker[str(pid)] = {
                    "open": stats[0] if stats else None,
                    "accepted": stats[1] if stats else None,
                    "socket_fds": _socket_fds(pid),
                    "source": "SIGUSR1 stats" if stats else "no stats line within 3 s",
                }
        finally:
            for s in socks:
                s.close()
    finally:
        server.stop()
    accepted = [w["accepted"] for w in per_worker.values()]
    known = [a for a in accepted if isinstance(a, int)]
    return {
        "server": spec.name,
        "workers": workers,
        "worker_pids_found": len(pids),
        "connections": count,
        "per_worker": per_worker,
        "goal": f"all {workers} workers accept connections",
        "met": len(known) == workers and all(a > 0 for a in known),
    }
