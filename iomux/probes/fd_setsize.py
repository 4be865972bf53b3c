"""Claim: select() is limited in handles, epoll only by the open-file limit
(write-up: "select()的句柄受限, 而epoll()没有, 它的限制是最大的打开文件句柄数目").

Facts this probe relies on:
- CPython's select() builds an fd_set of FD_SETSIZE bits and raises
  ValueError("filedescriptor out of range in select()") for any fd at or above
  it, whatever RLIMIT_NOFILE says. The fd *number* matters, not the count, so
  one socket duplicated at 1023 and at 1024 is the whole test.
- poll, epoll and kqueue take any fd below RLIMIT_NOFILE; epoll is further
  capped by fs.epoll.max_user_watches (per user, sized from RAM) and the BSDs
  by kern.maxfiles / kern.maxfilesperproc.
- Many dups of one socket end are distinct fds over one open file; writing a
  byte to the peer makes every one of them readable, so "handles N fds" is
  observed as "reported N ready fds".
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import socket
import subprocess
import time
from typing import Any, Dict, List

from iomux.probes._common import (
    FD_SETSIZE,
    NO_EPOLL,
    NO_KQUEUE,
    NO_POLL,
    SEL,
    ProbeContext,
    Result,
    has_epoll,
    has_kqueue,
    nofile_soft,
    open_fd_count,
    raise_nofile,
    unavailable,
)

FULL_FDS = 10000


def _sysctl(name: str) -> int | None:
    # Linux keeps these under /proc/sys; the BSDs answer sysctl(8).
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    exe = shutil.which("sysctl") or ("/sbin/sysctl" if os.path.exists("/sbin/sysctl") else None)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-n", name], capture_output=True, text=True, timeout=5,
                             check=False)
        return int(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def _select_limit(sock: socket.socket) -> Result:
    seen: Dict[str, Any] = {"fd_setsize_assumed": FD_SETSIZE, "ok_fds": [], "failing_fds": []}
    for want in (FD_SETSIZE - 1, FD_SETSIZE):
        # F_DUPFD takes the lowest free fd >= want, so nothing open is clobbered
        # (dup2 would silently close whatever sat at that number).
        try:
            fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, want)
        except OSError as exc:
            seen[f"dup_at_{want}"] = f"F_DUPFD failed: {exc.strerror}"
            continue
        try:
            select.select([fd], [], [], 0)
            seen["ok_fds"].append(fd)
        except ValueError as exc:
            seen["failing_fds"].append(fd)
            seen["error"] = f"ValueError: {exc}"
        finally:
            os.close(fd)
    seen["highest_ok_fd"] = max(seen["ok_fds"], default=None)
    seen["first_failing_fd"] = min(seen["failing_fds"], default=None)
    return seen


def _many(kind: str, fds: List[int], ready_fd_count: int) -> Result:
    t0 = time.perf_counter()
    if kind == "poll":
        p = select.poll()
        for fd in fds:
            p.register(fd, select.POLLIN)
        t1 = time.perf_counter()
        got = len(p.poll(1000))
    elif kind == "epoll":
        ep = select.epoll()
        try:
            for fd in fds:
                ep.register(fd, select.EPOLLIN)
            t1 = time.perf_counter()
            got = len(ep.poll(1.0, maxevents=len(fds) + 1))
        finally:
            ep.close()
    else:
        kq = SEL.kqueue()
        try:
            changes = [SEL.kevent(fd, SEL.KQ_FILTER_READ, SEL.KQ_EV_ADD) for fd in fds]
            kq.control(changes, 0, 0)
            t1 = time.perf_counter()
            got = len(kq.control(None, len(fds) + 1, 1.0))
        finally:
            kq.close()
    return {"registered": len(fds), "ready_expected": ready_fd_count, "ready_reported": got,
            "register_s": round(t1 - t0, 6), "wait_s": round(time.perf_counter() - t1, 6)}


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Observe select's fd-number limit and the fd counts poll/epoll/kqueue take."""
    limits = raise_nofile()
    out: Dict[str, Any] = {
        "rlimit_nofile": limits,
        "fs.epoll.max_user_watches": _sysctl("fs.epoll.max_user_watches"),
        "kern.maxfiles": _sysctl("kern.maxfiles"),
        "kern.maxfilesperproc": _sysctl("kern.maxfilesperproc"),
    }
    a, b = socket.socketpair()
    dups: List[int] = []
    try:
        if nofile_soft() > FD_SETSIZE + 1:
            out["select"] = _select_limit(a)
        else:
            out["select"] = unavailable(f"RLIMIT_NOFILE {nofile_soft()} leaves no fd at "
                                        f"{FD_SETSIZE} to try")
        # Room for what the process has open already, plus a margin for the
        # epoll/kqueue fd and whatever the interpreter opens meanwhile.
        room = nofile_soft() - open_fd_count() - 64
        want = ctx.size(FULL_FDS, 100)
        n = max(0, min(want, room))
        out["fds_wanted"] = want
        out["fds_used"] = n
        if n < want:
            out["fds_note"] = f"RLIMIT_NOFILE soft={nofile_soft()} allows only {n} more fds"
        b.send(b"x")
        for _ in range(n):
            dups.append(os.dup(a.fileno()))
            if len(dups) % 1000 == 0 and ctx.left() < 0:
                out["fds_note"] = f"time budget ran out after {len(dups)} fds"
                break
        out["fds_used"] = len(dups)
        for kind, ok, why in (("poll", hasattr(select, "poll"), NO_POLL),
                              ("epoll", has_epoll(), NO_EPOLL),
                              ("kqueue", has_kqueue(), NO_KQUEUE)):
            if not ok:
                out[kind] = unavailable(why)
                continue
            try:
                out[kind] = _many(kind, dups, len(dups))
            except OSError as exc:
                out[kind] = {"error": f"{type(exc).__name__}: {exc}", "registered": len(dups)}
    finally:
        for fd in dups:
            os.close(fd)
        a.close()
        b.close()
    return out
