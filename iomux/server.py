"""The event loop: accept, read, echo, write, backpressure, signals, drain.

One process, one thread, one multiplexer. The loop owns the sockets; the echo
state of each connection (output buffer, watermarks, half-close, line mode)
lives in ``iomux.connection.Connection``, which ``_Peer`` extends with the
socket and its fd.

The hot path (echo mode, nothing pending) is one ``os.read`` of the ready fd
and one ``os.write`` of the bytes just read: two system calls per message, as
the C server in bench/c/ makes, and no multiplexer call. ``os.read`` and
``os.write`` rather than the socket's ``recv_into`` and ``send``: the socket
methods parse their arguments with the generic tuple parser and go through
the socket module's timeout machinery, ``os`` functions use Argument Clinic's
fast calls. Counted under callgrind on a socket pair (1 KiB echoes), a
``recv_into`` into a shared buffer plus a ``send`` of a memoryview slice
costs about 1,300 user-space instructions more than ``read`` plus ``write``
of the bytes object, which also needs no view slice. Counted the same way
(per echo, client side included): ``FileIO.readinto`` into a shared buffer
plus a write of a memoryview slice, 30 instructions more than read plus
write; ``os.readv``, 420 more; a read size of 2 KiB instead of 64 KiB, no
change (the 64 KiB malloc and its shrinking realloc cost what a view slice
costs). In the server itself (``make bench``'s 1 KiB x 10 cell, 5,300 per
request) the rest is the interpreter (about 1,500), taking and dropping the
GIL around every read, write and wait (about 700), malloc (about 700) and
epoll.poll's (fd, mask) tuples (about 400). ``epoll.poll(t, 64)`` instead of
the default 1,023 events saves about 260 instructions per wait, 30 to 80 per
request: not done, as under 2% of the user time, which is itself only 14-16%
of the server's CPU per request (the rest is the kernel's). Only when the kernel
takes less than we read is the unsent tail copied into the connection's
buffer and write interest turned on; it goes off again when the buffer is
empty. Everything else (line mode, pending output, EOF) goes through
``_service``.

Kernel facts the loop relies on, beside the code that needs them:

- A non-blocking socket's recv/send/accept raise BlockingIOError (EAGAIN) when
  there is nothing to do; edge-triggered backends must get there before
  waiting again, level-triggered ones may stop after one call.
- A read of a TCP socket that returns less than it asked for has emptied the
  receive queue (tcp_recvmsg copies from every queued segment until the
  length is reached), and data or a FIN that arrives afterwards raises a new
  edge. But a FIN that was already queued behind the data is returned by the
  *next* read (as 0) and raises no new edge. So an edge-triggered reader may
  stop at a short read, one system call less per message, only where the
  backend reports a queued FIN in the event itself (``native_eof``), and that
  bit is not set; nginx's ngx_unix_recv clears its "ready" flag on the same
  two conditions. No backend claims it today: epoll's EPOLLRDHUP would say
  it on Linux, but gVisor's epoll before 20240729 never sets EPOLLRDHUP (see
  iomux/backends/epoll.py), and kqueue's EV_EOF is not used for it. So every
  edge-triggered backend reads on until EAGAIN or EOF. A read that filled
  the whole buffer is always followed by another.
- recv returning 0 means the peer shut its write side (or closed): we may
  still write, so a half-closed client gets all its echo before we close.
- Python ignores SIGPIPE at start-up, so writing to a reset peer raises
  BrokenPipeError/ConnectionResetError instead of killing the process: those
  close that one connection.
- accept fails with EMFILE/ENFILE when we are out of fds, and the listener
  stays readable: retrying at once would spin. We keep one spare fd; on EMFILE
  we close it, accept and close what is waiting, and reopen it, and if that
  is not enough we stop watching the listener for a short while.
- A signal arriving during epoll_wait/poll/select makes the call fail with
  EINTR; Python runs the handler and retries the call (PEP 475), so a handler
  alone cannot wake the loop. ``signal.set_wakeup_fd`` writes the signal
  number to a socket we watch, and the loop acts on it between events.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time

from iomux import __version__
from iomux.backends.base import EVENT_READ, Multiplexer
from iomux.connection import Connection
from iomux.errors import RuntimeFailure, UsageError

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Optional, Tuple, Type

# What one read asks for: large enough that a 64 KiB message is usually one
# read. (os.read allocates that much and shrinks it to what came.)
RECV_SIZE = 65536
# Level-triggered accepts per readiness: bounded so a connection storm cannot
# starve the connections already open.
ACCEPT_BATCH = 64
# Edge-triggered reads per event before yielding to others; the connection is
# serviced again on the next round without waiting for a new edge.
ET_READ_BATCH = 16
# How long to stop watching the listener after accept ran out of fds. The
# spare-fd trick has cleared the queue by then; the pause keeps a
# level-triggered listener from spinning while fds stay exhausted.
EMFILE_BACKOFF = 0.1
# accept errors that mean "this one connection died before we took it".
_ACCEPT_SKIP = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
_FD_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# The byte the stdin watcher writes on the wakeup socket; signal numbers are >= 1.
_STDIN_BYTE = 0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STATS_SIGNALS = (signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()


class ServerConfig:
    """The serve options of the command line (docs/DESIGN.md section 1), with its defaults.

    A plain class rather than a dataclass: ``dataclasses`` imports ``inspect``
    (and with it ast, dis and tokenize), a fifth of the instructions of a
    server's start on Debian's python3, and the suites start hundreds of servers
    on every kernel. ``OPTIONS`` are argparse's dest names, one for one.
    """

    OPTIONS = ("backend", "host", "port", "workers", "line_mode", "idle_timeout", "max_conns",
               "ready_file", "high_water", "low_water", "drain_timeout", "stop_on_stdin",
               "quiet", "sndbuf")
    __slots__ = OPTIONS

    def __init__(
        self,
        backend: str = "auto",
        host: str = "127.0.0.1",
        port: int = 7000,
        workers: int = 1,
        line_mode: bool = False,
        idle_timeout: float = 0.0,
        max_conns: int = 0,
        ready_file: Optional[str] = None,
        high_water: int = 262144,
        low_water: int = 65536,
        drain_timeout: float = 2.0,
        stop_on_stdin: bool = False,
        quiet: bool = False,
        sndbuf: int = 0,
    ) -> None:
        self.backend = backend
        self.host = host
        self.port = port
        self.workers = workers
        self.line_mode = line_mode
        self.idle_timeout = idle_timeout
        self.max_conns = max_conns
        self.ready_file = ready_file
        self.high_water = high_water
        self.low_water = low_water
        self.drain_timeout = drain_timeout
        self.stop_on_stdin = stop_on_stdin
        self.quiet = quiet
        self.sndbuf = sndbuf

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.OPTIONS)
        return f"ServerConfig({shown})"

    def validate(self) -> None:
        """Raise UsageError for values no server could honour."""
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be 0..65535, not {self.port}")
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, not {self.workers}")
        if self.low_water < 0 or self.high_water < 1:
            raise UsageError("--high-water must be positive and --low-water not negative")
        if self.low_water > self.high_water:
            raise UsageError(
                f"--low-water ({self.low_water}) must not exceed --high-water ({self.high_water})"
            )
        if self.idle_timeout < 0 or self.drain_timeout < 0:
            raise UsageError("--idle-timeout and --drain-timeout must not be negative")
        if self.max_conns < 0:
            raise UsageError("--max-conns must not be negative")
        if self.sndbuf < 0:
            raise UsageError("--sndbuf must not be negative")


def log(line: str) -> None:
    """Write one line to stderr at once (tests read it as it comes)."""
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr closed (e.g. a daemonised run): the server goes on without it


def ready_line(host: str, port: int, backend: str, pid: int, workers: Optional[int] = None) -> str:
    """The ready line of the contract: ``listening on HOST:PORT backend=NAME pid=PID``."""
    line = f"listening on {host}:{port} backend={backend} pid={pid}"
    if workers is not None:
        line += f" workers={workers}"
    return line


def write_ready_file(path: str, host: str, port: int, backend: str, pid: int, workers: int) -> None:
    """Write the ready file atomically: a reader sees no file or the whole JSON."""
    record = {
        "host": host,
        "port": port,
        "backend": backend,
        "pid": pid,
        "workers": workers,
        "version": __version__,
    }
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise RuntimeFailure(f"cannot write the ready file {path}: {exc.strerror}") from None


def resolve_address(host: str, port: int) -> Tuple[int, Tuple[object, ...]]:
    """Return (family, sockaddr) for a listening address; UsageError if it is bad."""
    # A listening address is one of this host's own, so it is taken as a
    # numeric address: a name would send a DNS query off the machine, and a
    # typo would wait for the resolver's timeout. "localhost" is the one name
    # accepted, and it means the IPv4 loopback.
    if host == "localhost":
        host = "127.0.0.1"
    try:
        infos = socket.getaddrinfo(
            # Bytes: a str host goes through the "idna" codec first, whose import
            # (encodings.idna, stringprep) is a tenth of the server's start-up; a
            # numeric address is ASCII, and anything else is a UnicodeError.
            host.encode("ascii"),
            port,
            socket.AF_UNSPEC,
            socket.SOCK_STREAM,
            0,
            socket.AI_PASSIVE | socket.AI_NUMERICHOST,
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(
            f"bad address {host!r}: expected a numeric IP address of this host or localhost"
        ) from exc
    family, _, _, _, sockaddr = infos[0]
    return family, tuple(sockaddr)


def open_listener(
    host: str, port: int, reuse_option: Optional[int] = None, listen: bool = True
) -> socket.socket:
    """Bind (and listen on) a non-blocking TCP socket.

    Parameters:
        reuse_option: SO_REUSEPORT or SO_REUSEPORT_LB to set before bind (workers).
        listen: False to only bind (a port holder that receives no connections).

    Raises:
        UsageError: the address does not resolve or is not local (exit 2).
        RuntimeFailure: the port is in use or needs privileges (exit 1).
    """
    family, sockaddr = resolve_address(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # TIME_WAIT connections of a previous run must not block a restart.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_option is not None:
            sock.setsockopt(socket.SOL_SOCKET, reuse_option, 1)
        sock.bind(sockaddr)
        if listen:
            # The kernel clamps the backlog to somaxconn; ask for plenty so a
            # burst of connects waits in the queue instead of being dropped.
            sock.listen(4096)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        where = f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise RuntimeFailure(f"cannot listen on {where}: address already in use") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise RuntimeFailure(f"cannot listen on {where}: permission denied") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"bad address {host!r}: not an address of this host") from None
        raise RuntimeFailure(f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sock


class _Peer(Connection):
    """A connection's echo state plus its socket and fd (read and written with os.read/os.write)."""

    __slots__ = ("fd", "sock")

    def __init__(self, sock: socket.socket, high_water: int, low_water: int, line_mode: bool) -> None:
        super().__init__(high_water, low_water, line_mode)
        self.sock = sock
        self.fd = sock.fileno()


class Server:
    """One event loop serving echo on one listener with one multiplexer.

    ``on_ready(server)`` is called once the loop is about to wait for the first
    time; the default prints the ready line and writes the ready file.
    """

    def __init__(
        self,
        config: ServerConfig,
        listener: socket.socket,
        mux_cls: Type[Multiplexer],
        on_ready: Optional[Callable[[Server], None]] = None,
        watch_stdin: Optional[bool] = None,
        lifeline: Optional[int] = None,
    ) -> None:
        self.config = config
        self.listener = listener
        self.mux_cls = mux_cls
        self.backend = mux_cls.name
        self.on_ready = on_ready if on_ready is not None else Server.announce
        self.watch_stdin = config.stop_on_stdin if watch_stdin is None else watch_stdin
        # The read end of a pipe whose write end only a supervisor holds: it
        # becomes readable (EOF) when the supervisor dies, even by SIGKILL.
        self.lifeline = lifeline
        self.mux: Multiplexer = mux_cls()
        self.conns: Dict[int, _Peer] = {}
        self.accepted = 0
        self.refused = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._closed_pauses = 0
        self._again: List[_Peer] = []  # edge-triggered peers cut off by ET_READ_BATCH
        self._accept_again = False
        self._accept_paused_until = 0.0
        self._draining = False
        self._drain_deadline = 0.0
        self._spare: Optional[int] = None
        self._emfile_logged = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # -- what the outside sees ------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        """The host and port the listener is bound to (the real port after --port 0)."""
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def stats_line(self) -> str:
        """The SIGUSR1 line of the contract."""
        paused = self._closed_pauses + sum(p.pauses for p in self.conns.values())
        return (
            f"stats open={len(self.conns)} accepted={self.accepted} refused={self.refused} "
            f"bytes_in={self.bytes_in} bytes_out={self.bytes_out} paused={paused}"
        )

    def announce(self) -> None:
        """Print the ready line and write the ready file (a single-process server)."""
        host, port = self.address
        if self.config.ready_file:
            write_ready_file(self.config.ready_file, host, port, self.backend, os.getpid(), 1)
        log(ready_line(host, port, self.backend, os.getpid()))

    def stop(self) -> None:
        """Ask the loop to shut down as on SIGTERM (safe from another thread)."""
        # A full wakeup socket means a wakeup is pending anyway.
        with contextlib.suppress(OSError):
            self._wake_w.send(bytes([int(signal.SIGTERM)]))

    # -- set-up and tear-down -------------------------------------------------

    def serve(self) -> int:
        """Run until stopped and drained; return the exit status (0)."""
        mux = self.mux
        old_handlers = {}
        old_wakeup = -1
        try:
            try:
                mux.register(self.listener.fileno(), EVENT_READ)
                mux.register(self._wake_r.fileno(), EVENT_READ)
                if self.lifeline is not None:
                    mux.register(self.lifeline, EVENT_READ)
            except ValueError as exc:
                # Our own fds past select's FD_SETSIZE (a parent left many fds open).
                raise RuntimeFailure(f"cannot start the {self.backend} backend: {exc}") from None
            old_wakeup = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
            for sig in STOP_SIGNALS + STATS_SIGNALS:
                # The handler does nothing: the C-level handler has already
                # written the signal number to the wakeup socket.
                old_handlers[sig] = signal.signal(sig, _ignore_signal)
            if hasattr(signal, "pthread_sigmask"):
                # A supervisor blocks these around fork(); from here we handle them.
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS + STATS_SIGNALS)
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._spare = None
            if self.watch_stdin:
                watch_stdin(self._wake_w)
            self.on_ready(self)
            self._loop()
            return 0
        finally:
            for peer in list(self.conns.values()):
                self._close(peer)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            if old_wakeup != -1 or old_handlers:
                signal.set_wakeup_fd(old_wakeup)
            mux.close()
            self.listener.close()
            self._wake_r.close()
            self._wake_w.close()
            if self._spare is not None:
                os.close(self._spare)

    # -- the loop -------------------------------------------------------------

    def _loop(self) -> None:
        mux = self.mux
        conns = self.conns
        poll = mux.poll_raw
        native_read = mux.native_read
        native_write = mux.native_write
        edge = mux.edge_triggered
        # Bits that say the peer's FIN is already queued (0: this backend cannot say).
        eof_bits = mux.native_eof
        # Edge-triggered without eof_bits (kqueue's EV_CLEAR here) must read into
        # EAGAIN every time, which _service does.
        fast = not self.config.line_mode and not (edge and not eof_bits)
        again = self._again
        read = os.read
        write = os.write
        lfd = self.listener.fileno()
        wfd = self._wake_r.fileno()
        service = self._service
        close = self._close
        update = self._update
        monotonic = time.monotonic
        idle = self.config.idle_timeout
        # How often idle connections are looked for: a quarter of the timeout,
        # so one is reaped at most 25% late.
        idle_every = min(max(idle / 4, 0.05), 1.0) if idle else 0.0
        next_idle_scan = monotonic() + idle_every
        fast_in = 0
        fast_out = 0
        now = monotonic()

        while True:
            timeout: Optional[float] = None
            if again or self._accept_again:
                timeout = 0.0
            elif idle or self._draining or self._accept_paused_until:
                deadlines = []
                if idle:
                    deadlines.append(next_idle_scan)
                if self._draining:
                    deadlines.append(self._drain_deadline)
                if self._accept_paused_until:
                    deadlines.append(self._accept_paused_until)
                timeout = max(0.0, min(deadlines) - now)
            events = poll(timeout)
            now = monotonic()
            for fd, ev in events:
                try:
                    p = conns[fd]
                except KeyError:
                    # Not a connection: the listener, the wakeup socket or the lifeline.
                    # (A dict subscript with a rare miss costs less than a get() call.)
                    if fd == lfd:
                        self._accept(now)
                    elif fd == wfd:
                        self.bytes_in += fast_in
                        self.bytes_out += fast_out
                        fast_in = fast_out = 0
                        self._wakeup(now)
                    elif fd == self.lifeline:
                        mux.unregister(fd)
                        self._begin_drain("parent-exit", now)
                    continue
                if idle:
                    p.last_active = now
                if fast and ev & native_read and not p.out:
                    # The hot path: read, write straight back, keep only the tail.
                    try:
                        data = read(fd, RECV_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError:
                        close(p)
                        continue
                    if data:
                        n = len(data)
                        fast_in += n
                        try:
                            sent = write(fd, data)
                        except BlockingIOError:
                            sent = 0
                        except OSError:
                            close(p)
                            continue
                        fast_out += sent
                        if sent < n:
                            p.queue(memoryview(data)[sent:])
                            update(p)
                        elif edge and (n == RECV_SIZE or ev & eof_bits):
                            # A full read may have left bytes behind, or a FIN is queued:
                            # no new edge will tell us, so read again next round.
                            again.append(p)
                        continue
                    p.read_eof()
                    if p.done():
                        close(p)
                    else:
                        update(p)
                    continue
                service(p, ev & native_read, ev & native_write)
            if again:
                cut_off = again[:]
                again.clear()
                for p in cut_off:
                    if conns.get(p.fd) is p:
                        # As if a FIN were queued: read on until EAGAIN or EOF.
                        service(p, native_read, 0)
            if self._accept_again:
                self._accept_again = False
                if not self._draining:
                    self._accept(now)
            if self._accept_paused_until and now >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                if not self._draining:
                    mux.modify(lfd, EVENT_READ)
            if idle and now >= next_idle_scan:
                next_idle_scan = now + idle_every
                for p in [p for p in conns.values() if now - p.last_active >= idle]:
                    close(p)
            if self._draining and (not conns or now >= self._drain_deadline):
                break
        self.bytes_in += fast_in
        self.bytes_out += fast_out

    def _service(self, p: _Peer, readable: int, writable: int) -> None:
        """Everything but the hot path: ET draining, line mode, pending output, EOF."""
        if writable and len(p.out) > p.out_off and not self._flush(p):
            return
        if readable and not (p.paused or p.eof or p.closing) and not self._read(p, readable):
            return
        if p.done():
            self._close(p)
        else:
            self._update(p)

    def _read(self, p: _Peer, readable: int) -> bool:
        """Read (until EAGAIN on ET backends) and echo; False if the connection was closed.

        ``readable`` is the event's native bits: on an edge-triggered backend that
        reports a queued FIN (``native_eof``), a short read ends the loop unless
        one is queued.
        """
        fd = p.fd
        edge = self.mux.edge_triggered
        eof_bits = self.mux.native_eof
        short_ends = not edge or (eof_bits and not readable & eof_bits)
        echo = not p.line_mode
        queued = False  # bytes went into the buffer without a send attempt
        full = False  # a send was short: the socket's buffer is full
        for _ in range(ET_READ_BATCH if edge else 1):
            try:
                data = os.read(fd, RECV_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self._close(p)
                return False
            if not data:
                p.read_eof()
                break
            n = len(data)
            self.bytes_in += n
            if echo and not len(p.out) > p.out_off:
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    self._close(p)
                    return False
                self.bytes_out += sent
                if sent < n:
                    p.queue(memoryview(data)[sent:])
                    full = True
            else:
                p.received(data)
                queued = True
            if p.paused or p.closing or (short_ends and n < RECV_SIZE):
                # A short read emptied the receive queue and no FIN is queued: the
                # next byte or FIN to arrive raises a new edge (see the module's notes).
                break
        else:
            if edge:
                # Not yet at EAGAIN, but others deserve a turn: come back next round.
                self._again.append(p)
        if queued and not full and len(p.out) > p.out_off:
            return self._flush(p)
        return True

    def _flush(self, p: _Peer) -> bool:
        """Send pending output (until EAGAIN on ET backends); False if closed."""
        fd = p.fd
        edge = self.mux.edge_triggered
        while len(p.out) > p.out_off:
            try:
                n = os.write(fd, p.output())
            except BlockingIOError:
                return True
            except OSError:
                self._close(p)
                return False
            self.bytes_out += n
            p.sent(n)
            if not edge:
                return True
        return True

    def _update(self, p: _Peer) -> None:
        """Tell the multiplexer what ``p`` wants now, only if that changed."""
        wants = p.wants()
        if wants != p.events:
            self.mux.modify(p.fd, wants)
            p.events = wants

    def _close(self, p: _Peer) -> None:
        if self.conns.pop(p.fd, None) is None:
            return
        self._closed_pauses += p.pauses
        self.mux.unregister(p.fd)
        p.sock.close()

    # -- accepting ------------------------------------------------------------

    def _accept(self, now: float) -> None:
        if self._draining:
            return
        listener = self.listener
        mux = self.mux
        conns = self.conns
        max_fd = mux.max_fd
        max_conns = self.config.max_conns
        cfg = self.config
        edge = mux.edge_triggered
        for _ in range(ACCEPT_BATCH * 4 if edge else ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    self._fd_exhausted(exc, now)
                    return
                if exc.errno in _ACCEPT_SKIP:
                    continue
                raise
            fd = sock.fileno()
            if max_fd is not None and fd >= max_fd:
                # select's bitmaps end at FD_SETSIZE: refuse, keep serving the rest.
                # The line goes out before the close, so whoever sees the close
                # can already find it.
                log(f"refused fd={fd}: at or above FD_SETSIZE={max_fd} on the {mux.name} backend")
                sock.close()
                self.refused += 1
                continue
            if max_conns and len(conns) >= max_conns:
                sock.close()
                self.refused += 1
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                # An echo is one small write answering one small read: Nagle
                # would hold it back for the peer's delayed ACK. (OSError: the
                # peer already reset; the first recv will say so.)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if cfg.sndbuf:
                # A small send buffer makes the kernel take part of each write:
                # the way the fault suite injects partial writes. (Linux doubles
                # the value and enforces a floor of about 4.5 KiB.)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, cfg.sndbuf)
            peer = _Peer(sock, cfg.high_water, cfg.low_water, cfg.line_mode)
            peer.last_active = now
            try:
                mux.register(fd, EVENT_READ)
            except OSError:
                sock.close()
                self.refused += 1
                continue
            peer.events = EVENT_READ
            conns[fd] = peer
            self.accepted += 1
        if edge:
            # Batch used up before EAGAIN: no new edge will come, so look again soon.
            self._accept_again = True

    def _fd_exhausted(self, exc: OSError, now: float) -> None:
        if not self._emfile_logged and not self.config.quiet:
            log(f"accept: {exc.strerror}: refusing new connections until fds are free")
            self._emfile_logged = True
        if self._spare is not None:
            # The spare-fd trick: give back the one fd we hold, so accept can take
            # the waiting connections and close them (the client sees a clean
            # close, not a hang), then take the fd back.
            os.close(self._spare)
            self._spare = None
            while True:
                try:
                    sock, _ = self.listener.accept()
                except OSError:
                    break
                sock.close()
                self.refused += 1
            try:
                self._spare = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                self._spare = None
        # Whatever happened, do not look at the listener again for a moment:
        # with no fd to spare, a level-triggered listener would spin.
        self.mux.modify(self.listener.fileno(), 0)
        self._accept_paused_until = now + EMFILE_BACKOFF

    # -- signals and stdin ----------------------------------------------------

    def _wakeup(self, now: float) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in data:
            if signum == _STDIN_BYTE:
                self._begin_drain("stdin", now)
            elif signum in STATS_SIGNALS:
                log(self.stats_line())
            elif signum in STOP_SIGNALS:
                self._begin_drain(signal.Signals(signum).name, now)

    def _begin_drain(self, why: str, now: float) -> None:
        if self._draining:
            # Already draining, and the drain is bounded. (A Ctrl-C reaches a
            # --workers child twice, from the terminal and from its parent.)
            return
        self._draining = True
        self._drain_deadline = now + self.config.drain_timeout
        log(f"shutting down: {why}, draining {len(self.conns)} connections")
        self.mux.unregister(self.listener.fileno())
        self.listener.close()
        self._accept_paused_until = 0.0
        self._accept_again = False
        self._emfile_logged = False


def watch_stdin(wake: socket.socket) -> None:
    """Start a daemon thread that sends a 0 byte on ``wake`` at a line or EOF on stdin."""

    def watch() -> None:
        # A thread, not a registration: epoll refuses regular files (EPERM) and
        # select cannot take fd 0 on every platform; a blocking read is portable.
        # os.read on fd 0, not sys.stdin: a daemon thread blocked inside the
        # buffered reader holds its lock, and interpreter shutdown would then
        # abort trying to take it. An unusable stdin (OSError) counts as EOF.
        with contextlib.suppress(OSError):
            while True:
                chunk = os.read(0, 4096)
                if not chunk or b"\n" in chunk:
                    break
        with contextlib.suppress(OSError):  # the loop is gone or already woken
            wake.send(bytes([_STDIN_BYTE]))

    # Imported here: only --stop-on-stdin needs a thread, and threading is 4 M of
    # the 105 M instructions a server's start costs (callgrind).
    import threading

    threading.Thread(target=watch, name="stdin", daemon=True).start()


def _ignore_signal(signum: int, frame: object) -> None:
    """Python-level handler: the wakeup fd already carries the signal number."""


def serve(config: ServerConfig, mux_cls: Type[Multiplexer]) -> int:
    """Serve in this process (``--workers 1``); return the exit status."""
    listener = open_listener(config.host, config.port)
    return Server(config, listener, mux_cls).serve()
