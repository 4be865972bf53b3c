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
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from iomux import loadgen

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


def test_goals_are_computed_from_the_run() -> None:
    from bench import runner

    servers = _server_doc(
        {"iomux-epoll": 10.0, "asyncio-protocol": 12.5, "uvloop-protocol": 9.0, "c-epoll": 8.0},
        {"iomux-epoll": 1.0, "asyncio-protocol": 1.0, "uvloop-protocol": 1.0, "c-epoll": 2.0},
    )
    got = {g["goal"]: g for g in runner.goals(servers)}
    assert got["iomux-epoll / asyncio-protocol"]["ratio"] == pytest.approx(0.8)
    assert got["iomux-epoll / asyncio-protocol"]["met"] is True  # 0.8 <= 1/1.15
    assert got["iomux-epoll / uvloop-protocol"]["met"] is False  # 1.11 > 1.0
    assert got["iomux-epoll / c-epoll"]["ratio"] == pytest.approx(1.25)
    assert got["iomux-epoll / c-epoll"]["met"] is False  # 1.25 > 1/0.85
    del servers["uvloop-protocol"]
    missing = {g["goal"]: g for g in runner.goals(servers)}["iomux-epoll / uvloop-protocol"]
    assert missing["ratio"] is None and "uvloop-protocol" in missing["reason"]


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
            "--client", "python", "--sizes", "512", "--conns", "2", "--duration", "0.3",
            "--idle-conns", "0", "--worker-conns", "0", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert len(list(tmp_path.glob("bench-*.json"))) == 1
    assert doc["settings"]["client"] == "python"
    cell = doc["servers"]["asyncio-protocol"]["results"]["512B-2c"]
    assert cell["rounds"] == 1 and cell["requests_per_s"] > 0 and cell["cpu_per_req_us"] > 0
    # Without iomux-epoll in the run the goals are reported as not computed, never guessed.
    assert all(g["ratio"] is None and g["met"] is None for g in doc["goals"])
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
