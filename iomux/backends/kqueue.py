"""The kqueue(2) backends, level and EV_CLEAR: one class body, one flag.

Some facts about kqueue, and what follows for us:

- A registration is a (ident, filter) pair, not an fd: reading and writing are
  two separate knotes (EVFILT_READ, EVFILT_WRITE). Changing the interest of an
  fd means adding or deleting single filters. A filter is removed with a
  kevent of the same ident and filter and the flag EV_DELETE (not by building
  a fresh EV_ADD kevent, which would just re-add it).
- One kevent() call both applies a change list and waits. We apply changes
  at once, every change flagged EV_RECEIPT and with room for one reply per
  change, so the kernel processes the whole list and answers each change
  with an EV_ERROR reply whose ``data`` is its errno (0: applied), the way
  mio does. Without room for replies, FreeBSD's kevent() stops at the first
  failing change, keeps the ones before it and returns -1: one errno for a
  list, and no way to tell which changes went in. With receipts we undo
  exactly the changes that were applied and roll the bookkeeping back.
- A kevent() call that produced any EV_ERROR reply (a receipt counts) returns
  only those replies and does not scan for events (FreeBSD's kqueue_kevent
  returns nerrors before kqueue_scan; macOS skips the scan once it has
  output), so applying changes never takes a pending event off the queue.
- EV_RECEIPT is 0x40 on FreeBSD and macOS; CPython does not export the name.
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
  before closing; we tolerate both errnos anyway. Any other errno on a delete
  leaves that knote in the kernel, so the fd stays registered with what the
  kernel still watches and the error is raised: no event ever comes for an fd
  the bookkeeping does not know.
- An fd registered with no interest has no knote. To let the kernel judge the
  fd all the same (a closed fd is EBADF), ``register(fd, 0)`` adds and deletes
  a read filter in one call.
- No FD_SETSIZE limit; timeouts are seconds (float), None waits for ever.
"""

from __future__ import annotations

import errno
import os
import select

from iomux.backends.base import EVENT_ERROR, EVENT_READ, EVENT_WRITE, Multiplexer

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional

    from iomux.backends.base import Events

_GONE = (errno.EBADF, errno.ENOENT)
# <sys/event.h> on FreeBSD and macOS alike; select has no KQ_EV_RECEIPT.
EV_RECEIPT = 0x40


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
        self._receipt = getattr(sel, "KQ_EV_RECEIPT", EV_RECEIPT)

    def fileno(self) -> int:
        """The kqueue's own fd."""
        fd: int = self._kq.fileno()
        return fd

    def _filters(self, old: int, new: int) -> List[tuple[int, int, bool]]:
        """(our bit, filter, add?) for each filter that changes from ``old`` to ``new``."""
        out = []
        for bit, filt in ((EVENT_READ, self._read), (EVENT_WRITE, self._write)):
            if new & bit and not old & bit:
                out.append((bit, filt, True))
            elif old & bit and not new & bit:
                out.append((bit, filt, False))
        return out

    def _submit(self, fd: int, changes: List[tuple[int, bool]]) -> List[int]:
        """Apply ``(filter, add?)`` changes to ``fd`` in one kevent(); each change's errno (0: applied)."""
        kevent = self._sel.kevent
        flags = {True: self._add | self._receipt, False: self._delete | self._receipt}
        replies = self._kq.control([kevent(fd, filt, flags[add]) for filt, add in changes], len(changes), 0)
        # One EV_ERROR reply per change, in the order of the change list (see
        # the module essay). A reply that did not come back leaves the change's
        # fate unknown: it counts as refused.
        errors = []
        for i, (filt, _) in enumerate(changes):
            kev = replies[i] if i < len(replies) else None
            ok = kev is not None and kev.ident == fd and kev.filter == filt and kev.flags & self._error
            errors.append(int(kev.data) if ok and kev is not None else errno.EIO)
        return errors

    def _apply(self, fd: int, old: int, new: int) -> None:
        todo = self._filters(old, new)
        if not todo:
            return
        errors = self._submit(fd, [(filt, add) for _, filt, add in todo])
        failed = [err for err in errors if err]
        if failed:
            # Undo exactly what went in, so the kernel agrees with the bookkeeping
            # (which still says ``old``); an undo that fails leaves nothing to undo.
            undo = [(filt, not add) for (_, filt, add), err in zip(todo, errors) if not err]
            if undo:
                self._submit(fd, undo)
            raise OSError(failed[0], os.strerror(failed[0]))

    def register(self, fd: int, events: int) -> None:
        self._check_fd(fd)
        if fd in self._events:
            raise KeyError(f"fd {fd} is already registered")
        if events & (EVENT_READ | EVENT_WRITE):
            self._apply(fd, 0, events)
        else:
            # No filter to add: let the kernel judge the fd with an add and a
            # delete in one call (no event can come of it, see the essay).
            added, _ = self._submit(fd, [(self._read, True), (self._read, False)])
            if added:
                raise OSError(added, os.strerror(added))
        self._events[fd] = events

    def modify(self, fd: int, events: int) -> None:
        old = self._events[fd]
        self._apply(fd, old, events)
        self._events[fd] = events

    def unregister(self, fd: int) -> None:
        old = self._events[fd]
        todo = self._filters(old, 0)
        kept = 0
        first = 0
        if todo:
            # Both filters in one call, each reply checked (mio's deregister).
            for (bit, _, _), err in zip(todo, self._submit(fd, [(filt, False) for _, filt, _ in todo])):
                if err and err not in _GONE:
                    kept |= bit
                    first = first or err
        if kept:
            # The kernel still has these knotes: the fd stays registered for them.
            self._events[fd] = kept
            raise OSError(first, os.strerror(first))
        del self._events[fd]

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
