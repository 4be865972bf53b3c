"""Run the load client once against a running server and measure the server meanwhile.

Two clients speak the same JSON (the keys of ``iomux bench --json``):
- the C client (bench/c/loadclient.c), the default wherever cc exists: it
  prints "measuring" when its warm-up ends and the JSON when the window
  closes, so the server's CPU time is read exactly over the counted window;
- ``python -m iomux.loadgen`` (one process), the fallback without a compiler:
  the server's CPU is then read around the whole client run, set-up included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.procs import (
    Server,
    run_delay_seconds,
    tree_cpu_times,
    tree_on_cpu_seconds,
    tree_run_delay_seconds,
)

REPO = Path(__file__).resolve().parent.parent
WARMUP_S = 0.5


@dataclass
class Client:
    """Which load client to run, pinned to which CPU."""

    kind: str  # "c" | "python"
    exe: Path | None
    cpu: int | None

    def argv(self, port: int, conns: int, size: int, duration: float) -> list[str]:
        """The client's command line for one measurement."""
        if self.kind == "c":
            assert self.exe is not None
            return [
                str(self.exe),
                "127.0.0.1",
                str(port),
                str(conns),
                str(size),
                str(duration),
                str(WARMUP_S),
            ]
        return [
            sys.executable, "-m", "iomux.loadgen", f"127.0.0.1:{port}",
            "--conns", str(conns), "--size", str(size), "--duration", str(duration),
            "--procs", "1", "--json",
        ]  # fmt: skip


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def measure(
    client: Client, server: Server, conns: int, size: int, duration: float
) -> dict[str, object]:
    """One closed-loop run; returns the client's report plus the server's CPU over the window.

    Added keys: ``server_cpu_s`` (``server_user_s`` + ``server_sys_s``; ``cpu_clock`` says
    whether it is schedstat's exact on-CPU time or the ticks of /proc/PID/stat),
    ``window_s`` (wall time the CPU was read over),
    ``server_cpu_util`` (share of one CPU), ``client_cpu_util``,
    ``server_wait_share`` and ``client_wait_share`` (run-queue wait over the
    window: the CPU other processes took from them, i.e. the noise),
    ``cpu_per_req_us`` (server CPU microseconds per request; ``user_per_req_us``
    and ``sys_per_req_us`` its user and kernel parts), and ``error``
    (None, or one line saying why the run produced no figures).
    """
    proc = subprocess.Popen(
        client.argv(server.port, conns, size, duration),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=str(REPO),
        preexec_fn=lambda: _pin(client.cpu),
    )
    assert proc.stdout is not None and proc.stderr is not None

    def sample() -> tuple[float, float, float, float, float, float | None]:
        user, system = tree_cpu_times(server.pid)
        return (
            time.monotonic(),
            user,
            tree_run_delay_seconds(server.pid),
            run_delay_seconds(proc.pid),
            system,
            tree_on_cpu_seconds(server.pid),
        )

    a = sample()
    report: dict[str, object] | None = None
    try:
        # The C client writes "measuring" and then one JSON line; the Python client only JSON.
        # No read timeout is needed: the client bounds its own run by --duration.
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line == "measuring":
                a = sample()
            elif line.startswith("{"):
                b = sample()
                report = json.loads(line)
                break
        proc.wait(timeout=duration + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err = proc.stderr.read().decode(errors="replace").strip()
        proc.stdout.close()
        proc.stderr.close()
    if report is None:
        why = err.splitlines()[-1] if err else f"exit status {proc.returncode}"
        return {"error": f"load client failed: {why}"}
    requests = int(report["requests"])  # type: ignore[call-overload]
    window = b[0] - a[0]
    server_user, server_sys = b[1] - a[1], b[4] - a[4]
    server_cpu = server_user + server_sys
    if a[5] is not None and b[5] is not None:
        # The scheduler's exact on-CPU time, split in the ticks' proportion (procs.py).
        exact = b[5] - a[5]
        user_share = server_user / server_cpu if server_cpu > 0 else 0.0
        server_cpu, server_user = exact, exact * user_share
        server_sys = exact - server_user
    client_cpu = float(report["client_cpu_s"])  # type: ignore[arg-type]
    report.update(
        server_cpu_s=server_cpu,
        cpu_clock="schedstat" if a[5] is not None and b[5] is not None else "ticks",
        server_user_s=server_user,
        server_sys_s=server_sys,
        window_s=window,
        server_cpu_util=server_cpu / window if window > 0 else 0.0,
        client_cpu_util=client_cpu / duration,
        server_wait_share=(b[2] - a[2]) / window if window > 0 else 0.0,
        client_wait_share=(b[3] - a[3]) / window if window > 0 else 0.0,
        cpu_per_req_us=server_cpu / requests * 1e6 if requests else None,
        user_per_req_us=server_user / requests * 1e6 if requests else None,
        sys_per_req_us=server_sys / requests * 1e6 if requests else None,
        error=None if requests else "no request completed",
    )
    return report
