"""A stand-in for the kqueue half of the ``select`` module, modelled on FreeBSD's kernel.

No kernel here has kqueue, so the kqueue backend's bookkeeping is tested
against this model of ``sys/kern/kern_event.c`` (``kqueue_kevent``,
``kqueue_register``, ``kqueue_scan``) as CPython's ``select.kqueue.control``
reaches it. What it models, as FreeBSD does it:

- Knotes keyed by (ident, filter). EV_ADD creates or updates one (and
  re-evaluates it), EV_DELETE removes it; deleting or changing a knote that is
  not there is ENOENT; an ident that is not an open fd is EBADF, for a delete
  too (the fd is looked up before the knote). Closing an fd drops its knotes.
- The change list is processed change by change. A change that fails, or any
  change flagged EV_RECEIPT, yields an EV_ERROR reply (``flags`` exactly
  EV_ERROR, ``data`` the errno, 0 for a receipt of a success) while there is
  room in the event list. With no room left, a failed change makes the whole
  call raise OSError with the changes before it kept, and a receipt makes the
  call return at once, the rest of the list unapplied (``return (error)`` with
  error 0). A call that produced any reply returns only the replies and does
  not scan, so no pending event is consumed.
- Events stay queued until a call with room for them scans: change-only calls
  (``max_events`` 0) keep them.
- Level-triggered knotes report while their condition holds; EV_CLEAR knotes
  report once per ``fire`` (and again after an EV_ADD re-evaluates them).
- Returned events carry the knote's own flags minus EV_ADD/EV_DELETE/
  EV_ENABLE/EV_DISABLE (so EV_CLEAR and EV_RECEIPT stay, EV_ADD never shows),
  plus EV_EOF from the condition; ``fflags`` is the socket error (FreeBSD's
  numbers: ECONNRESET is 54, not Linux's 104), ``data`` the byte count.
- FreeBSD's constants: filters -1/-2, EV_ADD 0x1 ... EV_EOF 0x8000.

What it does not model (every known difference from the real kqueue):

- Readiness is whatever the test says (``fire``/``settle``), not the socket's
  state: an EVFILT_WRITE knote is not writable by itself, data arriving on a
  real socket is not seen, and ``data``/``fflags`` are never updated by it.
- It never blocks: ``timeout`` is checked (negative is ValueError, as CPython)
  but a call with nothing ready returns at once; EINTR never happens.
- Only EVFILT_READ and EVFILT_WRITE on fds (anything else is EINVAL); no
  EV_ENABLE/EV_DISABLE/EV_ONESHOT/EV_DISPATCH, no udata, no NOTE_* fflags on
  input, no low-water marks.
- Closed fds are noticed at the next ``control`` call (by fstat), so an fd
  closed and reopened with the same number in between keeps its old knotes,
  where the kernel drops them at close(2).
- Events come back in knote creation order, not in the kernel's active-queue
  order; a knote re-fired while queued is not moved to the end.
- macOS differs from FreeBSD in ways not modelled: deleting a knote of a
  closed fd is ENOENT there (``refuse`` can inject it) and replies keep the
  change's other flags beside EV_ERROR.
- Errnos other than EBADF/ENOENT/EINVAL come only from ``refuse``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

# <sys/event.h> on FreeBSD.
KQ_FILTER_READ = -1
KQ_FILTER_WRITE = -2
KQ_EV_ADD = 0x0001
KQ_EV_DELETE = 0x0002
KQ_EV_ENABLE = 0x0004
KQ_EV_DISABLE = 0x0008
KQ_EV_ONESHOT = 0x0010
KQ_EV_CLEAR = 0x0020
EV_RECEIPT = 0x0040  # not in CPython's select module
KQ_EV_DISPATCH = 0x0080
KQ_EV_SYSFLAGS = 0xF000
KQ_EV_ERROR = 0x4000
KQ_EV_EOF = 0x8000

# <sys/errno.h> on FreeBSD (the first 34 match Linux's; the socket ones do not).
ENOENT = 2
EBADF = 9
ENOMEM = 12
EINVAL = 22
EPIPE = 32
ECONNRESET = 54
ECONNABORTED = 53
ETIMEDOUT = 60

Key = Tuple[int, int]


class kevent:
    """select.kevent: a plain record of the six fields."""

    def __init__(self, ident: int, filter: int = KQ_FILTER_READ, flags: int = KQ_EV_ADD,
                 fflags: int = 0, data: int = 0, udata: int = 0) -> None:
        self.ident, self.filter, self.flags = ident, filter, flags
        self.fflags, self.data, self.udata = fflags, data, udata

    def __repr__(self) -> str:
        return (f"kevent(ident={self.ident}, filter={self.filter}, flags={self.flags:#x}, "
                f"fflags={self.fflags}, data={self.data})")


@dataclasses.dataclass
class _Knote:
    flags: int  # as registered, less EV_ADD/EV_DELETE/EV_ENABLE/EV_DISABLE
    pending: bool = False  # EV_CLEAR: fired since last delivered


@dataclasses.dataclass
class _Condition:
    flags: int  # EV_EOF or 0
    fflags: int
    data: int


class Kernel:
    """The kernel side: every kqueue made from one fake module shares its fd table view.

    Attributes a test reads: ``changes`` (every change applied or refused, as
    ``(ident, filter, flags)`` without EV_RECEIPT), ``calls`` (``(nchanges,
    max_events)`` per control call), and ``knotes`` of each kqueue.
    """

    def __init__(self) -> None:
        self.changes: List[Tuple[int, int, int]] = []
        self.calls: List[Tuple[int, int]] = []
        self.queues: List[Kqueue] = []
        self.conditions: Dict[Key, _Condition] = {}
        self.refusals: Dict[Tuple[int, int, int], int] = {}

    def fire(self, ident: int, filter: int, eof: bool = False, fflags: int = 0, data: int = 1) -> None:
        """The condition of (ident, filter) becomes true (data arrives, the peer closes...)."""
        self.conditions[(ident, filter)] = _Condition(KQ_EV_EOF if eof else 0, fflags, data)
        for kq in self.queues:
            kn = kq.knotes.get((ident, filter))
            if kn is not None:
                kn.pending = True

    def settle(self, ident: int, filter: int) -> None:
        """The condition of (ident, filter) goes away (the data was read)."""
        self.conditions.pop((ident, filter), None)

    def refuse(self, ident: int, filter: int, op: int, err: int) -> None:
        """Make the next change ``op`` (KQ_EV_ADD or KQ_EV_DELETE) on (ident, filter) fail with ``err``."""
        self.refusals[(ident, filter, op)] = err

    def module(self) -> Any:
        """A ``select``-like namespace whose kqueue() lives in this kernel."""
        import types

        names = {k: v for k, v in globals().items() if k.startswith("KQ_")}
        return types.SimpleNamespace(kqueue=lambda: Kqueue(self), kevent=kevent, **names)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Kqueue:
    """select.kqueue: ``control`` is kevent(2)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.knotes: Dict[Key, _Knote] = {}
        self.closed = False
        kernel.queues.append(self)

    def fileno(self) -> int:
        """A made-up fd number (no real fd stands behind it)."""
        return 1000 + self.kernel.queues.index(self)

    def close(self) -> None:
        """Drop every knote."""
        self.closed = True
        self.knotes.clear()

    def control(self, changelist: Optional[Iterable[kevent]], max_events: int,
                timeout: Optional[float] = None) -> List[kevent]:
        """kevent(2) as FreeBSD's kqueue_kevent runs it; see the module docstring."""
        if self.closed:
            raise ValueError("I/O operation on closed kqueue object")
        if max_events < 0:
            raise ValueError(f"Length of eventlist must be 0 or positive, got {max_events}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be positive or None, got {timeout}")
        changes = list(changelist or ())
        self.kernel.calls.append((len(changes), max_events))
        for key in [k for k in self.knotes if not _fd_open(k[0])]:
            del self.knotes[key]  # close(2) dropped them (noticed late: see docstring)
        room = max_events
        replies: List[kevent] = []
        for ch in changes:
            flags = ch.flags & ~KQ_EV_SYSFLAGS
            self.kernel.changes.append((ch.ident, ch.filter, flags & ~EV_RECEIPT))
            err = self._register(ch.ident, ch.filter, flags)
            if err or flags & EV_RECEIPT:
                if room == 0:
                    if err:
                        raise OSError(err, os.strerror(err))
                    return []  # a receipt with no room: FreeBSD stops here
                replies.append(kevent(ch.ident, ch.filter, KQ_EV_ERROR, ch.fflags, err, ch.udata))
                room -= 1
        if replies:
            return replies
        return self._scan(max_events)

    def _register(self, ident: int, filt: int, flags: int) -> int:
        if filt not in (KQ_FILTER_READ, KQ_FILTER_WRITE):
            return EINVAL
        if flags & (KQ_EV_ENABLE | KQ_EV_DISABLE | KQ_EV_ONESHOT | KQ_EV_DISPATCH):
            raise NotImplementedError("the stand-in models EV_ADD, EV_DELETE, EV_CLEAR and EV_RECEIPT only")
        op = KQ_EV_DELETE if flags & KQ_EV_DELETE else KQ_EV_ADD
        refused = self.kernel.refusals.pop((ident, filt, op), 0)
        if refused:
            return refused
        if not _fd_open(ident):
            return EBADF
        key = (ident, filt)
        kn = self.knotes.get(key)
        if flags & KQ_EV_DELETE:
            if kn is None:
                return ENOENT
            del self.knotes[key]
            return 0
        if not flags & KQ_EV_ADD:
            return ENOENT if kn is None else 0
        kept = flags & ~(KQ_EV_ADD | KQ_EV_DELETE | KQ_EV_ENABLE | KQ_EV_DISABLE)
        if kn is None:
            kn = self.knotes[key] = _Knote(kept)
        else:
            kn.flags = kept
        kn.pending = key in self.kernel.conditions  # EV_ADD re-evaluates the filter
        return 0

    def _scan(self, max_events: int) -> List[kevent]:
        out: List[kevent] = []
        for key, kn in self.knotes.items():
            if len(out) >= max_events:
                break
            cond = self.kernel.conditions.get(key)
            if cond is None:
                continue  # f_event says no: not reported, whatever EV_CLEAR says
            if kn.flags & KQ_EV_CLEAR:
                if not kn.pending:
                    continue
                kn.pending = False
            out.append(kevent(key[0], key[1], kn.flags | cond.flags, cond.fflags, cond.data))
        return out
