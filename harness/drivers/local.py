"""The ``local`` kind: this machine. The echo servers run as child processes.

``start`` runs ``python -m iomux serve`` once per backend of the target, each on
port 0 with a ready file, and reads the ports back from the ready files (no racy
"find a free port"). The servers run with ``--stop-on-stdin`` on a pipe from the
harness, so that if the harness dies (even of SIGKILL) the pipe closes and they
exit by themselves; ``sweep`` finds any that did not through the environment
variables that stand in for a container's labels.

When the harness runs as root, the servers run as ``nobody``, as they do in the
containers, so that the host suite's "not root" check means the same everywhere.
The interpreter is then one that ``nobody`` can execute (a virtualenv under
/root is not), with the working tree on PYTHONPATH: iomux is standard library
only, so any Python 3.9+ runs it.
"""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Collection, Sequence

from harness.drivers.base import (
    LABEL_PROJECT,
    LABEL_RUN,
    PROJECT,
    Driver,
    ExecResult,
    Guest,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    run_argv,
    serve_argv,
)

REPO = Path(__file__).resolve().parents[2]
#: Environment variables that label our processes, as labels mark containers.
ENV_PROJECT = LABEL_PROJECT.upper().replace(".", "_")
ENV_RUN = LABEL_RUN.upper().replace(".", "_")
UNPRIVILEGED_USER = "nobody"


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


#: The file in a local target's scratch directory that names the run it belongs to.
SCRATCH_MARK = ".iomux-run"


def sweep_scratch(run_id: str | None, root: Path | None = None) -> list[str]:
    """Remove the scratch directories (``iomux-<run>-<worker>-<target>-*`` in the
    temporary directory, marked with SCRATCH_MARK) of ``run_id``, or of every run
    when it is None. A directory without the mark is not ours and stays."""
    removed = []
    base_dir = root if root is not None else Path(tempfile.gettempdir())
    pattern = f"iomux-{run_id}-*" if run_id is not None else "iomux-*"
    for scratch in sorted(base_dir.glob(pattern)):
        try:
            owner = (scratch / SCRATCH_MARK).read_text().strip()
        except OSError:
            continue
        if run_id is not None and owner != run_id:
            continue
        shutil.rmtree(scratch, ignore_errors=True)
        removed.append(f"local scratch {scratch} (run {owner})")
    return removed


class LocalDriver(Driver):
    """Targets that are this host."""

    kind = "local"
    keep_reason = "its servers are the harness's children and stop with it"

    def __init__(self) -> None:
        self._procs: dict[str, dict[str, subprocess.Popen[bytes]]] = {}
        self._logs: dict[str, list[IO[bytes]]] = {}
        self._server_python: str | None = None

    # -- engine
    def unavailable_reason(self) -> str | None:
        """This host is always there."""
        return None

    def _server_user(self) -> str | None:
        return UNPRIVILEGED_USER if os.geteuid() == 0 else None

    def _env(self, run_id: str) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        env[ENV_PROJECT] = PROJECT
        env[ENV_RUN] = run_id
        return env

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        """Kill our servers left by an earlier run (Linux: found through /proc)."""
        removed: list[str] = []
        proc_root = Path("/proc")
        if not proc_root.is_dir():
            return removed  # elsewhere --stop-on-stdin is the whole safety net
        for entry in proc_root.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue  # gone, or not ours to read
            labels = dict(item.split(b"=", 1) for item in environ if b"=" in item)
            if labels.get(ENV_PROJECT.encode()) != PROJECT.encode():
                continue
            run = labels.get(ENV_RUN.encode(), b"").decode()
            if run_id is not None and run != run_id:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
                removed.append(f"local process {entry.name} (run {run})")
        removed += sweep_scratch(run_id)
        return removed

    # -- lifecycle
    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """Byte-compile the working tree's iomux, and check that it runs as the server will."""
        started = time.monotonic()
        # As the tree's owner: the servers run as nobody, who cannot write
        # iomux/__pycache__ (and PYTHONDONTWRITEBYTECODE stops anyone else), so
        # each of the some 350 servers a run starts would compile the package
        # from source again, a third of its start-up. py_compile writes whatever
        # that variable says; a stale .pyc is recompiled here next time, and
        # never trusted by Python meanwhile (its source's mtime is in it).
        compileall.compile_dir(str(REPO / "iomux"), quiet=1)
        user = self._server_user()
        candidates = [sys.executable]
        system_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if user is not None and system_python:
            candidates.append(system_python)
        errors = []
        for python in candidates:
            try:
                proc = subprocess.run(
                    [python, "-m", "iomux", "backends", "--json"], capture_output=True,
                    text=True, timeout=timeout, cwd="/", env=self._env("build"), user=user,
                    check=False)
            except subprocess.TimeoutExpired:
                raise StepTimeout(f"build: iomux backends timed out after {timeout:g}s") from None
            except OSError as exc:
                errors.append(f"{python}: {exc.strerror}")
                continue
            if proc.returncode == 0:
                self._server_python = python
                return {"cached": True, "seconds": round(time.monotonic() - started, 3),
                        "python": python, "user": user or pwd.getpwuid(os.geteuid()).pw_name}
            last = proc.stderr.strip().splitlines()
            errors.append(f"{python}: {last[-1] if last else f'exit {proc.returncode}'}")
        raise TargetError("build: `python -m iomux backends --json` failed: " + "; ".join(errors))

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Start one ``iomux serve`` per backend, each on port 0 with a ready file."""
        python = self._server_python or sys.executable
        user = self._server_user()
        name = f"iomux-{run_id}-{worker}-{target.name}"
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        # The label a sweep finds it by, as a container's labels: a kill -9 of the
        # run leaves the directory behind, and the next run's sweep removes it.
        (scratch / SCRATCH_MARK).write_text(run_id + "\n")
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(scratch, entry.pw_uid, entry.pw_gid)  # the servers write ready files here
        instance = Instance(target=target, run_id=run_id, resource_name=name, guest=Guest(
            tests_dir=str(REPO / "tests" / "server"),
            python=sys.executable,  # the in-guest suite needs pytest: the harness's own
            scratch_dir=str(scratch),
            cwd=str(REPO),
        ), data={
            "server_python": python,
            "server_user": user,
            "scratch": str(scratch),  # what destroy removes
        })
        procs: dict[str, subprocess.Popen[bytes]] = {}
        logs: list[IO[bytes]] = []
        self._procs[name] = procs
        self._logs[name] = logs
        for backend in target.backends:
            log = open(scratch / f"{backend}.log", "wb")  # noqa: SIM115 - closed in destroy
            logs.append(log)
            argv = serve_argv(backend, 0, python=python,
                              ready_file=str(scratch / f"{backend}.ready.json"),
                              extra=["--stop-on-stdin"])
            try:
                procs[backend] = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                    cwd="/", env=self._env(run_id), user=user,
                    # Own session: a Ctrl-C at the terminal reaches the harness, which
                    # stops the servers in order, rather than the servers themselves.
                    start_new_session=True)
            except OSError as exc:
                self.destroy(instance, timeout)
                raise TargetError(f"start: {backend}: {exc}") from None
        return instance

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        """Wait for every ready file, then for one echo round trip per backend."""
        procs = self._procs.get(instance.resource_name, {})
        scratch = Path(instance.guest.scratch_dir)
        deadline = time.monotonic() + timeout
        pending = dict(procs)
        while pending:
            for backend, proc in list(pending.items()):
                ready = scratch / f"{backend}.ready.json"
                if ready.exists():
                    info = json.loads(ready.read_text())
                    instance.echo_ports[backend] = ("127.0.0.1", int(info["port"]))
                    instance.guest.guest_ports[backend] = int(info["port"])
                    instance.guest.server_pids[backend] = int(info["pid"])
                    del pending[backend]
                elif proc.poll() is not None:
                    why = _last_line(scratch / f"{backend}.log") or f"exit {proc.returncode}"
                    raise TargetError(f"healthy: the {backend} server exited: {why}")
            if pending and time.monotonic() > deadline:
                raise StepTimeout(f"healthy: no ready file after {timeout:g}s for "
                                  f"{', '.join(pending)}")
            if pending:
                time.sleep(0.05)
        for backend, address in instance.echo_ports.items():
            left = max(0.5, deadline - time.monotonic())
            try:
                with socket.create_connection(address, timeout=left) as sock:
                    sock.sendall(b"healthy?\n")
                    got = b""
                    while len(got) < 9:
                        chunk = sock.recv(64)
                        if not chunk:
                            break
                        got += chunk
            except OSError as exc:
                raise TargetError(f"healthy: {backend} on port {address[1]}: {exc}") from None
            if got != b"healthy?\n":
                raise TargetError(f"healthy: {backend} echoed {got!r}")

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` here, in the working tree (no shell)."""
        if user is not None:
            raise TargetError("exec: the local kind runs commands as the harness's user only")
        # The harness's own pytest/xdist variables would leak into an inner pytest.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
        return run_argv(argv, timeout, step=f"exec {argv[0]}", cwd=Path(instance.guest.cwd or REPO),
                        env=env)

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """testinfra's local backend."""
        return "local://", {}

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        """A plain copy; a missing or unreadable file is a one-line TargetError, as in
        the other drivers."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(path, dest)
        except OSError as exc:
            raise TargetError(f"copy: {path}: {exc.strerror or exc}") from None
        return dest

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        """Copy each server's output."""
        dest.mkdir(parents=True, exist_ok=True)
        saved = []
        for log in sorted(Path(instance.guest.scratch_dir).glob("*.log")):
            saved.append(Path(shutil.copy(log, dest / log.name)))
        return saved

    def destroy(self, instance: Instance, timeout: float) -> None:
        """Stop the servers (EOF on stdin, then SIGTERM, then SIGKILL) and remove scratch."""
        procs = self._procs.pop(instance.resource_name, {})
        for proc in procs.values():
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + min(timeout, 10.0)
        for proc in procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in self._logs.pop(instance.resource_name, []):
            log.close()
        scratch = instance.data.get("scratch")
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
