"""Drive ``python -m iomux serve`` as a black box, through the contract of DESIGN.md section 1.

Everything here talks to the server the way a user does: a command line, a
ready file, stderr lines and signals. Nothing imports the server's modules, so
the same helpers run in every target (Linux containers and VMs, FreeBSD VMs)
where only ``import iomux`` is guaranteed (the package is pip-installed there).

Standard library only and Python 3.9 compatible: this directory is also the
in-guest suite.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from forkserver import ForkServer

# IOMUX_TEST_SCALE shrinks the sizes (bytes, client counts that are not the point
# of a test) for VMs where Python runs about 10x slower; waits grow by the inverse.
SCALE = float(os.environ.get("IOMUX_TEST_SCALE", "1.0"))
SLOW = max(1.0, 1.0 / SCALE) if SCALE > 0 else 1.0
MiB = 1024 * 1024

# The stderr lines of DESIGN.md section 1, exactly.
READY_RE = re.compile(
    r"^listening on (?P<host>[^\s:]+):(?P<port>\d+) backend=(?P<backend>\S+) pid=(?P<pid>\d+)"
    r"(?: workers=(?P<workers>\d+))?$"
)
STATS_RE = re.compile(
    r"^stats open=(?P<open>\d+) accepted=(?P<accepted>\d+) refused=(?P<refused>\d+) "
    r"bytes_in=(?P<bytes_in>\d+) bytes_out=(?P<bytes_out>\d+) paused=(?P<paused>\d+)$"
)
REFUSED_RE = re.compile(r"^refused fd=(?P<fd>\d+): at or above FD_SETSIZE=1024 on the select backend$")
# The server's one line on its first EMFILE/ENFILE of an episode (iomux/server.py,
# _fd_exhausted): the moment it is out of descriptors, which the EMFILE tests wait
# for instead of sleeping.
EXHAUSTED_RE = re.compile(r"^accept: .+: refusing new connections until fds are free$")
SHUTDOWN_RE = re.compile(r"^shutting down: (?P<signame>\S+), draining (?P<n>\d+) connections$")
ERROR_RE = re.compile(r"^iomux: error: \S.*$")

READY_FILE_KEYS = {"host", "port", "backend", "pid", "workers", "version"}


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def unwind_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so pytest
    unwinds through the fixtures' finalizers: the servers run in sessions of their
    own, which a signal to the run's process group does not reach, and a test
    process killed outright left them serving (seen when a .ci/run was ended with
    SIGTERM). Only a default disposition is replaced: an ignored SIGHUP (nohup)
    stays ignored, and a handler someone set (the harness plugin's) stays theirs."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _raise_interrupt)


def scaled(n: int, minimum: int = 1) -> int:
    """Return ``n`` scaled by IOMUX_TEST_SCALE, never below ``minimum``."""
    return max(minimum, int(n * SCALE))


def wait(seconds: float) -> float:
    """Return a timeout stretched for slow machines (IOMUX_TEST_SCALE < 1)."""
    return seconds * SLOW


def iomux_env() -> Dict[str, str]:
    """The environment for an iomux subprocess: it must import the same iomux as we do.

    In the repository the package is found through pytest's ``pythonpath``, which
    a child does not inherit, so the package's parent directory goes first on
    PYTHONPATH. In a target the package is installed and this changes nothing.
    """
    env = dict(os.environ)
    spec = importlib.util.find_spec("iomux")
    if spec is not None and spec.submodule_search_locations:
        parent = str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = parent + (os.pathsep + old if old else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def iomux_argv(*args: str) -> List[str]:
    """``python -m iomux ARGS`` with the interpreter running the tests."""
    return [sys.executable, "-m", "iomux", *args]


def run_iomux(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run one short iomux command and capture its output."""
    return subprocess.run(
        iomux_argv(*args),
        env=iomux_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=wait(timeout),
        check=False,
    )


@functools.cache
def backends_info() -> Dict[str, Any]:
    """``iomux backends --json``: ``{"available": [...], "auto": NAME, "known": [...]}``."""
    result = run_iomux("backends", "--json")
    if result.returncode != 0:
        raise RuntimeError(
            f"iomux backends --json exited {result.returncode}: {result.stderr.strip()}"
        )
    info: Dict[str, Any] = json.loads(result.stdout)
    return info


def unavailable_reason(backend: str) -> Optional[str]:
    """Why ``backend`` cannot run on this kernel, or None when it can."""
    info = backends_info()
    if backend in info["available"]:
        return None
    return (
        f"backend {backend!r} is not available on this kernel "
        f"(iomux backends --json: available={info['available']})"
    )


# The child resets SIGINT to its default (a shell starts background jobs with
# SIGINT ignored, and an ignored disposition survives exec), applies an optional
# RLIMIT_NOFILE, then execs iomux under the same pid. Done in a wrapper rather
# than in preexec_fn, which is unsafe here: the test process has reader threads.
_EXEC_WRAPPER = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
nofile = int(sys.argv[1])
if nofile > 0:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def exec_argv(nofile: int, *args: str) -> List[str]:
    """``python -m iomux ARGS``, through ``_EXEC_WRAPPER`` only where it has work to do.

    The wrapper is a second interpreter start per server, about 32 M instructions
    against the 125 M of ``iomux serve`` (callgrind, Debian 12's python3): a fifth
    of a start, and a VM's suites start hundreds of servers at ten times the
    host's cost per instruction. A caught SIGINT is reset to SIG_DFL by exec
    itself (POSIX), so only an ignored one needs the reset.
    """
    if nofile <= 0 and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        return iomux_argv(*args)
    return [sys.executable, "-c", _EXEC_WRAPPER, str(nofile), "-m", "iomux", *args]


class ServerHandle(Protocol):
    """What ServerProcess uses of its process: ``subprocess.Popen``, or a ``ForkedServer``."""

    pid: int
    returncode: Optional[int]
    stdin: Optional[IO[bytes]]
    stderr: Optional[IO[bytes]]

    def poll(self) -> Optional[int]: ...
    def wait(self, timeout: Optional[float] = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


#: How start_server starts a server: "fork" (the default) forks it from a fork server
#: that has imported iomux already (forkserver.py: 0.07-0.10 s to ready in the emulated
#: VM against 0.64-1.03 s for an exec), "exec" runs a fresh ``python -m iomux serve``
#: every time. A test of the start itself asks for exec whatever this says.
SERVER_START_ENV = "IOMUX_SERVER_START"
SERVER_START_MODES = ("fork", "exec")


def server_start_mode() -> str:
    """SERVER_START_ENV's value ("fork" where it is unset), checked."""
    mode = os.environ.get(SERVER_START_ENV, "") or "fork"
    if mode not in SERVER_START_MODES:
        raise ValueError(f"{SERVER_START_ENV}={mode!r}: expected one of {', '.join(SERVER_START_MODES)}")
    if mode == "fork" and not (hasattr(os, "fork") and hasattr(socket, "AF_UNIX")):
        return "exec"
    return mode


def server_start_header() -> str:
    """One line for pytest's header: how servers start in this run."""
    mode = server_start_mode()
    how = ("forked from a fork server that has imported iomux (forkserver.py)" if mode == "fork"
           else "python -m iomux serve, one interpreter each")
    return f"server starts: {mode}: {how}; tests of the start itself always exec ({SERVER_START_ENV})"


_fork_server: Optional[ForkServer] = None
_fork_server_lock = threading.Lock()


def fork_server() -> ForkServer:
    """This process's fork server, started on first use (and ended when we exit)."""
    global _fork_server
    with _fork_server_lock:
        if _fork_server is None:
            _fork_server = ForkServer(iomux_env())
        return _fork_server


def close_fork_server() -> None:
    """End this process's fork server, if it started one, and reap it (a conftest's
    pytest_unconfigure). Its children's CPU time reaches this process's os.times()
    only then: a suite's CPU (harness.guest_suites) is read before atexit runs."""
    global _fork_server
    with _fork_server_lock:
        if _fork_server is not None:
            _fork_server.close()
            _fork_server = None


atexit.register(close_fork_server)  # a process that ends outside pytest_unconfigure


class ServerProcess:
    """One running ``iomux serve``: its ready record, its stderr lines, its signals."""

    def __init__(self, proc: ServerHandle, ready_file: Path, argv: List[str]) -> None:
        self.proc = proc
        self.ready_file = ready_file
        self.argv = argv
        self.ready: Dict[str, Any] = {}
        self.lines: List[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    # -- stderr -------------------------------------------------------------------------------

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def stderr_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        with self._cond:
            return "\n".join(self.lines)

    def matching(self, pattern: re.Pattern[str], start: int = 0) -> List[re.Match[str]]:
        """Every stderr line from index ``start`` on that matches ``pattern``."""
        with self._cond:
            lines = list(self.lines[start:])
        return [m for m in map(pattern.match, lines) if m is not None]

    def wait_line(self, pattern: re.Pattern[str], timeout: float = 10.0, start: int = 0) -> re.Match[str]:
        """Wait for a stderr line (from index ``start`` on) that matches ``pattern``."""
        deadline = time.monotonic() + wait(timeout)
        index = start
        with self._cond:
            while True:
                while index < len(self.lines):
                    m = pattern.match(self.lines[index])
                    index += 1
                    if m is not None:
                        return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (not self._reader.is_alive() and index >= len(self.lines)):
                    raise AssertionError(
                        f"no stderr line matching {pattern.pattern!r} within {wait(timeout):.1f}s; "
                        f"exit status {self.proc.poll()}; stderr:\n{chr(10).join(self.lines)}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def line_count(self) -> int:
        """How many stderr lines have arrived (a mark for ``wait_line(start=...)``)."""
        with self._cond:
            return len(self.lines)

    def assert_no_traceback(self) -> None:
        """The server never printed a Python traceback."""
        text = self.stderr_text()
        assert "Traceback (most recent call last)" not in text, f"traceback on stderr:\n{text}"

    # -- start and ready ----------------------------------------------------------------------

    def wait_ready(self, timeout: float = 20.0) -> Dict[str, Any]:
        """Wait for the ready line, then read the ready file (written atomically before it).

        The server writes the file and then prints the line (iomux/server.py
        ``Server.announce``, iomux/workers.py), so the line is the signal: the
        stderr reader wakes us as it arrives. (Polling the file every 20 ms
        cost about 20 ms a server, 2 s of every suite's 100 servers.)
        """
        try:
            self.wait_line(READY_RE, timeout=timeout)
        except AssertionError:
            status = self.proc.poll()
            if status is None:
                raise
            self._reader.join(2)
            raise AssertionError(
                f"server exited with status {status} before it was ready; "
                f"argv={self.argv}; stderr:\n{self.stderr_text()}"
            ) from None
        try:
            self.ready = json.loads(self.ready_file.read_text())
        except (OSError, ValueError) as exc:
            # The contract says temp file + rename before the line: a missing or
            # partial file once the line is out is a finding.
            raise AssertionError(f"ready line printed, but the ready file {self.ready_file} "
                                 f"is not whole JSON: {exc}; stderr:\n{self.stderr_text()}") from None
        return self.ready

    @property
    def port(self) -> int:
        """The port from the ready file."""
        return int(self.ready["port"])

    @property
    def pid(self) -> int:
        """The pid of the process we started (the parent, with ``--workers``)."""
        return self.proc.pid

    @property
    def address(self) -> Tuple[str, int]:
        """Where to connect."""
        return ("127.0.0.1", self.port)

    def connect(self, timeout: float = 10.0, rcvbuf: Optional[int] = None) -> socket.socket:
        """A blocking client socket connected to the server (with a timeout on every call)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                # Before connect(), so the advertised window is small from the SYN on.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(wait(timeout))
            sock.connect(self.address)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- signals and stats --------------------------------------------------------------------

    def send_signal(self, sig: int, pid: Optional[int] = None) -> None:
        """Send ``sig`` to the server (or to one of its workers)."""
        os.kill(self.pid if pid is None else pid, sig)

    def stats(self, pid: Optional[int] = None, timeout: float = 10.0) -> Dict[str, int]:
        """SIGUSR1 the server (or one worker) and parse the stats line that follows."""
        mark = self.line_count()
        self.send_signal(signal.SIGUSR1, pid)
        m = self.wait_line(STATS_RE, timeout=timeout, start=mark)
        return {k: int(v) for k, v in m.groupdict().items()}

    def wait_stats(self, pid: Optional[int] = None, timeout: float = 10.0, **want: int) -> Dict[str, int]:
        """Poll the stats line until every ``key=value`` in ``want`` holds.

        The pause between polls starts at 5 ms and doubles up to 100 ms: the
        server usually catches up within a few milliseconds, and a fixed 100 ms
        was 11 s of sleep in a host's fault suite.
        """
        deadline = time.monotonic() + wait(timeout)
        pause = 0.005
        while True:
            got = self.stats(pid, timeout=timeout)
            if all(got[k] == v for k, v in want.items()):
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"stats never reached {want}; last: {got}")
            time.sleep(pause)
            pause = min(2 * pause, 0.1)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the server to exit; return its status (fails on timeout)."""
        try:
            status = self.proc.wait(wait(timeout))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"server still running {wait(timeout):.1f}s later; stderr:\n{self.stderr_text()}"
            ) from None
        self._reader.join(wait(5))
        return status

    def group_alive(self) -> bool:
        """Whether a live process of the server's process group (a worker) is left."""
        if os.path.isdir("/proc/self/task"):
            # Linux: a zombie is dead already; it only waits for its reaper (and an
            # orphan's reaper, pid 1, is not always quick to do it, e.g. in a VM init).
            return bool(_proc_scan(lambda fields: fields[2] == str(self.pid)))
        try:
            os.killpg(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def close(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL to its whole process group; reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait(5))
        # The group outlives the parent when a worker is orphaned; kill it whole.
        # It is our own session (start_new_session), so its id is the parent's pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def start_server(
    tmp_path: Path,
    backend: str,
    *extra: str,
    nofile: int = 0,
    stdin_pipe: bool = False,
    wait_ready: bool = True,
    fresh_interpreter: bool = False,
) -> ServerProcess:
    """Start ``iomux serve --backend BACKEND --host 127.0.0.1 --port 0 --ready-file F EXTRA``.

    ``nofile`` > 0 sets the server's RLIMIT_NOFILE soft limit. The server runs in
    its own session, so that the caller can kill it and every worker it forked.
    It is forked from the fork server (server_start_mode), unless the mode is
    "exec" or ``fresh_interpreter`` asks for a ``python -m iomux serve`` of its own.
    """
    ready_file = tmp_path / f"ready-{backend}-{time.monotonic_ns()}.json"
    serve = [
        "serve", "--backend", backend, "--host", "127.0.0.1", "--port", "0",
        "--ready-file", str(ready_file), *extra,
    ]
    proc: ServerHandle
    if fresh_interpreter or server_start_mode() == "exec":
        proc = subprocess.Popen(
            exec_argv(nofile, *serve),
            env=iomux_env(),
            stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    else:
        proc = fork_server().start(serve, iomux_env(), nofile=nofile, stdin_pipe=stdin_pipe)
    server = ServerProcess(proc, ready_file, ["iomux", *serve])
    if wait_ready:
        try:
            server.wait_ready()
        except BaseException:
            server.close()
            raise
    return server


class ServerFactory:
    """Starts servers for one test and stops every one of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: List[ServerProcess] = []

    def start(
        self,
        backend: str,
        *extra: str,
        nofile: int = 0,
        stdin_pipe: bool = False,
        fresh_interpreter: bool = False,
    ) -> ServerProcess:
        """Start ``iomux serve`` on ``backend`` with ``extra`` flags (see ``start_server``)."""
        server = start_server(self.tmp_path, backend, *extra, nofile=nofile, stdin_pipe=stdin_pipe,
                              fresh_interpreter=fresh_interpreter)
        self.servers.append(server)
        return server

    def close(self) -> None:
        """Kill and reap every server (and its process group) this test started."""
        for server in self.servers:
            server.close()


# -- clients ----------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes from a blocking socket (its own timeout applies)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 65536))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    """Send a small message and read back as many bytes (small: no need to read while writing)."""
    sock.sendall(data)
    return recv_exact(sock, len(data))


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> Tuple[bytes, str]:
    """Read until the server closes: returns (bytes read, "eof" or "reset"); fails on timeout."""
    sock.settimeout(wait(timeout))
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ConnectionAbortedError):
            return bytes(buf), "reset"
        except socket.timeout:
            raise AssertionError(
                f"the server did not close the connection within {wait(timeout):.1f}s"
            ) from None
        if not chunk:
            return bytes(buf), "eof"
        buf += chunk


@contextlib.contextmanager
def closing_all(socks: List[socket.socket]) -> Iterator[List[socket.socket]]:
    """Close every socket of the list (which may still grow) at the end of the block."""
    try:
        yield socks
    finally:
        for s in socks:
            s.close()


_CLOSED_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def probe(sock: socket.socket, data: bytes = b"ping\n") -> str:
    """One round trip: "echo" when it came back whole, "closed" when the server closed it."""
    try:
        sock.sendall(data)
    except _CLOSED_ERRORS:
        return "closed"
    return _echo_outcome(sock, data)


def _echo_outcome(sock: socket.socket, data: bytes) -> str:
    """Read ``data``'s echo: "echo", or "closed" on a reset or an end of stream."""
    try:
        got = recv_exact(sock, len(data))
    except _CLOSED_ERRORS:
        return "closed"
    except AssertionError:  # EOF from recv_exact
        return "closed"
    assert got == data, f"echo mismatch: sent {data!r}, got {got!r}"
    return "echo"


def probe_all(socks: Sequence[socket.socket], payloads: Sequence[bytes],
              hung_after: Optional[float] = None) -> List[str]:
    """``probe`` on every socket, pipelined: every request is sent before any echo is read.

    One round trip at a time costs the server a wake-up (or two) per client, and
    a wake-up is what the emulated VM is slow at; sent together, one wake-up can
    answer many. Each client's outcome is still its own.

    With ``hung_after`` (seconds, stretched) every read shares one deadline, and
    a client with no answer by then is "hung (timeout)" (or "hung (OSError)")
    instead of an error: a server that strands 150 clients then costs one
    timeout, not 150 in a row.
    """
    sent = []
    for sock, data in zip(socks, payloads):
        try:
            sock.sendall(data)
            sent.append(True)
        except _CLOSED_ERRORS:
            sent.append(False)
    if hung_after is None:
        return [_echo_outcome(sock, data) if ok else "closed"
                for sock, data, ok in zip(socks, payloads, sent)]
    deadline = time.monotonic() + wait(hung_after)
    outcomes = []
    for sock, data, ok in zip(socks, payloads, sent):
        if not ok:
            outcomes.append("closed")
            continue
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            outcomes.append(_echo_outcome(sock, data))
        except (socket.timeout, OSError) as exc:
            outcomes.append(f"hung ({type(exc).__name__})")
    return outcomes


def connect_and_probe(server: ServerProcess, socks: List[socket.socket], n: int,
                      batch: int = 100) -> List[str]:
    """Open ``n`` connections (appended to ``socks``) in batches, one round trip on each
    (``probe_all``); "echo" or "closed" per client.

    Batches of 100, each answered before the next, keep the accept queue short,
    so that the test does not depend on the server's listen backlog.
    """
    outcomes: List[str] = []
    while len(outcomes) < n:
        first = len(socks)
        count = min(batch, n - len(outcomes))
        for _ in range(count):
            socks.append(server.connect())
        outcomes += probe_all(socks[first:], [f"client {len(outcomes) + i}\n".encode() for i in range(count)])
    return outcomes


@dataclass
class _Flow:
    sock: socket.socket
    payload: memoryview
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False


@dataclass
class _GapRecord:
    """The longest time with no byte moving either way inside a pump() that
    completed, and how many completed: the figure pump's stall window must stay
    clear of, printed at the end of a session (suite_hooks.pytest_terminal_summary)."""

    longest: float = 0.0
    pumps: int = 0


_healthy_gaps = _GapRecord()

#: pump's default ``stall``: seconds without a byte moving (before ``stall_window``):
#: 6 s here, 12 s on the stretched targets.
PUMP_STALL = 6.0

#: How long writing must have stalled (no flow writable, nothing to read) before a
#: ``read_late`` pump starts reading: stretched like every wait, never past the half
#: second it was. A stall means the server has stopped reading (backpressure), which
#: is what read_late waits for; waiting on after that proved nothing, and the half
#: second cost every target 2 s of its in-guest suite and 2 s of its fault suite
#: (two read_late tests, four backends each).
READ_LATE_STALL = 0.1


def stall_window(stall: float) -> float:
    """How long pump waits with no byte moving before it calls a transfer stalled:
    ``stall`` stretched like every wait, but never past twice ``stall``.

    A stall is no progress at all, not slowness, and the slow targets are not slow
    at that: the longest gap in a completed transfer of a whole matrix
    (pump_gap_summary, 2026-12-04) was 1.51 s on the emulated VM, 0.88 s on
    gVisor, 0.57 s on UML and 0.50 s (read_late's own half second, since cut to
    READ_LATE_STALL) elsewhere,
    against windows of 40-80 s stretched. Each of gVisor's expected netstack
    stalls (kernel_expectations.py) waited the whole 40 s out. In a cold
    .ci/run (2026-12-07, images built beside the tests) the longest were 2.53 s
    on the VM, 1.08 s on gVisor 2022, 0.62 s on gVisor 2024 and 0.50 s
    elsewhere, while gVisor 2022's three netstack stalls took 23 s each of a
    20 s window: a window of 12 s (stretched) is still 4.7 times the worst gap.
    """
    return min(wait(stall), 2 * stall)


def pump_gap_summary() -> Optional[str]:
    """One line on the completed pumps' longest gap against the default stall window; None if none ran."""
    if not _healthy_gaps.pumps:
        return None
    return (f"pump: longest gap without progress in {_healthy_gaps.pumps} completed transfers: "
            f"{_healthy_gaps.longest:.2f}s (stall window {stall_window(PUMP_STALL):.1f}s)")


def pump(
    flows: Sequence[Tuple[socket.socket, bytes]],
    timeout: float = 30.0,
    shut_wr: bool = False,
    read_chunk: int = 256 * 1024,
    read_late: bool = False,
    stall: float = PUMP_STALL,
) -> List[bytes]:
    """Write every payload and read every echo at the same time, on many sockets at once.

    Reading while writing is needed: a server with backpressure stops reading a
    client that does not read, so ``sendall`` then ``recv`` deadlocks on big data.
    With ``shut_wr`` each socket is shut down for writing once its payload is
    sent, and reading goes on until EOF (which must come). Otherwise a flow
    ends once as many bytes came back as were sent. A small ``read_chunk`` makes
    a reader slower than its writer. With ``read_late`` a flow starts reading
    only once it has sent everything (and shut down), or when writing has
    stalled (READ_LATE_STALL): data and EOF then reach the server while its
    echo is still pending. No byte moving either way for ``stall`` seconds
    (stretched like ``timeout``, at most twice: ``stall_window``) fails at once,
    before the whole timeout: that is a stalled transfer, not a slow one.
    Returns what each read.
    """
    sel = selectors.DefaultSelector()
    states: List[_Flow] = []
    chunk = 256 * 1024
    try:
        for i, (sock, payload) in enumerate(flows):
            sock.setblocking(False)
            st = _Flow(sock, memoryview(payload))
            states.append(st)
            if not payload and shut_wr:
                sock.shutdown(socket.SHUT_WR)
            reading = 0 if read_late and payload else selectors.EVENT_READ
            events = reading | (selectors.EVENT_WRITE if payload else 0)
            sel.register(sock, events, i)
        open_flows = len(states)
        deadline = time.monotonic() + wait(timeout)
        moved_at = time.monotonic()
        moved = -1
        longest = 0.0
        # Bytes moved either way so far, kept as they move: a sum over every flow
        # at each wake-up cost O(flows) (2,000 in the connection storm), 10x that
        # under emulation.
        total = 0
        late = read_late  # not reading yet (flows that sent everything read already)
        late_wait = min(wait(READ_LATE_STALL), 0.5)
        while open_flows:
            now = time.monotonic()
            remaining = deadline - now
            if total != moved:
                longest = max(longest, now - moved_at)
                moved, moved_at = total, now
            stalled = now - moved_at >= stall_window(stall)
            if remaining <= 0 or stalled:
                progress = [
                    f"#{i}: sent {s.sent}/{len(s.payload)} got {len(s.received)} eof={s.eof}"
                    for i, s in enumerate(states)
                    if (s.eof is False and (shut_wr or len(s.received) < len(s.payload)))
                ]
                what = (f"no byte moved for {stall_window(stall):.1f}s" if stalled
                        else f"echo not complete after {wait(timeout):.1f}s")
                raise AssertionError(f"{what}: " + "; ".join(progress[:10]))
            ready = sel.select(min(remaining, late_wait if late else 0.5))
            if not ready and late:
                # Writing stalled (backpressure): read now, or nothing moves again.
                late = False
                for key in list(sel.get_map().values()):
                    sel.modify(key.fileobj, selectors.EVENT_READ | key.events, key.data)
            for key, mask in ready:
                st = states[key.data]
                done = False
                if mask & selectors.EVENT_WRITE and st.sent < len(st.payload):
                    with contextlib.suppress(BlockingIOError):
                        n = st.sock.send(st.payload[st.sent : st.sent + chunk])
                        st.sent += n
                        total += n
                    if st.sent == len(st.payload):
                        if shut_wr:
                            st.sock.shutdown(socket.SHUT_WR)
                        sel.modify(st.sock, selectors.EVENT_READ, key.data)
                if mask & selectors.EVENT_READ:
                    try:
                        data = st.sock.recv(read_chunk)
                    except BlockingIOError:
                        data = None
                    if data is not None:
                        if data:
                            st.received += data
                            total += len(data)
                            if not shut_wr and len(st.received) >= len(st.payload) == st.sent:
                                done = True
                        else:
                            st.eof = True
                            done = True
                if done:
                    sel.unregister(st.sock)
                    open_flows -= 1
        # The last bytes (which end the loop) ended a gap too.
        longest = max(longest, time.monotonic() - moved_at)
        _healthy_gaps.longest = max(_healthy_gaps.longest, longest)
        _healthy_gaps.pumps += 1
    finally:
        sel.close()
        for st in states:
            st.sock.settimeout(wait(10))
    if shut_wr:
        assert all(s.eof for s in states)
    return [bytes(s.received) for s in states]


def write_until_stalled(server: ServerProcess, sock: socket.socket, cap: int) -> Tuple[int, bool]:
    """Write to ``sock``, a client that never reads, until the server stops reading
    it or ``cap`` bytes have gone; return (bytes sent, whether it stalled).

    Stalled: not writable for a quarter of a second once the server's stats line
    counts a backpressure pause more than when the writing began, or not
    writable for a whole second (stretched) whatever the stats say (so that a
    server that stops reading without counting it still stalls here, and fails
    its test's ``paused`` check). The whole second, stretched, was the only rule
    before: 4-8 s of waiting per test on the slow targets, where the server had
    paused long before.
    """
    paused_before = server.stats()["paused"]
    sock.setblocking(False)
    chunk = b"s" * (64 * 1024)
    sent = 0
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        while sent < cap:
            try:
                sent += sock.send(chunk)
                continue
            except BlockingIOError:
                pass
            if sel.select(0.25):
                continue
            if server.stats()["paused"] > paused_before or not sel.select(wait(1.0)):
                return sent, True
    return sent, False


def set_linger_reset(sock: socket.socket) -> None:
    """SO_LINGER on, 0 seconds: close() then sends an RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@contextlib.contextmanager
def nofile_at_least(n: int) -> Iterator[None]:
    """Raise this process's RLIMIT_NOFILE soft limit to ``n`` for the block (skip if the hard limit is lower)."""
    import resource

    import pytest

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {n} descriptors this test needs")
    if soft != resource.RLIM_INFINITY and soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- what the server process costs ------------------------------------------------------------


def _ps(field_name: str, pid: int) -> Optional[str]:
    try:
        out = subprocess.run(
            ["ps", "-o", f"{field_name}=", "-p", str(pid)],
            capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value else None


def rss_kib(pid: int) -> Optional[int]:
    """Resident set size of ``pid`` in KiB: /proc on Linux, ``ps -o rss=`` elsewhere; None if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])  # "VmRSS:   12345 kB"
    except OSError:
        pass
    value = _ps("rss", pid)
    return int(value) if value is not None and value.isdigit() else None


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of ``pid``: /proc/PID/stat on Linux, ``ps -o time=`` elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # comm (field 2) may hold spaces and parentheses: split after the last ")".
            # Then index 0 is field 3 (state); utime and stime are fields 14 and 15.
            rest = f.read().rpartition(")")[2].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    # BSD ps prints "M:SS.ss" (centiseconds); procps would print "[D-]HH:MM:SS".
    value = _ps("time", pid)
    if value is None:
        return None
    days = 0.0
    if "-" in value:
        d, value = value.split("-", 1)
        days = float(d)
    seconds = 0.0
    for part in value.split(":"):
        seconds = seconds * 60 + float(part)
    return days * 86400 + seconds


def _proc_scan(match: Callable[[List[str]], bool]) -> List[int]:
    """Linux: the live processes whose /proc/PID/stat fields (from field 3 on) ``match``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # comm may hold spaces and parentheses: split after the last ")".
                # Index 0 is then the state, 1 the ppid, 2 the process group.
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # exited while we looked
        if len(fields) > 2 and fields[0] != "Z" and match(fields):
            found.append(int(entry))
    return sorted(found)


def open_fds(pid: int) -> Optional[int]:
    """How many descriptors ``pid`` holds (Linux /proc only; None elsewhere)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def child_pids(pid: int) -> List[int]:
    """Live child processes of ``pid``: /proc scan on Linux, ``pgrep -P`` elsewhere."""
    if os.path.isdir("/proc/self/task"):
        return _proc_scan(lambda fields: fields[1] == str(pid))
    out = subprocess.run(
        ["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10, check=False
    )
    return sorted(int(x) for x in out.stdout.split())


def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """The body of the suites' ``servers`` fixture: a factory of servers whose
    teardown kills what is left and rejects any traceback in their stderr."""
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()
    # After close(), so that the check sees every line the servers wrote.
    for server in factory.servers:
        server.assert_no_traceback()
