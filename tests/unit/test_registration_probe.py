"""The registration probe's kqueue count, run here under a stand-in truss and select.

No kernel here has kqueue or truss(1), so the kqueue half of
``iomux.probes.registration._count`` runs against two stand-ins that keep the
facts it depends on:

- truss: runs the command, writes a ``truss -c`` summary, and exits 0 whatever
  the command did (FreeBSD's truss does the same);
- select: a module put first on the child's path whose ``kqueue.control``
  counts one kevent() per call, as CPython's does even for an empty list.

Issue 12: the kqueue child used an unbound name (defect 2), its baseline
made a kevent() call of its own (defect 3), and a failing child was read as
a count of 0 because truss exits 0.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from iomux.probes import registration

FAKE_SELECT = '''
import errno, importlib.machinery, importlib.util, os, sys

# Everything of the real select module (socket and selectors use it), plus kqueue.
_spec = importlib.machinery.PathFinder.find_spec("select", [p for p in sys.path if "fakeselect" not in p])
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)
globals().update({k: v for k, v in vars(_real).items() if not k.startswith("__")})
KQ_FILTER_READ = -1
KQ_EV_ADD = 0x1


class kevent:
    def __init__(self, ident, filter=KQ_FILTER_READ, flags=KQ_EV_ADD):
        self.ident, self.filter, self.flags = ident, filter, flags


class kqueue:
    def __init__(self):
        if os.environ.get("FAKE_KQUEUE_FAIL"):
            raise OSError(errno.EMFILE, "Too many open files")

    def control(self, changes, max_events, timeout=None):
        # CPython's kqueue.control makes exactly one kevent() call.
        with open(os.environ["FAKE_TRUSS_LOG"], "a") as f:
            f.write("kevent\\n")
        return []

    def close(self):
        pass
'''

FAKE_TRUSS = '''
import os, subprocess, sys
args = sys.argv[1:]
out = args[args.index("-o") + 1]
cmd = args[args.index("-o") + 2:]
log = out + ".calls"
env = dict(os.environ, PYTHONPATH=sys.argv[0].rsplit("/", 1)[0] + "/fakeselect", FAKE_TRUSS_LOG=log)
subprocess.run(cmd, env=env)
calls = open(log).read().count("kevent") if os.path.exists(log) else 0
with open(out, "w") as f:
    f.write("syscall                     seconds   calls  errors\\n")
    if calls:
        f.write(f"kevent                  0.000010000    {calls}       0\\n")
sys.exit(0)  # truss's status is 0 whatever the child's was
'''


@pytest.fixture
def fake_truss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "fakeselect").mkdir()
    (tmp_path / "fakeselect" / "select.py").write_text(textwrap.dedent(FAKE_SELECT))
    script = tmp_path / "truss.py"
    script.write_text(textwrap.dedent(FAKE_TRUSS))

    def tracer(syscall: str) -> Tuple[Optional[List[str]], str]:
        return [sys.executable, str(script), "-f", "-c", "-o"], "truss"

    monkeypatch.setattr(registration, "_tracer", tracer)
    return tmp_path


def test_kqueue_batch_is_one_kevent_call_over_a_zero_call_baseline(fake_truss: Path) -> None:
    got = registration._count("kqueue", "kevent", 20, 60.0)
    assert got.get("why") is None, got
    # The baseline makes no kevent() call; the batch of 20 makes one.
    assert (got["baseline"], got["syscalls"], got["fds"]) == (0, 1, 20)


def test_a_failing_child_is_not_measurable_not_zero(fake_truss: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_KQUEUE_FAIL", "1")
    got = registration._count("kqueue", "kevent", 20, 60.0)
    assert got["syscalls"] is None
    assert "exited 1" in got["why"] and "Too many open files" in got["why"], got


def test_a_failing_child_is_not_measurable_in_the_claims(fake_truss: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from iomux.probes import claims

    monkeypatch.setenv("FAKE_KQUEUE_FAIL", "1")
    record = {"fds": 20, "kqueue": registration._count("kqueue", "kevent", 20, 60.0)}
    got = {c["id"]: c for c in claims.evaluate("t1", "freebsd", {"registration": record})}
    assert got["registration-syscalls"]["verdict"] == "not measurable"
    assert "Too many open files" in got["registration-syscalls"]["why"]


SLOW_CHILD = """
import os, sys, time
with open(os.environ["SLOW_CHILD_PID"], "w") as f:
    f.write(str(os.getpid()))
time.sleep(3)
with open(os.environ["SLOW_CHILD_MARK"], "w") as f:
    f.write("outlived its tracer")
"""


def _real_strace() -> Tuple[Optional[List[str]], str]:
    strace = shutil.which("strace")
    if strace is None or not sys.platform.startswith("linux"):
        pytest.skip("not run: no strace(1) here (apt-get install strace)")
    return [strace, "-f", "-c", "-e", "trace=epoll_ctl", "-o"], "strace"


@pytest.mark.parametrize("tracer", ["strace", "stand-in truss"])
def test_a_timed_out_tracer_takes_its_child_with_it(
        tracer: str, fake_truss: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracer and its child are killed together, before the temporary
    directory goes: a killed tracer detaches its child, which ran on and wrote
    into the directory while rmtree removed it (the VM's "Directory not empty")."""
    if tracer == "strace":
        monkeypatch.setattr(registration, "_tracer", lambda syscall: _real_strace())
    mark, pid_file = tmp_path / "mark", tmp_path / "pid"
    monkeypatch.setenv("SLOW_CHILD_MARK", str(mark))
    monkeypatch.setenv("SLOW_CHILD_PID", str(pid_file))
    monkeypatch.setattr(registration, "CHILD", SLOW_CHILD)
    started = time.monotonic()
    got = registration._count("epoll", "epoll_ctl", 1, 2.0)
    assert got == {"syscalls": None, "tool": registration._tracer("")[1],
                   "why": f"{registration._tracer('')[1]} timed out"}
    child = int(pid_file.read_text())
    assert not _alive(child), f"the traced child {child} outlived the timeout"
    time.sleep(max(0.0, started + 4.0 - time.monotonic()))  # past the child's 3 s sleep
    assert not mark.exists(), mark.read_text()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended: its state is Z)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("text, version", [
    ("strace -- version 6.1\nCopyright (c) 1991-2022 The strace developers <https://strace.io>.\n", (6, 1)),
    ("strace -- version 5.2\n", (5, 2)),
    ("strace -- version 4.26\n", (4, 26)),
    ("no version here\n", ()),
])
def test_strace_version(text: str, version: Tuple[int, ...]) -> None:
    assert registration.strace_version(text) == version
    assert (registration.strace_version(text) >= registration.SECCOMP_BPF_SINCE) == (version >= (5, 3))


@pytest.mark.parametrize("seccomp", [True, False])
def test_the_seccomp_filter_counts_what_plain_tracing_counts(
        seccomp: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --seccomp-bpf the child stops only at epoll_ctl; the count must not change."""
    strace_argv, _ = _real_strace()
    assert strace_argv is not None
    if seccomp:
        assert registration._tracer("epoll_ctl")[0] == [strace_argv[0], "--seccomp-bpf", *strace_argv[1:]]
    else:
        monkeypatch.setattr(registration, "_strace_filter", lambda strace: [])
        assert registration._tracer("epoll_ctl")[0] == strace_argv
    got = registration._count("epoll", "epoll_ctl", 100, 60.0)
    assert (got["baseline"], got["syscalls"], got["fds"]) == (0, 100, 100), got
