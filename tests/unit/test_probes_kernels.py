"""The probes that tell kernels apart (issue 14) run on this kernel, fast, and
record what their modules say; on Linux their exact facts are checked (the
claims suite checks them on every other kernel against expected.json).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any, Dict

import pytest

from iomux import facts, probes
from iomux.probes._common import ProbeContext

NEW = ["sockopt_inherit", "buffer_sizes", "shutdown_events", "listen_backlog", "refused_connect"]
LINUX = sys.platform.startswith("linux") and facts.kernel_identity()["family"] == "linux"
linux_only = pytest.mark.skipif(not LINUX, reason="the exact facts below are Linux's")


@pytest.fixture(scope="module")
def observed() -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name in NEW:
        module = importlib.import_module(f"iomux.probes.{name}")
        t0 = time.monotonic()
        out[name] = module.probe(ProbeContext(scale=1.0, deadline=time.monotonic() + 5))
        out[name]["_s"] = time.monotonic() - t0
    return out


def test_registered_and_fast(observed: Dict[str, Any]) -> None:
    for name in NEW:
        assert name in probes.PROBES
        assert observed[name]["_s"] < 3.0, name
        json.dumps(observed[name])
        doc = importlib.import_module(f"iomux.probes.{name}").__doc__ or ""
        assert "Facts this probe relies on" in doc, name


def test_sockopt_inherit(observed: Dict[str, Any]) -> None:
    r = observed["sockopt_inherit"]
    assert set(r["inherited"]) == {"TCP_NODELAY", "SO_KEEPALIVE", "SO_RCVBUF", "SO_SNDBUF"}
    assert r["plain_accepted"]["TCP_NODELAY"] == 0
    if LINUX:
        assert all(r["inherited"].values()), r


def test_buffer_sizes(observed: Dict[str, Any]) -> None:
    r = observed["buffer_sizes"]
    assert r["set_readback"]["SO_RCVBUF"] >= r["asked"]
    if LINUX:
        # socket(7): the kernel doubles the value; fresh TCP sockets show tcp_rmem[1]/tcp_wmem[1].
        assert r["factor"] == {"SO_RCVBUF": 2.0, "SO_SNDBUF": 2.0}
        rmem, wmem = r["sysctl"]["net.ipv4.tcp_rmem"].split(), r["sysctl"]["net.ipv4.tcp_wmem"].split()
        assert r["tcp_fresh"] == {"SO_RCVBUF": int(rmem[1]), "SO_SNDBUF": int(wmem[1])}


@linux_only
def test_shutdown_events_linux(observed: Dict[str, Any]) -> None:
    r = observed["shutdown_events"]
    assert set(r["both_shut_wr"]["epoll"]) == {"EPOLLIN", "EPOLLOUT", "EPOLLHUP", "EPOLLRDHUP"}
    assert set(r["own_shut_rdwr"]["epoll"]) >= {"EPOLLIN", "EPOLLOUT", "EPOLLHUP"}
    oob = r["oob_then_reset"]["epoll"]
    assert "EPOLLPRI" in oob["after_oob"] and "EPOLLERR" in oob["after_reset"]
    assert oob["so_error"] == "ECONNRESET" and "EPOLLERR" not in oob["after_so_error"]
    assert oob["recv"] == "eof"


def test_listen_backlog(observed: Dict[str, Any]) -> None:
    r = observed["listen_backlog"]
    for key in ("backlog_0", "backlog_1"):
        assert r[key]["connects"] == r[key]["connected"] + r[key]["refused"] + r[key]["pending"]
    if LINUX:
        assert (r["backlog_0"]["accepted"], r["backlog_1"]["accepted"]) == (1, 2)


def test_refused_connect(observed: Dict[str, Any]) -> None:
    r = observed["refused_connect"]
    assert r["tcp_blocking"] == "ECONNREFUSED"
    assert r["tcp_nonblocking"]["so_error"] == "ECONNREFUSED"
    if LINUX:
        assert r["tcp_nonblocking"]["so_error_again"] == 0
        assert {"EPOLLOUT", "EPOLLERR", "EPOLLHUP"} <= set(r["tcp_nonblocking"]["epoll_events"])
        assert r["udp"]["recv_after_send"] == "ECONNREFUSED"
