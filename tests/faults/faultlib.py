"""Clients and measurements of the fault suite (standard library only, Python 3.9+).

The server-side helpers (start a server, stats, RSS, CPU) come from
tests/server/serverproc.py; what is here is what only fault cases need: a
bystander that measures round-trip latency while something goes wrong beside
it, a streaming echo that never holds the whole payload in memory, and a count
of a process's descriptors that also works on FreeBSD.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from serverproc import MiB, open_fds, recv_exact, rss_kib, wait

FD_UNCOUNTABLE = (
    "not run: a process's open descriptors are not countable here "
    "(no /proc/PID/fd, no procstat)"
)


def fd_count(pid: int) -> Optional[int]:
    """How many descriptors ``pid`` holds: /proc/PID/fd (Linux), ``procstat -f`` (FreeBSD); else None."""
    n: Optional[int] = open_fds(pid)
    if n is not None:
        return n
    if shutil.which("procstat") is None:
        return None
    out = subprocess.run(
        ["procstat", "-f", str(pid)], capture_output=True, text=True, timeout=10, check=False
    )
    if out.returncode != 0:
        return None
    # Columns: PID COMM FD T ...; FD is a number for real descriptors and a word
    # (text, ctty, cwd, root, jail) for the process's other vnodes.
    return sum(1 for line in out.stdout.splitlines()[1:] if len(line.split()) > 2 and line.split()[2].isdigit())


def wait_fds(pid: int, want: int, timeout: float = 10.0) -> Optional[int]:
    """Poll ``fd_count(pid)`` until it equals ``want`` (or the timeout); return the last count."""
    deadline = time.monotonic() + wait(timeout)
    while True:
        n = fd_count(pid)
        if n is None or n == want or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def p99(samples: List[float]) -> float:
    """The 99th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class Bystander:
    """A client that keeps doing small round trips in a thread and records each one's latency.

    ``finish()`` stops it and returns the latencies; any mismatch, EOF or
    socket error becomes an AssertionError there (a bystander must never notice
    the fault beside it).
    """

    def __init__(self, address: Tuple[str, int], name: str, pause: float = 0.0) -> None:
        self.sock = socket.create_connection(address, timeout=wait(10))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.name = name
        self.pause = pause
        self.latencies: List[float] = []
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                msg = f"{self.name} {i}\n".encode()
                t0 = time.perf_counter()
                self.sock.sendall(msg)
                got = recv_exact(self.sock, len(msg))
                self.latencies.append(time.perf_counter() - t0)
                if got != msg:
                    self.error = f"{self.name}: sent {msg!r}, got {got!r}"
                    return
                i += 1
                if self.pause:
                    time.sleep(self.pause)
        except (OSError, AssertionError) as exc:
            self.error = f"{self.name}: {type(exc).__name__}: {exc}"

    def finish(self) -> List[float]:
        """Stop, close, and return the round-trip latencies in seconds."""
        self._stop.set()
        self._thread.join(wait(15))
        self.sock.close()
        assert not self._thread.is_alive(), f"{self.name} hung in a round trip"
        assert self.error is None, self.error
        assert self.latencies, f"{self.name} completed no round trip"
        return self.latencies


@dataclass
class StreamResult:
    """What a streaming echo sent and got back; the server's peak RSS meanwhile."""

    sent: int = 0
    received: int = 0
    #: The stream offset of the first echoed byte that differs from the byte
    #: sent there (None: every byte received so far is the one sent).
    first_wrong: Optional[int] = None
    eof: bool = False
    peak_rss_kib: Optional[int] = None
    errors: List[str] = field(default_factory=list)


class _StreamPattern:
    """The byte stream ``stream_echo`` sends: ``block`` over and over, each
    chunk's first 8 bytes its number (big-endian), so that any stretch of it can
    be rebuilt from its offset and compared byte for byte (memcmp) as it comes
    back, without keeping the stream."""

    def __init__(self, block: bytes) -> None:
        self.block = bytearray(block)
        self.chunk = len(block)
        self._number = -1

    def at(self, number: int) -> memoryview:
        """Chunk ``number`` (a view of one shared buffer: valid until the next call)."""
        if number != self._number:
            struct.pack_into(">Q", self.block, 0, number)
            self._number = number
        return memoryview(self.block)

    def first_wrong(self, offset: int, piece: memoryview) -> Optional[int]:
        """The stream offset of the first byte of ``piece`` (found at ``offset``)
        that differs from the pattern, or None."""
        done = 0
        while done < len(piece):
            number, start = divmod(offset + done, self.chunk)
            n = min(len(piece) - done, self.chunk - start)
            got, want = bytes(piece[done : done + n]), bytes(self.at(number)[start : start + n])
            if got != want:
                return offset + done + next(i for i in range(n) if got[i] != want[i])
            done += n
        return None


def stream_echo(
    address: Tuple[str, int],
    total: int,
    chunk: int = 1 * MiB,
    watch_pid: Optional[int] = None,
    timeout: float = 120.0,
) -> StreamResult:
    """Send ``total`` bytes and read the echo at the same time; check the echo as it comes.

    The payload is a random block whose first 8 bytes carry the chunk number
    (``_StreamPattern``), so a dropped, doubled or reordered chunk shows, and
    the test holds two chunks in memory, never the stream. Each piece read is
    compared with the bytes sent at its offset: memcmp, where a SHA-256 of
    both sides cost 7.5 s of the Debian VM's fault suite (software SHA-256
    under emulation) to say the same. The write side is shut once everything
    is sent, and reading goes on to EOF. With ``watch_pid`` the peak RSS of
    that process is sampled every 0.1 s.
    """
    result = StreamResult()
    sock = socket.create_connection(address, timeout=wait(timeout))
    random_block = os.urandom(chunk)
    sending = _StreamPattern(random_block)
    expected = _StreamPattern(random_block)

    def send_all() -> None:
        try:
            i = 0
            while result.sent < total:
                piece = sending.at(i)[: min(chunk, total - result.sent)]
                sock.sendall(piece)
                result.sent += len(piece)
                i += 1
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            result.errors.append(f"sender: {type(exc).__name__}: {exc}")

    def sample() -> None:
        assert watch_pid is not None
        while not stop.is_set():
            rss = rss_kib(watch_pid)
            if rss is not None:
                result.peak_rss_kib = max(result.peak_rss_kib or 0, rss)
            stop.wait(0.1)

    stop = threading.Event()
    sender = threading.Thread(target=send_all, name="stream-sender", daemon=True)
    sampler = threading.Thread(target=sample, name="rss-sampler", daemon=True) if watch_pid else None
    buf = bytearray(256 * 1024)
    try:
        sender.start()
        if sampler is not None:
            sampler.start()
        while True:
            try:
                n = sock.recv_into(buf)
            except OSError as exc:
                result.errors.append(f"reader: {type(exc).__name__}: {exc}")
                break
            if not n:
                result.eof = True
                break
            if result.first_wrong is None:
                result.first_wrong = expected.first_wrong(result.received, memoryview(buf)[:n])
            result.received += n
    finally:
        stop.set()
        # Unblocks the sender if the reader gave up first.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sender.join(wait(30))
        if sampler is not None:
            sampler.join(5)
        sock.close()
    return result
