"""Behaviour of ``iomux serve``, black-box through its command line, on every backend.

In the manner of CPython's Lib/test/test_selectors.py: ``EchoServerTests`` holds
the behaviour once; each backend is a small subclass that names it; a backend's
quirks (select's FD_SETSIZE) live on its own subclass. A backend that
``iomux backends --json`` does not list on this kernel is skipped with that reason.

Sizes scale with IOMUX_TEST_SCALE (0.25 in VMs); counts that are the point of a
test (200 clients, more than 1,024 connections, a burst of 100) do not.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from typing import ClassVar, List

import pytest
from serverproc import (
    ERROR_RE,
    EXHAUSTED_RE,
    READY_FILE_KEYS,
    READY_RE,
    REFUSED_RE,
    SHUTDOWN_RE,
    MiB,
    ServerFactory,
    ServerProcess,
    backends_info,
    child_pids,
    closing_all,
    connect_and_probe,
    cpu_seconds,
    nofile_at_least,
    open_fds,
    probe,
    pump,
    read_until_closed,
    recv_exact,
    roundtrip,
    rss_kib,
    run_iomux,
    scaled,
    set_linger_reset,
    unavailable_reason,
    wait,
    write_until_stalled,
)

import iomux

# More than FD_SETSIZE (1024), the limit of select(); the server also needs its own few fds.
MANY = 1100
MANY_NOFILE = MANY + 200


class EchoServerTests:
    """The behaviour every backend must have. Subclasses set BACKEND."""

    BACKEND: ClassVar[str]
    servers: ServerFactory

    @pytest.fixture(autouse=True)
    def _backend(self, servers: ServerFactory) -> None:
        reason = unavailable_reason(self.BACKEND)
        if reason is not None:
            pytest.skip(reason)
        self.servers = servers

    def serve(self, *extra: str, nofile: int = 0, stdin_pipe: bool = False,
              fresh_interpreter: bool = False) -> ServerProcess:
        """Start a server on this class's backend; the fixture reaps it."""
        return self.servers.start(self.BACKEND, *extra, nofile=nofile, stdin_pipe=stdin_pipe,
                                  fresh_interpreter=fresh_interpreter)

    # -- start-up contract ------------------------------------------------------------------

    def test_ready_line_and_ready_file(self) -> None:
        # The start itself is what is tested: a python -m iomux serve of its own,
        # not a fork of the fork server (serverproc.server_start_mode).
        server = self.serve(fresh_interpreter=True)
        ready = server.ready
        assert set(ready) == READY_FILE_KEYS
        assert ready["host"] == "127.0.0.1"
        assert isinstance(ready["port"], int) and ready["port"] > 0
        assert ready["backend"] == self.BACKEND
        assert ready["pid"] == server.pid
        assert ready["workers"] == 1
        assert ready["version"] == iomux.__version__
        lines = server.matching(READY_RE)
        assert len(lines) == 1, server.stderr_text()
        m = lines[0]
        assert (m["host"], int(m["port"]), m["backend"], int(m["pid"]), m["workers"]) == (
            "127.0.0.1", server.port, self.BACKEND, server.pid, None,
        )
        with server.connect() as c:
            assert roundtrip(c, b"hello\n") == b"hello\n"

    # -- data -------------------------------------------------------------------------------

    def test_echo_8_mib_sha256(self) -> None:
        server = self.serve()
        payload = os.urandom(scaled(8 * MiB))
        with server.connect() as c:
            (echoed,) = pump([(c, payload)], timeout=60)
        assert len(echoed) == len(payload)
        # Byte for byte (memcmp), not a SHA-256 of each side: the same answer, at a
        # fraction of the cost under emulation; outside the assert, so that pytest
        # does not diff two 8 MiB reprs.
        same = echoed == payload
        assert same, "the echo has the input's length but not its bytes"

    def test_200_concurrent_clients(self) -> None:
        server = self.serve()
        with closing_all([server.connect() for _ in range(200)]) as clients:
            payloads = [os.urandom(scaled(16 * 1024)) for _ in clients]
            echoed = pump(list(zip(clients, payloads)), timeout=60)
            wrong = [i for i, (p, e) in enumerate(zip(payloads, echoed)) if p != e]
            assert not wrong, f"clients {wrong[:10]} did not get exactly their own bytes back"
            assert server.stats()["open"] == 200

    def test_half_close_echoes_everything_then_eof(self) -> None:
        server = self.serve()
        payload = os.urandom(scaled(1 * MiB))
        with server.connect() as c:
            # pump() shuts the write side once all is sent, then insists on EOF.
            (echoed,) = pump([(c, payload)], shut_wr=True, timeout=30)
        assert len(echoed) == len(payload)
        assert echoed == payload
        server.wait_stats(open=0)

    def test_fin_queued_behind_the_data(self) -> None:
        # Stopped, the server cannot read: a message and the client's FIN both wait
        # in the receive queue, so they raise one readiness (one edge). Its first
        # read is short and returns the message; only a read after it returns the
        # EOF. A backend that stops at the short read must know from the event that
        # a FIN is queued; gVisor's epoll before 2024 never sets EPOLLRDHUP, so an
        # edge-triggered reader there must read on into EOF or EAGAIN.
        server = self.serve()
        for round_ in range(5):
            with server.connect() as c:
                assert roundtrip(c, b"hello\n") == b"hello\n"  # accepted and registered
                server.send_signal(signal.SIGSTOP)
                try:
                    c.sendall(b"the last message\n")
                    c.shutdown(socket.SHUT_WR)
                    time.sleep(0.05)
                finally:
                    server.send_signal(signal.SIGCONT)
                echoed, ending = read_until_closed(c, timeout=10)
                assert (echoed, ending) == (b"the last message\n", "eof"), f"round {round_}"

    def test_half_close_with_output_still_pending(self) -> None:
        server = self.serve()
        # Written in full (with the EOF) before we read, then read slowly: the
        # server sees the EOF while echo is still pending. 8 MiB is more than the
        # server's socket send buffer takes (up to 4 MiB on Linux, 2 MiB on
        # FreeBSD) plus the high-water mark; smaller would sit in kernel buffers.
        payload = os.urandom(max(4 * MiB, scaled(8 * MiB)))
        with server.connect(rcvbuf=8192) as c:
            (echoed,) = pump(
                [(c, payload)], shut_wr=True, read_chunk=8192, read_late=True, timeout=60
            )
        assert len(echoed) == len(payload)
        assert echoed == payload

    def test_peer_reset_while_data_in_flight(self) -> None:
        server = self.serve()
        with closing_all([server.connect()]) as socks:
            bystander = socks[0]
            assert roundtrip(bystander, b"before\n") == b"before\n"
            fds_before = open_fds(server.pid)
            victim = server.connect()
            socks.append(victim)
            # Write without reading: the echo backs up towards us, so bytes are in
            # flight both ways (and pending in the server) when the RST lands.
            victim.setblocking(False)
            chunk = os.urandom(64 * 1024)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < scaled(2 * MiB):
                    sent += victim.send(chunk)
            time.sleep(0.1)
            set_linger_reset(victim)
            victim.close()
            for i in range(20):
                msg = f"after {i}\n".encode()
                assert roundtrip(bystander, msg) == msg
            server.wait_stats(open=1)
            if fds_before is not None:
                assert open_fds(server.pid) == fds_before, "the reset connection's fd leaked"
            with server.connect() as fresh:
                assert roundtrip(fresh, b"fresh\n") == b"fresh\n"
        assert server.proc.poll() is None
        server.assert_no_traceback()

    def test_slow_reader_memory_stays_bounded(self) -> None:
        server = self.serve()
        with server.connect() as warm:
            # Warm the server's buffers up before the baseline, so it measures growth.
            (_echoed,) = pump([(warm, bytes(1 * MiB))])
        baseline = rss_kib(server.pid)
        # Enough that a server without backpressure would swallow it all, and more
        # than the kernel buffers hold between us (a few MiB each way).
        cap = max(32 * MiB, scaled(64 * MiB))
        with closing_all([server.connect(rcvbuf=4096)]) as socks:
            sent, stalled = write_until_stalled(server, socks[0], cap)
            rss = rss_kib(server.pid)
            with server.connect() as other:
                assert roundtrip(other, b"still here\n") == b"still here\n"
            stats = server.stats()
        assert stalled, f"the server read all {sent} bytes from a client that never reads"
        assert stats["paused"] >= 1, f"no backpressure pause in the stats line: {stats}"
        if baseline is None or rss is None:
            pytest.skip("the server's RSS is not measurable here (no /proc, no ps)")
        grown = (rss - baseline) * 1024
        assert grown < cap // 2, (
            f"server RSS grew by {grown / MiB:.1f} MiB (baseline {baseline} KiB) "
            f"while a client wrote {sent / MiB:.1f} MiB and never read"
        )

    # -- many connections -------------------------------------------------------------------

    def test_more_than_1024_connections(self) -> None:
        with nofile_at_least(MANY_NOFILE), closing_all([]) as clients:
            server = self.serve(nofile=MANY_NOFILE)
            outcomes = connect_and_probe(server, clients, MANY)
            assert outcomes.count("echo") == MANY, f"{outcomes.count('closed')} connections were closed"
            stats = server.stats()
            assert stats["open"] == MANY and stats["refused"] == 0, stats

    def test_burst_of_100_connections(self) -> None:
        server = self.serve()
        with closing_all([]) as clients:
            # Stopped, the server cannot accept: the kernel completes all 100
            # handshakes into the accept queue, and the listener becomes readable
            # once. An edge-triggered backend must accept until EAGAIN or strand them.
            server.send_signal(signal.SIGSTOP)
            try:
                for _ in range(100):
                    s = socket.socket()
                    clients.append(s)
                    s.setblocking(False)
                    s.connect_ex(server.address)
                time.sleep(0.2)
            finally:
                server.send_signal(signal.SIGCONT)
            payloads = [f"burst client {i}\n".encode() for i in range(len(clients))]
            echoed = pump(list(zip(clients, payloads)), timeout=30)
            assert echoed == payloads
            assert server.stats()["accepted"] == 100

    # -- stopping ---------------------------------------------------------------------------

    @pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
    def test_signal_stops_with_status_0(self, signame: str) -> None:
        # The client keeps its connection open, so the server closes it when the drain
        # timeout ends: a short one, as the deadline itself is the fault suite's
        # test_sigterm_drain_deadline (1 s here cost 1 s of waiting per case).
        server = self.serve("--drain-timeout", "0.2")
        with server.connect() as c:
            assert roundtrip(c, b"hi\n") == b"hi\n"
            server.send_signal(getattr(signal, signame))
            m = server.wait_line(SHUTDOWN_RE)
            assert (m["signame"], int(m["n"])) == (signame, 1)
            read_until_closed(c, timeout=10)
        assert server.wait_exit(timeout=10) == 0

    @pytest.mark.parametrize("how", ["eof", "line"])
    def test_stop_on_stdin(self, how: str) -> None:
        server = self.serve("--stop-on-stdin", stdin_pipe=True)
        with server.connect() as c:
            assert roundtrip(c, b"hi\n") == b"hi\n"
        stdin = server.proc.stdin
        assert stdin is not None
        if how == "line":
            stdin.write(b"stop\n")
            stdin.flush()
        else:
            stdin.close()
        assert server.wait_exit(timeout=10) == 0

    # -- limits -----------------------------------------------------------------------------

    def test_emfile_does_not_spin(self) -> None:
        limit = 64
        server = self.serve(nofile=limit)
        with closing_all([server.connect()]) as clients:
            first = clients[0]
            assert roundtrip(first, b"first\n") == b"first\n"
            # More clients than the server has descriptors; non-blocking connects,
            # as the ones the server cannot accept may stay in the accept queue.
            for _ in range(limit + 40):
                s = socket.socket()
                clients.append(s)
                s.setblocking(False)
                s.connect_ex(server.address)
            # Measure from the server's first EMFILE on: from then on a server that
            # spins on it does so (a fixed half-second wait for it proved nothing).
            server.wait_line(EXHAUSTED_RE)
            # A second: a server that spins on EMFILE burns about all of it (the
            # bound is 20%), and the counters tick in 10 ms (CLK_TCK 100; BSD ps: cs).
            # What an honest server spends falls at the window's start (it accepts
            # and closes the 40 waiting connections, then backs off): in half a
            # second the emulated VM read 21% of a CPU for it, beside a loaded
            # host's other targets (its guest ticks go on while its vCPU waits).
            cpu0, t0 = cpu_seconds(server.pid), time.monotonic()
            time.sleep(1.0)
            cpu1, t1 = cpu_seconds(server.pid), time.monotonic()
            assert server.proc.poll() is None, server.stderr_text()
            assert roundtrip(first, b"still\n") == b"still\n"
        # Every client closed: the server must accept and serve again.
        deadline = time.monotonic() + wait(10)
        while True:
            with server.connect() as c:
                if probe(c, b"again\n") == "echo":
                    break
            assert time.monotonic() < deadline, "the server did not serve again once fds were free"
            time.sleep(0.2)
        if cpu0 is None or cpu1 is None:
            pytest.skip("the server's CPU time is not measurable here (no /proc, no ps)")
        busy = (cpu1 - cpu0) / (t1 - t0)
        assert busy < 0.2, f"server used {busy:.0%} of a CPU while out of descriptors"

    def test_max_conns_refuses_beyond_n(self) -> None:
        server = self.serve("--max-conns", "2")
        with closing_all([server.connect(), server.connect()]) as (a, b):
            assert probe(a) == "echo" and probe(b) == "echo"
            with server.connect() as c:
                data, _how = read_until_closed(c, timeout=10)
                assert data == b""
            stats = server.stats()
            assert stats["open"] == 2 and stats["refused"] >= 1, stats
            assert probe(b) == "echo"
            a.close()
            server.wait_stats(open=1)
            with server.connect() as d:
                assert probe(d) == "echo"

    def test_idle_timeout_reaps_an_idle_connection(self) -> None:
        # The timeout against a busy client that talks 8 times as often: a margin
        # of 8, so a loaded machine's scheduling stalls do not reap the busy one
        # too. 1 s where the suite runs at full scale, 2 s on the slow targets
        # (a stalled emulated VM's clock jumps on, and both judge by it).
        timeout = min(2.0, wait(1.0))
        server = self.serve("--idle-timeout", f"{timeout:g}")
        with closing_all([server.connect(), server.connect()]) as (idle, busy):
            assert probe(idle) == "echo" and probe(busy) == "echo"
            t0 = time.monotonic()
            closed_after = None
            with selectors.DefaultSelector() as sel:
                sel.register(idle, selectors.EVENT_READ)
                while time.monotonic() - t0 < wait(6 * timeout):
                    assert probe(busy, b"tick\n") == "echo"
                    if sel.select(timeout / 8):
                        data, _how = read_until_closed(idle, timeout=2)
                        assert data == b""
                        closed_after = time.monotonic() - t0
                        break
            assert closed_after is not None, "the idle connection was never closed"
            assert closed_after >= timeout / 2, (
                f"closed after {closed_after:.2f}s, before the {timeout:g}s timeout")
            # The busy one, open since t0 as well, has outlived the timeout: the scan
            # that reaped the idle one judged both at the same instant. (A second of
            # ticks more proved nothing beyond this and cost 1 s per backend.)
            assert probe(busy, b"tick\n") == "echo"
            assert server.stats()["open"] == 1

    # -- stats, modes, workers --------------------------------------------------------------

    def test_sigusr1_stats_line(self) -> None:
        server = self.serve()
        zero = {"open": 0, "accepted": 0, "refused": 0, "bytes_in": 0, "bytes_out": 0, "paused": 0}
        assert server.stats() == zero
        with server.connect() as c:
            data = os.urandom(1000)
            assert roundtrip(c, data) == data
            assert server.stats() == {**zero, "open": 1, "accepted": 1, "bytes_in": 1000, "bytes_out": 1000}
        server.wait_stats(open=0, accepted=1)
        assert server.proc.poll() is None

    def test_line_mode(self) -> None:
        server = self.serve("--line-mode")
        with closing_all([server.connect(), server.connect(), server.connect()]) as (c, other, crlf):
            assert roundtrip(c, b"hello\n") == b"hello\n"
            c.sendall(b"wor")
            time.sleep(0.05)
            c.sendall(b"ld\n")
            assert recv_exact(c, 6) == b"world\n"
            assert roundtrip(c, b"a\nb\r\n") == b"a\nb\r\n"
            # Lines before the empty one are echoed, then the connection closes.
            c.sendall(b"last\n\n")
            data, how = read_until_closed(c)
            assert data in (b"last\n", b"last\n\n") and how == "eof", (data, how)
            # A telnet-style empty line (the write-up's protocol) closes too.
            crlf.sendall(b"x\r\n\r\n")
            data, how = read_until_closed(crlf)
            assert data in (b"x\r\n", b"x\r\n\r\n") and how == "eof", (data, how)
            assert roundtrip(other, b"unaffected\n") == b"unaffected\n"

    def test_workers_2_serve_from_two_processes(self) -> None:
        server = self.serve("--workers", "2", "--drain-timeout", "1")
        assert server.ready["workers"] == 2
        m = server.wait_line(READY_RE)
        assert (m["workers"], int(m["pid"])) == ("2", server.pid)
        workers = self._wait_children(server, 2, exclude=())
        n = 40
        with closing_all([]) as clients:
            assert connect_and_probe(server, clients, n) == ["echo"] * n
            # The stats line has no pid: ask one worker at a time.
            accepted = {pid: server.stats(pid)["accepted"] for pid in workers}
        assert sum(accepted.values()) == n, accepted
        assert all(v >= 1 for v in accepted.values()), f"one worker served everything: {accepted}"
        # The parent replaces a worker that dies.
        os.kill(workers[0], signal.SIGKILL)
        self._wait_children(server, 2, exclude=(workers[0],))
        with server.connect() as c:
            assert probe(c) == "echo"
        # SIGTERM to the parent stops the workers too.
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(timeout=10) == 0
        deadline = time.monotonic() + wait(10)
        while server.group_alive():
            assert time.monotonic() < deadline, "a worker outlived the parent"
            time.sleep(0.1)

    @staticmethod
    def _wait_children(server: ServerProcess, n: int, exclude: tuple[int, ...]) -> List[int]:
        deadline = time.monotonic() + wait(15)
        while True:
            kids = [p for p in child_pids(server.pid) if p not in exclude]
            if len(kids) == n:
                return kids
            assert time.monotonic() < deadline, f"expected {n} workers, found {kids}"
            time.sleep(0.1)


class TestSelect(EchoServerTests):
    BACKEND = "select"

    def test_more_than_1024_connections(self) -> None:
        """select: a connection whose fd is at or above FD_SETSIZE is refused, cleanly."""
        with nofile_at_least(MANY_NOFILE), closing_all([]) as clients:
            server = self.serve(nofile=MANY_NOFILE)
            outcomes = connect_and_probe(server, clients, MANY)
            served, refused = outcomes.count("echo"), outcomes.count("closed")
            assert refused >= 1, "no connection refused although the server needed fds >= 1024"
            # The server's own descriptors (listener, multiplexer, stdio...) are few.
            assert served >= 1024 - 64, f"only {served} served"
            # The stats line comes after every refusal line on the same stderr,
            # so once it has been read, so have they (a client may see its
            # close before our reader thread has read the line about it).
            stats = server.stats()
            assert (stats["open"], stats["refused"]) == (served, refused), stats
            lines = server.matching(REFUSED_RE)
            assert len(lines) == refused, server.stderr_text()[-2000:]
            assert all(int(m["fd"]) >= 1024 for m in lines)
            for c in clients[:50]:
                assert probe(c) == "echo"
            for c in clients:
                c.close()
            server.wait_stats(open=0)
            with server.connect() as c:
                assert probe(c) == "echo"
            assert server.proc.poll() is None


class TestPoll(EchoServerTests):
    BACKEND = "poll"


class TestEpoll(EchoServerTests):
    BACKEND = "epoll"


class TestEpollET(EchoServerTests):
    BACKEND = "epoll-et"


class TestKqueue(EchoServerTests):
    BACKEND = "kqueue"


class TestKqueueET(EchoServerTests):
    BACKEND = "kqueue-et"


# -- the command line around serve --------------------------------------------------------------


def test_auto_backend_is_the_ranked_choice(servers: ServerFactory) -> None:
    server = servers.start("auto")
    auto = backends_info()["auto"]
    assert auto in backends_info()["available"]
    assert server.ready["backend"] == auto
    assert server.wait_line(READY_RE)["backend"] == auto


def test_check_exit_status(servers: ServerFactory) -> None:
    server = servers.start("auto")
    ok = run_iomux("check", f"127.0.0.1:{server.port}", "--timeout", "5")
    assert ok.returncode == 0, ok
    assert len((ok.stdout + ok.stderr).strip().splitlines()) == 1, ok
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    # Nothing listens on closed_port now (we bound it and never listened).
    bad = run_iomux("check", f"127.0.0.1:{closed_port}", "--timeout", "5")
    assert bad.returncode == 1, bad
    assert len((bad.stdout + bad.stderr).strip().splitlines()) == 1, bad
    assert "Traceback" not in bad.stderr


def test_backends_lists_one_line_per_available_backend() -> None:
    info = backends_info()
    result = run_iomux("backends")
    assert result.returncode == 0, result
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == info["available"], lines
    marked = [line.split()[0] for line in lines if "(auto)" in line.split()[1:2]]
    assert marked == [info["auto"]], lines


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "no-such-backend"],
        ["--no-such-flag"],
        ["--port", "70000"],
        ["--workers", "0"],
    ],
    ids=["unknown-backend", "bad-flag", "bad-port", "bad-workers"],
)
def test_usage_error_is_one_line_and_status_2(argv: List[str]) -> None:
    # No bad *host* here: resolving one would send a DNS query off this machine.
    result = run_iomux("serve", "--host", "127.0.0.1", "--port", "0", *argv)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ERROR_RE.match(lines[0]), result.stderr
    if "no-such-backend" in argv:
        # The error lists what is available instead.
        assert all(name in lines[0] for name in backends_info()["available"]), lines[0]


def test_unavailable_backend_is_a_one_line_usage_error() -> None:
    info = backends_info()
    missing = [b for b in info["known"] if b not in info["available"] and b != "auto"]
    if not missing:
        pytest.skip(f"every known backend is available on this kernel: {info['known']}")
    result = run_iomux("serve", "--backend", missing[0], "--port", "0")
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ERROR_RE.match(lines[0]), result.stderr


def test_port_in_use_is_a_one_line_runtime_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        result = run_iomux("serve", "--backend", "auto", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ERROR_RE.match(lines[0]), result.stderr
