"""Counts per request that do not move with the machine's load: system calls, wake-ups, instructions.

CPU time per request follows whatever else runs on the machine; these counts
do not, so a change to the server can be judged by them on a busy machine.
Each is taken over a fixed number of requests: the C load client's COUNT mode
(bench/c/loadclient.c) warms up, lets every request in flight finish, says
"ready" and waits; the counters are attached to the idle server; then exactly
COUNT echoes run, and the counters stop before any connection closes.

How they are counted (facts of Linux's perf and of valgrind this relies on):

- System calls: ``perf stat`` on the server's pid with the tracepoints
  ``raw_syscalls:sys_enter`` (every call) and ``syscalls:sys_enter_NAME`` (one
  per syscall of interest), plus ``raw_syscalls:sys_exit`` filtered on
  ``ret == -EAGAIN``: the reads and writes that found nothing to do. Counting
  a tracepoint is an in-kernel increment, so the server runs at nearly full
  speed. Tracepoints need root or perf_event_paranoid <= -1 (tracefs access);
  where that is refused the figures are "not measured" with perf's reason.
- Wake-ups and events per wake-up: ``perf record`` of the exits of the
  waiting calls (epoll_wait/epoll_pwait/epoll_pwait2, poll/ppoll,
  select/pselect6); each exit's return value is the number of ready fds. One
  sample per wake-up, not per call, so the cost stays small; ``perf script``
  prints the values.
- ``--control fifo:CTL,ACK`` with ``-D -1``: perf starts disabled and says
  "ack" once enabled, so the window opens only after it is attached.
- Instructions: the kernel here may not expose hardware counters (a VM:
  ``perf stat -e instructions`` says "not supported"), so user-space
  instructions are counted by ``valgrind --tool=callgrind`` (deterministic:
  the same on a loaded machine), zeroed with ``callgrind_control -z`` at
  "ready" and dumped with ``callgrind_control -d`` after the last echo. Under
  callgrind the server runs some 50x slower, so it batches more events per
  wake-up than it does at full speed: the figure is a count for comparing
  changes, per configuration, not a prediction of CPU time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from bench import procs
from bench.procs import Server, ServerSpec

TRACEFS = Path("/sys/kernel/tracing/events/syscalls")
# What an echo server's loop calls per request, by the names of its tracepoints.
SYSCALLS = [
    "read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
    "epoll_ctl", "accept4", "close", "getpid",
]  # fmt: skip
# The calls a loop waits in; their return value is the number of ready fds.
WAITS = ["epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"]
EAGAIN = 11  # Linux's EAGAIN (== EWOULDBLOCK) on every architecture it runs on
Json = dict[str, Any]


def requests_for(requests: int, size: int) -> int:
    """How many requests to count at ``size``: ``requests`` up to 4 KiB, fewer for large
    messages (where a request's cost is its copies, steady from the first few hundred)."""
    return max(min(requests, requests * 4096 // size), min(requests, 200))


def _tracepoints(names: list[str], kind: str) -> list[str]:
    """The subset of ``names`` this kernel has a ``sys_KIND_NAME`` tracepoint for."""
    if not TRACEFS.is_dir():
        return names
    return [n for n in names if (TRACEFS / f"sys_{kind}_{n}").is_dir()]


def perf_problem() -> str | None:
    """None if ``perf stat`` can count syscall tracepoints here, else one line saying why not."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed (apt-get install linux-perf)"
    proc = subprocess.run(
        [perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter", "--", "true"],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if "raw_syscalls:sys_enter" in ln]
    if proc.returncode != 0 or not lines or lines[0].startswith("<"):
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return f"perf cannot count syscall tracepoints: {last[:160]}"
    return None


def callgrind_problem() -> str | None:
    """None if valgrind's callgrind and callgrind_control are here, else why not."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install valgrind)"
    return None


class _Perf:
    """One perf process attached to a pid, started disabled, driven through its control fifos."""

    def __init__(self, mode: list[str], pid: int, workdir: str, name: str) -> None:
        self.ctl_path = os.path.join(workdir, f"{name}.ctl")
        self.ack_path = os.path.join(workdir, f"{name}.ack")
        os.mkfifo(self.ctl_path)
        os.mkfifo(self.ack_path)
        self.proc = subprocess.Popen(
            ["perf", *mode, "-D", "-1", "--control", f"fifo:{self.ctl_path},{self.ack_path}",
             "-p", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        # Opening a fifo blocks until the other end opens: perf opens both at start-up.
        self.ctl: IO[str] = open(self.ctl_path, "w")  # noqa: SIM115
        self.ack: IO[str] = open(self.ack_path)  # noqa: SIM115

    def command(self, what: str) -> None:
        self.ctl.write(what + "\n")
        self.ctl.flush()
        # perf writes "ack\n" with its C string's NUL, which then leads the next reply.
        if not self.ack.readline().lstrip("\0").startswith("ack"):
            raise OSError(f"perf did not acknowledge {what!r}")

    def finish(self) -> str:
        """Stop perf (SIGINT writes its output) and return its stderr."""
        with contextlib.suppress(OSError):
            self.ctl.close()
        self.ack.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


def _count_client(exe: Path, cpu: int | None, port: int, conns: int, size: int, requests: int,
                  limit_s: float) -> subprocess.Popen[bytes]:  # fmt: skip
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return subprocess.Popen(
        [str(exe), "127.0.0.1", str(port), str(conns), str(size), str(limit_s), "0.3", str(requests)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=pin,
    )  # fmt: skip


def _expect(client: subprocess.Popen[bytes], want: str) -> str:
    assert client.stdout is not None
    line = client.stdout.readline().decode(errors="replace").strip()
    if not line.startswith(want):
        assert client.stderr is not None
        client.kill()
        err = client.stderr.read().decode(errors="replace").strip().splitlines()
        raise OSError(f"load client: {(err or [line or 'no output'])[-1]}")
    return line


def _windowed(
    client_exe: Path,
    cpu: int | None,
    server: Server,
    conns: int,
    size: int,
    requests: int,
    limit_s: float,
    open_window: Any,
    close_window: Any,
) -> Json:
    """Run COUNT echoes between ``open_window()`` and ``close_window()``; returns the client's JSON."""
    client = _count_client(client_exe, cpu, server.port, conns, size, requests, limit_s)
    assert client.stdin is not None
    try:
        _expect(client, "ready")
        open_window()
        client.stdin.write(b"go\n")
        client.stdin.flush()
        report: Json = json.loads(_expect(client, "{"))
        close_window()
    finally:
        with contextlib.suppress(OSError):
            client.stdin.close()
        try:
            client.wait(timeout=10)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()
        for f in (client.stdout, client.stderr):
            if f is not None:
                f.close()
    return report


def _parse_stat(path: str) -> dict[str, int]:
    """perf stat -x, output: ``value,unit,event,...``; missing or "<not counted>" is 0."""
    counts: dict[str, int] = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 3 or line.startswith("#"):
            continue
        value, event = parts[0], parts[2]
        counts[event] = counts.get(event, 0) + (int(value) if value.isdigit() else 0)
    return counts


# ``perf script -F trace`` prints one return value a line: 0x3, or an errno as unsigned hex.
_RET = re.compile(r"^\s*(0x[0-9a-f]+|-?\d+)\s*$", re.MULTILINE)


def _parse_waits(script: str) -> tuple[int, int, int]:
    """(wake-ups, ready fds reported, wake-ups with nothing ready) from ``perf script`` lines."""
    wakeups = events = empty = 0
    for m in _RET.finditer(script):
        ret = int(m.group(1), 0)
        if ret > 0x7FFFFFFFFFFFFFFF:  # an error return printed as unsigned hex
            continue
        wakeups += 1
        events += ret
        empty += ret == 0
    return wakeups, events, empty


def syscalls(
    spec: ServerSpec,
    client_exe: Path,
    cpus: tuple[int | None, int | None],
    configs: list[tuple[int, int]],
    requests: int,
) -> dict[str, Json]:
    """System calls, EAGAINs, wake-ups and events per wake-up per request, per configuration."""
    calls = _tracepoints(SYSCALLS + WAITS, "enter")
    waits = _tracepoints(WAITS, "exit")
    stat_events = ["-e", "raw_syscalls:sys_enter", "-e", "raw_syscalls:sys_exit",
                   "--filter", f"ret == -{EAGAIN}"]  # fmt: skip
    for name in calls:
        stat_events += ["-e", f"syscalls:sys_enter_{name}"]
    record_events: list[str] = []
    for name in waits:
        record_events += ["-e", f"syscalls:sys_exit_{name}"]
    out: dict[str, Json] = {}
    server = procs.start(spec, cpus[0])
    try:
        for size, conns in configs:
            key = f"{size}B-{conns}c"
            workdir = tempfile.mkdtemp(prefix="iomux-counts-")
            stat_out = os.path.join(workdir, "stat.csv")
            rec_out = os.path.join(workdir, "waits.data")
            perfs: list[_Perf] = []
            try:
                perfs.append(_Perf(["stat", "-x,", "-o", stat_out, *stat_events],
                                   server.pid, workdir, "stat"))  # fmt: skip
                perfs.append(_Perf(["record", "-q", "-B", "-N", "-o", rec_out, "-c", "1", *record_events],
                                   server.pid, workdir, "record"))  # fmt: skip

                def enable(perfs: list[_Perf] = perfs) -> None:
                    for p in perfs:
                        p.command("enable")

                def disable(perfs: list[_Perf] = perfs) -> None:
                    for p in perfs:
                        p.command("disable")

                report = _windowed(client_exe, cpus[1], server, conns, size,
                                   requests_for(requests, size), 60.0,
                                   enable, disable)  # fmt: skip
                errs = [p.finish() for p in perfs]
                perfs = []
                if not os.path.exists(stat_out):
                    raise OSError(f"perf stat wrote nothing: {errs[0].strip()[-160:]}")
                counts = _parse_stat(stat_out)
                script = subprocess.run(
                    ["perf", "script", "-i", rec_out, "-F", "trace"],
                    capture_output=True, text=True, check=False, timeout=120,
                ).stdout  # fmt: skip
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                out[key] = {"error": str(exc)}
                continue
            finally:
                for p in perfs:
                    p.finish()
                shutil.rmtree(workdir, ignore_errors=True)
            n = int(report["requests"])
            wakeups, events, empty = _parse_waits(script)
            per_call = {
                name: round(counts.get(f"syscalls:sys_enter_{name}", 0) / n, 4)
                for name in calls
                if counts.get(f"syscalls:sys_enter_{name}", 0)
            }
            total = counts.get("raw_syscalls:sys_enter", 0)
            out[key] = {
                "requests": n,
                "syscalls_per_req": round(total / n, 4),
                "eagain_per_req": round(counts.get("raw_syscalls:sys_exit", 0) / n, 4),
                "per_syscall_per_req": per_call,
                "wakeups_per_req": round(wakeups / n, 4),
                "events_per_wakeup": round(events / wakeups, 3) if wakeups else None,
                "empty_wakeups": empty,
                "error": None,
            }
    finally:
        server.stop()
    return out


def _callgrind_total(path: Path) -> int:
    """The instruction count of a callgrind dump (its ``summary:`` line, events since the zero)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError(f"{path.name}: no summary line")


def instructions(
    spec: ServerSpec,
    client_exe: Path,
    cpus: tuple[int | None, int | None],
    configs: list[tuple[int, int]],
    requests: int,
) -> dict[str, Json]:
    """User-space instructions per request under callgrind, per configuration."""
    workdir = tempfile.mkdtemp(prefix="iomux-callgrind-")
    cg_spec = ServerSpec(
        spec.name,
        spec.kind,
        ["valgrind", "--tool=callgrind", "--quiet", f"--callgrind-out-file={workdir}/cg.%p",
         *spec.argv],
        cwd=spec.cwd,
    )  # fmt: skip
    out: dict[str, Json] = {}
    try:
        # Python's start-up under callgrind takes seconds.
        server = procs.start(cg_spec, cpus[0], timeout=120)
        try:
            for size, conns in configs:
                key = f"{size}B-{conns}c"
                pid = str(server.pid)
                before = set(Path(workdir).glob("cg.*.*"))

                def zero(pid: str = pid) -> None:
                    _control("-z", pid)

                def dump(pid: str = pid) -> None:
                    _control("-d", pid)

                try:
                    report = _windowed(client_exe, cpus[1], server, conns, size,
                                       requests_for(requests, size), 600.0,
                                       zero, dump)  # fmt: skip
                    dumps = _await_dump(workdir, before)
                    total = _callgrind_total(dumps)
                except (OSError, ValueError, subprocess.SubprocessError) as exc:
                    out[key] = {"error": str(exc)}
                    continue
                n = int(report["requests"])
                out[key] = {"requests": n, "instructions_per_req": round(total / n), "error": None}
        finally:
            server.stop(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def _control(flag: str, pid: str) -> None:
    proc = subprocess.run(
        ["callgrind_control", flag, pid], capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0 or "OK" not in proc.stdout:
        raise OSError(
            f"callgrind_control {flag} {pid}: {(proc.stdout + proc.stderr).strip()[-160:]}"
        )


def _await_dump(workdir: str, before: set[Path], timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = sorted(set(Path(workdir).glob("cg.*.*")) - before)
        # A dump is complete once its "totals:" line (the last one) is written.
        if new and "totals:" in new[-1].read_text(errors="replace")[-4096:]:
            return new[-1]
        time.sleep(0.1)
    raise OSError("callgrind wrote no dump")
