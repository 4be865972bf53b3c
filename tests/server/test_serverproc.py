"""The suites' client helpers on their own (serverproc.py), without an iomux server:
what a test's verdict rests on when a server misbehaves."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest
import serverproc
from serverproc import closing_all, probe_all, pump, pump_gap_summary, wait


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A listener that never accepts: the kernel completes the handshakes, nobody answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield listener


def test_probe_all_with_hung_after_shares_one_deadline(silent_listener: socket.socket) -> None:
    address = silent_listener.getsockname()
    with closing_all([socket.create_connection(address, timeout=wait(5)) for _ in range(5)]) as socks:
        t0 = time.monotonic()
        outcomes = probe_all(socks, [b"x\n"] * len(socks), hung_after=0.5)
        took = time.monotonic() - t0
    assert outcomes == ["hung (TimeoutError)"] * 5 or outcomes == ["hung (timeout)"] * 5, outcomes
    # One shared deadline: five stranded clients cost one timeout, not five in a row.
    assert took < wait(0.5) * 3, f"{took:.2f}s for five stranded clients"


def test_probe_all_without_hung_after_raises_on_a_stranded_client(silent_listener: socket.socket) -> None:
    with socket.create_connection(silent_listener.getsockname(), timeout=0.2) as sock, \
            pytest.raises(socket.timeout):
        probe_all([sock], [b"x\n"])


def test_pump_records_the_longest_gap_of_a_completed_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serverproc, "_healthy_gaps", serverproc._GapRecord())
    assert pump_gap_summary() is None
    ours, theirs = socket.socketpair()

    def late_echo() -> None:
        data = theirs.recv(64)
        time.sleep(0.4)
        theirs.sendall(data)

    echo = threading.Thread(target=late_echo, daemon=True)
    echo.start()
    with ours, theirs:
        (echoed,) = pump([(ours, b"late\n")], timeout=10)
        echo.join(5)
    assert echoed == b"late\n"
    longest = serverproc._healthy_gaps.longest
    assert 0.3 <= longest < 5, longest
    line = pump_gap_summary()
    assert line is not None and "in 1 completed transfers" in line and "stall window" in line, line
