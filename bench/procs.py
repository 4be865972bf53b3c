"""Processes under measurement: start a server, find its pids, read its CPU time and RSS.

Facts of Linux's /proc this module relies on:
- /proc/PID/stat fields 14 and 15 (utime, stime) count clock ticks of
  ``SC_CLK_TCK`` (100 on every mainstream kernel), so one reading is precise to
  10 ms, and the kernel charges each tick to whoever was on the CPU when it
  fired (a sample, not a measurement): over a 2 s window of a server that is
  on its CPU 10 % of the time, one tick either way is 5 %.
- /proc/PID/schedstat's first field is the on-CPU time in nanoseconds, taken
  from the scheduler's own clock at every switch (CONFIG_SCHED_INFO, on in
  Debian's kernels): exact, but user and system together. So a window's CPU
  is the schedstat delta, split into user and system in the ticks' proportion.
- The second field (comm) is in parentheses and may itself hold spaces or
  parentheses, so the fields are split after the *last* ")".
- /proc/PID/task/TID/children lists a thread's children (CONFIG_PROC_CHILDREN,
  on in every distribution kernel); scanning /proc for the parent pid is the
  fallback when it is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class StartError(Exception):
    """A server did not come up; the message says why in one line."""


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds ((0.0, 0.0) once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state), so utime (14) and stime (15) are 11 and 12.
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0.0 once it has gone)."""
    user, system = cpu_times(pid)
    return user + system


def on_cpu_seconds(pid: int) -> float | None:
    """Seconds ``pid`` has run on a CPU, from /proc/PID/schedstat (None if unknown)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def tree_on_cpu_seconds(pid: int) -> float | None:
    """On-CPU seconds of ``pid`` and its descendants (None if schedstat is missing)."""
    total = 0.0
    for p in tree(pid):
        seconds = on_cpu_seconds(p)
        if seconds is None:
            return None
        total += seconds
    return total


def run_delay_seconds(pid: int) -> float:
    """Seconds ``pid`` has spent runnable but waiting for a CPU (0.0 if unknown).

    /proc/PID/schedstat is "on-CPU ns, run-queue wait ns, timeslices"
    (CONFIG_SCHED_INFO). Over a window, the wait says how much other processes
    on the same CPU took from this one: how noisy the measurement was.
    """
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_run_delay_seconds(pid: int) -> float:
    """Run-queue wait of ``pid`` and its descendants, in seconds."""
    return sum(run_delay_seconds(p) for p in tree(pid))


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            kids += [int(p) for p in (task / "children").read_text().split()]
        return kids
    except OSError:
        pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a --workers server is a parent and N workers)."""
    out = [pid]
    for kid in children(pid):
        out += tree(kid)
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its descendants."""
    return sum(cpu_seconds(p) for p in tree(pid))


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` and its descendants."""
    times = [cpu_times(p) for p in tree(pid)]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def rss_bytes(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of one process in bytes, from /proc/PID/status."""
    values = {"VmRSS": 0, "VmHWM": 0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


@dataclass
class ServerSpec:
    """One server under test: a name, how to start it, and why it cannot run (if so)."""

    name: str
    kind: str  # "c" | "iomux" | "asyncio" | "uvloop": the Python ones are compared with C
    argv: list[str]
    not_run: str | None = None
    cwd: str | None = None


@dataclass
class Server:
    """A running server: the process we started and what its ready file said."""

    spec: ServerSpec
    proc: subprocess.Popen[bytes]
    port: int
    pid: int
    ready: dict[str, object]
    stderr: IO[bytes] = field(repr=False)

    def stderr_text(self, offset: int = 0) -> str:
        """What the server has written to stderr from byte ``offset`` on.

        pread, because the server shares this file's offset: a seek here would
        move where its next line lands.
        """
        fd = self.stderr.fileno()
        return os.pread(fd, max(os.fstat(fd).st_size - offset, 0), offset).decode(errors="replace")

    def stderr_size(self) -> int:
        """How many bytes the server has written to stderr so far."""
        return os.fstat(self.stderr.fileno()).st_size

    def stderr_tail(self) -> str:
        """The last line the server wrote to stderr (for a one-line failure reason)."""
        lines = [ln for ln in self.stderr_text().splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return self.proc.returncode


def start(
    spec: ServerSpec,
    cpu: int | None,
    extra: list[str] | None = None,
    nofile: int | None = None,
    timeout: float = 10.0,
) -> Server:
    """Start ``spec`` with ``--port 0 --ready-file F`` and wait for the ready file.

    ``cpu`` pins the server (and anything it forks) to that CPU; ``nofile``
    raises its RLIMIT_NOFILE soft limit (never above the hard limit).

    Raises:
        StartError: it exited or did not become ready within ``timeout``.
    """
    workdir = tempfile.mkdtemp(prefix="iomux-bench-")
    ready_path = os.path.join(workdir, "ready.json")
    argv = [*spec.argv, "--port", "0", "--ready-file", ready_path, *(extra or [])]

    def pre_exec() -> None:
        # Runs in the child between fork and exec: affinity and limits are inherited
        # by the exec'd server and by every worker it forks.
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if nofile is not None:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = nofile if hard == resource.RLIM_INFINITY else min(nofile, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))

    # Closed by Server.stop() (or below on failure): it outlives this function.
    stderr = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        cwd=spec.cwd,
        preexec_fn=pre_exec,
    )
    deadline = time.monotonic() + timeout
    try:
        while not os.path.exists(ready_path):
            if proc.poll() is not None:
                stderr.seek(0)  # safe: the server has exited
                lines = stderr.read().decode(errors="replace").strip().splitlines()
                why = lines[-1] if lines else f"exit status {proc.returncode}"
                raise StartError(f"{spec.name} exited before it was ready: {why}")
            if time.monotonic() > deadline:
                raise StartError(f"{spec.name} was not ready after {timeout:g} s")
            time.sleep(0.02)
        ready = json.loads(Path(ready_path).read_text())
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
        raise
    finally:
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    return Server(spec, proc, int(ready["port"]), int(ready.get("pid", proc.pid)), ready, stderr)
