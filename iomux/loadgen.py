"""iomux bench: a closed-loop, multi-process echo load client.

Each connection sends one message of ``--size`` bytes, reads the same number of
bytes back, records the round trip's latency and sends again, for
``--duration`` seconds. The connections are shared out between ``--procs``
forked processes; each drives its share with one ``selectors`` loop, so the
client scales past one CPU while every connection stays strictly
request/response (one message in flight per connection).

Only requests that complete inside the measured window count; the window opens
for every process at the same moment (a ready/go handshake over pipes, after
all connections are established), so connection set-up is never measured.

Standard library only, Python 3.9+.
"""

from __future__ import annotations

import argparse
import array
import json
import math
import os
import selectors
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

from iomux.check import parse_address
from iomux.errors import IomuxError, RuntimeFailure, UsageError

# A message larger than this is still echoed; it only takes several recv calls.
_RECV_CHUNK = 256 * 1024
# Latencies are sent from a child to the parent as raw doubles after a JSON header.
_LAT_TYPECODE = "d"


@dataclass
class WorkerResult:
    """What one load process measured."""

    requests: int = 0
    errors: int = 0
    cpu_s: float = 0.0
    latencies_s: array.array[float] = field(default_factory=lambda: array.array(_LAT_TYPECODE))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``iomux bench`` arguments (target, --conns, --size, --duration, --procs, --json)."""
    parser.add_argument("target", metavar="HOST:PORT", help="the echo server to load")
    parser.add_argument("--conns", type=int, default=10, help="concurrent connections (default 10)")
    parser.add_argument(
        "--size", type=int, default=1024, help="message size in bytes (default 1024)"
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds (default 5)")
    parser.add_argument(
        "--procs",
        type=int,
        default=None,
        help="load processes (default: one per CPU, at most one per connection)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def parse_target(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[V6]:PORT``) into a host and a port (UsageError if bad)."""
    return parse_address(text)


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile of already sorted values (0.0 for no values).

    Nearest rank (the smallest value with at least ``pct`` percent of the
    values at or below it) always returns a measured value, never an
    interpolation; the C load client in bench/ uses the same definition.
    """
    if not sorted_values:
        return 0.0
    rank = math.ceil(pct / 100.0 * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def aggregate(
    results: Sequence[WorkerResult], size: int, duration: float, conns: int, procs: int
) -> dict[str, object]:
    """Merge the processes' results into the report ``iomux bench --json`` prints.

    Rates are over the measured window (``duration``); MB/s counts the echoed
    payload once (bytes the server sent back), in units of 10**6 bytes.
    """
    lat = sorted(v for r in results for v in r.latencies_s)
    requests = sum(r.requests for r in results)
    rps = requests / duration if duration > 0 else 0.0
    return {
        "conns": conns,
        "size": size,
        "duration_s": duration,
        "procs": procs,
        "requests": requests,
        "errors": sum(r.errors for r in results),
        "requests_per_s": rps,
        "mb_per_s": rps * size / 1e6,
        "client_cpu_s": sum(r.cpu_s for r in results),
        "latency_us": {
            "p50": percentile(lat, 50) * 1e6,
            "p90": percentile(lat, 90) * 1e6,
            "p99": percentile(lat, 99) * 1e6,
            "max": (lat[-1] if lat else 0.0) * 1e6,
            "mean": (sum(lat) / len(lat) if lat else 0.0) * 1e6,
        },
    }


def _connect_all(host: str, port: int, count: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((host, port), timeout=5.0)
            # Small messages must leave at once: Nagle would add the peer's delayed ACK
            # (up to 40 ms on Linux) to every round trip.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            socks.append(sock)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system


def drive(socks: list[socket.socket], size: int, duration: float) -> WorkerResult:
    """Run the closed loop on connected non-blocking sockets for ``duration`` seconds.

    Returns the requests completed inside the window and their latencies. A
    connection the server closes or resets counts one error and leaves the loop.
    """
    payload = memoryview(b"\x5a" * size)
    rbuf = bytearray(min(size, _RECV_CHUNK))
    rview = memoryview(rbuf)
    n = len(socks)
    sent = [0] * n
    got = [0] * n
    started = [0.0] * n
    writing = [False] * n
    result = WorkerResult()
    lat = result.latencies_s
    sel = selectors.DefaultSelector()
    read_only = selectors.EVENT_READ
    read_write = selectors.EVENT_READ | selectors.EVENT_WRITE
    live = n
    clock = time.perf_counter
    cpu0 = _cpu_now()
    start = clock()
    deadline = start + duration

    def send_more(i: int, sock: socket.socket) -> bool:
        # Returns False when the connection failed. Write interest is on only while
        # part of the message is still unsent.
        off = sent[i]
        try:
            off += sock.send(payload[off:])
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            return False
        sent[i] = off
        if off < size and not writing[i]:
            writing[i] = True
            sel.modify(sock, read_write, i)
        elif off >= size and writing[i]:
            writing[i] = False
            sel.modify(sock, read_only, i)
        return True

    def drop(sock: socket.socket) -> None:
        nonlocal live
        result.errors += 1
        sel.unregister(sock)
        sock.close()
        live -= 1

    try:
        for i, sock in enumerate(socks):
            sel.register(sock, read_only, i)
        for i, sock in enumerate(socks):
            started[i] = clock()
            if not send_more(i, sock):
                drop(sock)
        while live:
            now = clock()
            if now >= deadline:
                break
            for key, mask in sel.select(deadline - now):
                sock = key.fileobj  # type: ignore[assignment]
                i = key.data
                if mask & selectors.EVENT_WRITE and sent[i] < size and not send_more(i, sock):
                    drop(sock)
                    continue
                if not mask & selectors.EVENT_READ:
                    continue
                want = size - got[i]
                try:
                    nread = sock.recv_into(rview, want if want < len(rbuf) else len(rbuf))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    drop(sock)
                    continue
                if nread == 0:
                    drop(sock)
                    continue
                got[i] += nread
                if got[i] < size:
                    continue
                done = clock()
                if done >= deadline:
                    # Straddles the end of the window: not counted, no new request.
                    continue
                lat.append(done - started[i])
                got[i] = 0
                sent[i] = 0
                started[i] = done
                if not send_more(i, sock):
                    drop(sock)
    finally:
        sel.close()
        result.cpu_s = _cpu_now() - cpu0
        for sock in socks:
            sock.close()
    result.requests = len(lat)
    return result


def _read_exact(fd: int, count: int) -> bytes:
    chunks = []
    while count:
        chunk = os.read(fd, min(count, 1 << 20))
        if not chunk:
            raise EOFError("short read from a load process")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def _read_line(fd: int) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        ch = os.read(fd, 1)
        if not ch:
            break
        line += ch
    return bytes(line)


def _child(
    host: str, port: int, conns: int, size: int, duration: float, out_w: int, go_r: int
) -> None:
    try:
        socks = _connect_all(host, port, conns)
    except OSError as exc:
        os.write(out_w, f"E cannot connect to {host}:{port}: {exc.strerror or exc}\n".encode())
        return
    os.write(out_w, b"R\n")
    if os.read(go_r, 1) != b"G":
        for sock in socks:
            sock.close()
        return
    res = drive(socks, size, duration)
    lat = res.latencies_s.tobytes()
    header = {
        "requests": res.requests,
        "errors": res.errors,
        "cpu_s": res.cpu_s,
        "nbytes": len(lat),
    }
    data = json.dumps(header).encode() + b"\n" + lat
    view = memoryview(data)
    while view:
        view = view[os.write(out_w, view) :]


def run(
    host: str, port: int, conns: int, size: int, duration: float, procs: int
) -> list[WorkerResult]:
    """Run the load: ``procs`` forked processes (or this one, for a single process).

    Raises:
        RuntimeFailure: a connection could not be made.
    """
    if procs == 1 or not hasattr(os, "fork"):
        try:
            socks = _connect_all(host, port, conns)
        except OSError as exc:
            raise RuntimeFailure(
                f"cannot connect to {host}:{port}: {exc.strerror or exc}"
            ) from None
        return [drive(socks, size, duration)]
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    children: list[tuple[int, int, int]] = []  # pid, result read end, go write end
    try:
        for share in shares:
            out_r, out_w = os.pipe()
            go_r, go_w = os.pipe()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                status = 1
                try:
                    os.close(out_r)
                    os.close(go_w)
                    _child(host, port, share, size, duration, out_w, go_r)
                    status = 0
                finally:
                    os._exit(status)
            os.close(out_w)
            os.close(go_r)
            children.append((pid, out_r, go_w))
        for _, out_r, _ in children:
            line = _read_line(out_r)
            if not line.startswith(b"R"):
                msg = line[2:].decode(errors="replace").strip() or "a load process died"
                raise RuntimeFailure(msg)
        for _, _, go_w in children:
            os.write(go_w, b"G")
        results = []
        for _, out_r, _ in children:
            try:
                header = json.loads(_read_line(out_r))
                lat: array.array[float] = array.array(_LAT_TYPECODE)
                lat.frombytes(_read_exact(out_r, int(header["nbytes"])))
            except (EOFError, ValueError, KeyError):
                raise RuntimeFailure("a load process died before it reported") from None
            results.append(
                WorkerResult(
                    int(header["requests"]), int(header["errors"]), float(header["cpu_s"]), lat
                )
            )
        return results
    finally:
        for pid, out_r, go_w in children:
            # Closing the go pipe first releases a child still waiting for "G".
            os.close(go_w)
            os.close(out_r)
            os.waitpid(pid, 0)


def format_report(target: str, report: dict[str, object]) -> str:
    """The human-readable report ``iomux bench`` prints without ``--json``."""
    lat = report["latency_us"]
    assert isinstance(lat, dict)
    rows = [
        ("target", target),
        ("connections", f"{report['conns']} in {report['procs']} process(es)"),
        ("message size", f"{report['size']} B"),
        ("duration", f"{report['duration_s']} s"),
        ("requests", f"{report['requests']}"),
        ("requests/s", f"{report['requests_per_s']:.1f}"),
        ("MB/s", f"{report['mb_per_s']:.2f} (echoed payload, 10^6 B)"),
        ("latency p50", f"{lat['p50'] / 1000:.3f} ms"),
        ("latency p99", f"{lat['p99'] / 1000:.3f} ms"),
        ("errors", f"{report['errors']}"),
    ]
    return "\n".join(f"{name:<14}{value}" for name, value in rows)


def main(args: argparse.Namespace) -> int:
    """Run ``iomux bench`` from parsed arguments; print a table or JSON; return the exit status."""
    try:
        host, port = parse_target(args.target)
        if args.conns < 1:
            raise UsageError("--conns must be at least 1")
        if args.size < 1:
            raise UsageError("--size must be at least 1")
        if not args.duration > 0:
            raise UsageError("--duration must be more than 0")
        procs = args.procs if args.procs is not None else min(os.cpu_count() or 1, args.conns)
        if procs < 1:
            raise UsageError("--procs must be at least 1")
        procs = min(procs, args.conns)
        results = run(host, port, args.conns, args.size, args.duration, procs)
    except IomuxError as exc:
        # main() is the boundary DESIGN.md section 5 gives `bench`: it returns the status.
        print(f"iomux: error: {exc.message}", file=sys.stderr)
        return exc.status
    report = aggregate(results, args.size, args.duration, args.conns, procs)
    report["target"] = args.target
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(args.target, report))
    if report["requests"] == 0:
        print(f"iomux: error: no request completed against {args.target}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # `python -m iomux.loadgen` lets bench/ run the client without the full CLI.
    _parser = argparse.ArgumentParser(prog="iomux bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
