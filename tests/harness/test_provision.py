"""vagrant/provision.sh on FreeBSD's path, run here against stub commands, and linted.

The script is run with /bin/sh and a PATH holding only the tools it uses, plus
stubs that stand for FreeBSD's:

- ``uname`` says FreeBSD, and there is no ``systemctl``: the daemon(8) branch;
- ``pkg`` records its calls and, on ``install``, puts ``python3`` on the PATH
  (the box has no Python until pkg installs it);
- ``daemon`` is daemon(8) as the script uses it (``-r -P pidfile -u user
  cmd...``): it detaches, writes its own pid to the -P file, runs and restarts
  the command, forwards SIGTERM to it and removes the file when it exits.
  ``STUB_DAEMON_EXIT_DELAY`` makes it take that long to exit after its server
  did, as a server draining under emulation does.

The servers are real iomux servers, installed by the script into a directory
standing for / (IOMUX_PROVISION_ROOT) and listening on 127.0.0.1. Debian's
path gets one run pair too, against a ``systemctl`` stub that starts the
units' servers detached.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "vagrant" / "provision.sh"
TOOLS = ("cat", "find", "sort", "xargs", "sha256sum", "cut", "rm", "mkdir", "cp", "mv", "chmod",
         "sed", "tr", "sleep", "ln")

STUB_UNAME = """#!/bin/sh
echo FreeBSD
"""

STUB_PKG = """#!/bin/sh
echo "pkg $*" >>"$STUB_LOG"
if [ "$1" = install ]; then
    printf '#!/bin/sh\\nexec %s "$@"\\n' "$STUB_PYTHON" >"$STUB_BIN/python3"
    chmod 755 "$STUB_BIN/python3"
fi
"""

STUB_DAEMON = """#!{python}
import os, signal, subprocess, sys, time

args, restart, pidfile = sys.argv[1:], False, None
while args and args[0].startswith("-"):
    opt = args.pop(0)
    if opt == "-r":
        restart = True
    elif opt in ("-P", "-u"):
        value = args.pop(0)
        pidfile = value if opt == "-P" else pidfile
    else:
        sys.exit(f"daemon stub: unknown option {{opt}}")
with open(os.environ["STUB_LOG"], "a") as log:
    log.write("daemon " + " ".join(sys.argv[1:]) + "\\n")
r, w = os.pipe()
if os.fork():
    os.close(w)
    os.read(r, 1)  # returns once the pid file is written, as daemon(8) does
    os._exit(0)
os.close(r)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)  # daemon(8) detaches from the caller's stdio
with open(pidfile, "w") as f:
    f.write(f"{{os.getpid()}}\\n")
os.write(w, b"x")
os.close(w)
stopping, child = False, None


def on_term(signum, frame):
    global stopping
    stopping = True
    if child is not None:
        child.terminate()


signal.signal(signal.SIGTERM, on_term)
err = open(os.environ["STUB_LOG"], "a")
while not stopping:
    child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    if stopping:
        child.terminate()
    child.wait()
    if not restart:
        break
    if not stopping:
        time.sleep(1)  # daemon(8)'s default restart delay (-R 1)
time.sleep(float(os.environ.get("STUB_DAEMON_EXIT_DELAY", "0")))
os.unlink(pidfile)
"""


# systemctl as the script uses it, for Debian's path: units are
# iomux-echo@BACKEND.service, each server started detached with the PORT of its
# env file, its pid kept where the stub can find it again.
STUB_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >>"$STUB_LOG"
run=$IOMUX_PROVISION_ROOT/run/stub-systemd
mkdir -p "$run"
cmd=$1; shift
case $cmd in
daemon-reload) ;;
enable) ;;
is-active)
    status=0
    for unit in "$@"; do
        if [ -s "$run/$unit" ] && kill -0 "$(cat "$run/$unit")" 2>/dev/null; then echo active
        else echo inactive; status=3; fi
    done
    exit $status ;;
restart)
    for unit in "$@"; do
        backend=${unit#iomux-echo@}; backend=${backend%.service}
        if [ -s "$run/$unit" ]; then
            kill "$(cat "$run/$unit")" 2>/dev/null || true
            while kill -0 "$(cat "$run/$unit")" 2>/dev/null; do sleep 0.1; done
        fi
        . "$IOMUX_PROVISION_ROOT/etc/iomux/echo-$backend.env"
        "$STUB_PYTHON" -c 'import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])' \\
            "$IOMUX_PROVISION_ROOT/usr/local/bin/iomux" serve --backend "$backend" --host 127.0.0.1 \\
            --port "$PORT" --quiet </dev/null >/dev/null 2>>"$STUB_LOG" &
        echo $! >"$run/$unit"
    done ;;
*) echo "systemctl stub: $cmd?" >&2; exit 1 ;;
esac
"""


@dataclass
class Guest:
    """One stand-in FreeBSD guest: its PATH, its / and its servers' ports."""

    tmp: Path
    env: Dict[str, str]
    ports: List[int]
    src: Path
    runs: List[Tuple[int, str, str]] = field(default_factory=list)

    @property
    def backends(self) -> str:
        return f"poll:{self.ports[0]},select:{self.ports[1]}"

    def provision(self, timeout: float = 120) -> Tuple[int, str, str]:
        """Run the script once; (exit status, its last stdout line, stderr)."""
        proc = subprocess.run(["/bin/sh", str(SCRIPT), str(self.src), self.backends], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)
        last = (proc.stdout.strip().splitlines() or [""])[-1]
        self.runs.append((proc.returncode, last, proc.stderr))
        return proc.returncode, last, proc.stderr

    def pid(self, backend: str) -> int:
        return int((self.tmp / "root" / "var" / "run" / f"iomux-echo-{backend}.pid").read_text())

    def log(self) -> str:
        path = self.tmp / "stub.log"
        return path.read_text() if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _echoes(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 2) as s:
            s.settimeout(5)
            s.sendall(b"provisioned\n")
            got = b""
            while len(got) < 12:
                chunk = s.recv(64)
                if not chunk:
                    break
                got += chunk
            return got == b"provisioned\n"
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_daemons(run_dir: Path, pattern: str = "*.pid") -> None:
    pids = []
    for pidfile in run_dir.glob(pattern):
        try:
            pids.append(int(pidfile.read_text()))
        except (OSError, ValueError):
            continue
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # the stub's own session: it and its server


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        path = shutil.which(tool)
        assert path, f"{tool} is not on this machine"
        (bin_dir / tool).symlink_to(path)
    for name, body in (("uname", STUB_UNAME), ("pkg", STUB_PKG),
                       ("daemon", STUB_DAEMON.format(python=sys.executable))):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    src = tmp_path / "src"
    shutil.copytree(REPO / "iomux", src / "iomux", ignore=shutil.ignore_patterns("__pycache__"))
    root = tmp_path / "root"
    env = {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "LC_ALL": "C",
        "IOMUX_PROVISION_ROOT": str(root),
        "IOMUX_PROVISION_HOST": "127.0.0.1",
        "IOMUX_PROVISION_WAIT": "150",
        # The guest's python finds the package through the .pth the script
        # writes; here that file lies under the stand-in root, so say it again.
        "PYTHONPATH": str(root / "opt" / "iomux" / "lib"),
        "STUB_LOG": str(tmp_path / "stub.log"),
        "STUB_BIN": str(bin_dir),
        "STUB_PYTHON": sys.executable,
    }
    g = Guest(tmp_path, env, [_free_port(), _free_port()], src)
    try:
        yield g
    finally:
        _stop_daemons(root / "var" / "run")


def test_second_run_changes_nothing_and_leaves_listening_servers(guest: Guest) -> None:
    status, first, err = guest.provision()
    assert status == 0, err
    assert first.startswith("iomux-provision: changed=") and not first.startswith("iomux-provision: changed=0 "), first
    # pkg was asked for Python the way the script says (the box had none).
    assert "pkg install -y python311" in guest.log()
    assert all(_echoes(port) for port in guest.ports)
    # Byte-compiled at install: every module of the package has its .pyc, up to date,
    # so the servers the suites start as another user never compile it again.
    lib = Path(guest.env["IOMUX_PROVISION_ROOT"]) / "opt" / "iomux" / "lib"
    sources = sorted(lib.glob("iomux/**/*.py"))
    assert sources
    for source in sources:
        cached = Path(importlib.util.cache_from_source(str(source)))
        assert cached.is_file() and cached.stat().st_mtime >= source.stat().st_mtime, source
    pids = {b: guest.pid(b) for b in ("poll", "select")}

    status, second, err = guest.provision()
    assert status == 0, err
    assert second.startswith("iomux-provision: changed=0 "), second
    assert second.split("state=")[1] == first.split("state=")[1]
    assert guest.log().count("pkg install") == 1  # Python is there now: no pkg call
    assert {b: guest.pid(b) for b in ("poll", "select")} == pids  # nothing restarted
    assert all(_echoes(port) for port in guest.ports)


def test_a_slow_old_server_is_waited_for_before_the_new_one_starts(guest: Guest) -> None:
    # Every daemon takes 2.5 s to exit after SIGTERM: longer than the fixed
    # one-second pause the script used to make.
    guest.env["STUB_DAEMON_EXIT_DELAY"] = "2.5"
    status, _, err = guest.provision()
    assert status == 0, err
    old = guest.pid("poll")
    # A new tree: the install changes, so every server is restarted.
    init = guest.src / "iomux" / "__init__.py"
    init.write_text(init.read_text() + "\n# a change the provisioner must roll out\n")
    status, line, err = guest.provision()
    assert status == 0, err
    assert not line.startswith("iomux-provision: changed=0 "), line
    assert not _alive(old)
    assert guest.pid("poll") != old
    assert all(_echoes(port) for port in guest.ports)
    status, line, err = guest.provision()
    assert (status, line.startswith("iomux-provision: changed=0 ")) == (0, True), (line, err)


def test_a_server_that_never_listens_is_an_error_not_a_change(guest: Guest) -> None:
    # No kqueue on this kernel: the server exits at once, daemon restarts it
    # every second, and nothing ever listens on the port.
    guest.env["IOMUX_PROVISION_WAIT"] = "20"
    proc = subprocess.run(["/bin/sh", str(SCRIPT), str(guest.src), f"kqueue:{guest.ports[0]}"],
                          env=guest.env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert "changed=" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        f"iomux-provision: error: nothing listens on guest port {guest.ports[0]} within 2 s")


def test_debian_path_second_run_changes_nothing(guest: Guest) -> None:
    # Debian's branch: systemctl on the PATH (and the Linux uname).
    bin_dir = Path(guest.env["STUB_BIN"])
    (bin_dir / "uname").unlink()
    (bin_dir / "systemctl").write_text(STUB_SYSTEMCTL)
    (bin_dir / "systemctl").chmod(0o755)
    (bin_dir / "python3").write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    run_dir = Path(guest.env["IOMUX_PROVISION_ROOT"]) / "run" / "stub-systemd"
    try:
        status, first, err = guest.provision()
        assert status == 0, err
        assert not first.startswith("iomux-provision: changed=0 "), first
        assert all(_echoes(port) for port in guest.ports)
        # The unit it wrote is the one `--print-unit` gives (the box carries that one).
        etc = Path(guest.env["IOMUX_PROVISION_ROOT"]) / "etc/systemd/system"
        printed = subprocess.run(["/bin/sh", str(SCRIPT), "--print-unit"], env=guest.env,
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        assert (etc / "iomux-echo@.service").read_text() == printed
        assert "ExecStart=/usr/local/bin/iomux serve --backend %i" in printed
        assert "systemctl daemon-reload" in guest.log()
        # Enabled as `systemctl enable` leaves a WantedBy=multi-user.target template
        # instance: a link in the wants directory to the template (made directly).
        wants = Path(guest.env["IOMUX_PROVISION_ROOT"]) / "etc/systemd/system/multi-user.target.wants"
        links = sorted(p.name for p in wants.iterdir())
        assert links and all(n.startswith("iomux-echo@") for n in links), links
        assert {os.readlink(wants / n) for n in links} == {"/etc/systemd/system/iomux-echo@.service"}
        reloads = guest.log().count("systemctl daemon-reload")
        status, second, err = guest.provision()
        assert status == 0, err
        assert second.startswith("iomux-provision: changed=0 "), (second, guest.log())
        assert guest.log().count("systemctl daemon-reload") == reloads  # the unit was in place
        assert "pkg" not in guest.log()
        assert all(_echoes(port) for port in guest.ports)
    finally:
        _stop_daemons(run_dir, "*.service")


def test_vagrant_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("not run: shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p) for p in (REPO / "vagrant").glob("*.sh"))
    assert scripts
    proc = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout
