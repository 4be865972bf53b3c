"""The command line's error paths: one line ``iomux: error: ...``, the right exit status, no traceback."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from iomux import backends, cli

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``python -m iomux`` as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "iomux", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def assert_one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("iomux: error: ")
    assert "Traceback" not in stderr
    return lines[0]


def main_in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> Tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something else is listening on."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


# -- usage errors: exit 2 -----------------------------------------------------------


def test_unknown_backend_exits_2_listing_the_available() -> None:
    done = run_cli("serve", "--backend", "nosuch", "--port", "0")
    assert done.returncode == 2
    line = assert_one_error_line(done.stderr)
    assert "nosuch" in line
    for name in backends.available():
        assert name in line


@pytest.mark.skipif(backends.BACKENDS["kqueue"].available(), reason="this kernel has kqueue: nothing unavailable to ask for")
def test_unavailable_backend_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = main_in_process(capsys, "serve", "--backend", "kqueue-et", "--port", "0")
    assert status == 2
    assert "not available" in assert_one_error_line(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--bogus"],
        ["serve", "--port", "notaport"],
        ["serve", "--port", "70000"],
        ["serve", "--workers", "0"],
        ["serve", "--high-water", "10", "--low-water", "20"],
        ["serve", "--drain-timeout", "-1"],
        ["serve", "--sndbuf", "-1"],
        ["probe", "--probes", "bogus"],
        ["frobnicate"],
        [],
        ["report"],
        ["check"],
        ["check", "localhost"],
        ["check", "127.0.0.1:0"],
        ["probe", "--probes", ","],
    ],
    ids=lambda argv: " ".join(argv) or "no-command",
)
def test_usage_errors_exit_2_in_one_line(capsys: pytest.CaptureFixture[str], argv: List[str]) -> None:
    status, _, err = main_in_process(capsys, *argv)
    assert status == 2
    assert_one_error_line(err)


def test_bad_flag_through_the_real_entry_point() -> None:
    done = run_cli("serve", "--no-such-flag")
    assert done.returncode == 2
    assert_one_error_line(done.stderr)


@pytest.mark.parametrize("host", ["no.such.host.invalid", "300.1.1.1", "192.0.2.1"])
def test_bad_address_exits_2(capsys: pytest.CaptureFixture[str], host: str) -> None:
    # 192.0.2.1 (TEST-NET-1) resolves but is no address of this host: bind says EADDRNOTAVAIL.
    # No packet is sent: the server fails at bind().
    status, _, err = main_in_process(capsys, "serve", "--host", host, "--port", "0")
    assert status == 2
    assert "bad address" in assert_one_error_line(err)


# -- run-time errors: exit 1 ----------------------------------------------------------


def test_port_in_use_exits_1_in_one_line(busy_port: int) -> None:
    done = run_cli("serve", "--port", str(busy_port))
    assert done.returncode == 1
    assert "address already in use" in assert_one_error_line(done.stderr)


def test_port_in_use_with_workers_exits_1(busy_port: int) -> None:
    done = run_cli("serve", "--port", str(busy_port), "--workers", "2")
    assert done.returncode == 1
    assert "address already in use" in assert_one_error_line(done.stderr)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may bind privileged ports")
def test_privileged_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
            if int(f.read()) <= 80:
                pytest.skip("this kernel lets anyone bind port 80")
    except OSError:
        pass
    status, _, err = main_in_process(capsys, "serve", "--port", "80")
    assert status == 1
    assert "permission denied" in assert_one_error_line(err)


def test_unwritable_ready_file_exits_1(tmp_path: Path) -> None:
    done = run_cli("serve", "--port", "0", "--ready-file", str(tmp_path / "no" / "such" / "dir" / "r.json"))
    assert done.returncode == 1
    assert "ready file" in assert_one_error_line(done.stderr)


def test_check_against_nothing_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # bound, then closed: nothing listens there now
    status, out, err = main_in_process(capsys, "check", f"127.0.0.1:{port}", "--timeout", "2")
    assert status == 1
    assert out == ""
    assert "failed" in assert_one_error_line(err)


def test_check_against_a_silent_listener_times_out(capsys: pytest.CaptureFixture[str], busy_port: int) -> None:
    start = time.monotonic()
    status, _, err = main_in_process(capsys, "check", f"127.0.0.1:{busy_port}", "--timeout", "0.3")
    assert status == 1
    assert "no answer" in assert_one_error_line(err)
    assert time.monotonic() - start < 5


def test_missing_bench_module_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "iomux.loadgen", None)  # makes the import fail
    status, _, err = main_in_process(capsys, "bench", "127.0.0.1:7000", "--duration", "1")
    assert status == 1
    assert "bench is not available" in assert_one_error_line(err)


def test_missing_report_module_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "iomux.report", None)
    status, _, err = main_in_process(capsys, "report", "merge", "a.json")
    assert status == 1
    assert "report merge is not available" in assert_one_error_line(err)


# -- what works -------------------------------------------------------------------


def test_backends_lists_names_and_marks_auto(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main_in_process(capsys, "backends")
    assert status == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert names == backends.available()
    marked = [line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["(auto)"]]
    assert marked == [backends.auto()]


def test_backends_json(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main_in_process(capsys, "backends", "--json")
    assert status == 0
    assert json.loads(out) == {"available": backends.available(), "auto": backends.auto(), "known": backends.KNOWN}


def test_probe_json_host_facts(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = main_in_process(capsys, "probe", "--json", "--probes", "none")
    assert status == 0
    facts = json.loads(out)
    assert facts["kernel"] == os.uname().release
    assert facts["backends"] == backends.available()
    assert facts["auto"] == backends.auto()
    assert facts["rlimit_nofile"]["soft"] is None or facts["rlimit_nofile"]["soft"] > 0
    assert facts["so_reuseport"] == hasattr(socket, "SO_REUSEPORT")
    assert "probes" not in facts
    if Path("/proc/sys/net/core/somaxconn").exists():
        assert facts["somaxconn"] == int(Path("/proc/sys/net/core/somaxconn").read_text())


def test_serve_check_and_sigterm_round_trip(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "iomux", "serve", "--port", "0", "--ready-file", str(ready)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().strip()
        record = json.loads(ready.read_text())
        assert line == f"listening on 127.0.0.1:{record['port']} backend={record['backend']} pid={proc.pid}"
        assert record["workers"] == 1 and record["pid"] == proc.pid
        done = run_cli("check", f"127.0.0.1:{record['port']}")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"ok 127.0.0.1:{record['port']} round trip")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "shutting down: SIGTERM, draining 0 connections" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:7000", ("127.0.0.1", 7000)), ("[::1]:80", ("::1", 80)), ("localhost:1", ("localhost", 1))],
)
def test_check_address_parsing(text: str, expected: Tuple[str, int]) -> None:
    from iomux.check import parse_address

    assert parse_address(text) == expected


def test_serve_starts_without_the_modules_only_other_commands_need() -> None:
    """Every behaviour and fault test starts its own server, some 350 per target, so
    what `iomux serve` imports is paid hundreds of times on every kernel: not the
    load client (bench's arguments), not the idna codec (a str host passed to
    getaddrinfo), not dataclasses and the inspect it imports (ServerConfig is a
    plain class), not typing (its names are the type checker's only), not shutil
    (argparse's formatter wants only the terminal's width), and no other
    command's subparser. `bench --help` still shows the load client's own
    options."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "iomux", "serve", "--port", "0",
         "--stop-on-stdin", "--quiet"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        cwd=str(ROOT), check=False)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert {"iomux.cli", "iomux.server"} <= imported
    assert not {"iomux.loadgen", "encodings.idna", "dataclasses", "inspect", "typing",
                "shutil"} & imported, sorted(imported)
    shown = run_cli("bench", "--help")
    assert shown.returncode == 0 and "--conns" in shown.stdout and "--size" in shown.stdout


def test_serve_starts_a_thread_only_to_watch_stdin(tmp_path: Path) -> None:
    """threading is imported by --stop-on-stdin's watcher alone (4 M instructions
    of a start): a server stopped by SIGTERM never imports it."""
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "iomux", "serve", "--port", "0",
         "--ready-file", str(ready)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the server never got ready"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    imported = {line.rsplit("|", 1)[1].strip() for line in err.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "iomux.server" in imported and "threading" not in imported, sorted(imported)


@pytest.mark.parametrize("columns", [None, "50", "0", "wide"])
def test_help_width_is_shutils(columns: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The formatter's width follows shutil.get_terminal_size's rule, without shutil."""
    import shutil

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert cli._terminal_columns() == shutil.get_terminal_size().columns


def test_help_wraps_at_columns() -> None:
    shown = subprocess.run([sys.executable, "-m", "iomux", "serve", "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30, check=False,
                           env={**os.environ, "COLUMNS": "50"})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) > 10 and max(map(len, lines)) <= 50, lines


def _subcommands(parser: argparse.ArgumentParser) -> List[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1
    return list(subs[0].choices)


def test_a_known_command_builds_only_its_own_subparser() -> None:
    every = ["serve", "backends", "probe", "check", "bench", "report"]
    assert _subcommands(cli.build_parser()) == every
    assert _subcommands(cli.build_parser("serv")) == every  # the usage error lists them all
    for command in every:
        assert _subcommands(cli.build_parser(command)) == [command]
    typo = run_cli("serv")
    assert typo.returncode == 2 and "choose from 'serve', 'backends'" in typo.stderr


def test_server_config_options_are_its_parameters_and_the_parsers_dests() -> None:
    import inspect

    from iomux.server import ServerConfig

    assert tuple(inspect.signature(ServerConfig).parameters) == ServerConfig.OPTIONS
    args = cli.build_parser("serve").parse_args(["serve", "--port", "0", "--sndbuf", "4096"])
    config = ServerConfig(**{name: getattr(args, name) for name in ServerConfig.OPTIONS})
    assert (config.port, config.sndbuf, config.backend) == (0, 4096, "auto")
    assert "sndbuf=4096" in repr(config)
