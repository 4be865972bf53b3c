"""The backend registry, and every Multiplexer's behaviour on real socketpairs.

The behaviour is written once (``MultiplexerTests``); each backend is a small
subclass naming its class and, where this kernel lacks the mechanism, its
skip reason (CPython test_selectors style).
"""

from __future__ import annotations

import select
import socket
import time
from typing import Dict, Iterator, List, Tuple, Type

import fake_kqueue
import pytest

from iomux import backends
from iomux.backends.base import EVENT_ERROR, EVENT_READ, EVENT_WRITE, Multiplexer
from iomux.backends.epoll import EpollEdgeMultiplexer, EpollMultiplexer
from iomux.backends.kqueue import KqueueEdgeMultiplexer, KqueueMultiplexer
from iomux.backends.poll import PollMultiplexer
from iomux.backends.select import FD_SETSIZE, SelectMultiplexer
from iomux.errors import UsageError

# -- the registry ----------------------------------------------------------------


def test_known_names_are_the_contract() -> None:
    assert backends.KNOWN == ["select", "poll", "epoll", "epoll-et", "kqueue", "kqueue-et", "auto"]


def test_availability_follows_the_select_module() -> None:
    expected = {"select": hasattr(select, "select"), "poll": hasattr(select, "poll")}
    expected["epoll"] = expected["epoll-et"] = hasattr(select, "epoll")
    expected["kqueue"] = expected["kqueue-et"] = hasattr(select, "kqueue")
    assert set(backends.available()) == {name for name, ok in expected.items() if ok}


def test_auto_is_the_best_available() -> None:
    offered = backends.available()
    best = next(name for name in ("epoll", "kqueue", "poll", "select") if name in offered)
    assert backends.auto() == best
    assert backends.resolve("auto") == best
    assert backends.get("auto") is backends.BACKENDS[best]


def test_auto_ranking_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "available", lambda: ["select", "poll"])
    assert backends.auto() == "poll"
    monkeypatch.setattr(backends, "available", lambda: ["select"])
    assert backends.auto() == "select"
    monkeypatch.setattr(backends, "available", lambda: ["select", "poll", "kqueue", "kqueue-et"])
    assert backends.auto() == "kqueue"


def test_unknown_backend_is_a_usage_error_listing_the_available() -> None:
    with pytest.raises(UsageError) as info:
        backends.get("devpoll")
    assert info.value.status == 2
    assert "devpoll" in info.value.message
    for name in backends.available():
        assert name in info.value.message
    assert "\n" not in info.value.message


def test_unavailable_backend_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "available", lambda: ["select", "poll"])
    with pytest.raises(UsageError) as info:
        backends.get("epoll")
    assert info.value.status == 2
    assert "not available" in info.value.message
    assert "select, poll" in info.value.message


def test_edge_and_level_variants_share_one_body() -> None:
    assert issubclass(EpollEdgeMultiplexer, EpollMultiplexer)
    assert issubclass(KqueueEdgeMultiplexer, KqueueMultiplexer)
    assert EpollEdgeMultiplexer.edge_triggered and not EpollMultiplexer.edge_triggered
    assert KqueueEdgeMultiplexer.edge_triggered and not KqueueMultiplexer.edge_triggered
    # The ET class adds no methods of its own: only the flag and the name differ.
    assert set(vars(EpollEdgeMultiplexer)) <= {"name", "edge_triggered", "__doc__", "__module__", "__abstractmethods__", "_abc_impl"}


# -- behaviour, once for every backend ---------------------------------------------


def ready_map(events: List[Tuple[int, int]]) -> Dict[int, int]:
    merged: Dict[int, int] = {}
    for fd, bits in events:
        merged[fd] = merged.get(fd, 0) | bits
    return merged


def poll_until(mux: Multiplexer, fd: int, bits: int, timeout: float = 2.0) -> int:
    """Poll until ``fd`` reports all of ``bits``; return what it reported."""
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = ready_map(mux.poll(0.1)).get(fd, 0)
        if got & bits == bits:
            return got
    return got


class MultiplexerTests:
    """The Multiplexer contract; subclasses set ``cls``."""

    cls: Type[Multiplexer]

    @pytest.fixture
    def mux(self) -> Iterator[Multiplexer]:
        mux = self.cls()
        try:
            yield mux
        finally:
            mux.close()

    @pytest.fixture
    def pair(self) -> Iterator[Tuple[socket.socket, socket.socket]]:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            yield a, b
        finally:
            a.close()
            b.close()

    def test_nothing_ready_times_out(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, _ = pair
        mux.register(a.fileno(), EVENT_READ)
        start = time.monotonic()
        assert mux.poll(0.1) == []
        # Tolerant: the wait happened (not a busy return), and did not hang.
        assert 0.05 <= time.monotonic() - start < 2.0

    def test_readable_after_data(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), EVENT_READ)
        b.send(b"x")
        bits = poll_until(mux, a.fileno(), EVENT_READ)
        assert bits & EVENT_READ
        assert not bits & EVENT_WRITE  # not asked for

    def test_writable_when_asked(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, _ = pair
        mux.register(a.fileno(), EVENT_WRITE)
        bits = poll_until(mux, a.fileno(), EVENT_WRITE)
        assert bits & EVENT_WRITE and not bits & EVENT_READ

    def test_modify_turns_write_interest_on_and_off(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, _ = pair
        fd = a.fileno()
        mux.register(fd, EVENT_READ)
        assert ready_map(mux.poll(0)).get(fd, 0) & EVENT_WRITE == 0
        mux.modify(fd, EVENT_READ | EVENT_WRITE)
        assert poll_until(mux, fd, EVENT_WRITE) & EVENT_WRITE
        mux.modify(fd, EVENT_READ)
        assert ready_map(mux.poll(0)).get(fd, 0) & EVENT_WRITE == 0

    def test_both_directions_at_once(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        b.send(b"x")
        mux.register(a.fileno(), EVENT_READ | EVENT_WRITE)
        bits = poll_until(mux, a.fileno(), EVENT_READ | EVENT_WRITE)
        assert bits & EVENT_READ and bits & EVENT_WRITE
        # Reported once per fd, even where the kernel reports per filter (kqueue).
        assert [fd for fd, _ in mux.poll(0)].count(a.fileno()) <= 1

    def test_registered_with_no_events_reports_nothing_asked(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), 0)
        b.send(b"x")
        assert ready_map(mux.poll(0.05)).get(a.fileno(), 0) & (EVENT_READ | EVENT_WRITE) == 0

    def test_unregister_stops_reports(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), EVENT_READ)
        b.send(b"x")
        assert poll_until(mux, a.fileno(), EVENT_READ)
        mux.unregister(a.fileno())
        assert a.fileno() not in ready_map(mux.poll(0))

    def test_double_register_and_unknown_fd_are_key_errors(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), EVENT_READ)
        with pytest.raises(KeyError):
            mux.register(a.fileno(), EVENT_READ)
        with pytest.raises(KeyError):
            mux.modify(b.fileno(), EVENT_READ)
        with pytest.raises(KeyError):
            mux.unregister(b.fileno())

    def test_negative_fd_is_a_value_error(self, mux: Multiplexer) -> None:
        with pytest.raises(ValueError):
            mux.register(-1, EVENT_READ)

    def test_peer_close_is_reported_readable(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), EVENT_READ)
        b.close()
        bits = poll_until(mux, a.fileno(), EVENT_READ)
        # EOF is a read of 0 bytes; some kernels add a hang-up (EVENT_ERROR) bit.
        assert bits & EVENT_READ
        assert a.recv(1) == b""

    def test_half_close_is_readable_and_still_writable(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), EVENT_READ | EVENT_WRITE)
        b.shutdown(socket.SHUT_WR)
        bits = poll_until(mux, a.fileno(), EVENT_READ | EVENT_WRITE)
        assert bits & EVENT_READ and bits & EVENT_WRITE
        assert a.recv(1) == b""
        a.send(b"still")
        assert b.recv(10) == b"still"

    def test_poll_raw_masks_agree_with_poll(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), EVENT_READ)
        b.send(b"x")
        raw: Dict[int, int] = {}
        deadline = time.monotonic() + 2.0
        while a.fileno() not in raw and time.monotonic() < deadline:
            raw = ready_map(mux.poll_raw(0.1))
        assert raw[a.fileno()] & mux.native_read
        assert not raw[a.fileno()] & mux.native_write

    def test_level_or_edge(self, mux: Multiplexer, pair: Tuple[socket.socket, socket.socket]) -> None:
        a, b = pair
        mux.register(a.fileno(), EVENT_READ)
        b.send(b"x")
        assert poll_until(mux, a.fileno(), EVENT_READ)
        # The byte is still unread: level-triggered reports it again, edge does not.
        again = ready_map(mux.poll(0.05)).get(a.fileno(), 0)
        if self.cls.edge_triggered:
            assert not again & EVENT_READ
            # Re-arming by modify reports what is waiting (the server's resume after a pause).
            mux.modify(a.fileno(), 0)
            mux.modify(a.fileno(), EVENT_READ)
            assert poll_until(mux, a.fileno(), EVENT_READ) & EVENT_READ
        else:
            assert again & EVENT_READ


class ScalableTests(MultiplexerTests):
    """Backends with no FD_SETSIZE limit take fds past 1024."""

    def test_fd_above_fd_setsize(self, mux: Multiplexer) -> None:
        import os
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft <= FD_SETSIZE + 8:
            pytest.skip(f"RLIMIT_NOFILE is {soft}: cannot open an fd above {FD_SETSIZE}")
        a, b = socket.socketpair()
        high = os.dup2(a.fileno(), FD_SETSIZE + 5)
        try:
            mux.register(high, EVENT_READ)
            b.send(b"x")
            assert poll_until(mux, high, EVENT_READ) & EVENT_READ
            mux.unregister(high)
        finally:
            os.close(high)
            a.close()
            b.close()


class TestSelect(MultiplexerTests):
    cls = SelectMultiplexer

    def test_fd_at_fd_setsize_is_refused_with_value_error(self, mux: Multiplexer) -> None:
        assert mux.max_fd == FD_SETSIZE == 1024
        with pytest.raises(ValueError, match="1024"):
            mux.register(FD_SETSIZE, EVENT_READ)
        mux.register(FD_SETSIZE - 1, 0)  # just below is accepted (bookkeeping only)


class TestPoll(ScalableTests):
    cls = PollMultiplexer


@pytest.mark.skipif(not EpollMultiplexer.available(), reason="no epoll in this kernel's select module")
class TestEpoll(ScalableTests):
    cls = EpollMultiplexer


@pytest.mark.skipif(not EpollMultiplexer.available(), reason="no epoll in this kernel's select module")
class TestEpollEdge(ScalableTests):
    cls = EpollEdgeMultiplexer


@pytest.mark.kqueue
@pytest.mark.skipif(not KqueueMultiplexer.available(), reason="no kqueue in this kernel's select module (a BSD or macOS feature)")
class TestKqueue(ScalableTests):
    cls = KqueueMultiplexer


@pytest.mark.kqueue
@pytest.mark.skipif(not KqueueMultiplexer.available(), reason="no kqueue in this kernel's select module (a BSD or macOS feature)")
class TestKqueueEdge(ScalableTests):
    cls = KqueueEdgeMultiplexer


def test_error_bit_is_distinct() -> None:
    assert (EVENT_READ, EVENT_WRITE, EVENT_ERROR) == (1, 2, 4)


# -- kqueue's bookkeeping, checked on any kernel with a stand-in select module ----
# fake_kqueue models FreeBSD's kevent(); its docstring lists what it does not.

READ, WRITE = fake_kqueue.KQ_FILTER_READ, fake_kqueue.KQ_FILTER_WRITE
ADD, DELETE, CLEAR = fake_kqueue.KQ_EV_ADD, fake_kqueue.KQ_EV_DELETE, fake_kqueue.KQ_EV_CLEAR


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> fake_kqueue.Kernel:
    from iomux.backends import kqueue as kqueue_module

    kern = fake_kqueue.Kernel()
    monkeypatch.setattr(kqueue_module, "select", kern.module())
    return kern


@pytest.fixture
def fds() -> Iterator[List[int]]:
    """Four open fds (two socketpairs) for the stand-in kernel to accept."""
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        yield [s.fileno() for pair in pairs for s in pair]
    finally:
        for pair in pairs:
            for s in pair:
                s.close()


def _knotes(kernel: fake_kqueue.Kernel) -> set[tuple[int, int]]:
    return set(kernel.queues[-1].knotes)


def test_kqueue_removes_a_filter_with_ev_delete_on_the_same_ident(kernel: fake_kqueue.Kernel, fds: List[int]) -> None:
    fd = fds[0]
    mux = KqueueMultiplexer()
    mux.register(fd, EVENT_READ | EVENT_WRITE)
    assert kernel.changes == [(fd, READ, ADD), (fd, WRITE, ADD)]
    assert kernel.calls == [(2, 2)]  # one call, room for a receipt per change
    kernel.changes.clear()
    mux.modify(fd, EVENT_READ)  # write interest off: one EV_DELETE, read untouched
    assert kernel.changes == [(fd, WRITE, DELETE)]
    kernel.changes.clear()
    mux.modify(fd, EVENT_READ)  # no change, no system call
    assert kernel.changes == []
    mux.unregister(fd)
    assert kernel.changes == [(fd, READ, DELETE)]
    assert _knotes(kernel) == set()


def test_kqueue_edge_adds_with_ev_clear(kernel: fake_kqueue.Kernel, fds: List[int]) -> None:
    KqueueEdgeMultiplexer().register(fds[0], EVENT_READ)
    assert kernel.changes == [(fds[0], READ, ADD | CLEAR)]


def test_kqueue_merges_filters_and_maps_eof_errors(kernel: fake_kqueue.Kernel, fds: List[int]) -> None:
    a, b = fds[0], fds[2]
    mux = KqueueMultiplexer()
    mux.register(a, EVENT_READ | EVENT_WRITE)
    mux.register(b, EVENT_READ)
    kernel.fire(a, READ)
    kernel.fire(a, WRITE)
    kernel.fire(b, READ, eof=True, fflags=fake_kqueue.ECONNRESET)  # FreeBSD's 54
    assert dict(mux.poll(0)) == {a: EVENT_READ | EVENT_WRITE, b: EVENT_READ | EVENT_ERROR}
    kernel.settle(a, READ)
    kernel.settle(a, WRITE)
    kernel.fire(b, READ, eof=True)  # a plain EOF (half-close) is only readable
    assert dict(mux.poll(0)) == {b: EVENT_READ}


def test_kqueue_rolls_back_a_half_applied_change(kernel: fake_kqueue.Kernel, fds: List[int]) -> None:
    fd = fds[0]
    mux = KqueueMultiplexer()
    kernel.refuse(fd, WRITE, ADD, fake_kqueue.ENOMEM)  # the EVFILT_WRITE add fails
    with pytest.raises(OSError) as info:
        mux.register(fd, EVENT_READ | EVENT_WRITE)
    assert info.value.errno == fake_kqueue.ENOMEM
    # The read filter that went in beside the failure is deleted again.
    assert kernel.changes == [(fd, READ, ADD), (fd, WRITE, ADD), (fd, READ, DELETE)]
    assert _knotes(kernel) == set()
    with pytest.raises(KeyError):
        mux.unregister(fd)  # and the fd is not registered
    # A failed modify keeps the old interest, in the kernel and in the bookkeeping.
    mux.register(fd, EVENT_READ)
    kernel.refuse(fd, WRITE, ADD, fake_kqueue.ENOMEM)
    with pytest.raises(OSError):
        mux.modify(fd, EVENT_WRITE)
    assert _knotes(kernel) == {(fd, READ)}
    mux.modify(fd, EVENT_READ)  # still READ: no change, so no call
    mux.unregister(fd)
    assert _knotes(kernel) == set()


@pytest.mark.parametrize("edge", [False, True], ids=["level", "edge"])
def test_kqueue_unregister_failure_leaves_no_unknown_knote(kernel: fake_kqueue.Kernel, fds: List[int], edge: bool) -> None:
    # Defect 6 of issue 12: a delete refused with an errno other than EBADF/ENOENT.
    fd = fds[0]
    mux = (KqueueEdgeMultiplexer if edge else KqueueMultiplexer)()
    mux.register(fd, EVENT_READ | EVENT_WRITE)
    kernel.refuse(fd, READ, DELETE, fake_kqueue.EINVAL)
    with pytest.raises(OSError) as info:
        mux.unregister(fd)
    assert info.value.errno == fake_kqueue.EINVAL
    # The write filter is gone; the read knote the kernel kept is still the
    # backend's, so its events belong to a registered fd.
    assert _knotes(kernel) == {(fd, READ)}
    kernel.fire(fd, READ)
    kernel.fire(fd, WRITE)
    assert mux.poll(0) == [(fd, EVENT_READ)]
    with pytest.raises(KeyError):
        mux.register(fd, EVENT_READ)  # still registered
    mux.unregister(fd)  # the second try deletes what is left
    assert _knotes(kernel) == set()
    assert mux.poll(0) == []


def test_kqueue_unregister_tolerates_ebadf_and_enoent(kernel: fake_kqueue.Kernel) -> None:
    a, b = socket.socketpair()
    mux = KqueueMultiplexer()
    try:
        mux.register(a.fileno(), EVENT_READ | EVENT_WRITE)
        mux.register(b.fileno(), EVENT_READ)
        # macOS answers ENOENT where FreeBSD answers EBADF (closed fd, below).
        kernel.refuse(b.fileno(), READ, DELETE, fake_kqueue.ENOENT)
        mux.unregister(b.fileno())
        fd = a.fileno()
    finally:
        a.close()
        b.close()
    mux.unregister(fd)  # closed: FreeBSD's EBADF for both deletes
    assert kernel.changes[-2:] == [(fd, READ, DELETE), (fd, WRITE, DELETE)]
    with pytest.raises(KeyError):
        mux.unregister(fd)


def test_kqueue_register_with_no_events_asks_the_kernel(kernel: fake_kqueue.Kernel, fds: List[int]) -> None:
    # Defect 7 of issue 12: the contract says "OSError: the kernel refused".
    a, b = socket.socketpair()
    closed = a.fileno()
    a.close()
    b.close()
    mux = KqueueMultiplexer()
    with pytest.raises(OSError) as info:
        mux.register(closed, 0)
    assert info.value.errno == fake_kqueue.EBADF
    with pytest.raises(KeyError):
        mux.unregister(closed)
    # An open fd is accepted, with no knote left behind and no event taken.
    kernel.fire(fds[1], READ)
    mux.register(fds[1], EVENT_READ)
    mux.register(fds[0], 0)
    assert _knotes(kernel) == {(fds[1], READ)}
    assert mux.poll(0) == [(fds[1], EVENT_READ)]
    mux.modify(fds[0], EVENT_READ)
    assert _knotes(kernel) == {(fds[0], READ), (fds[1], READ)}


def test_kqueue_changes_never_consume_pending_events(kernel: fake_kqueue.Kernel, fds: List[int]) -> None:
    mux = KqueueEdgeMultiplexer()
    mux.register(fds[0], EVENT_READ)
    kernel.fire(fds[0], READ)
    mux.register(fds[1], EVENT_WRITE)  # a change-only call while an event waits
    mux.modify(fds[1], EVENT_READ)
    assert mux.poll(0) == [(fds[0], EVENT_READ)]
    assert mux.poll(0) == []  # EV_CLEAR: once
    mux.modify(fds[0], 0)
    mux.modify(fds[0], EVENT_READ)  # re-adding re-evaluates: reported again
    assert mux.poll(0) == [(fds[0], EVENT_READ)]
