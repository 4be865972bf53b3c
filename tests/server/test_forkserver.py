"""The fork server (forkserver.py) starts a server as exec would, on every kernel.

The suites fork most of their servers from it (serverproc.server_start_mode), so
what they test is only worth as much as the fork is faithful. Each check here
compares a forked server with a ``python -m iomux serve`` of its own, started
the same way, or checks a part of the ``subprocess.Popen`` contract the suites
rely on. Linux shows a process's descriptors and signal state in /proc; FreeBSD
in ``procstat -f`` and ``ps -o sigmask,sigignore,sigcatch``.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest
from forkserver import TITLE, ForkedServer, ForkServer, ForkServerError
from serverproc import (
    SERVER_START_ENV,
    MiB,
    ServerFactory,
    ServerProcess,
    close_fork_server,
    cpu_seconds,
    iomux_env,
    server_start_mode,
    start_server,
    wait,
)


@pytest.fixture(autouse=True)
def _forked(monkeypatch: pytest.MonkeyPatch) -> None:
    """What is tested here is the fork, whatever IOMUX_SERVER_START says for the run."""
    monkeypatch.setenv(SERVER_START_ENV, "fork")
    assert server_start_mode() == "fork"


def _descriptors(pid: int) -> Optional[Set[int]]:
    """The descriptor numbers ``pid`` holds: /proc on Linux, procstat on FreeBSD."""
    try:
        return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    except OSError:
        pass
    try:
        out = subprocess.run(["procstat", "-f", str(pid)], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    # "  PID COMM  FD T V FLAGS ...": the third column is a number, or cwd/root/text/jail.
    return {int(words[2]) for words in map(str.split, out.stdout.splitlines()[1:])
            if len(words) > 2 and words[2].isdigit()}


def _signal_state(pid: int) -> Optional[Dict[str, str]]:
    """Blocked, ignored and caught signal masks of ``pid``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: v.strip() for k, _, v in (line.partition(":") for line in f)
                    if k in ("SigBlk", "SigIgn", "SigCgt")}
    except OSError:
        pass
    try:
        out = subprocess.run(["ps", "-o", "sigmask=,sigignore=,sigcatch=", "-p", str(pid)],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.stdout.split()
    return dict(zip(("blocked", "ignored", "caught"), words)) if len(words) == 3 else None


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    out = subprocess.run(["ps", "-o", "state=", "-p", str(pid)], capture_output=True,
                         text=True, timeout=30, check=False)
    return out.returncode == 0 and bool(out.stdout.strip()) and not out.stdout.strip().startswith("Z")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + wait(seconds)
    while _running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def pair(servers: ServerFactory) -> Iterator[List[ServerProcess]]:
    """An exec'd and a forked server of the same backend, both idle and ready."""
    backend = "auto"
    yield [servers.start(backend, "--stop-on-stdin", stdin_pipe=True, fresh_interpreter=True),
           servers.start(backend, "--stop-on-stdin", stdin_pipe=True)]


def test_a_forked_server_holds_the_descriptors_an_execd_one_holds(pair: List[ServerProcess]) -> None:
    execd, forked = (_descriptors(s.pid) for s in pair)
    assert execd is not None and forked is not None, "no /proc/PID/fd and no procstat here"
    assert forked == execd, f"forked: {sorted(forked)}, exec'd: {sorted(execd)}"


def test_a_forked_server_has_the_signal_state_of_an_execd_one(pair: List[ServerProcess]) -> None:
    execd, forked = (_signal_state(s.pid) for s in pair)
    assert execd is not None and forked is not None, "no /proc/PID/status and no ps sig fields"
    assert forked == execd


def test_a_forked_server_leads_its_own_session(pair: List[ServerProcess]) -> None:
    for server in pair:
        assert os.getsid(server.pid) == server.pid
        assert os.getpgid(server.pid) == server.pid


def test_a_forked_server_gets_the_nofile_limit_asked_for(servers: ServerFactory) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1500 if hard == resource.RLIM_INFINITY else min(hard, 1500)
    server = servers.start("auto", "--stop-on-stdin", stdin_pipe=True, nofile=want)
    if hasattr(resource, "prlimit"):  # Linux
        got = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
    else:
        out = subprocess.run(["procstat", "-l", str(server.pid)], capture_output=True, text=True,
                             timeout=30, check=True)
        line = next(words for words in map(str.split, out.stdout.splitlines())
                    if "openfiles" in words)
        got = (int(line[-2]), int(line[-1]))
    assert got == (want, hard), f"asked for {want} (hard {hard}, ours soft {soft})"


@pytest.mark.parametrize("how, want", [("SIGKILL", -signal.SIGKILL), ("SIGTERM", 0), ("stdin EOF", 0)])
def test_exit_status_is_what_popen_reports(servers: ServerFactory, how: str, want: int) -> None:
    server = servers.start("auto", "--stop-on-stdin", stdin_pipe=True)
    if how == "stdin EOF":
        assert server.proc.stdin is not None
        server.proc.stdin.close()
    else:
        server.send_signal(getattr(signal, how))
    assert server.wait_exit() == want
    assert server.proc.poll() == want and server.proc.returncode == want


def test_a_usage_error_exits_2_with_one_line(tmp_path: Path) -> None:
    server = start_server(tmp_path, "auto", "--drain-timeout", "soon", wait_ready=False)
    try:
        assert server.wait_exit() == 2
        lines = [line for line in server.stderr_text().splitlines() if line]
        assert len(lines) == 1 and "--drain-timeout" in lines[0], lines
    finally:
        server.close()


def test_an_unknown_start_mode_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SERVER_START_ENV, "spawn")
    with pytest.raises(ValueError, match=r"^IOMUX_SERVER_START='spawn': expected one of fork, exec$"):
        server_start_mode()


_KILLED_PARENT = """\
import os, sys, time
sys.path.insert(0, sys.argv[1])
from forkserver import ForkServer
from serverproc import iomux_env
fs = ForkServer(iomux_env())
child = fs.start(["serve", "--backend", "auto", "--host", "127.0.0.1", "--port", "0"], iomux_env())
print(fs.pid, child.pid, flush=True)
time.sleep(600)
"""


def test_the_fork_server_ends_with_its_test_process() -> None:
    """A test process killed with SIGKILL runs no clean-up: the fork server must see
    EOF on its control socket and exit by itself. The server it forked lives on in its
    own session, as an exec'd one would; this test kills it."""
    here = str(Path(__file__).resolve().parent)
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, here], env=iomux_env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    fork_server_pid = server_pid = 0
    try:
        assert parent.stdout is not None
        fork_server_pid, server_pid = map(int, parent.stdout.readline().split())
        assert _running(fork_server_pid)
        parent.kill()
        parent.wait()
        assert _gone_within(fork_server_pid, 10), "the fork server outlived its test process"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in (server_pid, fork_server_pid):
            if pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
    assert _gone_within(server_pid, 10)


def test_a_fork_server_gone_is_an_error_not_a_hang() -> None:
    fs = ForkServer(iomux_env())
    child = fs.start(["serve", "--backend", "auto", "--host", "127.0.0.1", "--port", "0"], iomux_env())
    try:
        os.kill(fs.pid, signal.SIGKILL)
        with pytest.raises(ForkServerError, match="went away"):
            child.wait(wait(10))
        with pytest.raises(ForkServerError, match="cannot reach"):
            fs.start(["backends"], iomux_env())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        fs.close()
        assert child.stderr is not None
        child.stderr.close()
    assert _gone_within(child.pid, 10)


def test_a_fork_server_that_dies_with_a_request_in_flight_is_an_error_not_a_hang() -> None:
    """The send succeeds (the fork server is stopped, not gone) and it dies before it
    reads the request: the same "cannot reach" as a send that fails, within seconds.
    (In a loaded run, a child that has not yet closed its inherited control socket
    made the send succeed after the fork server had died: Python 3.9, debian-11.)"""
    fs = ForkServer(iomux_env())
    try:
        os.kill(fs.pid, signal.SIGSTOP)
        killer = threading.Timer(0.5, os.kill, (fs.pid, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(ForkServerError, match=r"cannot reach the fork server: it exited \(signal 9\)"):
                fs.start(["backends"], iomux_env())
        finally:
            killer.join()
        assert time.monotonic() - t0 < wait(10)
    finally:
        fs.close()


def test_the_fork_server_says_what_it_is_in_its_command_line() -> None:
    fs = ForkServer(iomux_env())
    try:
        out = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(fs.pid)], capture_output=True,
                             text=True, timeout=30, check=True)
        assert TITLE in out.stdout
    finally:
        fs.close()
    assert not _running(fs.pid)


def test_a_forked_servers_cpu_time_is_ours_once_the_fork_server_is_closed(tmp_path: Path) -> None:
    """A suite's CPU is read from its own os.times() (harness.guest_suites): a forked
    server is the fork server's child, so its CPU reaches us when the fork server,
    which reaped it, is reaped in turn (close_fork_server, pytest_unconfigure)."""
    before = os.times()
    server = start_server(tmp_path, "auto")
    try:
        # Streamed, not held: the emulated VM has 512 MiB, and a 64 MiB payload
        # with its echo and their copies left its sshd no memory to answer in.
        # Until the server has used enough CPU to see, not a fixed size: the
        # emulated VM took 4.6 s for the 64 MiB that the host echoes in 0.3 s.
        chunk = os.urandom(64 * 1024)
        cap = 256 * MiB
        sent = got = 0
        with server.connect(timeout=60) as c:

            def drain() -> None:
                nonlocal got
                while True:
                    data = c.recv(1 << 20)
                    if not data:
                        return
                    got += len(data)

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            while sent < cap:
                c.sendall(chunk)
                sent += len(chunk)
                if sent % (4 * MiB) == 0 and (cpu_seconds(server.pid) or 0.0) >= 0.25:
                    break
            c.shutdown(socket.SHUT_WR)  # the server echoes the rest, then closes
            reader.join(wait(60))
        assert got == sent, f"{got} of {sent} bytes came back"
        used = cpu_seconds(server.pid)
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(10) == 0
    finally:
        server.close()
    assert used is not None and used >= 0.1, f"the server used {used} s: too little to see"
    close_fork_server()
    after = os.times()
    gained = (after.children_user + after.children_system
              - before.children_user - before.children_system)
    # Clock ticks round each figure; the fork server's own CPU only adds.
    assert gained >= used - 0.02, f"the server used {used:.2f} s; our children's CPU grew {gained:.2f} s"


def test_a_fork_server_gone_without_an_end_of_stream_is_seen_as_gone() -> None:
    """gVisor keeps a status socket that is still in flight referenced (forkserver.py,
    ForkedServer._line): no end of stream comes, and the fork server's exit alone
    must end the wait, within seconds, not after the 60 s pid timeout."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs, open(os.devnull, "rb") as stderr:  # theirs stays open: no end of stream
        t0 = time.monotonic()
        with pytest.raises(ForkServerError, match="went away"):
            ForkedServer(ours, None, stderr, timeout=60, alive=lambda: False)
        assert time.monotonic() - t0 < 5
        ours.close()
        # What it wrote before it went is still read.
        ours, theirs2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs2:
            theirs2.sendall(b"pid 4242\n")
            assert ForkedServer(ours, None, stderr, timeout=60, alive=lambda: False).pid == 4242
        ours.close()
