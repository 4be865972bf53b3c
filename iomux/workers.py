"""--workers N: N processes serving one port, and the parent that supervises them.

Kernel facts, and what follows for us:

- Linux (3.9+) SO_REUSEPORT lets several sockets of one user bind the same
  port and *balances* incoming connections between the listening ones by a
  hash of the 4-tuple. Each worker has its own listener, so each has its own
  accept queue and no thundering herd. A socket joins Linux's reuseport group
  at listen() (only listening sockets are in the listening hash), so there a
  socket that is bound but never listens receives no connections.
- FreeBSD 12+ spells that SO_REUSEPORT_LB (0x00010000 in <sys/socket.h>;
  Python exposes the name only from 3.12, and FreeBSD boxes ship 3.11). FreeBSD's
  and macOS's plain SO_REUSEPORT only allows the shared bind; connections all
  go to one socket, so there it is no way to share load.
- FreeBSD adds a SO_REUSEPORT_LB socket to the port's load-balancing group at
  bind(), not at listen() (in_pcbinshash; sys/netinet/in_pcb.c keeps the group
  as an array il_inp[] of il_inpcnt sockets, a new one appended, a closed one
  replaced by the last). A SYN's lookup takes il_inp[hash % il_inpcnt] without
  checking that it listens, so a member that is bound but not listening gets
  its share of the SYNs and resets them: one holder among N listeners resets
  about one connection in N+1. Newer kernels park such sockets on il_pending
  until listen(), but not every supported release has it.
- So no socket of ours sits in a group without listening: the parent opens
  every worker's listener itself, one after the other, each bound and
  listening (open_listener does both at once) before the next is bound, and
  worker i is forked with listener i. The parent keeps its copy of each: after
  fork it is the same socket, so while a worker is restarted its listener
  stays a listening member, the port stays held against other programs (they
  cannot bind without the option), and connections arriving meanwhile wait in
  its accept queue for the next worker instead of being reset. That holds on
  Linux (listening members of one reuseport group) and on FreeBSD (every
  member listens). The parent drops its copies when it starts stopping, so a
  draining worker's close takes its listener away, as a lone server's does.
- Elsewhere (macOS) the parent opens one listener before fork and every worker
  inherits it: one accept queue, all workers woken, the kernel hands each
  connection to one of them. The parent's copy holds the port across restarts.
- With --port 0 the first listener picks the port and the others bind to it.
- A worker's death is a SIGCHLD; ``signal.set_wakeup_fd`` turns it (and
  SIGTERM/SIGINT/SIGUSR1) into a byte on a socket the parent waits on.
  Signals are blocked across fork() so a worker cannot be hit by one before
  it has installed its own handlers (it unblocks them then).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys
import time

from iomux.backends.base import Multiplexer
from iomux.errors import IomuxError, RuntimeFailure
from iomux.server import (
    STATS_SIGNALS,
    STOP_SIGNALS,
    Server,
    ServerConfig,
    log,
    open_listener,
    ready_line,
    watch_stdin,
    write_ready_file,
)

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Type

# <sys/socket.h> on FreeBSD 12.0 and later.
FREEBSD_SO_REUSEPORT_LB = 0x00010000
# A worker that dies this many times within RESTART_WINDOW seconds is given up on.
MAX_RESTARTS = 5
RESTART_WINDOW = 10.0
# After forwarding SIGTERM, how long beyond the drain timeout to wait before SIGKILL.
KILL_GRACE = 3.0


def reuse_port_option() -> Optional[int]:
    """The socket option that balances connections among listeners, or None."""
    if hasattr(socket, "SO_REUSEPORT_LB"):
        return int(socket.SO_REUSEPORT_LB)
    if sys.platform.startswith("freebsd"):
        # The kernel has it (12.0+) even where this Python does not name it.
        return FREEBSD_SO_REUSEPORT_LB
    # Only Linux balances on plain SO_REUSEPORT; the BSDs and macOS accept the
    # option but hand every connection to one socket (see the module essay).
    if hasattr(socket, "SO_REUSEPORT") and sys.platform.startswith("linux"):
        return int(socket.SO_REUSEPORT)
    return None


class Supervisor:
    """The parent of ``--workers N``: starts, restarts, signals and waits for the workers."""

    def __init__(self, config: ServerConfig, mux_cls: Type[Multiplexer]) -> None:
        self.config = config
        self.mux_cls = mux_cls
        self.reuse = reuse_port_option()
        # listeners[slot] is the socket worker ``slot`` serves (see the module essay).
        self.listeners: List[socket.socket] = []
        first = open_listener(config.host, config.port, reuse_option=self.reuse)
        host, port = first.getsockname()[:2]
        self.host = str(host)
        self.port = int(port)
        self.listeners.append(first)
        try:
            for _ in range(1, config.workers):
                if self.reuse is None:
                    self.listeners.append(first)  # one listener, inherited by all
                else:
                    # Bound and listening before the next bind: no member of the
                    # FreeBSD group ever waits for its listen().
                    self.listeners.append(open_listener(self.host, self.port, reuse_option=self.reuse))
        except BaseException:
            self.close_listeners()
            raise
        self.children: Dict[int, int] = {}  # pid -> slot
        self.deaths: Dict[int, List[float]] = {}  # slot -> recent death times
        self.ready_r, self.ready_w = os.pipe()
        # Workers watch life_r: EOF there means this process is gone, so that
        # no worker outlives its supervisor holding the port.
        self.life_r, self.life_w = os.pipe()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.closed = False

    def _spawn(self, slot: int) -> None:
        signals = STOP_SIGNALS + STATS_SIGNALS
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            raise RuntimeFailure(f"cannot start worker {slot}: {exc.strerror}") from None
        if pid == 0:
            self._worker(slot)  # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        self.children[pid] = slot

    def _worker(self, slot: int) -> None:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.wake_r.close()
            self.wake_w.close()
            os.close(self.ready_r)
            os.close(self.life_w)
            listener = self.listeners[slot]
            for other in self.listeners:
                if other is not listener:
                    other.close()  # this process's copy only: the parent keeps its own
            ready_w = self.ready_w

            def report_ready(server: Server) -> None:
                os.write(ready_w, f"{os.getpid()}\n".encode())

            server = Server(
                self.config, listener, self.mux_cls, on_ready=report_ready, watch_stdin=False, lifeline=self.life_r
            )
            status = server.serve()
        except IomuxError as exc:
            log(f"iomux: error: worker {slot}: {exc.message}")
            status = exc.status
        except BaseException as exc:  # a worker must never fall back into the parent's code
            log(f"iomux: error: worker {slot}: {type(exc).__name__}: {exc}")
            status = 1
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(status)

    def run(self) -> int:
        """Start the workers, print the ready line once all listen, supervise; exit status."""
        signals = (*STOP_SIGNALS, *STATS_SIGNALS, signal.SIGCHLD)
        old = {sig: signal.signal(sig, _ignore) for sig in signals}
        old_wakeup = signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        try:
            for slot in range(self.config.workers):
                self._spawn(slot)
            return self._supervise()
        finally:
            self._kill_all(signal.SIGKILL)
            self._reap(block=True)
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.close()

    def close_listeners(self) -> None:
        """Drop this process's copies of the listeners (a worker's own copy stays open)."""
        for sock in self.listeners:
            sock.close()

    def close(self) -> None:
        """Release every socket and pipe the supervisor holds (``run`` does this at its end)."""
        self.close_listeners()
        if self.closed:
            return  # the fd numbers may belong to someone else by now
        self.closed = True
        self.wake_r.close()
        self.wake_w.close()
        for fd in (self.ready_r, self.ready_w, self.life_r, self.life_w):
            os.close(fd)

    def _supervise(self) -> int:
        cfg = self.config
        ready: set[int] = set()
        announced = False
        stopping = False
        kill_at = 0.0
        if cfg.stop_on_stdin:
            watch_stdin(self.wake_w)
        partial = b""
        while True:
            timeout = 1.0
            if stopping:
                timeout = max(0.0, min(timeout, kill_at - time.monotonic()))
            try:
                readable, _, _ = select.select([self.wake_r.fileno(), self.ready_r], [], [], timeout)
            except InterruptedError:
                continue
            if self.ready_r in readable:
                partial += os.read(self.ready_r, 4096)
                *lines, partial = partial.split(b"\n")
                ready.update(int(line) for line in lines if line.strip())
                if not announced and all(pid in ready for pid in self.children) and len(
                    self.children
                ) == cfg.workers:
                    announced = True
                    if cfg.ready_file:
                        write_ready_file(
                            cfg.ready_file, self.host, self.port, self.mux_cls.name, os.getpid(), cfg.workers
                        )
                    log(ready_line(self.host, self.port, self.mux_cls.name, os.getpid(), cfg.workers))
            if self.wake_r.fileno() in readable:
                try:
                    data = self.wake_r.recv(4096)
                except BlockingIOError:
                    data = b""
                for signum in data:
                    if signum == 0 or signum in STOP_SIGNALS:
                        if not stopping:
                            stopping = True
                            kill_at = time.monotonic() + cfg.drain_timeout + KILL_GRACE
                            # No restart from here on: the listeners live on in the
                            # workers only, and close with their drain.
                            self.close_listeners()
                        # Pass the signal on as it came (stdin's stop is a SIGTERM): the
                        # workers' shutdown lines then name what the parent received.
                        self._kill_all(signum or signal.SIGTERM)
                    elif signum in STATS_SIGNALS:
                        self._kill_all(signal.SIGUSR1)
            for pid, slot, status in self._reap(block=False):
                if stopping:
                    continue
                if not announced:
                    self._kill_all(signal.SIGTERM)
                    raise RuntimeFailure(f"worker {slot} exited with status {status} before listening")
                if not self._may_restart(slot):
                    self._kill_all(signal.SIGTERM)
                    raise RuntimeFailure(f"worker {slot} keeps dying (status {status}); giving up")
                if not cfg.quiet:
                    log(f"worker {slot} pid={pid} exited with status {status}; restarting")
                self._spawn(slot)
            if stopping and not self.children:
                return 0
            if stopping and time.monotonic() >= kill_at:
                self._kill_all(signal.SIGKILL)

    def _may_restart(self, slot: int) -> bool:
        now = time.monotonic()
        recent = [t for t in self.deaths.get(slot, []) if now - t < RESTART_WINDOW]
        recent.append(now)
        self.deaths[slot] = recent
        return len(recent) <= MAX_RESTARTS

    def _reap(self, block: bool) -> List[tuple[int, int, int]]:
        dead = []
        while self.children:
            try:
                pid, wstatus = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            slot = self.children.pop(pid, -1)
            if slot >= 0:
                dead.append((pid, slot, _exit_status(wstatus)))
        return dead

    def _kill_all(self, sig: int) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    raise  # ESRCH: already dead, reaped on the next SIGCHLD


def _exit_status(wstatus: int) -> int:
    if os.WIFEXITED(wstatus):
        return os.WEXITSTATUS(wstatus)
    if os.WIFSIGNALED(wstatus):
        return 128 + os.WTERMSIG(wstatus)
    return 1


def _ignore(signum: int, frame: object) -> None:
    """Python-level handler: the wakeup fd already carries the signal number."""


def serve_workers(config: ServerConfig, mux_cls: Type[Multiplexer]) -> int:
    """Serve with ``config.workers`` processes; return the exit status."""
    return Supervisor(config, mux_cls).run()
