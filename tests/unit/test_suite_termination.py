"""A behaviour-suite run ended by SIGTERM or SIGHUP stops the servers it started.

The servers run in sessions of their own (so that a test can kill one and every
worker it forked), which a signal to the run's process group does not reach:
until tests/server/serverproc.unwind_on_termination, pytest died at once and its
servers went on serving. Here a real run of one test of tests/server is signalled
while its server is up, and afterwards no process of that run is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.drivers.kernels import marked_pids

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("start", ["fork", "exec"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_run_leaves_no_server(tmp_path: Path, signum: int, start: str) -> None:
    """Servers forked by the fork server (tests/server/forkserver.py) have its command
    line, not theirs: the run's environment marks every process of it, the fork server
    and what it forked included, as /proc/PID/environ shows the one of its exec."""
    base = tmp_path / "run"
    env = dict(os.environ, IOMUX_SERVER_START=start, IOMUX_TEST_RUN=str(base))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"--basetemp={base}", "tests/server/test_echo_server.py",
         "-k", "TestPoll and test_idle_timeout_reaps_an_idle_connection"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        # As a shell's foreground job has them: default dispositions.
        preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)])
    try:
        deadline = time.monotonic() + 60
        while not list(base.glob("**/ready-poll-*.json")):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the test's server never got ready"
            time.sleep(0.05)
        servers = [p for p in marked_pids(str(base)) if p != proc.pid]
        assert servers, "no server process found while its ready file exists"
        os.killpg(proc.pid, signum)  # as a terminal's hang-up or a CI's stop reaches it
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while marked_pids(str(base)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = marked_pids(str(base))
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"servers left serving after the run got signal {signum}:\n{out[-2000:]}"
    assert proc.returncode != 0, out[-2000:]  # the run was interrupted, not passed


# After pytest.main returns, before atexit: no child of the run is left, so that the
# CPU time of every server it forked is in os.times() (harness.guest_suites reads it there).
_AFTER_MAIN = (
    "import os, sys, pytest\n"
    "rc = pytest.main(sys.argv[1:])\n"
    "try:\n"
    "    pid, _ = os.waitpid(-1, os.WNOHANG)\n"
    "    print('children: alive' if pid == 0 else f'children: {pid} exited unreaped')\n"
    "except ChildProcessError:\n"
    "    print('children: none')\n"
    "sys.exit(rc)\n")


def test_a_suite_run_reaps_its_fork_server_before_pytest_returns(tmp_path: Path) -> None:
    env = dict(os.environ, IOMUX_SERVER_START="fork")
    proc = subprocess.run(
        [sys.executable, "-c", _AFTER_MAIN, "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         f"--basetemp={tmp_path / 'run'}", "tests/server/test_echo_server.py",
         "-k", "TestPoll and test_echo_8_mib_sha256"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout, proc.stdout[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "children: none", proc.stdout[-2000:]
