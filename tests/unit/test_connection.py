"""The echo state of one connection, without sockets: buffers, watermarks, half-close, line mode."""

from __future__ import annotations

import pytest

from iomux.backends.base import EVENT_READ, EVENT_WRITE
from iomux.connection import Connection


def drain(conn: Connection, chunk: int = 1 << 30) -> bytes:
    """Send everything pending in pieces of at most ``chunk`` bytes; return what went."""
    out = bytearray()
    while conn.pending():
        view = conn.output()
        piece = bytes(view[:chunk])
        del view
        out += piece
        conn.sent(len(piece))
    return bytes(out)


def paused(conn: Connection) -> bool:
    # A call, not the attribute: the state changes under method calls, which a
    # type checker narrowing on ``assert not conn.paused`` would not see.
    return conn.paused


def closing(conn: Connection) -> bool:
    return conn.closing


def test_echo_mode_queues_what_it_received() -> None:
    conn = Connection()
    conn.received(b"hello ")
    conn.received(memoryview(b"world"))
    assert conn.pending() == 11
    assert drain(conn) == b"hello world"
    assert conn.pending() == 0


def test_partial_writes_keep_the_unsent_tail_in_order() -> None:
    conn = Connection()
    payload = bytes(range(256)) * 1000
    conn.received(payload)
    assert drain(conn, chunk=777) == payload


def test_the_sent_head_is_compacted_so_the_buffer_does_not_grow() -> None:
    conn = Connection(high_water=1 << 30, low_water=0)
    for _ in range(100):
        conn.received(b"x" * 10000)
        view = conn.output()
        n = len(view) - 10
        del view
        conn.sent(n)  # keep a small tail each round
    assert conn.pending() == 10
    assert len(conn.out) < 200_000


def test_write_interest_only_while_output_is_pending() -> None:
    conn = Connection()
    assert conn.wants() == EVENT_READ
    conn.received(b"abc")
    assert conn.wants() == EVENT_READ | EVENT_WRITE
    drain(conn)
    assert conn.wants() == EVENT_READ


def test_backpressure_pauses_above_high_and_resumes_at_low() -> None:
    conn = Connection(high_water=1000, low_water=100)
    conn.received(b"a" * 1000)
    assert not paused(conn)  # at the mark is not above it
    conn.received(b"a")
    assert paused(conn) and conn.pauses == 1
    assert conn.wants() == EVENT_WRITE  # no read interest while paused
    conn.sent(800)
    assert paused(conn)  # 201 left, still above low water
    conn.sent(101)
    assert not paused(conn)  # 100 left: at low water, reading resumes
    assert conn.wants() == EVENT_READ | EVENT_WRITE
    conn.received(b"b" * 1000)
    assert paused(conn) and conn.pauses == 2


def test_queue_of_an_unsent_tail_counts_toward_backpressure() -> None:
    conn = Connection(high_water=10, low_water=5)
    conn.queue(b"0123456789A")
    assert paused(conn)


def test_watermarks_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        Connection(high_water=10, low_water=20)


def test_half_close_flushes_then_is_done() -> None:
    conn = Connection()
    conn.received(b"last words")
    conn.read_eof()
    assert not conn.done()
    assert conn.wants() == EVENT_WRITE  # no more reading after EOF
    assert drain(conn) == b"last words"
    assert conn.done()
    assert conn.wants() == 0


def test_eof_with_nothing_pending_is_done_at_once() -> None:
    conn = Connection()
    conn.read_eof()
    assert conn.done()


def test_line_mode_echoes_complete_lines_only() -> None:
    conn = Connection(line_mode=True)
    conn.received(b"hel")
    assert conn.pending() == 0
    conn.received(b"lo\nwor")
    assert drain(conn) == b"hello\n"
    conn.received(b"ld\r\n")
    assert drain(conn) == b"world\r\n"
    assert not conn.done()


@pytest.mark.parametrize("empty", [b"\n", b"\r\n"])
def test_line_mode_empty_line_closes_after_the_lines_before_it(empty: bytes) -> None:
    conn = Connection(line_mode=True)
    conn.received(b"one\ntwo\n" + empty + b"never echoed\n")
    assert closing(conn)
    assert conn.wants() == EVENT_WRITE
    assert drain(conn) == b"one\ntwo\n"
    assert conn.done()
    conn.received(b"more\n")  # after the empty line, input is ignored
    assert conn.pending() == 0


def test_line_mode_a_lone_carriage_return_is_not_an_empty_line() -> None:
    conn = Connection(line_mode=True)
    conn.received(b"\rx\n")
    assert not closing(conn)
    assert drain(conn) == b"\rx\n"


def test_line_mode_empty_line_split_across_reads() -> None:
    conn = Connection(line_mode=True)
    conn.received(b"a\n\r")
    assert not closing(conn)
    conn.received(b"\n")
    assert closing(conn)
    assert drain(conn) == b"a\n"


def test_line_mode_an_endless_line_is_echoed_not_hoarded() -> None:
    conn = Connection(high_water=100, low_water=10, line_mode=True)
    conn.received(b"x" * 150)
    assert len(conn.partial) == 0
    assert drain(conn) == b"x" * 150


def test_line_mode_eof_echoes_the_unterminated_last_line() -> None:
    conn = Connection(line_mode=True)
    conn.received(b"a\nb")
    conn.read_eof()
    assert drain(conn) == b"a\nb"
    assert conn.done()
