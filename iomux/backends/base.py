"""The Multiplexer interface: the one contract every backend implements.

A multiplexer watches file descriptors and says which are ready. It knows
nothing of sockets, buffers or echo; the server (``iomux.server``) decides
what to read and write, and tells the multiplexer which directions it cares
about with ``register``/``modify``/``unregister``.

Our event bits are our own, independent of any kernel's constants:
``EVENT_READ``, ``EVENT_WRITE`` and ``EVENT_ERROR``. Every backend translates,
and callers always test bits with ``&`` (never ``==``: a kernel may report
several conditions at once, e.g. EPOLLIN|EPOLLHUP).

For the server's hot loop there is a second, faster way to read events:
``poll_raw`` returns the kernel's own masks untranslated, and the class
attributes ``native_read``/``native_write`` say which native bits mean "try
reading"/"try writing". ``poll`` is the portable form, ``poll_raw`` saves one
translation per event where the kernel hands us a mask already.
"""

from __future__ import annotations

import abc

# The type names are for the checker only. Importing typing cost 9.7 M of the
# 120.5 M instructions that `iomux serve --stop-on-stdin </dev/null` took from
# exec to exit (callgrind, Debian 12's Python 3.11, PYTHONHASHSEED=0, python -S),
# and the test suites start some 350 servers per target, on kernels where Python
# starts slowly. Every module on serve's path imports it this way (mypy takes any
# constant named TYPE_CHECKING as true); a test checks that serve never imports it.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar, Dict, List, Optional, Tuple

    Events = List[Tuple[int, int]]

EVENT_READ = 1
EVENT_WRITE = 2
EVENT_ERROR = 4


class Multiplexer(abc.ABC):
    """Readiness notification for a set of file descriptors.

    Class attributes:
        name: the backend's name on the command line (``epoll-et``).
        edge_triggered: True if a readiness is reported once per change, so the
            caller must read/write/accept until EAGAIN before waiting again.
        max_fd: the largest fd + 1 this mechanism can watch, or None if the
            only bound is the process's RLIMIT_NOFILE.
        native_read: bits of ``poll_raw`` masks after which the caller should
            try to read (includes error and hang-up bits: the read surfaces them).
        native_write: bits of ``poll_raw`` masks after which the caller should
            try to write.
        native_eof: bits of ``poll_raw`` masks that say the peer's FIN is
            already queued, so an edge-triggered reader must read on to EOF
            (no new edge will come for it); 0 when the backend cannot say, and
            then an edge-triggered reader must always read until EAGAIN.
    """

    name: ClassVar[str]
    edge_triggered: ClassVar[bool] = False
    max_fd: ClassVar[Optional[int]] = None
    native_read: ClassVar[int] = EVENT_READ | EVENT_ERROR
    native_write: ClassVar[int] = EVENT_WRITE | EVENT_ERROR
    native_eof: ClassVar[int] = 0

    @classmethod
    def available(cls) -> bool:
        """Return True if this kernel and this Python offer the mechanism.

        Decided by capability (what the ``select`` module has), never by OS name.
        """
        return True

    @abc.abstractmethod
    def register(self, fd: int, events: int) -> None:
        """Start watching ``fd`` for ``events``.

        Parameters:
            fd: an open file descriptor, not yet registered.
            events: a bitwise OR of EVENT_READ and EVENT_WRITE; 0 is allowed and
                means "registered, but tell me nothing" (a paused connection).

        Raises:
            ValueError: ``fd`` is negative or not below ``max_fd``.
            KeyError: ``fd`` is already registered.
            OSError: the kernel refused; the bookkeeping is rolled back.
        """

    @abc.abstractmethod
    def modify(self, fd: int, events: int) -> None:
        """Change the events watched on a registered ``fd``.

        Callers should only call this when the set actually changes: on most
        kernels it is a system call.

        Raises:
            KeyError: ``fd`` is not registered.
            OSError: the kernel refused; the bookkeeping is rolled back.
        """

    @abc.abstractmethod
    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``. Call it before closing the fd.

        Raises:
            KeyError: ``fd`` is not registered.
            OSError: the kernel kept some of the registration (kqueue: a filter
                whose delete failed); ``fd`` stays registered for what it kept.
        """

    @abc.abstractmethod
    def poll(self, timeout: Optional[float]) -> Events:
        """Wait for readiness.

        Parameters:
            timeout: seconds to wait; None waits for ever, 0 does not block.

        Returns:
            A list of ``(fd, bits)``, one entry per ready fd, bits an OR of
            EVENT_READ, EVENT_WRITE and EVENT_ERROR; empty on timeout. Only
            registered fds appear. EVENT_ERROR may come without having been
            asked for (the kernel always reports errors and hang-ups).

        Interrupted system calls are retried by Python (PEP 475); a signal
        handler that must wake the loop should use ``signal.set_wakeup_fd``.
        """

    def poll_raw(self, timeout: Optional[float]) -> Events:
        """Like ``poll``, but the masks are native: test them with ``native_read``/``native_write``.

        The default returns ``poll``'s bits, which the default native masks match.
        """
        return self.poll(timeout)

    @abc.abstractmethod
    def close(self) -> None:
        """Release the kernel object (if any). The multiplexer is unusable afterwards."""

    def __enter__(self) -> Multiplexer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_fd(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"invalid fd {fd}")
        if self.max_fd is not None and fd >= self.max_fd:
            raise ValueError(f"fd {fd} is at or above {self.max_fd}, the {self.name} backend's limit")


class MaskMultiplexer(Multiplexer):
    """The shared body of the backends whose kernel object takes one bit mask per fd.

    poll(2) and epoll(7) differ only by their constants, their timeout unit and
    (epoll) a flag or'ed into every mask, as CPython's ``_PollLikeSelector``.
    A subclass's ``__init__`` sets ``_kernel`` (an object with register,
    modify, unregister and poll), the native bits ``_in``/``_out``/``_err``
    and ``_flag``, then calls ``_init_masks``; it overrides ``poll_raw`` where
    the kernel object's timeout is not in seconds.
    """

    _kernel: Any
    _in: int
    _out: int
    _err: int
    _flag: int = 0

    def _init_masks(self) -> None:
        self._events: Dict[int, int] = {}
        # Error and hang-up bits are reported unasked: they mean "try both ways".
        self.native_read = self._in | self._err  # type: ignore[misc]
        self.native_write = self._out | self._err  # type: ignore[misc]

    def _native(self, events: int) -> int:
        mask = self._flag
        if events & EVENT_READ:
            mask |= self._in
        if events & EVENT_WRITE:
            mask |= self._out
        return mask

    def register(self, fd: int, events: int) -> None:
        self._check_fd(fd)
        if fd in self._events:
            raise KeyError(f"fd {fd} is already registered")
        self._kernel.register(fd, self._native(events))
        self._events[fd] = events

    def modify(self, fd: int, events: int) -> None:
        if fd not in self._events:
            raise KeyError(f"fd {fd} is not registered")
        self._kernel.modify(fd, self._native(events))
        self._events[fd] = events

    def unregister(self, fd: int) -> None:
        del self._events[fd]
        self._kernel.unregister(fd)

    def poll(self, timeout: Optional[float]) -> Events:
        if timeout is not None and timeout < 0:
            timeout = 0  # epoll would read a negative timeout as "for ever"
        ready = []
        for fd, mask in self.poll_raw(timeout):
            bits = 0
            if mask & self._in:
                bits |= EVENT_READ
            if mask & self._out:
                bits |= EVENT_WRITE
            if mask & self._err:
                bits |= EVENT_ERROR
            ready.append((fd, bits))
        return ready

    def close(self) -> None:
        self._events.clear()
