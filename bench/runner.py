"""make bench: every server through the same load client, in interleaved rounds, then medians.

On a 2-CPU machine every server is CPU-bound, so requests/s mostly says how
fast the load client and the scheduler are; the figure that separates the
servers is their CPU time per request (user and system apart), read from
/proc over the measured window. The server is pinned to one CPU and the
client to another, so they never compete for a CPU with each other.

CPU time still moves with whatever else runs on the machine, so beside it go
counts that do not (bench/counts.py): system calls, wake-ups and events per
wake-up over a fixed number of requests, and instructions per request under
callgrind. A goal on CPU time counts as met only when its worst round meets it,
and one that is missed says what holds it back (``held_back``): user time per
request holds from round to round, kernel time moves with the wake-up pattern,
so each goal is also worked out with iomux's kernel time and the peer's user
time (the best any change to iomux's code could do in that run) and the other
way round (the user-space code's own verdict).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import build, clients, counts, extras, procs
from bench.clients import Client
from bench.procs import ServerSpec

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
WARMUP_RUN_S = 1.0
IOMUX_BACKENDS = ["epoll", "epoll-et", "poll", "select"]
# The configurations (size in bytes, connections): the goals' (1 KiB x 10), many
# small messages (per-event Python cost shows), one large stream (copies show).
CONFIGS = [(1024, 10), (64, 100), (65536, 1)]
# Goals from issue 13, each a ratio of iomux-epoll's server CPU per request to a
# peer's in the same round, in each of these configurations.
GOAL_CONFIGS = [(1024, 10), (64, 100)]
GOALS = [
    ("iomux-epoll / asyncio-protocol", "asyncio-protocol", 0.87),
    ("iomux-epoll / uvloop-protocol", "uvloop-protocol", 1.0),
    ("iomux-epoll / c-epoll", "c-epoll", 1.18),
]
IDLE_GOAL_MIB = 32
# Requests counted per configuration (bench/counts.py scales them down for large messages).
# (--quick skips callgrind: a Python server takes some 10 s to start under it.)
COUNT_REQUESTS, QUICK_COUNT_REQUESTS = 10000, 1000
CALLGRIND_REQUESTS, QUICK_CALLGRIND_REQUESTS = 1000, 0
Json = dict[str, Any]


def server_specs(build_dir: Path) -> list[ServerSpec]:
    """Every server the benchmark knows, C ceiling first; ``not_run`` says why one cannot run."""
    exe, why = build.build("echo_epoll", build_dir)
    specs = [ServerSpec("c-epoll", "c", [str(exe)] if exe else [], not_run=why)]
    py = sys.executable
    for backend in IOMUX_BACKENDS:
        argv = [py, "-m", "iomux", "serve", "--backend", backend, "--quiet"]
        specs.append(ServerSpec(f"iomux-{backend}", "iomux", argv, cwd=str(REPO)))
    for name, module in [
        ("asyncio-protocol", "asyncio_protocol"),
        ("asyncio-streams", "asyncio_streams"),
        ("uvloop-protocol", "uvloop_protocol"),
    ]:
        specs.append(
            ServerSpec(name, "asyncio", [py, "-m", f"bench.peers.{module}"], cwd=str(REPO))
        )
    if importlib.util.find_spec("uvloop") is None:
        specs[-1].not_run = f"uvloop does not import in {py}"
    return specs


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def pick_cpus() -> tuple[int | None, int | None, str]:
    """(server CPU, client CPU, note): two different CPUs this process may use."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None, "no sched_setaffinity here: nothing pinned"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return cpus[0], cpus[0], "only one CPU available: server and client share it"
    return cpus[0], cpus[1], f"server on CPU {cpus[0]}, client on CPU {cpus[1]}"


def median_of(runs: list[Json]) -> Json:
    """Medians of the figures over the rounds that produced figures."""
    ok = [r for r in runs if not r.get("error")]
    if not ok:
        return {"error": runs[-1].get("error") if runs else "not measured"}

    def med(key: str) -> float | None:
        vals = [float(r[key]) for r in ok if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    lat = [r["latency_us"] for r in ok]
    return {
        "rounds": len(ok),
        "requests_per_s": med("requests_per_s"),
        "mb_per_s": med("mb_per_s"),
        "cpu_per_req_us": med("cpu_per_req_us"),
        "user_per_req_us": med("user_per_req_us"),
        "sys_per_req_us": med("sys_per_req_us"),
        # The least disturbed round: other processes only ever add CPU per request.
        "cpu_per_req_us_min": min(
            (float(r["cpu_per_req_us"]) for r in ok if r.get("cpu_per_req_us") is not None),
            default=None,
        ),
        "cpu_per_req_us_max": max(
            (float(r["cpu_per_req_us"]) for r in ok if r.get("cpu_per_req_us") is not None),
            default=None,
        ),
        "server_cpu_util": med("server_cpu_util"),
        "client_cpu_util": med("client_cpu_util"),
        "server_wait_share": med("server_wait_share"),
        "client_wait_share": med("client_wait_share"),
        "p50_us": statistics.median(x["p50"] for x in lat),
        "p99_us": statistics.median(x["p99"] for x in lat),
        "errors": sum(int(r.get("errors", 0)) for r in ok),
    }


def config_key(size: int, conns: int) -> str:
    """The key of one (size, connections) cell in the JSON."""
    return f"{size}B-{conns}c"


def client_check(servers: Json, configs: list[tuple[int, int]]) -> Json:
    """Is the load client fast enough? The C server must go faster through it than any Python server."""
    cells: list[Json] = []
    for size, conns in configs:
        key = config_key(size, conns)
        c_rps = servers.get("c-epoll", {}).get("results", {}).get(key, {}).get("requests_per_s")
        py = {
            name: s["results"][key]["requests_per_s"]
            for name, s in servers.items()
            if s["kind"] != "c" and s.get("results", {}).get(key, {}).get("requests_per_s")
        }
        if c_rps is None or not py:
            cells.append(
                {"config": key, "ok": None, "reason": "C server or Python servers not measured"}
            )
            continue
        fastest = max(py, key=lambda n: py[n])
        cells.append(
            {
                "config": key,
                "c_rps": c_rps,
                "fastest_python": fastest,
                "fastest_python_rps": py[fastest],
                "ok": c_rps > py[fastest],
                # Supporting evidence, robust to other load on the machine: a server that
                # is on its CPU or waiting for it (share near 1) is not waiting for the client.
                "c_busy_or_waiting": _busy(servers["c-epoll"]["results"][key]),
                "fastest_python_busy_or_waiting": _busy(servers[fastest]["results"][key]),
            }
        )
    verdicts = [c["ok"] for c in cells if c["ok"] is not None]
    return {
        "rule": "c-epoll requests/s > every Python server's, per configuration",
        "ok": all(verdicts) if verdicts else None,
        "configs": cells,
    }


def noise(servers: Json) -> Json:
    """How much other processes took from the servers: the median run-queue wait share.

    Above ~10 % the requests/s (and so the client check) follow the machine's
    other load more than the servers; CPU per request holds up far better.
    """
    waits = [
        float(cell["server_wait_share"])
        for s in servers.values()
        for cell in s.get("results", {}).values()
        if cell.get("server_wait_share") is not None
    ]
    median = statistics.median(waits) if waits else None
    return {
        "median_server_wait_share": median,
        "busy_machine": median is not None and median > 0.10,
    }


def _busy(m: Json) -> float | None:
    util, wait = m.get("server_cpu_util"), m.get("server_wait_share")
    return None if util is None or wait is None else float(util) + float(wait)


def _round_cpu(servers: Json, name: str, key: str) -> list[float | None]:
    """One server's CPU per request in each round of one cell (None where that round failed)."""
    runs = servers.get(name, {}).get("results", {}).get(key, {}).get("runs", [])
    return [
        None if r.get("error") or not r.get("cpu_per_req_us") else float(r["cpu_per_req_us"])
        for r in runs
    ]


def _round_split(servers: Json, name: str, key: str) -> list[tuple[float, float] | None]:
    """One server's (user, sys) microseconds per request in each round of one cell."""
    runs = servers.get(name, {}).get("results", {}).get(key, {}).get("runs", [])
    return [
        None
        if r.get("error") or r.get("user_per_req_us") is None or r.get("sys_per_req_us") is None
        else (float(r["user_per_req_us"]), float(r["sys_per_req_us"]))
        for r in runs
    ]


def held_back(ours: list[tuple[float, float] | None], theirs: list[tuple[float, float] | None],
              limit: float) -> Json:
    """What keeps a CPU goal from being met, from the user/sys split of the paired rounds.

    Two counterfactual ratios per round, each worst over the rounds as the verdict is:
    ``at_peer_user``, iomux's kernel time with the peer's user time (the best any
    change to iomux's own code could give in this run), and ``at_peer_kernel``,
    iomux's user time with the peer's kernel time (the verdict on the user-space
    code alone). Kernel time moves with the wake-up pattern and the machine;
    user time per request holds to a few per cent from round to round.
    """
    pairs = [(a, b) for a, b in zip(ours, theirs) if a is not None and b is not None]
    if not pairs:
        return {"kernel_share": None, "user_ratio": None, "at_peer_user": None,
                "at_peer_kernel": None, "by": None}  # fmt: skip
    at_peer_user = max((b[0] + a[1]) / sum(b) for a, b in pairs)
    at_peer_kernel = max((a[0] + b[1]) / sum(b) for a, b in pairs)
    share = statistics.median(a[1] / sum(a) for a, _ in pairs)
    user_ratios = [a[0] / b[0] for a, b in pairs if b[0] > 0]
    user_ratio = statistics.median(user_ratios) if user_ratios else None
    if at_peer_user > limit:
        by = (f"kernel time: with {at_peer_user:.3f} at the peer's user time, no change to "
              f"iomux's own code meets it in this run (kernel {share:.0%} of iomux's CPU)")
    elif at_peer_kernel > limit:
        times = "" if user_ratio is None else f" (user time {user_ratio:.2f}x the peer's)"
        by = f"user space: {at_peer_kernel:.3f} at the peer's kernel time{times}"
    else:
        by = (f"neither alone: {at_peer_user:.3f} at the peer's user time, {at_peer_kernel:.3f} "
              "at its kernel time")
    return {"kernel_share": share, "user_ratio": user_ratio, "at_peer_user": at_peer_user,
            "at_peer_kernel": at_peer_kernel, "by": by}  # fmt: skip


def goals(servers: Json, configs: list[tuple[int, int]] | None = None) -> list[Json]:
    """The issue's CPU goals, per goal configuration: ratios per round, verdict on the worst.

    Round i of iomux-epoll is paired with round i of the peer (the rounds are
    interleaved, so a pair ran minutes apart at most). A goal is met only when
    every paired round meets it. ``held_back`` says, for every goal, what the
    user/sys split of the same rounds puts the verdict down to.
    """
    out = []
    for size, conns in GOAL_CONFIGS if configs is None else configs:
        key = config_key(size, conns)
        ours = _round_cpu(servers, "iomux-epoll", key)
        ours_split = _round_split(servers, "iomux-epoll", key)
        for label, peer, limit in GOALS:
            theirs = _round_cpu(servers, peer, key)
            ratios = [a / b for a, b in zip(ours, theirs) if a is not None and b is not None]
            goal: Json = {"goal": label, "config": key, "limit": limit}
            if not ratios:
                missing = "iomux-epoll" if not any(ours) else peer
                goal.update(ratio=None, met=None, reason=f"{missing} not measured in {key}")
                out.append(goal)
                continue
            goal.update(
                # The verdict: the worst round.
                ratio=max(ratios),
                met=max(ratios) <= limit,
                reason=None,
                ratio_median=statistics.median(ratios),
                ratio_best=min(ratios),
                ratio_spread=max(ratios) - min(ratios),
                rounds=len(ratios),
                ratios=ratios,
            )
            goal["held_back"] = held_back(ours_split, _round_split(servers, peer, key), limit)
            if goal["met"]:
                goal["held_back"]["by"] = None
            out.append(goal)
    return out


def syscall_goals(servers: Json, configs: list[tuple[int, int]]) -> list[Json]:
    """System calls per request of iomux-epoll against the C server's, per configuration.

    The verdict is on all calls. Beside it: the calls other than the waits (the
    reads, writes and epoll_ctls a request costs, which do not depend on
    timing) and the wake-ups, whose number per request follows how many events
    each wake-up found, i.e. how fast the server is against the client.
    """
    out = []
    for size, conns in configs:
        key = config_key(size, conns)

        def cell(name: str, key: str = key) -> Json:
            c: Json = servers.get(name, {}).get("counts", {}).get(key, {})
            return c

        ours, theirs = cell("iomux-epoll"), cell("c-epoll")
        goal: Json = {"goal": "iomux-epoll syscalls/req <= c-epoll's", "config": key}
        if ours.get("syscalls_per_req") is None or theirs.get("syscalls_per_req") is None:
            missing = "iomux-epoll" if ours.get("syscalls_per_req") is None else "c-epoll"
            goal.update(
                ours=None, c=None, met=None, reason=f"{missing}: syscalls not counted in {key}"
            )
            out.append(goal)
            continue
        o, c = float(ours["syscalls_per_req"]), float(theirs["syscalls_per_req"])
        o_io = o - float(ours.get("wakeups_per_req") or 0.0)
        c_io = c - float(theirs.get("wakeups_per_req") or 0.0)
        # Counts of one run each: under 0.5 % apart is the same count.
        goal.update(
            ours=o,
            c=c,
            met=o <= c * 1.005,
            reason=None,
            ours_besides_waits=round(o_io, 4),
            c_besides_waits=round(c_io, 4),
            ours_wakeups=ours.get("wakeups_per_req"),
            c_wakeups=theirs.get("wakeups_per_req"),
        )
        if o > c * 1.005 and o_io <= c_io * 1.005:
            goal["reason"] = (
                f"every extra call is a wake-up: {o_io:.3f} vs {c_io:.3f} calls besides the "
                f"waits, but {ours.get('events_per_wakeup')} vs "
                f"{theirs.get('events_per_wakeup')} events per wake-up in this run"
            )
        out.append(goal)
    return out


def ceiling(servers: Json, configs: list[tuple[int, int]]) -> list[Json]:
    """Is the C server the most efficient per configuration? When not, say why from the figures.

    The usual reason on two CPUs: the C server answers faster than the client
    asks, so it sleeps between requests (its CPU use well under 100 %) and
    wakes up for one or two events at a time, paying an epoll_wait and a
    context switch per request that a busier Python server shares among many
    events ("client-bound"). The other is the scheduler: other processes took
    the C server's CPU (its run-queue wait share).
    """
    out = []
    for size, conns in configs:
        key = config_key(size, conns)
        cpu = {
            name: float(s["results"][key]["cpu_per_req_us"])
            for name, s in servers.items()
            if s.get("results", {}).get(key, {}).get("cpu_per_req_us")
        }
        cell: Json = {"config": key}
        if "c-epoll" not in cpu or len(cpu) < 2:
            cell.update(c_is_ceiling=None, why="C server or its peers not measured")
            out.append(cell)
            continue
        best = min(cpu, key=lambda n: cpu[n])
        cell.update(c_is_ceiling=best == "c-epoll", most_efficient=best, cpu_per_req_us=cpu[best])
        if best != "c-epoll":
            c_res = servers["c-epoll"]["results"][key]
            b_res = servers[best]["results"][key]
            c_cnt = servers["c-epoll"].get("counts", {}).get(key, {})
            b_cnt = servers[best].get("counts", {}).get(key, {})
            util, wait = c_res.get("server_cpu_util"), c_res.get("server_wait_share")
            reasons = []
            if util is not None and util < 0.9:
                reasons.append(
                    f"client-bound: c-epoll was on its CPU {util:.0%} of the window, waiting "
                    f"for the client the rest"
                )
            c_ev, b_ev = c_cnt.get("events_per_wakeup"), b_cnt.get("events_per_wakeup")
            if c_ev is not None and b_ev is not None and c_ev < b_ev:
                reasons.append(
                    f"batching: c-epoll handled {c_ev:.1f} events per wake-up, {best} "
                    f"{b_ev:.1f}, so c-epoll pays more wake-ups (epoll_wait and a context "
                    f"switch) per request"
                )
            if wait is not None and wait > 0.05:
                reasons.append(f"scheduler: other processes took {wait:.0%} of c-epoll's CPU")
            c_sys, b_sys = c_res.get("sys_per_req_us"), b_res.get("sys_per_req_us")
            if c_sys is not None and b_sys is not None:
                reasons.append(
                    f"kernel time per request: c-epoll {c_sys:.2f} us, {best} {b_sys:.2f} us"
                )
            cell["why"] = "; ".join(reasons) or "no figure explains it: noise of this run"
        out.append(cell)
    return out


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(doc: Json) -> str:
    """The printed summary: one block per configuration, then the checks and the goals."""
    lines = []
    head = (
        f"{'server':<18}{'req/s':>9}{'CPU us/req':>11}{'user':>7}{'sys':>7}{'srv CPU':>8}"
        f"{'wait':>6}{'p99 ms':>8}{'sysc/req':>9}{'wake/req':>9}{'ev/wake':>8}{'instr/req':>10}"
    )
    for size, conns in doc["settings"]["configs"]:
        key = config_key(size, conns)
        lines += ["", f"== {size} B messages, {conns} connections ==", head]
        for name, s in doc["servers"].items():
            if s["status"] != "run":
                lines.append(f"{name:<18}not run: {s['reason']}")
                continue
            m = s["results"].get(key, {})
            if m.get("error"):
                lines.append(f"{name:<18}failed: {m['error']}")
                continue
            c = s.get("counts", {}).get(key, {})
            ins = s.get("instructions", {}).get(key, {})
            util, wait = m.get("server_cpu_util"), m.get("server_wait_share")
            lines.append(
                f"{name:<18}{_fmt(m['requests_per_s'], '9.0f')}{_fmt(m['cpu_per_req_us'], '11.2f')}"
                f"{_fmt(m.get('user_per_req_us'), '7.2f')}{_fmt(m.get('sys_per_req_us'), '7.2f')}"
                f"{_fmt(util * 100 if util is not None else None, '7.0f')}%"
                f"{_fmt(wait * 100 if wait is not None else None, '5.0f')}%"
                f"{_fmt(m['p99_us'] / 1000, '8.3f')}"
                f"{_fmt(c.get('syscalls_per_req'), '9.3f')}{_fmt(c.get('wakeups_per_req'), '9.3f')}"
                f"{_fmt(c.get('events_per_wakeup'), '8.1f')}"
                f"{_fmt(ins.get('instructions_per_req'), '10.0f')}"
            )
    check = doc["client_check"]
    st = doc["settings"]
    lines += [
        "",
        "CPU us/req = user + sys (server: schedstat on-CPU time, split by utime/stime); srv CPU: its CPU time / wall time; wait: its",
        f"run-queue wait / wall time (CPU taken by other processes). {st['pinning']}; load average",
        f"at start {doc['host']['loadavg_start']}, at end {doc['host'].get('loadavg_end')}.",
        f"sysc/req, wake/req, ev/wake: {st['syscalls_method']}",
        f"instr/req: {st['instructions_method']}",
        "",
        f"load client ({st['client']}) not the bottleneck: {check['ok']}",
    ]
    if doc["noise"]["busy_machine"]:
        lines.insert(
            -1,
            f"WARNING: other processes took {doc['noise']['median_server_wait_share']:.0%} of the "
            "servers' CPU (median): requests/s and this check are unreliable in this run.",
        )
    for c in check["configs"]:
        if c["ok"] is not None:
            lines.append(
                f"  {c['config']}: c-epoll {c['c_rps']:.0f} req/s vs fastest Python "
                f"{c['fastest_python']} {c['fastest_python_rps']:.0f} -> {'ok' if c['ok'] else 'NOT OK'}"
            )
    for cell in doc.get("ceiling", []):
        if cell.get("c_is_ceiling") is False:
            lines.append(
                f"  {cell['config']}: c-epoll is not the most efficient ({cell['most_efficient']} "
                f"is): {cell['why']}"
            )
    lines += ["", "goals (server CPU per request, the worst round's ratio decides):"]
    for g in doc["goals"]:
        label = f"{g['goal']} @ {g['config']}"
        if g["ratio"] is None:
            lines.append(f"  {label:<44} not computed: {g['reason']}")
        else:
            verdict = "met" if g["met"] else "NOT met"
            lines.append(
                f"  {label:<44} worst {g['ratio']:.3f} (goal <= {g['limit']:.2f}) {verdict:<8}"
                f" median {g['ratio_median']:.3f}, best {g['ratio_best']:.3f} over {g['rounds']}"
            )
            if g.get("held_back", {}).get("by"):
                lines.append(f"  {'':<44} held back by {g['held_back']['by']}")
    for g in doc.get("syscall_goals", []):
        label = f"{g['goal']} @ {g['config']}"
        if g["met"] is None:
            lines.append(f"  {label:<44} not computed: {g['reason']}")
        else:
            lines.append(
                f"  {label:<44} {g['ours']:.3f} vs {g['c']:.3f}  {'met' if g['met'] else 'NOT met'}"
                f"  (besides waits {g['ours_besides_waits']:.3f} vs {g['c_besides_waits']:.3f})"
                + (f": {g['reason']}" if g["reason"] else "")
            )
    for label, key in (("idle connections", "idle"), ("workers", "workers")):
        extra = doc.get(key)
        if extra is None:
            continue
        if "error" in extra:
            lines.append(f"{label}: not measured: {extra['error']}")
        elif key == "idle":
            lines.append(
                f"{label}: {extra['connections']} on {extra['server']}: RSS {extra['rss_mib']} MiB "
                f"(before {extra['rss_before_mib']} MiB, {extra['bytes_per_conn']} B/conn); "
                f"goal {extra['goal']} {'met' if extra['met'] else 'NOT met'}"
            )
        else:
            split = ", ".join(f"pid {p}: {w['accepted']}" for p, w in extra["per_worker"].items())
            lines.append(
                f"{label}: {extra['connections']} connections over --workers {extra['workers']}: "
                f"{split}; {'spread' if extra['met'] else 'NOT spread'}"
            )
    return "\n".join(lines).lstrip("\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The runner's command line."""
    p = argparse.ArgumentParser(prog="python -m bench", description="iomux benchmarks (make bench)")
    p.add_argument(
        "--quick", action="store_true", help="1 round of 2 s per measurement, fewer counts"
    )
    p.add_argument("--rounds", type=int, default=None, help="rounds over all servers (default 3)")
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per measurement (default 2)"
    )
    p.add_argument("--servers", default=None, help="comma-separated subset (default: all)")
    p.add_argument(
        "--configs",
        default=",".join(f"{s}x{c}" for s, c in CONFIGS),
        help="SIZExCONNS cells, comma-separated (default: %(default)s)",
    )
    p.add_argument(
        "--count-requests",
        type=int,
        default=None,
        help=f"requests per cell for the syscall counts (default {COUNT_REQUESTS}, "
        f"--quick {QUICK_COUNT_REQUESTS}; 0: skip)",
    )
    p.add_argument(
        "--callgrind-requests",
        type=int,
        default=None,
        help=f"requests per cell under callgrind (default {CALLGRIND_REQUESTS}, "
        f"--quick {QUICK_CALLGRIND_REQUESTS}; 0: skip)",
    )
    p.add_argument("--client", choices=["auto", "c", "python"], default="auto", help="load client")
    p.add_argument(
        "--idle-conns", type=int, default=10000, help="idle connections on iomux-epoll (0: skip)"
    )
    p.add_argument(
        "--worker-conns", type=int, default=1000, help="connections for --workers 2 (0: skip)"
    )
    p.add_argument("--out", default=str(OUT_DIR), help="directory for the JSON (default bench/out)")
    return p.parse_args(argv)


class BenchError(Exception):
    """A bad option (status 2) or a missing requirement (status 1): one line, no traceback."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _configs(text: str) -> list[tuple[int, int]]:
    out = []
    for cell in (c.strip() for c in text.split(",") if c.strip()):
        size, sep, conns = cell.partition("x")
        if not sep or not size.isdigit() or not conns.isdigit() or not int(size) or not int(conns):
            raise BenchError(f"--configs takes SIZExCONNS cells such as 1024x10, not {cell!r}")
        out.append((int(size), int(conns)))
    if not out:
        raise BenchError("--configs is empty")
    return out


def run(args: argparse.Namespace) -> Json:
    """Run everything the arguments ask for; returns the JSON document."""
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    duration = args.duration if args.duration is not None else 2.0
    if rounds < 1 or not duration > 0:
        raise BenchError("--rounds must be at least 1 and --duration more than 0")
    configs = _configs(args.configs)
    sizes, conns_list = [s for s, _ in configs], [c for _, c in configs]
    count_n = args.count_requests
    if count_n is None:
        count_n = QUICK_COUNT_REQUESTS if args.quick else COUNT_REQUESTS
    cg_n = args.callgrind_requests
    if cg_n is None:
        cg_n = QUICK_CALLGRIND_REQUESTS if args.quick else CALLGRIND_REQUESTS
    if count_n < 0 or cg_n < 0:
        raise BenchError("--count-requests and --callgrind-requests must not be negative")
    out_dir = Path(args.out)
    build_dir = out_dir / "build"
    specs = server_specs(build_dir)
    by_name = {s.name: s for s in specs}
    if args.servers:
        wanted = [n.strip() for n in args.servers.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise BenchError(f"unknown server {unknown[0]!r}; known: {', '.join(by_name)}")
        specs = [by_name[n] for n in wanted]

    server_cpu, client_cpu, pin_note = pick_cpus()
    client_exe: Path | None = None
    client_why: str | None = "python client asked for"
    if args.client in ("auto", "c"):
        client_exe, client_why = build.build("loadclient", build_dir)
        if client_exe is None and args.client == "c":
            raise BenchError(f"the C load client cannot run: {client_why}", status=1)
    client = Client("c" if client_exe else "python", client_exe, client_cpu)
    # One open fd per connection in the client; the C client inherits this limit.
    extras.raise_nofile(max(conns_list) + 64)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = _loadavg()
    runs: dict[str, dict[str, list[Json]]] = {s.name: {} for s in specs}
    for rnd in range(rounds):
        # Round-robin, starting one server later each round, so no server always runs
        # first (or right after the same neighbour) while the machine warms up.
        order = specs[rnd % len(specs) :] + specs[: rnd % len(specs)]
        for spec in order:
            if spec.not_run:
                continue
            print(f"round {rnd + 1}/{rounds}: {spec.name}", file=sys.stderr, flush=True)
            try:
                server = procs.start(spec, server_cpu)
            except procs.StartError as exc:
                spec.not_run = str(exc)
                continue
            try:
                # A throwaway run first: a freshly started Python server is measurably
                # dearer per request for its first second or two (seen on asyncio: about
                # 3x), and whichever cell ran first would carry that cost alone.
                clients.measure(
                    client, server, conns_list[0], sizes[0], min(WARMUP_RUN_S, duration)
                )
                for size, conns in configs:
                    res = clients.measure(client, server, conns, size, duration)
                    if server.proc.poll() is not None:
                        res = {
                            "error": f"server died: {server.stderr_tail() or server.proc.returncode}"
                        }
                    runs[spec.name].setdefault(config_key(size, conns), []).append(res)
                    if server.proc.poll() is not None:
                        break
            finally:
                server.stop()

    servers: Json = {}
    for spec in specs:
        entry: Json = {"kind": spec.kind, "argv": spec.argv}
        if spec.not_run and not runs[spec.name]:
            entry.update(status="not run", reason=spec.not_run)
        else:
            entry.update(status="run", reason=spec.not_run)
            entry["results"] = {
                key: {**median_of(rs), "runs": rs} for key, rs in runs[spec.name].items()
            }
        servers[spec.name] = entry

    count_notes = _count_all(
        specs, servers, client, (server_cpu, client_cpu), configs, count_n, cg_n
    )
    doc: Json = {
        "started": started.isoformat(timespec="seconds"),
        "host": {
            "kernel": platform.release(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cc": build.compiler(),
            "loadavg_start": load_start,
        },
        "settings": {
            "rounds": rounds,
            "duration_s": duration,
            "warmup_s": clients.WARMUP_S if client.kind == "c" else 0.0,
            "configs": configs,
            "client": client.kind,
            "client_note": None if client.kind == "c" else f"C client not used: {client_why}",
            "pinning": pin_note,
            "cpu_per_req": "server on-CPU time over the window (/proc/PID/schedstat, split into user and system in utime:stime proportion; ticks where schedstat is missing), / requests counted",
            **count_notes,
        },
        "servers": servers,
        "client_check": client_check(servers, configs),
        "noise": noise(servers),
        "goals": goals(servers, [c for c in GOAL_CONFIGS if c in configs]),
        "syscall_goals": syscall_goals(servers, configs),
        "ceiling": ceiling(servers, configs),
    }
    epoll = by_name["iomux-epoll"]
    for key, count, fn in (
        (
            "idle",
            args.idle_conns,
            functools.partial(extras.idle_connections, goal_mib=IDLE_GOAL_MIB),
        ),
        ("workers", args.worker_conns, extras.workers_spread),
    ):
        if count <= 0:
            continue
        print(f"{key}: {count} connections on iomux-epoll", file=sys.stderr, flush=True)
        try:
            doc[key] = fn(epoll, count)
        except (procs.StartError, OSError) as exc:
            doc[key] = {"error": str(exc)}
    doc["host"]["loadavg_end"] = _loadavg()
    doc["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return doc


def _count_all(
    specs: list[ServerSpec],
    servers: Json,
    client: Client,
    cpus: tuple[int | None, int | None],
    configs: list[tuple[int, int]],
    count_n: int,
    cg_n: int,
) -> Json:
    """Add ``counts`` and ``instructions`` to each server run; returns the methods' notes."""
    sys_why = "skipped (--count-requests 0)" if not count_n else counts.perf_problem()
    cg_why = (
        "skipped (--callgrind-requests 0; --quick skips it unless asked for)"
        if not cg_n
        else counts.callgrind_problem()
    )
    if client.kind != "c" or client.exe is None:
        sys_why = cg_why = "needs the C load client's COUNT mode (no C compiler)"
    for spec in specs:
        entry = servers[spec.name]
        if entry["status"] != "run":
            continue
        for key, why, fn, n in (
            ("counts", sys_why, counts.syscalls, count_n),
            ("instructions", cg_why, counts.instructions, cg_n),
        ):
            if why:
                entry[key] = {
                    config_key(s, c): {"error": f"not measured: {why}"} for s, c in configs
                }
                continue
            print(f"{key}: {spec.name}", file=sys.stderr, flush=True)
            assert client.exe is not None
            try:
                entry[key] = fn(spec, client.exe, cpus, configs, n)
            except (procs.StartError, OSError) as exc:
                entry[key] = {config_key(s, c): {"error": str(exc)} for s, c in configs}
    return {
        "syscalls_method": (
            f"perf stat (syscall tracepoints) and perf record (epoll_wait/poll/select returns) on "
            f"the server over {count_n} requests per cell (fewer above 4 KiB: see requests)"
            if not sys_why
            else f"not measured: {sys_why}"
        ),
        "instructions_method": (
            f"valgrind --tool=callgrind, user-space instructions over {cg_n} requests per cell"
            if not cg_why
            else f"not measured: {cg_why}"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m bench``: run, write bench/out/bench-<timestamp>.json and latest.json, print the table."""
    args = parse_args(argv)
    try:
        doc = run(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return exc.status
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = doc["started"].replace(":", "").replace("-", "").replace("+0000", "Z")
    text = json.dumps(doc, indent=2)
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(text + "\n")
    (out_dir / "latest.json").write_text(text + "\n")
    print(table(doc))
    print(f"\nJSON: {path}")
    return 0
