"""The epoll(7) backends, level- and edge-triggered: one class body, one flag.

Some facts about epoll, and what follows for us:

- The interest list lives in the kernel: epoll_ctl(ADD/MOD/DEL) once per
  change, epoll_wait returns only ready fds. So the cost per wait is O(ready),
  not O(registered), and each epoll_ctl is a system call: the server only
  calls ``modify`` when the set of directions it wants actually changes (write
  interest on when output is pending, off when it drained), never per message.
- Level-triggered (the default) reports an fd as long as it is ready.
  Edge-triggered (EPOLLET) reports it when it *becomes* ready, so a reader that
  stops before EAGAIN is never told about the bytes left behind: with ET the
  server must accept, read and write until EAGAIN. That is ``edge_triggered``.
- EPOLL_CTL_MOD re-evaluates readiness, so an ET registration that is modified
  (e.g. read interest put back after a backpressure pause) is reported again
  if data is waiting. Resuming reads therefore needs no extra read attempt.
- EPOLLERR and EPOLLHUP are always reported, asked for or not; we ask for
  neither and treat both as "try to read/write", which surfaces the errno
  (ECONNRESET, EPIPE) or EOF. EPOLLRDHUP (peer shut its write side, Linux
  2.6.17+) is not needed level-triggered: a half-close shows up as readable
  with a zero-byte recv, which we must handle anyway on every backend.
  Nor do we rely on it edge-triggered: a FIN queued behind the data we just
  read raises no new edge, so a reader that stopped at a short read would
  need EPOLLRDHUP to say the FIN is there, and gVisor's epoll before 20240729
  never sets EPOLLRDHUP (tests/server: test_fin_queued_behind_the_data hangs
  there). So ``native_eof`` stays 0 and edge-triggered reads go on to EAGAIN
  or EOF, one read more per readiness, correct on every kernel we run on.
- An fd is removed from the interest list when its last file reference closes;
  unregistering a closed fd gives EBADF. The server unregisters first.
- ``select.epoll().poll`` takes seconds (float) and returns (fd, mask) pairs;
  the masks are native, which ``poll_raw`` hands to the loop untouched.
"""

from __future__ import annotations

import contextlib
import select

from iomux.backends.base import MaskMultiplexer


class EpollMultiplexer(MaskMultiplexer):
    """epoll(7), level-triggered."""

    name = "epoll"
    edge_triggered = False

    @classmethod
    def available(cls) -> bool:
        return hasattr(select, "epoll")

    def __init__(self) -> None:
        self._kernel = select.epoll()
        self._in = select.EPOLLIN
        self._out = select.EPOLLOUT
        self._err = select.EPOLLERR | select.EPOLLHUP
        self._flag = select.EPOLLET if self.edge_triggered else 0
        self._init_masks()
        # Seconds already, None blocks: the loop calls epoll.poll directly,
        # with no Python frame per wait.
        self.poll_raw = self._kernel.poll  # type: ignore[method-assign]

    def fileno(self) -> int:
        """The epoll instance's own fd."""
        fd: int = self._kernel.fileno()
        return fd

    def unregister(self, fd: int) -> None:
        del self._events[fd]
        # EBADF/ENOENT: the fd was closed first, and closing already removed
        # it from the interest list. Nothing is left to undo.
        with contextlib.suppress(OSError):
            self._kernel.unregister(fd)

    def close(self) -> None:
        super().close()
        self._kernel.close()


class EpollEdgeMultiplexer(EpollMultiplexer):
    """epoll(7) with EPOLLET: report changes only; callers drain until EAGAIN."""

    name = "epoll-et"
    edge_triggered = True
