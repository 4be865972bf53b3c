"""Unit tests of the fault proxy (tests/faults/faultproxy.py), against a tiny threaded echo.

The upstream here is not iomux: a proxy bug must not look like a server bug.
Each toxic is checked for the effect it promises, with tolerant time bounds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Iterator, List, Tuple

import pytest
from faultproxy import FaultProxy, wait_for
from serverproc import pump, recv_exact, stall_window, wait

pytestmark = pytest.mark.suite("faults")


class ThreadedEcho:
    """A blocking echo server, one thread per connection (the reference upstream)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: List[socket.socket] = []
        self.resets = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> Tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
                threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                conn.sendall(data)
        except ConnectionResetError:
            self.resets += 1
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def echo() -> Iterator[ThreadedEcho]:
    server = ThreadedEcho()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def make_proxy(echo: ThreadedEcho) -> Iterator[List[FaultProxy]]:
    proxies: List[FaultProxy] = []
    try:
        yield proxies
    finally:
        for p in proxies:
            p.close()
        for p in proxies:
            assert not p.errors, p.errors


def new_proxy(proxies: List[FaultProxy], echo: ThreadedEcho, **toxics: float) -> FaultProxy:
    proxy = FaultProxy(echo.address, **toxics)  # type: ignore[arg-type]
    proxies.append(proxy)
    return proxy


def echo_through(proxy: FaultProxy, data: bytes, timeout: float = 30) -> Tuple[bytes, float]:
    """Send ``data`` through the proxy while reading the echo; (echo, seconds)."""
    with socket.create_connection(proxy.address, timeout=wait(timeout)) as c:
        t0 = time.monotonic()
        sender = threading.Thread(target=c.sendall, args=(data,), daemon=True)
        sender.start()
        got = recv_exact(c, len(data))
        took = time.monotonic() - t0
        sender.join(wait(timeout))
    return got, took


def test_passthrough_and_half_close(echo: ThreadedEcho, make_proxy: List[FaultProxy]) -> None:
    """No toxic: 2 MiB go through exactly; a FIN is forwarded, and the upstream's comes back."""
    proxy = new_proxy(make_proxy, echo)
    data = os.urandom(2 * 1024 * 1024)
    got, _ = echo_through(proxy, data)
    assert got == data
    with socket.create_connection(proxy.address, timeout=wait(10)) as c:
        c.sendall(b"last words")
        c.shutdown(socket.SHUT_WR)
        assert recv_exact(c, 10) == b"last words"
        assert c.recv(10) == b""  # the upstream's EOF, passed on
    assert wait_for(lambda: all(link.closed for link in proxy.links()), wait(5))


def test_latency_is_added_each_way(echo: ThreadedEcho, make_proxy: List[FaultProxy]) -> None:
    """latency=0.1: a round trip takes at least 0.2 s (two directions), and not absurdly more."""
    proxy = new_proxy(make_proxy, echo, latency=0.1)
    got, took = echo_through(proxy, b"ping")
    assert got == b"ping"
    assert 0.2 <= took < wait(2.0), took


def test_bandwidth_limit(echo: ThreadedEcho, make_proxy: List[FaultProxy]) -> None:
    """bandwidth=256 KiB/s: 256 KiB take at least ~0.9 s through it, and arrive whole."""
    proxy = new_proxy(make_proxy, echo, bandwidth=256 * 1024)
    data = os.urandom(256 * 1024)
    got, took = echo_through(proxy, data)
    assert got == data
    assert 0.9 <= took < wait(10), took


def test_slicing_sends_one_byte_at_a_time(echo: ThreadedEcho, make_proxy: List[FaultProxy]) -> None:
    """slice_size=1: every forwarded byte is its own send() call, both ways."""
    proxy = new_proxy(make_proxy, echo, slice_size=1)
    data = os.urandom(4096)
    got, _ = echo_through(proxy, data)
    assert got == data
    # The last byte may reach the client before the proxy counts it.
    assert wait_for(lambda: proxy.links()[0].down_bytes == 4096, wait(5))
    (link,) = proxy.links()
    assert (link.up_bytes, link.up_sends) == (4096, 4096)
    assert (link.down_bytes, link.down_sends) == (4096, 4096)


def test_stall_then_resume(echo: ThreadedEcho, make_proxy: List[FaultProxy]) -> None:
    """stall(): nothing comes through, even after 0.5 s; resume(): everything does, exactly."""
    proxy = new_proxy(make_proxy, echo)
    with socket.create_connection(proxy.address, timeout=wait(10)) as c:
        c.sendall(b"a")
        assert recv_exact(c, 1) == b"a"
        proxy.stall()
        c.sendall(b"held back")
        c.settimeout(0.5)
        with pytest.raises(socket.timeout):
            c.recv(100)
        proxy.resume()
        c.settimeout(wait(10))
        assert recv_exact(c, 9) == b"held back"


def test_reset_after_n_bytes(echo: ThreadedEcho, make_proxy: List[FaultProxy]) -> None:
    """reset_after=1000: exactly 1000 bytes reach the upstream, then both sides get an RST."""
    proxy = new_proxy(make_proxy, echo, reset_after=1000)
    with socket.create_connection(proxy.address, timeout=wait(10)) as c:
        with contextlib.suppress(OSError):
            c.sendall(os.urandom(5000))
        got = bytearray()
        with pytest.raises(ConnectionResetError):
            while True:
                data = c.recv(65536)
                if not data:
                    break
                got += data
    assert wait_for(lambda: proxy.links()[0].closed, wait(5))
    (link,) = proxy.links()
    assert link.reset and link.up_bytes == 1000
    assert len(got) <= 1000
    assert wait_for(lambda: echo.resets == 1, wait(5)), "the upstream saw no reset"


def test_upstream_down_resets_client(make_proxy: List[FaultProxy]) -> None:
    """No upstream listening: the client's connection is reset, the proxy keeps running."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        proxy = FaultProxy(("127.0.0.1", port))
        make_proxy.append(proxy)
        # The reset may come before connect() returns, or at the first recv.
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)), \
                socket.create_connection(proxy.address, timeout=wait(10)) as c:
            assert c.recv(10) == b"", "data came from nowhere"
            raise ConnectionResetError("EOF")  # a FIN is fine too: no data came
    assert not proxy.errors


def test_pump_fails_fast_on_a_stalled_transfer() -> None:
    """A peer that takes the bytes and never answers: pump gives up once nothing has
    moved for ``stall`` seconds, not after its whole timeout (gVisor's netstack
    stalls made each such test wait out 360 s)."""
    client, silent = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(AssertionError, match="no byte moved for"):
            pump([(client, b"x" * 1000)], timeout=600, stall=0.5)
        assert time.monotonic() - t0 < stall_window(0.5) + 5
    finally:
        client.close()
        silent.close()
