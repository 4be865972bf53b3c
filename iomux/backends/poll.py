"""The poll(2) backend.

Some facts about poll, and what follows for us:

- poll takes an array of (fd, events) instead of bitmaps, so it has no
  FD_SETSIZE limit: any fd below RLIMIT_NOFILE works. Like select it is
  stateless in the kernel, O(n) per call, and level-triggered.
- ``revents`` may carry bits that were never asked for: POLLERR (a pending
  socket error), POLLHUP (the peer closed, or both directions are shut) and
  POLLNVAL (the fd is not open: a bookkeeping bug, we closed without
  unregistering). All three are reported whatever ``events`` says, so we map
  them to EVENT_ERROR, and the server tries a read, which surfaces the errno
  (or EOF) and closes that connection.
- Python's ``select.poll().poll`` takes its timeout in *milliseconds*, unlike
  select and epoll (seconds). A timeout that rounds down to 0 ms would turn
  a short wait into a busy loop, so we round up.
- A peer that half-closes (SHUT_WR) makes the socket readable with a zero-byte
  read; Linux may add POLLRDHUP only if asked, which we do not need.
"""

from __future__ import annotations

import math
import select

from iomux.backends.base import MaskMultiplexer

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

    from iomux.backends.base import Events


class PollMultiplexer(MaskMultiplexer):
    """poll(2): level-triggered, no fd limit beyond RLIMIT_NOFILE."""

    name = "poll"

    @classmethod
    def available(cls) -> bool:
        return hasattr(select, "poll")

    def __init__(self) -> None:
        self._kernel = select.poll()
        self._in = select.POLLIN
        self._out = select.POLLOUT
        # POLLNVAL means "not an open fd": reported like an error, never asked for.
        self._err = select.POLLERR | select.POLLHUP | select.POLLNVAL
        self._init_masks()

    def poll_raw(self, timeout: Optional[float]) -> Events:
        # Milliseconds, rounded up: a short wait must not become a busy 0 ms loop.
        millis = None if timeout is None else max(0, math.ceil(timeout * 1000))
        ready: Events = self._kernel.poll(millis)
        return ready
