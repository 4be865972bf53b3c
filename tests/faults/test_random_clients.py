"""The fault suite (issue 6): random client behaviour, property-based (hypothesis).

Fault: clients that do anything a TCP client may do, in any order.
Injection: hypothesis draws 1 to 8 clients, each with a list of chunk sizes
(1 byte to 16 KiB) and whether it half-closes (``shutdown(SHUT_WR)``) after
its last chunk, and then one interleaving of every client's steps (a send or
the shutdown) across all clients; whatever echo is ready is read between
steps. One server per backend serves every example.
Must hold: every client gets exactly its own bytes back, in order; a client
that half-closed then gets EOF, with nothing after; and the server ends each
example with no connection open. Failing examples shrink to a minimal one.

Hypothesis is a dev dependency: a target without it skips this module with
the reason, and the rest of the suite stays standard library only.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

# Before the hypothesis imports: a target without hypothesis skips the module here.
hypothesis = pytest.importorskip("hypothesis", reason="not run: hypothesis is not installed in this target")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serverproc import SCALE, ServerProcess, recv_exact, start_server, unavailable_reason, wait  # noqa: E402

pytestmark = pytest.mark.suite("faults")

EXAMPLES = max(10, int(50 * SCALE))


@pytest.fixture(scope="module", params=["select", "poll", "epoll", "epoll-et", "kqueue", "kqueue-et"])
def shared_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server per backend for all of its examples (a server per example would be slow)."""
    backend = str(request.param)
    reason = unavailable_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    tmp: Path = tmp_path_factory.mktemp(f"random-{backend}")
    # Module-scoped, so it lives long: --stop-on-stdin on a pipe from us makes
    # it stop by itself should this test process die before the teardown.
    server = start_server(tmp, backend, "--stop-on-stdin", stdin_pipe=True)
    try:
        yield server
    finally:
        server.close()
    server.assert_no_traceback()


client_strategy = st.fixed_dictionaries({
    "chunks": st.lists(st.integers(min_value=1, max_value=16 * 1024), max_size=12),
    "shutdown": st.booleans(),
})


def _drain(sock: socket.socket, into: bytearray) -> None:
    """Read whatever echo is ready, without blocking (keeps the server from backing up)."""
    # Not MSG_DONTWAIT: on a socket with a timeout, Python waits for readiness
    # (up to the timeout) before the recv, whatever the flags say.
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                return
            into += data
    finally:
        sock.settimeout(timeout)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(clients=st.lists(client_strategy, min_size=1, max_size=8), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_every_client_gets_exactly_its_own_bytes(
    shared_server: ServerProcess, clients: List[Dict[str, Any]], seed: int, data: st.DataObject
) -> None:
    """Random chunk sizes, shutdown points and interleavings: see the module docstring."""
    server = shared_server
    rng = random.Random(seed)
    payloads = [[rng.getrandbits(8 * n).to_bytes(n, "big") for n in c["chunks"]] for c in clients]
    # Step k of client i is its k-th chunk, or its shutdown after the last one.
    steps = [i for i, c in enumerate(clients) for _ in range(len(c["chunks"]) + int(c["shutdown"]))]
    order = data.draw(st.permutations(steps), label="interleaving")
    socks = [server.connect(timeout=10) for _ in clients]
    received = [bytearray() for _ in clients]
    done = [0] * len(clients)
    try:
        for i in order:
            k = done[i]
            if k < len(payloads[i]):
                socks[i].sendall(payloads[i][k])
            else:
                socks[i].shutdown(socket.SHUT_WR)
            done[i] += 1
            for s, r in zip(socks, received):
                _drain(s, r)
        for i, (s, r) in enumerate(zip(socks, received)):
            expected = b"".join(payloads[i])
            if len(r) < len(expected):
                r += recv_exact(s, len(expected) - len(r))
            assert bytes(r) == expected, f"client {i} got {len(r)} bytes, not exactly its own {len(expected)}"
            if clients[i]["shutdown"]:
                s.settimeout(wait(10))
                assert s.recv(1) == b"", f"client {i}: bytes after its echo instead of EOF"
    finally:
        for s in socks:
            s.close()
    server.wait_stats(open=0)
