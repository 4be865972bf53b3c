"""Whether an accepted socket inherits O_NONBLOCK and TCP_NODELAY from its
listener (issue 5: "BSD does with accept(), Linux does not").

Facts this probe relies on:
- accept(2): on FreeBSD and macOS the new socket inherits the listener's file
  status flags (O_NONBLOCK); on Linux it never does (accept(2): "portable
  programs should not rely on inheritance or noninheritance").
- accept4(2) sets the flags from its argument and inherits none, on Linux and
  FreeBSD alike. CPython's socket.accept() calls accept4(SOCK_CLOEXEC) where
  the platform has it (Linux, FreeBSD 10+), so there Python's own accept
  hides the BSD inheritance. macOS has no accept4: CPython calls plain
  accept() and the inheritance shows through (python_accept.o_nonblock is
  True there for a non-blocking listener). The probe therefore also calls
  libc's accept() through ctypes, and records both.
- TCP_NODELAY lives in the TCP control block, which Linux and the BSDs copy
  from the listener when the connection is created.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import socket
import sys
from typing import Any, Callable, Dict

from iomux.probes._common import ProbeContext, Result, errno_name


def _flags_of(fd: int) -> Result:
    nonblock = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)
    # socket(fileno=) leaves O_NONBLOCK alone when no default timeout is set,
    # and the flag was read above anyway.
    s = socket.socket(fileno=os.dup(fd))
    try:
        nodelay = bool(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    finally:
        s.close()
    return {"o_nonblock": nonblock, "tcp_nodelay": nodelay}


def _libc_accept() -> Callable[[int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.accept
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int

    def accept(lfd: int) -> int:
        fd: int = fn(lfd, None, None)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return fd

    return accept


def _python_accept_syscall() -> str:
    # CPython is built with accept4 where libc has it: glibc/musl and FreeBSD
    # 10+ do, macOS's libSystem does not (so it calls accept() there).
    if sys.platform == "darwin":
        return "accept() (macOS has no accept4: flags inherited as BSD does)"
    return "accept4(SOCK_CLOEXEC) (no flags inherited)"


def _one(how: str, listener_nonblock: bool, listener_nodelay: bool) -> Result:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = None
    try:
        lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(listener_nodelay))
        lst.bind(("127.0.0.1", 0))
        lst.listen(4)
        lst.setblocking(not listener_nonblock)
        client = socket.create_connection(lst.getsockname()[:2], timeout=5)
        select.select([lst], [], [], 5.0)
        # socket._accept() is the raw fd before socket.accept() wraps it and
        # resets its blocking mode, which would hide what the kernel did.
        raw: Any = lst
        fd: int = raw._accept()[0] if how == "python" else _libc_accept()(lst.fileno())
        try:
            return _flags_of(fd)
        finally:
            os.close(fd)
    finally:
        if client is not None:
            client.close()
        lst.close()


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Flags of accepted sockets for a non-blocking, TCP_NODELAY listener (and a plain one)."""
    out: Dict[str, Any] = {
        "listener": {"o_nonblock": True, "tcp_nodelay": True},
        "python_accept_syscall": _python_accept_syscall(),
    }
    for how in ("libc", "python"):
        try:
            out[f"{how}_accept"] = _one(how, True, True)
            out[f"{how}_accept_plain_listener"] = _one(how, False, False)
        except (OSError, AttributeError) as exc:
            out[f"{how}_accept"] = {"available": False, "why": f"{how} accept failed: "
                                    f"{errno_name(exc)}: {exc}"}
    return out
