"""A fault-injecting TCP proxy for tests, in the manner of Toxiproxy.

``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port), and for every
client it accepts opens one connection to ``upstream`` and forwards bytes both
ways, applying its *toxics* on the way:

- ``latency``: every chunk is held this many seconds after it was read, in each
  direction (an echo round trip through the proxy takes at least twice this);
- ``bandwidth``: at most this many bytes per second per direction per link;
- ``slice_size``: at most this many bytes per ``send`` (1: one byte per
  segment, as both proxy sockets have TCP_NODELAY);
- ``reset_after``: once this many bytes went client -> upstream on a link, both
  of its sockets are closed with SO_LINGER(1, 0), which sends an RST each way;
- ``stall()`` / ``resume()``: stop reading and forwarding on every link (the
  peers see a silent path, their kernel buffers fill), then go on; a stall
  that never resumes is a black-holed peer.

One thread runs a ``selectors`` loop for the listener and every link, so a
toxic never races a socket close; the API may be called from any thread (a
socketpair wakes the loop). Half-close is forwarded: EOF on one side becomes
``shutdown(SHUT_WR)`` on the other once everything before it was sent.
Standard library only, Python 3.9+.
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Tuple, cast

# How much a direction reads ahead of what it has forwarded: beyond this it stops
# reading, so a slow toxic pushes back on the sender as a slow network would.
READ_AHEAD = 1024 * 1024
RECV_SIZE = 65536
# Bandwidth is paced in slices of 1/20 s, so a limit is smooth at test timescales.
PACING_SLICES = 20


@dataclass
class LinkStats:
    """What one link (one client, one upstream connection) carried so far."""

    up_bytes: int = 0  # client -> upstream, forwarded
    down_bytes: int = 0  # upstream -> client, forwarded
    up_sends: int = 0  # send() calls that forwarded client -> upstream bytes
    down_sends: int = 0
    reset: bool = False  # closed by reset_after or reset_all (RST both ways)
    closed: bool = False


class _Pipe:
    """One direction of a link: read from ``src``, hold, forward to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        self.src = src
        self.dst = dst
        self.up = up
        self.queue: Deque[Tuple[float, memoryview]] = collections.deque()
        self.queued = 0
        self.eof = False  # src sent FIN
        self.shut = False  # we forwarded the FIN to dst
        self.next_send = 0.0  # bandwidth pacing: not before this instant

    def done(self) -> bool:
        return self.shut


class _Link:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.up = _Pipe(client, upstream, True)
        self.down = _Pipe(upstream, client, False)
        self.stats = LinkStats()


class FaultProxy:
    """A TCP proxy from a local port to ``upstream`` with adjustable faults (see the module)."""

    def __init__(
        self,
        upstream: Tuple[str, int],
        *,
        latency: float = 0.0,
        bandwidth: int = 0,
        slice_size: int = 0,
        reset_after: int = 0,
        connect_timeout: float = 5.0,
    ) -> None:
        self.upstream = upstream
        self.latency = latency
        self.bandwidth = bandwidth
        self.slice_size = slice_size
        self.reset_after = reset_after
        self.connect_timeout = connect_timeout
        self._stalled = False
        self._reset_now = False
        self._lock = threading.Lock()
        self._links: List[_Link] = []
        self._stop = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.errors: List[str] = []  # unexpected exceptions of the loop thread
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- the API ----------------------------------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """Where clients connect."""
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def configure(self, **toxics: Any) -> None:
        """Change toxics (latency, bandwidth, slice_size, reset_after) for every link, now."""
        with self._lock:
            for name, value in toxics.items():
                if name not in ("latency", "bandwidth", "slice_size", "reset_after"):
                    raise TypeError(f"unknown toxic {name!r}")
                setattr(self, name, value)
        self._wake()

    def stall(self) -> None:
        """Stop reading and forwarding on every link until ``resume()``."""
        with self._lock:
            self._stalled = True
        self._wake()

    def resume(self) -> None:
        """Forward again after ``stall()``."""
        with self._lock:
            self._stalled = False
        self._wake()

    def reset_all(self) -> None:
        """Close every open link with an RST both ways."""
        with self._lock:
            self._reset_now = True
        self._wake()

    def links(self) -> List[LinkStats]:
        """A snapshot of every link's counters, in accept order."""
        with self._lock:
            return [LinkStats(**vars(link.stats)) for link in self._links]

    def close(self) -> None:
        """Stop the loop and close every socket (idempotent)."""
        with self._lock:
            self._stop = True
        self._wake()
        self._thread.join(10)
        for s in (self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the loop ---------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full: a wakeup is pending anyway; closed: stopped
            self._wake_w.send(b"x")

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ, None)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            self._loop(sel)
        except Exception as exc:  # reported to the test, which asserts on it
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                links = list(self._links)
            for link in links:
                self._close_link(sel, link, rst=False)
            sel.close()
            self._listener.close()

    def _loop(self, sel: selectors.BaseSelector) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
                stalled = self._stalled
                reset_now, self._reset_now = self._reset_now, False
                links = [link for link in self._links if not link.stats.closed]
            if reset_now:
                for link in links:
                    self._close_link(sel, link, rst=True)
                continue
            now = time.monotonic()
            deadline = now + 0.5
            for link in links:
                want: Dict[socket.socket, int] = {link.client: 0, link.upstream: 0}
                for pipe in (link.up, link.down):
                    if stalled:
                        continue
                    if not pipe.eof and pipe.queued < READ_AHEAD:
                        want[pipe.src] |= selectors.EVENT_READ
                    if pipe.queue:
                        due = max(pipe.queue[0][0], pipe.next_send)
                        if due <= now:
                            want[pipe.dst] |= selectors.EVENT_WRITE
                        else:
                            deadline = min(deadline, due)
                    elif pipe.eof and not pipe.shut:
                        self._forward_eof(pipe)
                for sock, events in want.items():
                    self._set_interest(sel, sock, events, link)
                if link.up.done() and link.down.done():
                    self._close_link(sel, link, rst=False)
            for key, mask in sel.select(max(0.0, deadline - time.monotonic())):
                if key.fileobj is self._listener:
                    self._accept(sel)
                elif key.fileobj is self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                else:
                    link = key.data
                    if link.stats.closed:
                        continue
                    sock = cast(socket.socket, key.fileobj)
                    for pipe in (link.up, link.down):
                        if link.stats.closed:
                            break
                        if mask & selectors.EVENT_READ and pipe.src is sock:
                            self._read(sel, link, pipe)
                        if mask & selectors.EVENT_WRITE and pipe.dst is sock:
                            self._write(sel, link, pipe)

    @staticmethod
    def _set_interest(sel: selectors.BaseSelector, sock: socket.socket, events: int, link: _Link) -> None:
        try:
            key = sel.get_key(sock)
        except KeyError:
            if events:
                sel.register(sock, events, link)
            return
        if not events:
            sel.unregister(sock)
        elif key.events != events:
            sel.modify(sock, events, link)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except BlockingIOError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout)
            except OSError:
                # Upstream is down: the client sees its connection reset.
                _set_rst(client)
                client.close()
                continue
            for s in (client, upstream):
                s.setblocking(False)
                # Slicing must reach the wire as slices, not coalesced by Nagle.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._links.append(_Link(client, upstream))

    def _read(self, sel: selectors.BaseSelector, link: _Link, pipe: _Pipe) -> None:
        try:
            data = pipe.src.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            # The peer reset: pass the reset on, as a cut cable would not, but a
            # proxy that closes both halves must.
            self._close_link(sel, link, rst=True)
            return
        if not data:
            pipe.eof = True
            return
        with self._lock:
            latency = self.latency
        pipe.queue.append((time.monotonic() + latency, memoryview(data)))
        pipe.queued += len(data)

    def _write(self, sel: selectors.BaseSelector, link: _Link, pipe: _Pipe) -> None:
        with self._lock:
            bandwidth, slice_size, reset_after = self.bandwidth, self.slice_size, self.reset_after
        due, chunk = pipe.queue[0]
        n = len(chunk)
        if slice_size > 0:
            n = min(n, slice_size)
        if bandwidth > 0:
            n = min(n, max(1, bandwidth // PACING_SLICES))
        if reset_after > 0 and pipe.up:
            n = min(n, max(0, reset_after - link.stats.up_bytes))
        sent = 0
        if n:
            try:
                sent = pipe.dst.send(chunk[:n])
            except BlockingIOError:
                return
            except OSError:
                self._close_link(sel, link, rst=True)
                return
        with self._lock:
            if pipe.up:
                link.stats.up_bytes += sent
                link.stats.up_sends += 1
            else:
                link.stats.down_bytes += sent
                link.stats.down_sends += 1
        pipe.queued -= sent
        if sent == len(chunk):
            pipe.queue.popleft()
        else:
            pipe.queue[0] = (due, chunk[sent:])
        if bandwidth > 0:
            pipe.next_send = time.monotonic() + sent / bandwidth
        if reset_after > 0 and pipe.up and link.stats.up_bytes >= reset_after:
            self._close_link(sel, link, rst=True)

    @staticmethod
    def _forward_eof(pipe: _Pipe) -> None:
        pipe.shut = True
        with contextlib.suppress(OSError):  # the other side is gone already
            pipe.dst.shutdown(socket.SHUT_WR)

    def _close_link(self, sel: selectors.BaseSelector, link: _Link, rst: bool) -> None:
        with self._lock:
            if link.stats.closed:
                return
            link.stats.closed = True
            link.stats.reset = rst
        for s in (link.client, link.upstream):
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(s)
            if rst:
                _set_rst(s)
            s.close()


def _set_rst(sock: socket.socket) -> None:
    """SO_LINGER on, 0 seconds: close() then sends an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def wait_for(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


__all__ = ["FaultProxy", "LinkStats", "wait_for"]
