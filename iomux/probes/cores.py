"""Claim: I/O multiplexing cannot use several cores (write-up, drawbacks:
"不能充分利用多核处理器").

The claim mixes two things, measured apart here:

- One event loop is one thread, so it can never use more than one core, how
  ever hard it is loaded. Measured as the CPU time (user + system, from the
  wait4() rusage of the reaped server) over the wall time of a ``--workers 1``
  server that was kept busy by the load clients: at most 1.0 on every kernel
  that accounts CPU time per thread.
- Nothing stops a server from running one loop per core on one port
  (SO_REUSEPORT, or an inherited listener): ``iomux serve --workers N`` does,
  so workers do scale. Measured as echo throughput with ``--workers 2`` over
  ``--workers 1``. The load clients run on the same machine and need cores
  of their own: with fewer than 4 cores the ratio says more about the
  clients than the server (on 2 cores it flipped between 1.35, 1.21 and 1.02
  in successive runs), so the claims call it not measurable there.

Method: for each worker count, start ``python -m iomux serve`` on a free
loopback port, wait for its ready file, run two client processes (each keeping
a few connections busy with one message in flight), and sum the bytes echoed
back per second.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Tuple

import iomux
from iomux.probes._common import ProbeContext

CLIENT_PROCS = 2
CONNS_PER_PROC = 8
MESSAGE = 16384
FULL_DURATION = 1.5

# One client process: keep CONNS connections each with one MESSAGE in flight,
# for DURATION seconds; print the bytes echoed back.
CLIENT = """
import select, socket, sys, time
host, port, conns, size, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
msg = b"x" * size
socks = [socket.create_connection((host, port), timeout=10) for _ in range(conns)]
left = {s: size for s in socks}
for s in socks:
    s.sendall(msg)
got = 0
buf = bytearray(65536)
end = time.monotonic() + duration
while time.monotonic() < end:
    ready = select.select(socks, [], [], 0.5)[0]
    for s in ready:
        n = s.recv_into(buf)
        if n == 0:
            raise SystemExit("server closed a connection")
        got += n
        left[s] -= n
        if left[s] <= 0:
            left[s] += size
            s.sendall(msg)
for s in socks:
    s.close()
print(got)
"""


def _free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


def _env() -> Dict[str, str]:
    # The server child must import this same iomux, installed or not.
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(iomux.__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _proc_cpu(pid: int) -> Optional[float]:
    # Linux and gVisor: utime + stime of one process, in clock ticks, fields
    # 14 and 15 of /proc/PID/stat (after the parenthesised command name).
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _reap(proc: subprocess.Popen[str]) -> Optional[float]:
    # wait4() gives the reaped child's own CPU time; Popen.wait() would throw
    # it away. None when the child was already reaped elsewhere.
    end = time.monotonic() + 5
    killed = False
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return float(usage.ru_utime + usage.ru_stime)
        if time.monotonic() > end and not killed:
            proc.kill()
            killed = True
            end = time.monotonic() + 5
        elif time.monotonic() > end:
            return None
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[str]) -> Tuple[str, Optional[float]]:
    cpu: Optional[float] = None
    if proc.returncode is None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        cpu = _reap(proc)
    err = proc.stderr.read() if proc.stderr else ""
    return err, cpu


def _throughput(workers: int, duration: float, ready_timeout: float) -> Dict[str, Any]:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="iomux-cores-") as tmp:
        ready = os.path.join(tmp, "ready.json")
        argv = [sys.executable, "-m", "iomux", "serve", "--backend", "auto", "--host",
                "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--ready-file", ready, "--quiet"]
        started = time.monotonic()
        server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, env=_env())
        result: Dict[str, Any] = {}
        try:
            end = time.monotonic() + ready_timeout
            while not os.path.exists(ready):
                if server.poll() is not None or time.monotonic() > end:
                    lines = _stop(server)[0].strip().splitlines()
                    what = lines[-1] if lines else f"exit status {server.returncode}"
                    raise RuntimeError(f"iomux serve --workers {workers} did not become "
                                       f"ready: {what}")
                time.sleep(0.05)
            with open(ready) as f:
                info = json.load(f)
            clients = [subprocess.Popen([sys.executable, "-c", CLIENT, "127.0.0.1", str(port),
                                         str(CONNS_PER_PROC), str(MESSAGE), str(duration)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                       for _ in range(CLIENT_PROCS)]
            cpu0, t0 = _proc_cpu(server.pid), time.monotonic()
            total = 0
            for c in clients:
                out, err = c.communicate(timeout=duration + 30)
                if c.returncode != 0:
                    raise RuntimeError(f"client failed: {(err.strip().splitlines() or ['?'])[-1]}")
                total += int(out.strip())
            cpu1, t1 = _proc_cpu(server.pid), time.monotonic()
            result = {"bytes_per_s": total / duration, "backend": info.get("backend"),
                      "workers_reported": info.get("workers"),
                      # CPU of the server (the parent, with --workers N) while under load.
                      "load_cores_used": (None if cpu0 is None or cpu1 is None else
                                          round((cpu1 - cpu0) / (t1 - t0), 4))}
        finally:
            cpu = _stop(server)[1]
        wall = time.monotonic() - started
        # The whole life of the server, start-up included: the start-up is one
        # thread too, so it cannot lift the figure above one core either.
        result["server_cpu_s"] = None if cpu is None else round(cpu, 4)
        result["server_wall_s"] = round(wall, 4)
        result["server_cores_used"] = None if cpu is None else round(cpu / wall, 4)
        return result


def _cpus() -> Dict[str, Optional[int]]:
    aff: Optional[int] = None
    if hasattr(os, "sched_getaffinity"):
        aff = len(os.sched_getaffinity(0))
    # "cpus": what this process may really run on (the affinity mask, where the
    # kernel has one: Linux; os.cpu_count() elsewhere).
    return {"cpu_count": os.cpu_count(), "usable_cpus": aff, "cpus": aff or os.cpu_count()}


def probe(ctx: ProbeContext) -> Dict[str, Any]:
    """Echo throughput of ``iomux serve`` with 2 workers against 1, and the cores at hand."""
    out: Dict[str, Any] = dict(_cpus())
    try:
        out["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        out["loadavg_1m"] = None
    # Each run costs a server start (most of a second in a slow VM) plus the
    # clients' duration; keep a reserve so the whole probe ends in its share.
    duration = max(0.3, min(FULL_DURATION * ctx.scale, (ctx.left() - 6.0) / 2))
    # Two rounds in the order 1, 2, 2, 1 when there is time, keeping each
    # count's best: the machine may be shared, and noise only ever slows a run.
    rounds = 2 if ctx.left() > 4 * (duration + 1.5) else 1
    order = [1, 2, 2, 1] if rounds == 2 else [1, 2]
    cpus = out.get("cpus")
    if isinstance(cpus, int) and cpus < 4:
        # Below 4 cores the 2-worker figure cannot be judged (workers-scale requires
        # 4 in expected.json: the clients need cores of their own), so only the
        # one-loop run is made; each run costs a server start and a drain, which
        # took the probe suite past its budget on 2 cores. One, not two: the rounds
        # are for the throughput's noise (each count keeps its best), and no
        # throughput is judged here, while one loaded loop is what "never more than
        # one core" needs. The second cost 2-6 s of wall and about 3 core-seconds
        # on each of the ten targets of a matrix on two cores.
        order, rounds = [1], 1
    out.update({"duration_s": duration, "client_procs": CLIENT_PROCS, "rounds": rounds,
                "conns_per_proc": CONNS_PER_PROC, "message_bytes": MESSAGE})
    runs: Dict[str, Any] = {}
    out["runs"] = runs
    loop_cores: list[Optional[float]] = []
    try:
        for workers in order:
            got = _throughput(workers, duration, max(5.0, min(20.0, ctx.left())))
            if workers == 1:
                loop_cores.append(got["load_cores_used"] if got["load_cores_used"] is not None
                                  else got["server_cores_used"])
            best = runs.get(str(workers))
            got["all_bytes_per_s"] = (best["all_bytes_per_s"] if best else []) + \
                [round(got["bytes_per_s"])]
            if best is None or got["bytes_per_s"] > best["bytes_per_s"]:
                runs[str(workers)] = got
            else:
                best["all_bytes_per_s"] = got["all_bytes_per_s"]
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
        # Keep the core counts: they explain the figure even without one.
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["ratio"] = None
        return out
    one = runs["1"]["bytes_per_s"]
    two = runs["2"]["bytes_per_s"] if "2" in runs else None
    out["ratio"] = round(two / one, 3) if one and two is not None else None
    # The busiest single-loop run: the figure "one loop never exceeds one core" is about.
    used = [r for r in loop_cores if r is not None]
    out["one_loop_cores_used"] = max(used) if used else None
    out["one_loop_cores_all"] = loop_cores
    return out
