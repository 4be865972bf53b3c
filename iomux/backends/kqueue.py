"""The kqueue(2) backends, level and EV_CLEAR: one class body, one flag.

Some facts about kqueue, and what follows for us:

- A registration is a (ident, filter) pair, not an fd: reading and writing are
  two separate knotes (EVFILT_READ, EVFILT_WRITE). Changing the interest of an
  fd means adding or deleting single filters. A filter is removed with a
  kevent of the same ident and filter and the flag EV_DELETE (not by building
  a fresh EV_ADD kevent, which would just re-add it).
- One kevent() call both applies a change list and waits; we apply changes
  at once (max_events=0, timeout 0) so an error is raised by the call that
  caused it, and the bookkeeping can be rolled back.
- Events come one per (ident, filter): an fd ready both ways appears twice,
  so ``poll`` merges them per fd.
- EV_EOF in ``flags`` means the peer shut down (a half-close on the read
  filter, a reset or closed peer on the write filter); for sockets ``fflags``
  then holds the pending socket error, if any (e.g. ECONNRESET). A read EOF is
  only "readable" for us (recv returns 0); EV_EOF with a non-zero fflags is
  EVENT_ERROR. EV_ERROR in ``flags`` (an error applying a change) carries the
  errno in ``data``.
- EV_CLEAR resets the knote's state after it is delivered: edge-triggered, the
  same contract as EPOLLET (drain until EAGAIN). Re-adding a filter with
  EV_ADD re-evaluates it, so resuming reads after a pause is reported again.
- Closing an fd removes its knotes. Deleting a knote of a closed fd fails:
  FreeBSD reports this using EBADF, macOS uses ENOENT. The server unregisters
  before closing; we tolerate both errnos anyway.
- No FD_SETSIZE limit; timeouts are seconds (float), None waits for ever.
"""

from __future__ import annotations

import errno
import select
from typing import Any, Dict, List, Optional

from iomux.backends.base import EVENT_ERROR, EVENT_READ, EVENT_WRITE, Events, Multiplexer

_GONE = (errno.EBADF, errno.ENOENT)


class KqueueMultiplexer(Multiplexer):
    """kqueue(2), level-triggered."""

    name = "kqueue"
    edge_triggered = False

    @classmethod
    def available(cls) -> bool:
        return hasattr(select, "kqueue")

    def __init__(self) -> None:
        sel: Any = select  # kqueue names are absent from Linux's typeshed view
        self._sel = sel
        self._kq = sel.kqueue()
        self._events: Dict[int, int] = {}
        self._read = sel.KQ_FILTER_READ
        self._write = sel.KQ_FILTER_WRITE
        self._add = sel.KQ_EV_ADD | (sel.KQ_EV_CLEAR if self.edge_triggered else 0)
        self._delete = sel.KQ_EV_DELETE
        self._eof = sel.KQ_EV_EOF
        self._error = sel.KQ_EV_ERROR

    def fileno(self) -> int:
        """The kqueue's own fd."""
        fd: int = self._kq.fileno()
        return fd

    def _changes(self, fd: int, old: int, new: int) -> List[Any]:
        kevent = self._sel.kevent
        changes = []
        for bit, filt in ((EVENT_READ, self._read), (EVENT_WRITE, self._write)):
            if new & bit and not old & bit:
                changes.append(kevent(fd, filt, self._add))
            elif old & bit and not new & bit:
                changes.append(kevent(fd, filt, self._delete))
        return changes

    def _apply(self, fd: int, old: int, new: int) -> None:
        changes = self._changes(fd, old, new)
        if not changes:
            return
        try:
            self._kq.control(changes, 0, 0)
        except OSError:
            # With no room for events, kevent() stops at the first failing change
            # and keeps the ones before it: undo those one by one, then re-raise,
            # so the kernel agrees with our bookkeeping (which still says ``old``).
            for undo in self._changes(fd, new, old):
                try:
                    self._kq.control([undo], 0, 0)
                except OSError:
                    continue  # this one was never applied
            raise

    def register(self, fd: int, events: int) -> None:
        self._check_fd(fd)
        if fd in self._events:
            raise KeyError(f"fd {fd} is already registered")
        self._apply(fd, 0, events)
        self._events[fd] = events

    def modify(self, fd: int, events: int) -> None:
        old = self._events[fd]
        self._apply(fd, old, events)
        self._events[fd] = events

    def unregister(self, fd: int) -> None:
        old = self._events.pop(fd)
        # Delete filter by filter: one failing (already gone) must not keep the other.
        for change in self._changes(fd, old, 0):
            try:
                self._kq.control([change], 0, 0)
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise

    def poll(self, timeout: Optional[float]) -> Events:
        if timeout is not None and timeout < 0:
            timeout = 0
        max_events = max(1, 2 * len(self._events))
        ready: Dict[int, int] = {}
        for kev in self._kq.control(None, max_events, timeout):
            fd = kev.ident
            bits = ready.get(fd, 0)
            if kev.flags & self._error:
                bits |= EVENT_ERROR
            elif kev.filter == self._read:
                bits |= EVENT_READ
            elif kev.filter == self._write:
                bits |= EVENT_WRITE
            if kev.flags & self._eof and kev.fflags:
                bits |= EVENT_ERROR
            ready[fd] = bits
        return list(ready.items())

    def close(self) -> None:
        self._events.clear()
        self._kq.close()


class KqueueEdgeMultiplexer(KqueueMultiplexer):
    """kqueue(2) with EV_CLEAR: report changes only; callers drain until EAGAIN."""

    name = "kqueue-et"
    edge_triggered = True
