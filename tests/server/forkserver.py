"""Warm server starts: ``iomux serve`` forked from an interpreter that has imported it.

The suites start a server per test, about 180 of them per target. A fresh
``python -m iomux serve`` costs its interpreter's start and imports before it
listens: 95-125 M instructions (callgrind, Debian 12's python3), measured at
0.64-1.03 s from exec to ready file in the emulated (TCG) Debian VM, where a
fork of an interpreter that has imported iomux already was ready in 0.07-0.10 s
(2026-12-03). This module is that fork server, after the design of CPython's
``multiprocessing.forkserver``:

- **One single-threaded process forks, never the test process.** fork(2) copies
  only the calling thread, and the test process has a stderr-reader thread per
  server (and pytest's own): a lock held by another thread at the fork stays
  held in the child for ever. The fork server is started once per test process,
  with ``python -c``, and has no thread.
- **The request carries what exec would have set.** argv, the environment, the
  working directory, RLIMIT_NOFILE, and the child's stdin and stderr, passed as
  file descriptors over an AF_UNIX socket (SCM_RIGHTS, unix(7): POSIX, the same
  on Linux and FreeBSD). The child makes a session of its own (setsid, as
  ``start_new_session`` does), puts those on fds 0-2 (stdout: /dev/null), closes
  every other descriptor, and resets every signal to what a fresh ``python``
  has (``_SignalState``).
- **Only a parent can wait for its child** (waitpid(2)): the fork server reaps
  its children and writes each one's status, as ``Popen.returncode`` gives it
  (negative: killed by that signal), to the status socket that came with its
  request. ``ForkedServer`` reads it there, so ``poll``/``wait`` behave as
  ``Popen``'s do.
- **Left alone:** a child shares the fork server's hash seed (an exec'd python
  draws one per start; ``random`` reseeds itself at fork), and no atexit handler
  runs when ``iomux.cli.main`` returns (iomux registers none).

The fork server exits when its control socket reaches EOF, which is when the
test process closes it or dies however it dies: it outlives no test run. Its
command line says what it is (``iomux serve fork server``), so ``pgrep -f
'iomux serve'`` still finds it and what it forked.

Standard library only and Python 3.9 compatible: it runs in every target.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

#: What the fork server imports once, so that a child need not: the command line
#: and the server with everything ``iomux serve`` loads (threading: --stop-on-stdin).
PRELOAD = ("iomux.cli", "iomux.server", "threading")

#: The request: a 4-byte big-endian length, then that many bytes of JSON, sent with
#: three descriptors (the status socket, the child's stdin, its stderr).
_HEADER = struct.Struct(">I")
_FDS_PER_REQUEST = 3
_MAX_REQUEST = 1 << 20

#: The marker in the fork server's command line (``ps``, ``pgrep -f``).
TITLE = "iomux serve fork server"

#: sys.path loses this directory again once the module is in: a child's path is then
#: the one ``python -c`` has, nothing of the suites' on it.
_BOOT = ("import sys; sys.path.insert(0, sys.argv[2]); import forkserver; "
         "sys.path.remove(sys.argv[2]); forkserver.serve(int(sys.argv[3]))")


class ForkServerError(RuntimeError):
    """The fork server could not start a server, or went away before reporting."""


# -- the fork server ------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int, fds: List[int]) -> Optional[bytes]:
    """Read ``n`` bytes (collecting any descriptors that come with them); None at EOF."""
    buf = b""
    while len(buf) < n:
        data, ancdata, _flags, _addr = sock.recvmsg(
            n - len(buf), socket.CMSG_SPACE(_FDS_PER_REQUEST * struct.calcsize("i")))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % struct.calcsize("i")
                fds.extend(struct.unpack(f"{usable // struct.calcsize('i')}i", payload[:usable]))
        if not data:
            return None
        buf += data
    return buf


class _SignalState:
    """The signal dispositions and mask the fork server had at its start.

    They are what an exec'd ``python -m iomux serve`` would have: exec keeps
    ignored signals ignored and the mask as it was, resets caught ones to SIG_DFL
    (execve(2)), and Python's start-up then ignores SIGPIPE and SIGXFSZ and
    catches SIGINT; the fork server is exec'd from the test process the same way.
    multiprocessing.forkserver restores its own start's handlers the same way.
    """

    def __init__(self) -> None:
        self.handlers: Dict[int, Any] = {}
        for signum in range(1, signal.NSIG):
            try:
                handler = signal.getsignal(signum)
            except (OSError, ValueError):
                continue
            if handler is not None:  # None: set outside Python; left as it is
                self.handlers[signum] = handler
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])

    def restore(self) -> None:
        """Put them back in a child, with SIGINT caught as serverproc's exec wrapper
        has it (SIG_DFL before the exec, so Python's start-up catches it)."""
        signal.set_wakeup_fd(-1)
        for signum, handler in self.handlers.items():
            try:
                signal.signal(signum, handler)
            except (OSError, ValueError):
                continue  # SIGKILL, SIGSTOP: their disposition cannot change
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)


def _run_child(request: Dict[str, Any], stdin_fd: int, stderr_fd: int, fds_below: int,
               signals: _SignalState) -> int:
    """In the forked child: become what exec would have made, run iomux, return its status.

    ``fds_below`` is one more than the highest descriptor the fork server holds:
    a small number (its sockets, one status socket per live child), so closing
    the range is a few calls on every kernel, where a range up to RLIMIT_NOFILE
    (1,048,576 in a container) is a million close() calls without close_range(2).
    """
    os.setsid()
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd, target in ((stdin_fd, 0), (devnull, 1), (stderr_fd, 2)):
        os.dup2(fd, target)
    # Everything else goes: the fork server's sockets and whatever came with them.
    os.closerange(3, max(fds_below, devnull + 1))
    if request["nofile"] > 0:
        import resource
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (request["nofile"], hard))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    signals.restore()
    from iomux.cli import main

    try:
        status = main(request["args"])
    except SystemExit as exc:
        code = exc.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code
        else:
            print(code, file=sys.stderr)
            status = 1
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    return status & 0xFF


def serve(control_fd: int) -> None:
    """The fork server's loop: fork a child per request, report each child's exit."""
    import importlib

    signals = _SignalState()  # before this loop changes any
    for name in PRELOAD:
        importlib.import_module(name)
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the test process's to handle
    signal.set_wakeup_fd(wake_w)
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, "control")
    sel.register(wake_r, selectors.EVENT_READ, "sigchld")
    sel_fd: int = getattr(sel, "fileno", lambda: -1)()  # epoll, kqueue: a descriptor
    status_of: Dict[int, socket.socket] = {}
    try:
        while True:
            for key, _mask in sel.select():
                if key.data == "sigchld":
                    while True:
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            break
                    _reap(status_of)
                    continue
                fds: List[int] = []
                header = _recv_exact(control, _HEADER.size, fds)
                if header is None:
                    return
                (length,) = _HEADER.unpack(header)
                body = _recv_exact(control, length, fds) if length <= _MAX_REQUEST else None
                if body is None or len(fds) != _FDS_PER_REQUEST:
                    for fd in fds:
                        os.close(fd)
                    return
                status_fd, stdin_fd, stderr_fd = fds
                status = socket.socket(fileno=status_fd)
                request = json.loads(body.decode("utf-8"))
                try:
                    pid = os.fork()
                except OSError as exc:
                    status.sendall(f"error fork: {exc.strerror}\n".encode())
                    status.close()
                    pid = -1
                if pid == 0:
                    code = 1
                    held = [control.fileno(), wake_r, wake_w, sel_fd, *fds,
                            *(s.fileno() for s in status_of.values())]
                    try:
                        code = _run_child(request, stdin_fd, stderr_fd, max(held) + 1, signals)
                    except BaseException:  # in the set-up before iomux ran: say what
                        import traceback
                        traceback.print_exc()
                    finally:
                        os._exit(code)
                os.close(stdin_fd)
                os.close(stderr_fd)
                if pid > 0:
                    status.sendall(f"pid {pid}\n".encode())
                    status_of[pid] = status
                    _reap(status_of)
    finally:
        _reap(status_of)  # what has exited: its CPU time reaches us, and so our parent
        for status in status_of.values():
            status.close()


def _reap(status_of: Dict[int, socket.socket]) -> None:
    """Write the status of every child that has exited to its status socket."""
    while status_of:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status = status_of.pop(pid, None)
        if status is not None:
            with contextlib.suppress(OSError):  # closed by the test process: nobody waits
                status.sendall(f"exit {os.waitstatus_to_exitcode(raw)}\n".encode())
            status.close()


# -- the test process's side ----------------------------------------------------------------


#: How often a wait for a status line checks that the fork server still runs (ForkedServer._line).
_LIVENESS_POLL = 0.5
_GONE = "the fork server went away before it reported the server's status"


class ForkedServer:
    """One child of the fork server, with the part of ``subprocess.Popen`` the suites use."""

    def __init__(self, status: socket.socket, stdin: Optional[IO[bytes]], stderr: IO[bytes],
                 timeout: float = 60.0, alive: Callable[[], bool] = lambda: True) -> None:
        self._status = status
        self._alive = alive
        self._buf = b""
        self.stdin = stdin
        self.stderr: Optional[IO[bytes]] = stderr
        self.returncode: Optional[int] = None
        words = self._line(timeout=timeout).split()
        if not words:
            raise ForkServerError(f"the fork server reported no pid within {timeout:.0f}s")
        if len(words) != 2 or words[0] != "pid":
            raise ForkServerError(f"the fork server could not start the server: {' '.join(words)}")
        self.pid = int(words[1])

    def _line(self, timeout: Optional[float]) -> str:
        """The next line from the status socket; '' when none came within ``timeout``.

        The fork server's death shows as the status socket's end of stream, except
        for a request it never read: that status socket is still in flight, and
        gVisor keeps a descriptor in flight referenced while our end of the control
        socket is open (no end of stream came in 60 s, runsc 20221219 and 20240729),
        so the fork server's liveness is checked too, every _LIVENESS_POLL seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        gone = False
        while b"\n" not in self._buf:
            remaining = _LIVENESS_POLL if deadline is None else max(0.0, deadline - time.monotonic())
            self._status.settimeout(0.0 if gone else min(remaining, _LIVENESS_POLL))
            try:
                data = self._status.recv(4096)
            except (socket.timeout, BlockingIOError):
                if gone:  # and nothing was left to read
                    raise ForkServerError(_GONE) from None
                gone = not self._alive()  # then read once more what it wrote before
                if not gone and deadline is not None and time.monotonic() >= deadline:
                    return ""
                continue
            if not data:
                raise ForkServerError(_GONE)
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace")

    def _finish(self, line: str) -> Optional[int]:
        if line:
            kind, _, value = line.partition(" ")
            if kind != "exit":
                raise ForkServerError(f"unexpected status line from the fork server: {line!r}")
            self.returncode = int(value)
            self._status.close()
        return self.returncode

    def poll(self) -> Optional[int]:
        """The exit status once the server has exited (and been reaped), else None."""
        if self.returncode is None:
            self._finish(self._line(timeout=0.0))
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the exit status; ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if self.returncode is None and self._finish(self._line(timeout=timeout)) is None:
            raise subprocess.TimeoutExpired(["iomux", "serve"], timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal the server unless it has been reaped (its pid may be reused then)."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the server."""
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The test process's handle on a fork server, which it starts (serverproc.fork_server
    starts one per process, on first use)."""

    def __init__(self, env: Dict[str, str]) -> None:
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        here = os.path.dirname(os.path.abspath(__file__))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, TITLE, here, str(theirs.fileno())],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=[theirs.fileno()], start_new_session=True)
        finally:
            theirs.close()
        self._control = ours

    def start(self, args: Sequence[str], env: Dict[str, str], nofile: int = 0,
              stdin_pipe: bool = False) -> ForkedServer:
        """Fork ``iomux ARGS`` with ``env``; its stderr (and stdin, if asked) are pipes to us."""
        request = json.dumps({
            "args": list(args), "argv": [sys.executable, "-m", "iomux", *args],
            "env": env, "cwd": os.getcwd(), "nofile": nofile,
        }).encode("utf-8")
        status_ours, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe()
        in_r, in_w = os.pipe() if stdin_pipe else (os.open(os.devnull, os.O_RDONLY), -1)
        try:
            with self._lock:
                self._control.sendmsg(
                    [_HEADER.pack(len(request)) + request],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      struct.pack("3i", status_theirs.fileno(), in_r, err_w))])
        except OSError as exc:
            for fd in (err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            status_ours.close()
            raise ForkServerError(f"cannot reach the fork server: {exc}") from None
        finally:
            status_theirs.close()
            os.close(err_w)
            os.close(in_r)
        stdin = os.fdopen(in_w, "wb", buffering=0) if in_w >= 0 else None
        stderr = os.fdopen(err_r, "rb")
        try:
            return ForkedServer(status_ours, stdin, stderr, alive=lambda: self._proc.poll() is None)
        except BaseException as exc:
            status_ours.close()
            stderr.close()
            if stdin is not None:
                stdin.close()
            if isinstance(exc, ForkServerError):
                # The request was sent but the fork server died before it forked: a
                # child of an earlier request that has not yet closed its inherited
                # copy of the control socket keeps the send from failing (EPIPE).
                # Say it is gone, as a failed send does, once its exit is certain.
                gone = self._exit_status(timeout=5.0)
                if gone is not None:
                    raise ForkServerError(f"cannot reach the fork server: it exited ({gone})") from None
            raise

    def _exit_status(self, timeout: float) -> Optional[str]:
        """How the fork server ended ("status N", "signal N"), or None if it runs on."""
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return f"signal {-rc}" if rc < 0 else f"status {rc}"

    def close(self, timeout: float = 10.0) -> None:
        """End the fork server (EOF on its control socket) and reap it."""
        self._control.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    @property
    def pid(self) -> int:
        """The fork server's own pid."""
        return self._proc.pid

