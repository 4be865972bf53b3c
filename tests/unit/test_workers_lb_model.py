"""--workers on FreeBSD, against a model of SO_REUSEPORT_LB as sys/netinet/in_pcb.c keeps it.

No kernel here has SO_REUSEPORT_LB, so the supervisor's socket plan runs
against ``LbPort``: one local address and port of a FreeBSD kernel, with

- the bind conflict rule of in_pcbbind_setup: a bind meets an existing socket
  of the port, and fails with EADDRINUSE unless both have SO_REUSEPORT or
  both have SO_REUSEPORT_LB;
- the load-balancing group as in_pcbinslbgrouphash/in_pcbremlbgrouphash keep
  it: a list ``il_inp`` of bound sockets, a new one appended at bind() (or at
  listen() on kernels with ``il_pending``), a closed one replaced by the last;
- the SYN lookup of in_pcblookup_lbgroup: ``il_inp[hash % il_inpcnt]``, with
  no check that the socket listens; a SYN meeting a socket that does not
  listen is reset (tcp_input's dropwithreset).

The supervisor's own calls go through ``open_listener``, which the test
replaces by one that opens model sockets in the same order of steps as
iomux.server.open_listener (options, bind, then listen unless told not to).
Forked workers share their parent's sockets and make no calls of their own,
so the model sees everything the parent does.
"""

from __future__ import annotations

import errno
import random
import sys
from typing import Iterator, List, Optional

import pytest

from iomux import workers
from iomux.server import ServerConfig

SO_REUSEADDR = 0x0004  # FreeBSD's <sys/socket.h>
SO_REUSEPORT = 0x0200
SO_REUSEPORT_LB = workers.FREEBSD_SO_REUSEPORT_LB


class ModelSocket:
    """A TCP socket of the model: its options, and whether it is bound and listening."""

    def __init__(self, port: LbPort) -> None:
        self.port = port
        self.options = 0
        self.bound = False
        self.listening = False
        self.closed = False

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if value:
            self.options |= option

    def bind(self) -> None:
        self.port.bind(self)
        self.bound = True

    def listen(self) -> None:
        self.listening = True
        self.port.listened(self)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port.number)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.port.closed(self)


class LbPort:
    """127.0.0.1:number on a FreeBSD kernel (see the module docstring)."""

    def __init__(self, number: int, il_pending: bool) -> None:
        self.number = number
        self.il_pending = il_pending
        self.bound: List[ModelSocket] = []  # the port's inpcbs
        self.il_inp: List[ModelSocket] = []  # the load-balancing group
        self.pending: List[ModelSocket] = []  # il_pending (newer kernels only)

    def bind(self, sock: ModelSocket) -> None:
        for t in self.bound:
            if not (sock.options & t.options & SO_REUSEPORT) and not (sock.options & t.options & SO_REUSEPORT_LB):
                raise OSError(errno.EADDRINUSE, "Address already in use")
        self.bound.append(sock)
        if sock.options & SO_REUSEPORT_LB:
            (self.pending if self.il_pending else self.il_inp).append(sock)

    def listened(self, sock: ModelSocket) -> None:
        if sock in self.pending:
            self.pending.remove(sock)
            self.il_inp.append(sock)

    def closed(self, sock: ModelSocket) -> None:
        if sock in self.bound:
            self.bound.remove(sock)
        if sock in self.pending:
            self.pending.remove(sock)
        if sock in self.il_inp:
            i = self.il_inp.index(sock)
            self.il_inp[i] = self.il_inp[-1]  # in_pcbremlbgrouphash: the last fills the hole
            self.il_inp.pop()

    def syn(self, pkthash: int) -> str:
        """What a SYN with this 4-tuple hash meets: 'queued' or 'reset'."""
        sock: Optional[ModelSocket]
        if self.il_inp:
            sock = self.il_inp[pkthash % len(self.il_inp)]
        else:
            sock = next((s for s in self.bound if s.listening), None)  # the plain wildcard lookup
        return "queued" if sock is not None and sock.listening else "reset"

    def open_listener(self, host: str, number: int, reuse_option: Optional[int] = None,
                      listen: bool = True) -> ModelSocket:
        """iomux.server.open_listener's steps, on a model socket."""
        assert number in (0, self.number)
        sock = ModelSocket(self)
        sock.setsockopt(0, SO_REUSEADDR, 1)
        if reuse_option is not None:
            sock.setsockopt(0, reuse_option, 1)
        try:
            sock.bind()
        except OSError:
            sock.close()
            raise
        if listen:
            sock.listen()
        return sock

    def resets(self, syns: int, seed: int = 12) -> int:
        rng = random.Random(seed)
        return sum(self.syn(rng.getrandbits(32)) == "reset" for _ in range(syns))


@pytest.fixture(params=[False, True], ids=["freebsd-12-14", "il_pending"])
def port(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[LbPort]:
    model = LbPort(40123, il_pending=request.param)
    monkeypatch.setattr(workers, "open_listener", model.open_listener)
    monkeypatch.setattr(sys, "platform", "freebsd14")
    yield model


def every_member_listens(port: LbPort) -> bool:
    return all(s.listening for s in port.il_inp)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_supervisor_leaves_no_member_that_does_not_listen(port: LbPort, n: int) -> None:
    assert workers.reuse_port_option() == SO_REUSEPORT_LB  # FreeBSD with Python 3.11
    sup = workers.Supervisor(ServerConfig(port=0, workers=n), object)  # type: ignore[arg-type]
    try:
        assert every_member_listens(port), [(s.options, s.listening) for s in port.il_inp]
        assert port.resets(2000) == 0
        assert len(port.il_inp) == n and len(set(map(id, sup.listeners))) == n
        # A worker's death closes only its copy; the parent's keeps the member
        # listening, so nothing changes for the kernel while it is restarted.
        # Another program cannot take the port meanwhile.
        with pytest.raises(OSError) as info:
            port.bind(ModelSocket(port))
        assert info.value.errno == errno.EADDRINUSE
        sup.close_listeners()  # the parent starts stopping
        assert port.il_inp == [] and port.bound == []
    finally:
        sup.close()


@pytest.mark.parametrize("n", [2, 4])
def test_the_model_resets_one_syn_in_n_plus_1_for_a_bound_only_holder(port: LbPort, n: int) -> None:
    # The plan before issue 12: a holder bound with SO_REUSEPORT_LB that never
    # listens, then each worker's listener. The model must see the defect.
    holder = port.open_listener("127.0.0.1", 0, reuse_option=SO_REUSEPORT_LB, listen=False)
    listeners = [port.open_listener("127.0.0.1", port.number, reuse_option=SO_REUSEPORT_LB) for _ in range(n)]
    resets = port.resets(6000)
    if port.il_pending:
        assert resets == 0  # newer kernels keep the holder out of the group
    else:
        assert 0.6 / (n + 1) < resets / 6000 < 1.4 / (n + 1), resets
    holder.close()
    for sock in listeners:
        sock.close()
    assert port.bound == [] and port.il_inp == []


def test_a_closed_member_is_replaced_by_the_last(port: LbPort) -> None:
    socks = [port.open_listener("127.0.0.1", 0, reuse_option=SO_REUSEPORT_LB) for _ in range(3)]
    socks[0].close()
    assert port.il_inp == [socks[2], socks[1]]
    for sock in socks[1:]:
        sock.close()
