"""make bench: every server through the same load client, in interleaved rounds, then medians.

On a 2-CPU machine every server is CPU-bound, so requests/s mostly says how
fast the load client and the scheduler are; the figure that separates the
servers is their CPU time per request, read from /proc over the measured
window. The server is pinned to one CPU and the client to another, so they
never compete for a CPU with each other.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import build, clients, extras, procs
from bench.clients import Client
from bench.procs import ServerSpec

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
WARMUP_RUN_S = 1.0
IOMUX_BACKENDS = ["epoll", "epoll-et", "poll", "select"]
# Goals from issue 2, each a ratio of iomux-epoll's server CPU per request to a
# peer's, at 1 KiB and 10 connections, in the same run.
GOAL_SIZE, GOAL_CONNS = 1024, 10
GOALS = [
    ("iomux-epoll / asyncio-protocol", "asyncio-protocol", 1 / 1.15),
    ("iomux-epoll / uvloop-protocol", "uvloop-protocol", 1.0),
    ("iomux-epoll / c-epoll", "c-epoll", 1 / 0.85),
]
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
        # The least disturbed round: other processes only ever add CPU per request.
        "cpu_per_req_us_min": min(
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


def goals(servers: Json) -> list[Json]:
    """The issue's goal ratios, computed from this run's medians."""
    key = config_key(GOAL_SIZE, GOAL_CONNS)

    def cpu(name: str, figure: str = "cpu_per_req_us") -> float | None:
        v = servers.get(name, {}).get("results", {}).get(key, {}).get(figure)
        return float(v) if v else None

    out = []
    ours = cpu("iomux-epoll")
    for label, peer, limit in GOALS:
        theirs = cpu(peer)
        if ours is None or theirs is None:
            missing = "iomux-epoll" if ours is None else peer
            out.append(
                {
                    "goal": label,
                    "limit": limit,
                    "ratio": None,
                    "met": None,
                    "reason": f"{missing} not measured",
                }
            )
            continue
        ratio = ours / theirs
        ours_min, theirs_min = (
            cpu("iomux-epoll", "cpu_per_req_us_min"),
            cpu(peer, "cpu_per_req_us_min"),
        )
        out.append(
            {
                "goal": label,
                "limit": limit,
                "ratio": ratio,
                "met": ratio <= limit,
                "reason": None,
                # The verdict is on the medians; this one (each side's least disturbed
                # round) shows how much the machine's other load moved it.
                "ratio_best_rounds": ours_min / theirs_min if ours_min and theirs_min else None,
            }
        )
    return out


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(doc: Json) -> str:
    """The printed summary: one block per configuration, then the checks and the goals."""
    lines = []
    head = (
        f"{'server':<18}{'req/s':>10}{'CPU us/req':>12}{'srv CPU':>9}{'srv wait':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}"
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
            util, wait = m.get("server_cpu_util"), m.get("server_wait_share")
            lines.append(
                f"{name:<18}{_fmt(m['requests_per_s'], '10.0f')}{_fmt(m['cpu_per_req_us'], '12.2f')}"
                f"{_fmt(util * 100 if util is not None else None, '8.0f')}%"
                f"{_fmt(wait * 100 if wait is not None else None, '8.0f')}%"
                f"{_fmt(m['p50_us'] / 1000, '9.3f')}{_fmt(m['p99_us'] / 1000, '9.3f')}"
            )
    check = doc["client_check"]
    lines += [
        "",
        "srv CPU: the server's CPU time / wall time; srv wait: its run-queue wait / wall time",
        f"(CPU taken by other processes). {doc['settings']['pinning']}; load average at start "
        f"{doc['host']['loadavg_start']}, at end {doc['host'].get('loadavg_end')}.",
        "",
        f"load client ({doc['settings']['client']}) not the bottleneck: {check['ok']}",
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
    lines += ["", f"goals (server CPU per request, {GOAL_SIZE} B, {GOAL_CONNS} connections):"]
    for g in doc["goals"]:
        if g["ratio"] is None:
            lines.append(f"  {g['goal']:<32} not computed: {g['reason']}")
        else:
            verdict = "met" if g["met"] else "NOT met"
            best = g.get("ratio_best_rounds")
            lines.append(
                f"  {g['goal']:<32} {g['ratio']:.3f}  (goal <= {g['limit']:.3f})  {verdict:<8}"
                f"  best rounds: {_fmt(best, '.3f')}"
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
                f"goal <= 64 MiB {'met' if extra['met'] else 'NOT met'}"
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
    p.add_argument("--quick", action="store_true", help="1 round of 2 s per measurement")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all servers (default 3)")
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per measurement (default 2)"
    )
    p.add_argument("--servers", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--sizes", default="1024,65536", help="message sizes in bytes")
    p.add_argument("--conns", default="10,100", help="connection counts")
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


def _int_list(text: str, flag: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise BenchError(f"{flag} takes positive integers separated by commas, not {text!r}")
    return vals


def run(args: argparse.Namespace) -> Json:
    """Run everything the arguments ask for; returns the JSON document."""
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    duration = args.duration if args.duration is not None else 2.0
    if rounds < 1 or not duration > 0:
        raise BenchError("--rounds must be at least 1 and --duration more than 0")
    sizes, conns_list = _int_list(args.sizes, "--sizes"), _int_list(args.conns, "--conns")
    configs = [(s, c) for s in sizes for c in conns_list]
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
            "cpu_per_req": "server utime+stime from /proc over the window, / requests counted",
        },
        "servers": servers,
        "client_check": client_check(servers, configs),
        "noise": noise(servers),
        "goals": goals(servers),
    }
    epoll = by_name["iomux-epoll"]
    for key, count, fn in (
        ("idle", args.idle_conns, extras.idle_connections),
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
