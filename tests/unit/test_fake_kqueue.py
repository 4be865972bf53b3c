"""The kqueue stand-in keeps the FreeBSD kevent() rules its docstring claims.

Each test is one rule of ``sys/kern/kern_event.c`` as kevent(2) documents it;
the backend tests (test_backends.py) rely on these.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator, List

import fake_kqueue as fk
import pytest


@pytest.fixture
def kq() -> fk.Kqueue:
    return fk.Kqueue(fk.Kernel())


@pytest.fixture
def fds() -> Iterator[List[int]]:
    a, b = socket.socketpair()
    try:
        yield [a.fileno(), b.fileno()]
    finally:
        a.close()
        b.close()


def add(fd: int, filt: int = fk.KQ_FILTER_READ, extra: int = 0) -> fk.kevent:
    return fk.kevent(fd, filt, fk.KQ_EV_ADD | extra)


def delete(fd: int, filt: int = fk.KQ_FILTER_READ, extra: int = 0) -> fk.kevent:
    return fk.kevent(fd, filt, fk.KQ_EV_DELETE | extra)


def fields(events: List[fk.kevent]) -> List[Any]:
    return [(e.ident, e.filter, e.flags, e.fflags, e.data) for e in events]


def test_failed_change_with_no_room_raises_and_keeps_the_changes_before(kq: fk.Kqueue, fds: List[int]) -> None:
    with pytest.raises(OSError) as info:
        kq.control([add(fds[0]), delete(fds[1]), add(fds[1])], 0, 0)
    assert info.value.errno == fk.ENOENT
    assert set(kq.knotes) == {(fds[0], fk.KQ_FILTER_READ)}  # the third change never ran


def test_failed_change_with_room_is_an_ev_error_reply_and_the_rest_goes_on(kq: fk.Kqueue, fds: List[int]) -> None:
    kq.kernel.fire(fds[0], fk.KQ_FILTER_READ)
    got = kq.control([add(fds[0]), delete(fds[1]), add(fds[1])], 4, 0)
    assert fields(got) == [(fds[1], fk.KQ_FILTER_READ, fk.KQ_EV_ERROR, 0, fk.ENOENT)]
    assert set(kq.knotes) == {(fds[0], fk.KQ_FILTER_READ), (fds[1], fk.KQ_FILTER_READ)}
    # A call with replies does not scan: the pending read on fds[0] is still there.
    assert fields(kq.control(None, 4, 0)) == [(fds[0], fk.KQ_FILTER_READ, 0, 0, 1)]


def test_receipts_answer_every_change_and_stop_a_call_without_room(kq: fk.Kqueue, fds: List[int]) -> None:
    r = fk.EV_RECEIPT
    got = kq.control([add(fds[0], extra=r), delete(fds[1], extra=r)], 2, 0)
    assert [(e.flags, e.data) for e in got] == [(fk.KQ_EV_ERROR, 0), (fk.KQ_EV_ERROR, fk.ENOENT)]
    # No room: the first receipt returns at once, the second change is never applied.
    assert kq.control([add(fds[1], extra=r), add(fds[1], fk.KQ_FILTER_WRITE)], 0, 0) == []
    assert (fds[1], fk.KQ_FILTER_WRITE) not in kq.knotes


def test_events_survive_change_only_calls(kq: fk.Kqueue, fds: List[int]) -> None:
    kq.control([add(fds[0], extra=fk.KQ_EV_CLEAR)], 0, 0)
    kq.kernel.fire(fds[0], fk.KQ_FILTER_READ)
    kq.control([add(fds[1], fk.KQ_FILTER_WRITE)], 0, 0)
    kq.control(None, 0, 0)
    got = kq.control(None, 4, 0)
    # Returned flags keep EV_CLEAR, never EV_ADD.
    assert fields(got) == [(fds[0], fk.KQ_FILTER_READ, fk.KQ_EV_CLEAR, 0, 1)]
    assert kq.control(None, 4, 0) == []  # EV_CLEAR: delivered once


def test_level_knote_reports_until_the_condition_goes(kq: fk.Kqueue, fds: List[int]) -> None:
    kq.control([add(fds[0])], 0, 0)
    kq.kernel.fire(fds[0], fk.KQ_FILTER_READ, eof=True, fflags=fk.ECONNRESET)
    for _ in range(2):
        assert fields(kq.control(None, 4, 0)) == [(fds[0], fk.KQ_FILTER_READ, fk.KQ_EV_EOF, 54, 1)]
    kq.kernel.settle(fds[0], fk.KQ_FILTER_READ)
    assert kq.control(None, 4, 0) == []


def test_closed_fd_is_ebadf_even_for_a_delete_and_its_knotes_go() -> None:
    kq = fk.Kqueue(fk.Kernel())
    a, b = socket.socketpair()
    fd = a.fileno()
    kq.control([add(fd)], 0, 0)
    a.close()
    b.close()
    assert fields(kq.control([delete(fd)], 1, 0)) == [(fd, fk.KQ_FILTER_READ, fk.KQ_EV_ERROR, 0, fk.EBADF)]
    assert kq.knotes == {}
    with pytest.raises(OSError) as info:
        kq.control([add(fd)], 0, 0)
    assert info.value.errno == fk.EBADF


def test_freebsd_numbers_not_linux_ones() -> None:
    assert (fk.ECONNRESET, fk.KQ_EV_EOF, fk.KQ_EV_ERROR, fk.EV_RECEIPT) == (54, 0x8000, 0x4000, 0x40)
    assert (fk.KQ_FILTER_READ, fk.KQ_FILTER_WRITE) == (-1, -2)
