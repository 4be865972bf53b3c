"""Echo state of one connection, without the socket (h11 style).

The event loop owns the socket and the multiplexer; this module owns what an
echo connection *is*: the bytes waiting to go out, the watermarks that pause
and resume reading, half-close, and line mode. The loop feeds it what it read
and asks it what to send and which directions it wants, so all of this is
unit-testable with plain bytes.

Output buffer: one ``bytearray`` and an offset. Sending consumes from the
offset (no copy per partial write); the consumed head is cut off only when it
is large (amortised O(1) per byte), or dropped at once when everything went.

Backpressure: when more than ``high_water`` bytes are pending, stop reading
(``paused``) until the peer has taken enough that at most ``low_water`` are
left. A client that writes and never reads then holds at most ``high_water``
plus one read's worth of our memory.

Line mode (the write-up's protocol): input is echoed line by line, each line
with its terminator; an empty line (``\\n`` or ``\\r\\n``) closes the connection
after everything before it is sent. A partial line longer than ``high_water``
is echoed as it is, so a peer that never sends a newline cannot grow our
memory either.
"""

from __future__ import annotations

from iomux.backends.base import EVENT_READ, EVENT_WRITE

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Union

    Bytes = Union[bytes, bytearray, memoryview]

# Cut the sent head off the output buffer only past this size: smaller heads
# are cheaper to keep than to move.
_COMPACT_AT = 64 * 1024


class Connection:
    """The echo state of one connection: output buffer, watermarks, half-close, line mode."""

    __slots__ = (
        "closing",
        "eof",
        "events",
        "high_water",
        "last_active",
        "line_mode",
        "low_water",
        "out",
        "out_off",
        "partial",
        "paused",
        "pauses",
    )

    def __init__(self, high_water: int = 262144, low_water: int = 65536, line_mode: bool = False) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        self.high_water = high_water
        self.low_water = low_water
        self.line_mode = line_mode
        self.out = bytearray()
        self.out_off = 0
        self.partial = bytearray()  # line mode: an incomplete line
        self.paused = False  # reading stopped by backpressure
        self.eof = False  # the peer shut its write side (or we saw EOF)
        self.closing = False  # line mode: an empty line asked us to close
        self.pauses = 0  # how many times backpressure paused reading
        self.events = 0  # the directions last registered with the multiplexer
        self.last_active = 0.0  # monotonic time of the last byte moved (idle timeout)

    # -- input ----------------------------------------------------------------

    def received(self, data: Bytes) -> None:
        """Take bytes read from the peer; what must be echoed is queued for output."""
        if self.closing:
            return  # after an empty line in line mode, the rest is never echoed
        if not self.line_mode:
            self.out += data
        else:
            self._received_lines(data)
        self._check_pause()

    def _received_lines(self, data: Bytes) -> None:
        buf = self.partial
        buf += data
        start = 0  # buf[:start] holds complete, non-empty lines
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if end == start or (end == start + 1 and buf[start] == 0x0D):  # "\n" or "\r\n"
                self.out += buf[:start]
                self.closing = True
                buf.clear()
                return
            start = end + 1
        if start:
            self.out += buf[:start]
            del buf[:start]
        if len(buf) > self.high_water:
            self.out += buf
            buf.clear()

    def read_eof(self) -> None:
        """The peer shut down its write side: echo what is queued, then close."""
        self.eof = True
        if self.partial:
            # The last line had no terminator; echo it rather than lose it.
            self.out += self.partial
            self.partial.clear()

    def queue(self, data: Bytes) -> None:
        """Queue bytes the loop read and could not send at once (the unsent tail)."""
        self.out += data
        self._check_pause()

    # -- output ---------------------------------------------------------------

    def pending(self) -> int:
        """Bytes waiting to be sent."""
        return len(self.out) - self.out_off

    def output(self) -> memoryview:
        """The bytes to send next (a view: do not keep it past ``sent``)."""
        return memoryview(self.out)[self.out_off :]

    def sent(self, n: int) -> None:
        """``n`` bytes of ``output()`` went out."""
        off = self.out_off + n
        if off >= len(self.out):
            self.out.clear()
            off = 0
        elif off >= _COMPACT_AT and off * 2 >= len(self.out):
            del self.out[:off]
            off = 0
        self.out_off = off
        if self.paused and len(self.out) - off <= self.low_water:
            self.paused = False

    def _check_pause(self) -> None:
        if not self.paused and len(self.out) - self.out_off > self.high_water:
            self.paused = True
            self.pauses += 1

    # -- what the loop should do ----------------------------------------------

    def wants(self) -> int:
        """The directions to watch now: EVENT_READ unless paused or done reading,
        EVENT_WRITE while output is pending."""
        events = 0
        if not (self.paused or self.eof or self.closing):
            events = EVENT_READ
        if len(self.out) > self.out_off:
            events |= EVENT_WRITE
        return events

    def done(self) -> bool:
        """True when the connection should be closed: reading is over and nothing is pending."""
        return (self.eof or self.closing) and len(self.out) == self.out_off
