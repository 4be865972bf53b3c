"""The load client (iomux/loadgen.py) and the benchmark runner's pieces (bench/).

Quick by design: a tiny echo server in a thread, sub-second load runs, and
only tolerant checks on figures (timing goals belong to `make bench`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from iomux import loadgen

if TYPE_CHECKING:
    from bench.procs import ServerSpec

REPO = Path(__file__).resolve().parents[2]


class EchoThreadServer:
    """A blocking echo server: one thread per connection; ``echo_once`` closes after one echo."""

    def __init__(self, echo_once: bool = False) -> None:
        self.echo_once = echo_once
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.conns: list[socket.socket] = []
        self.accepter = threading.Thread(target=self._accept, daemon=True)
        self.accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _echo(self, conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)
                if self.echo_once:
                    return
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone may not on Linux.
        for sock in [self.listener, *self.conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.accepter.join(5)
        for t in self.threads:
            t.join(5)


@pytest.fixture
def echo_server() -> Iterator[EchoThreadServer]:
    server = EchoThreadServer()
    try:
        yield server
    finally:
        server.close()


def bench_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    loadgen.add_arguments(parser)
    return parser.parse_args(argv)


# --- percentiles and aggregation ---------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [
        ([], 50, 0.0),
        ([7.0], 99, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),  # nearest rank: ceil(0.5 * 4) = 2nd value
        ([1.0, 2.0, 3.0, 4.0, 5.0], 50, 3.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 101)], 100, 100.0),
        ([float(i) for i in range(1, 1001)], 99, 990.0),
        ([1.0, 2.0], 0, 1.0),
    ],
)
def test_percentile_nearest_rank(values: list[float], pct: float, expected: float) -> None:
    assert loadgen.percentile(values, pct) == expected


def test_aggregate_merges_processes() -> None:
    import array

    a = loadgen.WorkerResult(3, 0, 0.5, array.array("d", [0.003, 0.001, 0.002]))
    b = loadgen.WorkerResult(2, 1, 0.25, array.array("d", [0.010, 0.004]))
    report = loadgen.aggregate([a, b], size=1000, duration=2.0, conns=4, procs=2)
    assert report["requests"] == 5
    assert report["errors"] == 1
    assert report["requests_per_s"] == 2.5
    assert report["mb_per_s"] == pytest.approx(2.5 * 1000 / 1e6)
    assert report["client_cpu_s"] == 0.75
    lat = report["latency_us"]
    assert isinstance(lat, dict)
    # The merged, sorted latencies are 1, 2, 3, 4, 10 ms.
    assert lat["p50"] == pytest.approx(3000.0)
    assert lat["p99"] == pytest.approx(10000.0)
    assert lat["max"] == pytest.approx(10000.0)
    assert lat["mean"] == pytest.approx(4000.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_parse_target(text: str, expected: tuple[str, int]) -> None:
    assert loadgen.parse_target(text) == expected


# --- the load client against a real socket -----------------------------------------------


def check_sane(report: dict[str, object], conns: int, size: int, duration: float) -> None:
    assert report["conns"] == conns and report["size"] == size
    assert report["errors"] == 0
    requests = report["requests"]
    assert isinstance(requests, int) and requests > conns
    assert report["requests_per_s"] == pytest.approx(requests / duration)
    assert report["mb_per_s"] == pytest.approx(requests / duration * size / 1e6)
    lat = report["latency_us"]
    assert isinstance(lat, dict)
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # Every counted request finished inside the window, so none took longer than it.
    assert lat["max"] <= duration * 1e6


@pytest.mark.parametrize("size", [1, 1024, 200_000])
def test_bench_json_in_process(
    echo_server: EchoThreadServer, capsys: pytest.CaptureFixture[str], size: int
) -> None:
    args = bench_args(
        [
            f"127.0.0.1:{echo_server.port}",
            "--conns",
            "4",
            "--size",
            str(size),
            "--duration",
            "0.3",
            "--procs",
            "1",
            "--json",
        ]
    )
    assert loadgen.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    check_sane(report, 4, size, 0.3)
    assert report["procs"] == 1


def test_iomux_bench_several_processes(echo_server: EchoThreadServer) -> None:
    # Through the real command line, and in a subprocess, so that the fork happens in a
    # process without this test's threads.
    proc = subprocess.run(
        [sys.executable, "-m", "iomux", "bench", f"127.0.0.1:{echo_server.port}",
         "--conns", "5", "--size", "512", "--duration", "0.3", "--procs", "2", "--json"],
        capture_output=True, text=True, timeout=30, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    check_sane(report, 5, 512, 0.3)
    assert report["procs"] == 2


def test_bench_table_output(
    echo_server: EchoThreadServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = bench_args(
        [f"127.0.0.1:{echo_server.port}", "--conns", "2", "--duration", "0.2", "--procs", "1"]
    )
    assert loadgen.main(args) == 0
    out = capsys.readouterr().out
    for label in ("requests/s", "MB/s", "latency p50", "latency p99"):
        assert label in out


def test_closed_connections_count_as_errors(capsys: pytest.CaptureFixture[str]) -> None:
    server = EchoThreadServer(echo_once=True)
    try:
        args = bench_args(
            [
                f"127.0.0.1:{server.port}",
                "--conns",
                "3",
                "--duration",
                "0.5",
                "--procs",
                "1",
                "--json",
            ]
        )
        assert loadgen.main(args) == 0
    finally:
        server.close()
    report = json.loads(capsys.readouterr().out)
    assert report["requests"] == 3  # one echo each, then the server closed
    assert report["errors"] == 3


@pytest.mark.parametrize(
    ("argv", "status", "fragment"),
    [
        (["nonsense"], 2, "expected HOST:PORT"),
        (["127.0.0.1:99999"], 2, "port must be"),
        (["127.0.0.1:7000", "--conns", "0"], 2, "--conns"),
        (["127.0.0.1:7000", "--duration", "0"], 2, "--duration"),
    ],
)
def test_bench_usage_errors(
    argv: list[str], status: int, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loadgen.main(bench_args(argv)) == status
    err = capsys.readouterr().err
    assert err.startswith("iomux: error:") and fragment in err
    assert err.count("\n") == 1


def test_bench_refused_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # A port that was just free: bind, read the number, close.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert loadgen.main(bench_args([f"127.0.0.1:{port}", "--duration", "0.1", "--procs", "2"])) == 1
    err = capsys.readouterr().err
    assert "cannot connect" in err and err.count("\n") == 1


# --- bench/: the C programs and the runner's arithmetic ------------------------------------

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None,
    reason="no C compiler on PATH",
)


@needs_cc
def test_c_programs_compile_and_echo(tmp_path: Path) -> None:
    from bench import build, procs

    server_exe, why = build.build("echo_epoll", tmp_path)
    assert server_exe is not None, why
    client_exe, why = build.build("loadclient", tmp_path)
    assert client_exe is not None, why
    server = procs.start(procs.ServerSpec("c-epoll", "c", [str(server_exe)]), cpu=None)
    try:
        assert server.ready["backend"] == "c-epoll"
        out = subprocess.run(
            [str(client_exe), "127.0.0.1", str(server.port), "3", "70000", "0.3", "0.1"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        status = server.stop()
    assert status == 0  # SIGTERM ends it cleanly
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "measuring"
    check_sane(json.loads(lines[1]), 3, 70000, 0.3)


def test_asyncio_peer_measured_through_runner_pieces() -> None:
    from bench import clients, procs

    spec = procs.ServerSpec(
        "asyncio-protocol",
        "asyncio",
        [sys.executable, "-m", "bench.peers.asyncio_protocol"],
        cwd=str(REPO),
    )
    server = procs.start(spec, cpu=None)
    try:
        assert server.pid == server.proc.pid
        res = clients.measure(
            clients.Client("python", None, None), server, conns=2, size=256, duration=0.3
        )
    finally:
        assert server.stop() == 0
    assert res["error"] is None
    cpu_per_req = res["cpu_per_req_us"]
    # The server did some work; per request it is microseconds, not seconds.
    assert isinstance(cpu_per_req, float) and 0 < cpu_per_req < 100_000


def test_procs_cpu_seconds_of_this_process() -> None:
    from bench import procs

    before = procs.cpu_seconds(os.getpid())
    sum(i * i for i in range(2_000_000))  # burn a little CPU
    assert procs.cpu_seconds(os.getpid()) >= before
    rss, hwm = procs.rss_bytes(os.getpid())
    assert 0 < rss <= hwm


def test_on_cpu_seconds_is_finer_than_a_tick() -> None:
    """schedstat's on-CPU time of a busy process agrees with its ticks, and is not
    a whole number of ticks (it is the scheduler's nanosecond clock)."""
    from bench import procs

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        readings = []
        for _ in range(5):
            time.sleep(0.13)
            ticks, exact = procs.cpu_seconds(burner.pid), procs.tree_on_cpu_seconds(burner.pid)
            assert exact is not None, "no /proc/PID/schedstat (CONFIG_SCHED_INFO) here"
            assert abs(exact - ticks) < 0.05
            readings.append(exact)
        assert readings == sorted(readings) and readings[-1] > readings[0]
        assert any(round(r * 1e9) % 10_000_000 for r in readings)
    finally:
        burner.kill()
        burner.wait()
    assert procs.on_cpu_seconds(burner.pid) is None


def _server_doc(cpu: dict[str, float | None], rps: dict[str, float]) -> dict[str, object]:
    kinds = {
        "c-epoll": "c",
        "iomux-epoll": "iomux",
        "asyncio-protocol": "asyncio",
        "uvloop-protocol": "asyncio",
    }
    return {
        name: {
            "kind": kinds[name],
            "results": {"1024B-10c": {"cpu_per_req_us": cpu[name], "requests_per_s": rps[name]}},
        }
        for name in cpu
    }


def _rounds_doc(
    per_round: dict[str, list[float | None]], key: str = "1024B-10c"
) -> dict[str, object]:
    """Servers with one CPU-per-request figure per round (None: that round failed)."""
    return {
        name: {
            "kind": "c" if name == "c-epoll" else "python",
            "results": {
                key: {
                    "cpu_per_req_us": statistics.median(v for v in vals if v is not None),
                    "runs": [
                        {"error": "server died"}
                        if v is None
                        else {"cpu_per_req_us": v, "error": None}
                        for v in vals
                    ],
                }
            },
        }
        for name, vals in per_round.items()
    }


def test_goals_are_judged_on_the_worst_round() -> None:
    from bench import runner

    servers = _rounds_doc(
        {
            "iomux-epoll": [10.0, 10.0, 12.0],
            "asyncio-protocol": [12.5, 12.5, 12.5],  # ratios 0.8, 0.8, 0.96: worst misses 0.87
            "uvloop-protocol": [11.0, 12.0, None],  # the failed round is left out of the pairs
            "c-epoll": [9.0, 9.0, 11.0],
        }
    )
    got = {g["goal"]: g for g in runner.goals(servers, [(1024, 10)])}
    asy = got["iomux-epoll / asyncio-protocol"]
    assert asy["config"] == "1024B-10c" and asy["rounds"] == 3
    assert asy["ratio"] == pytest.approx(0.96) and asy["ratio_best"] == pytest.approx(0.8)
    assert asy["ratio_median"] == pytest.approx(0.8)
    assert asy["ratio_spread"] == pytest.approx(0.16)
    assert asy["met"] is False  # the median (0.8) would pass: the worst round decides
    uv = got["iomux-epoll / uvloop-protocol"]
    assert uv["rounds"] == 2 and uv["ratio"] == pytest.approx(10 / 11) and uv["met"] is True
    c = got["iomux-epoll / c-epoll"]
    assert c["ratio"] == pytest.approx(10 / 9) and c["met"] is True  # 1.11 <= 1.18
    del servers["uvloop-protocol"]
    missing = {g["goal"]: g for g in runner.goals(servers, [(1024, 10)])}
    assert missing["iomux-epoll / uvloop-protocol"]["ratio"] is None
    assert "uvloop-protocol" in missing["iomux-epoll / uvloop-protocol"]["reason"]


def _split_doc(per_round: dict[str, list[tuple[float, float]]]) -> dict[str, object]:
    """Servers with a (user, sys) split per round of 1024B-10c."""
    return {
        name: {
            "results": {
                "1024B-10c": {
                    "runs": [
                        {"cpu_per_req_us": u + k, "user_per_req_us": u, "sys_per_req_us": k,
                         "error": None}
                        for u, k in vals
                    ]
                }
            }
        }
        for name, vals in per_round.items()
    }  # fmt: skip


def test_a_missed_goal_says_whether_kernel_or_user_time_holds_it_back() -> None:
    from bench import runner

    def held(
        ours: list[tuple[float, float]], peer: list[tuple[float, float]], name: str = "uvloop-protocol"
    ) -> dict[str, Any]:
        servers = _split_doc({"iomux-epoll": ours, name: peer})
        got = {g["goal"]: g for g in runner.goals(servers, [(1024, 10)])}
        goal = got[f"iomux-epoll / {name}"]
        return {"met": goal["met"], **goal["held_back"]}

    # Same user time, more kernel time in one round: only the kernel can be blamed.
    k = held([(2.0, 10.0), (2.0, 13.0)], [(2.0, 10.0), (2.0, 10.0)])
    assert k["met"] is False and k["by"].startswith("kernel time")
    assert k["at_peer_user"] == pytest.approx(15 / 12) and k["at_peer_kernel"] == pytest.approx(1.0)
    assert k["kernel_share"] == pytest.approx(statistics.median([10 / 12, 13 / 15]))
    # Same kernel time, twice the user time: the user-space code is what misses.
    u = held([(4.0, 10.0)] * 2, [(2.0, 10.0)] * 2)
    assert u["met"] is False and u["by"].startswith("user space") and "2.00x" in u["by"]
    assert u["at_peer_user"] == pytest.approx(1.0)
    # A little of each against the C server's 1.18: either alone would have met it.
    both = held([(4.0, 12.0)], [(2.0, 10.0)], "c-epoll")
    assert both["met"] is False and both["by"].startswith("neither alone")
    # A met goal names nothing; a round without the split is left out.
    assert held([(2.0, 9.0)], [(2.0, 10.0)])["by"] is None
    assert runner.held_back([None], [(1.0, 1.0)], 1.0)["by"] is None


def test_goals_cover_both_goal_configurations() -> None:
    from bench import runner

    assert runner.GOAL_CONFIGS == [(1024, 10), (64, 100)]
    assert {(s, c) for s, c in runner.GOAL_CONFIGS} <= set(runner.CONFIGS)
    got = runner.goals({})
    assert [g["config"] for g in got] == ["1024B-10c"] * 3 + ["64B-100c"] * 3
    assert all(g["met"] is None for g in got)


def test_syscall_goal_compares_with_the_c_server() -> None:
    from bench import runner

    def server(*spr: float | None, wakes: tuple[float, ...] = (0.2, 0.2, 1.0)) -> dict[str, object]:
        keys = ["1024B-10c", "64B-100c", "65536B-1c"]
        return {
            "counts": {
                k: {
                    "syscalls_per_req": v,
                    "wakeups_per_req": w,
                    "events_per_wakeup": 1 / w if w else None,
                }
                for k, v, w in zip(keys, spr, wakes)
            }
        }

    servers = {
        "iomux-epoll": server(2.1, 2.2, None, wakes=(0.1, 0.2, 1.0)),
        "c-epoll": server(2.3, 2.0, 3.0, wakes=(0.3, 0.1, 1.0)),
    }
    got = runner.syscall_goals(servers, [(1024, 10), (64, 100), (65536, 1)])
    assert [g["met"] for g in got] == [True, False, None]
    assert got[1]["ours_besides_waits"] == pytest.approx(2.0)
    assert got[1]["c_besides_waits"] == pytest.approx(1.9)
    assert got[1]["reason"] is None  # 0.1 more calls besides the waits: a real difference
    assert "not counted" in got[2]["reason"]
    # The same totals where all of the difference is wake-ups: the reason says so.
    servers["c-epoll"] = server(2.3, 2.0, 3.0, wakes=(0.3, 0.0, 1.0))
    timing = runner.syscall_goals(servers, [(64, 100)])[0]
    assert timing["met"] is False and "every extra call is a wake-up" in timing["reason"]


def test_ceiling_says_why_the_c_server_is_beaten() -> None:
    from bench import runner

    def server(cpu: float, util: float, wait: float, sys_us: float, ev: float) -> dict[str, object]:
        return {
            "results": {
                "1024B-10c": {
                    "cpu_per_req_us": cpu,
                    "server_cpu_util": util,
                    "server_wait_share": wait,
                    "sys_per_req_us": sys_us,
                }
            },
            "counts": {"1024B-10c": {"events_per_wakeup": ev}},
        }

    beaten = runner.ceiling(
        {
            "c-epoll": server(12.0, 0.5, 0.2, 12.0, 1.5),
            "iomux-epoll": server(11.0, 1.0, 0.0, 8.0, 6.0),
        },
        [(1024, 10)],
    )[0]
    assert beaten["c_is_ceiling"] is False and beaten["most_efficient"] == "iomux-epoll"
    for word in ("client-bound", "50%", "batching", "1.5", "6.0", "scheduler", "20%"):
        assert word in beaten["why"]
    held = runner.ceiling(
        {
            "c-epoll": server(5.0, 1.0, 0.0, 5.0, 1.0),
            "iomux-epoll": server(11.0, 1.0, 0.0, 8.0, 6.0),
        },
        [(1024, 10)],
    )[0]
    assert held["c_is_ceiling"] is True and "why" not in held
    assert runner.ceiling({}, [(1024, 10)])[0]["c_is_ceiling"] is None


def test_configs_option() -> None:
    from bench import runner

    assert runner._configs("1024x10, 64x100") == [(1024, 10), (64, 100)]
    for bad in ("1024", "0x10", "ax1", ""):
        with pytest.raises(runner.BenchError):
            runner._configs(bad)


# --- bench/counts.py: the counts that do not move with load ---------------------------------


def test_perf_stat_and_script_parsing(tmp_path: Path) -> None:
    from bench import counts

    stat = tmp_path / "stat.csv"
    stat.write_text(
        "# started on Tue Dec  1 19:48:44 2026\n\n"
        "4200,,raw_syscalls:sys_enter,1000,100.00,,\n"
        "<not counted>,,syscalls:sys_enter_epoll_ctl,0,100.00,,\n"
        "2000,,syscalls:sys_enter_read,1000,100.00,,\n"
    )
    assert counts._parse_stat(str(stat)) == {
        "raw_syscalls:sys_enter": 4200,
        "syscalls:sys_enter_epoll_ctl": 0,
        "syscalls:sys_enter_read": 2000,
    }
    # Three wake-ups: 3 ready, 0 ready (a timeout), 5 ready; and an EINTR (-4) that is none.
    script = "0x3\n0x0\n0x5\n0xfffffffffffffffc\n"
    assert counts._parse_waits(script) == (3, 8, 1)


def test_requests_for_scales_down_large_messages() -> None:
    from bench import counts

    assert counts.requests_for(20000, 64) == 20000
    assert counts.requests_for(20000, 1024) == 20000
    assert counts.requests_for(20000, 65536) == 1250
    assert counts.requests_for(300, 65536) == 200
    assert counts.requests_for(100, 65536) == 100


@needs_cc
def test_count_mode_runs_exactly_count_requests(tmp_path: Path) -> None:
    from bench import build, procs

    server_exe, why = build.build("echo_epoll", tmp_path)
    client_exe, why2 = build.build("loadclient", tmp_path)
    assert server_exe is not None and client_exe is not None, (why, why2)
    server = procs.start(procs.ServerSpec("c-epoll", "c", [str(server_exe)]), cpu=None)
    try:
        client = subprocess.Popen(
            [str(client_exe), "127.0.0.1", str(server.port), "7", "300", "30", "0.1", "1001"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline() == b"ready\n"
        client.stdin.write(b"go\n")
        client.stdin.flush()
        report = json.loads(client.stdout.readline())
        # The connections stay open until stdin closes (the counters are read meanwhile).
        assert client.poll() is None
        client.stdin.close()
        assert client.wait(timeout=10) == 0
        client.stdout.close()
        assert client.stderr is not None
        client.stderr.close()
    finally:
        server.stop()
    assert report["requests"] == 1001 and report["errors"] == 0 and report["conns"] == 7


def _c_spec(tmp_path: Path) -> tuple[ServerSpec, Path]:
    from bench import build, procs

    server_exe, why = build.build("echo_epoll", tmp_path)
    client_exe, why2 = build.build("loadclient", tmp_path)
    assert server_exe is not None and client_exe is not None, (why, why2)
    return procs.ServerSpec("c-epoll", "c", [str(server_exe)]), client_exe


@needs_cc
def test_syscall_counts_of_the_c_server(tmp_path: Path) -> None:
    from bench import counts

    why = counts.perf_problem()
    if why:
        pytest.fail(f"not run: {why}")  # perf tracepoints are required where the bench runs
    spec, client_exe = _c_spec(tmp_path)
    got = counts.syscalls(spec, client_exe, (None, None), [(512, 4)], 2000)
    cell = got["512B-4c"]
    assert cell["error"] is None and cell["requests"] == 2000
    # The C server reads once and writes once per 512 B echo; waits come on top.
    assert cell["per_syscall_per_req"]["read"] == pytest.approx(1.0, abs=0.01)
    assert cell["per_syscall_per_req"]["write"] == pytest.approx(1.0, abs=0.01)
    assert 0 < cell["wakeups_per_req"] <= 1.01
    assert cell["syscalls_per_req"] == pytest.approx(2 + cell["wakeups_per_req"], abs=0.02)
    assert 1.0 <= cell["events_per_wakeup"] <= 4.0


@needs_cc
def test_instruction_counts_of_the_c_server(tmp_path: Path) -> None:
    from bench import counts

    why = counts.callgrind_problem()
    if why:
        pytest.fail(f"not run: {why}")
    spec, client_exe = _c_spec(tmp_path)
    got = counts.instructions(spec, client_exe, (None, None), [(256, 2)], 300)
    cell = got["256B-2c"]
    assert cell["error"] is None and cell["requests"] == 300
    # A read, a write and a share of an epoll_wait: tens to hundreds of instructions, not
    # the thousands of the whole process's start-up (the counters were zeroed at "ready").
    assert 10 < cell["instructions_per_req"] < 2000


def test_client_check_compares_c_with_the_fastest_python_server() -> None:
    from bench import runner

    cpu: dict[str, float | None] = {"c-epoll": 1.0, "iomux-epoll": 1.0, "asyncio-protocol": 1.0}
    ok = runner.client_check(
        _server_doc(cpu, {"c-epoll": 100.0, "iomux-epoll": 90.0, "asyncio-protocol": 50.0}),
        [(1024, 10)],
    )
    assert ok["ok"] is True and ok["configs"][0]["fastest_python"] == "iomux-epoll"
    bad = runner.client_check(
        _server_doc(cpu, {"c-epoll": 80.0, "iomux-epoll": 90.0, "asyncio-protocol": 50.0}),
        [(1024, 10)],
    )
    assert bad["ok"] is False


def test_median_of_rounds_skips_failed_rounds() -> None:
    from bench import runner

    def run(rps: float, p99: float) -> dict[str, object]:
        return {"requests_per_s": rps, "cpu_per_req_us": rps / 10, "mb_per_s": 1.0,
                "latency_us": {"p50": 1.0, "p99": p99}, "errors": 0, "error": None}  # fmt: skip

    med = runner.median_of([run(30, 9), {"error": "server died"}, run(10, 1), run(20, 5)])
    assert med["rounds"] == 3
    assert med["requests_per_s"] == 20 and med["cpu_per_req_us"] == 2 and med["p99_us"] == 5
    assert runner.median_of([{"error": "boom"}]) == {"error": "boom"}


def test_runner_end_to_end_writes_json_and_table(tmp_path: Path) -> None:
    # The smallest real run: one Python peer, one cell, no extras; the Python client so
    # that it runs without a compiler too.
    argv = [sys.executable, "-m", "bench", "--quick", "--servers", "asyncio-protocol,uvloop-protocol",
            "--client", "python", "--configs", "512x2", "--duration", "0.3",
            "--idle-conns", "0", "--worker-conns", "0", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert len(list(tmp_path.glob("bench-*.json"))) == 1
    assert doc["settings"]["client"] == "python"
    server = doc["servers"]["asyncio-protocol"]
    cell = server["results"]["512B-2c"]
    assert cell["rounds"] == 1 and cell["requests_per_s"] > 0 and cell["cpu_per_req_us"] > 0
    # User and kernel time apart, adding up to the whole.
    assert cell["user_per_req_us"] + cell["sys_per_req_us"] == pytest.approx(cell["cpu_per_req_us"])
    # The counts need the C client's COUNT mode: without it they say so, never a figure.
    for key in ("counts", "instructions"):
        assert "C load client" in server[key]["512B-2c"]["error"]
    assert "not measured" in doc["settings"]["syscalls_method"]
    # 512x2 is no goal configuration, and iomux-epoll did not run: nothing is guessed.
    assert doc["goals"] == []
    assert all(g["met"] is None for g in doc["syscall_goals"])
    assert "asyncio-protocol" in proc.stdout and "not computed" in proc.stdout


def test_runner_rejects_unknown_server(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--servers", "nginx", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert (
        proc.stderr.startswith("bench: error: unknown server 'nginx'")
        and proc.stderr.count("\n") == 1
    )


def test_without_a_compiler_the_c_peers_are_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import build, runner

    monkeypatch.setattr(build, "compiler", lambda: None)
    assert build.build("loadclient", tmp_path) == (None, "no C compiler (cc, gcc, clang) on PATH")
    c_spec = next(s for s in runner.server_specs(tmp_path) if s.name == "c-epoll")
    assert c_spec.not_run == "no C compiler (cc, gcc, clang) on PATH"


def test_noise_is_the_median_run_queue_wait() -> None:
    from bench import runner

    def server(*waits: float) -> dict[str, object]:
        return {"results": {f"cell{i}": {"server_wait_share": w} for i, w in enumerate(waits)}}

    busy = runner.noise({"a": server(0.05, 0.3), "b": server(0.4)})
    assert busy == {"median_server_wait_share": 0.3, "busy_machine": True}
    quiet = runner.noise({"a": server(0.01, 0.02, 0.5)})
    assert quiet == {"median_server_wait_share": 0.02, "busy_machine": False}
