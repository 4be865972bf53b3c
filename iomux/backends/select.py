"""The select(2) backend.

Some facts about select, and what follows for us:

- select takes three bitmaps of fixed size FD_SETSIZE, 1024 on Linux, glibc
  and the BSDs' defaults. An fd at or above it cannot be put in a set at all:
  CPython's ``select.select`` raises ``ValueError("filedescriptor out of range
  in select()")`` rather than scribble past the bitmap. So ``max_fd = 1024``,
  ``register`` raises ValueError first, and the server refuses (closes, one log
  line) any accepted connection whose fd would not fit, instead of dying.
- It is level-triggered and stateless: the kernel forgets the sets after every
  call, so each call is O(highest fd) in the kernel and O(n) in Python to build
  the lists. Fine for a few hundred connections, which is its place here.
- Errors and hang-ups have no bit of their own: a socket with a pending error
  or a closed peer is reported readable (and writable), and the following
  recv/send returns the error. So EVENT_ERROR is never reported by this backend.
- An fd closed while in a set gives EBADF for the whole call; the server always
  unregisters before it closes.
"""

from __future__ import annotations

import select

from iomux.backends.base import EVENT_READ, EVENT_WRITE, Multiplexer

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Optional, Set

    from iomux.backends.base import Events

FD_SETSIZE = 1024


class SelectMultiplexer(Multiplexer):
    """select(2): portable, level-triggered, limited to fds below FD_SETSIZE."""

    name = "select"
    max_fd = FD_SETSIZE

    @classmethod
    def available(cls) -> bool:
        return hasattr(select, "select")

    def __init__(self) -> None:
        self._events: Dict[int, int] = {}
        self._readers: Set[int] = set()
        self._writers: Set[int] = set()

    def _apply(self, fd: int, events: int) -> None:
        self._events[fd] = events
        if events & EVENT_READ:
            self._readers.add(fd)
        else:
            self._readers.discard(fd)
        if events & EVENT_WRITE:
            self._writers.add(fd)
        else:
            self._writers.discard(fd)

    def register(self, fd: int, events: int) -> None:
        self._check_fd(fd)
        if fd in self._events:
            raise KeyError(f"fd {fd} is already registered")
        self._apply(fd, events)

    def modify(self, fd: int, events: int) -> None:
        if fd not in self._events:
            raise KeyError(f"fd {fd} is not registered")
        self._apply(fd, events)

    def unregister(self, fd: int) -> None:
        del self._events[fd]
        self._readers.discard(fd)
        self._writers.discard(fd)

    def poll(self, timeout: Optional[float]) -> Events:
        if timeout is not None and timeout < 0:
            timeout = 0
        readable, writable, _ = select.select(self._readers, self._writers, (), timeout)
        if not writable:
            return [(fd, EVENT_READ) for fd in readable]
        ready: Dict[int, int] = dict.fromkeys(readable, EVENT_READ)
        for fd in writable:
            ready[fd] = ready.get(fd, 0) | EVENT_WRITE
        return list(ready.items())

    def close(self) -> None:
        self._events.clear()
        self._readers.clear()
        self._writers.clear()
