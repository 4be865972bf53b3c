"""The ``uml`` kind: the Debian 12 userland on a User-Mode Linux kernel.

User-Mode Linux is a real Linux kernel built to run as an ordinary process, so
its epoll, TCP and socket options are that version's own, on one vCPU. Each
instance boots the pinned ``linux.uml`` (harness/drivers/kernels.py) with

    mem=M root=/dev/root rootfstype=hostfs rootflags=<rootfs> ro
    init=/opt/iomux/uml_agent.py ssl0=fd:R,fd:W con0=null,fd:L uml_dir=<private dir>

that is, the shared exported root filesystem read-only through hostfs, and
harness/drivers/uml_agent.py as init: the exec channel is the guest's serial
line /dev/ttyS0, wired to two pipes of this process (JSON lines, see the agent).
Facts about UML on this machine that this relies on:

- It boots in about 3 s with a hostfs root; no disk image is needed.
- It needs its memory file (in $TMPDIR, default /tmp) on a filesystem mounted
  with exec: /dev/shm when that is exec, else the instance's own directory.
  Docker mounts /dev/shm noexec, so UML cannot run inside a default container.
- It has one vCPU, and no network but its own loopback: nothing in it is
  reachable from the host, so the black-box and host suites are not run.
- Every guest process is a host process of the UML kernel's, in the session
  it was started in: killing that process group leaves nothing behind.
- Without ``uml_dir``/``umid`` UML keeps its pid file and management socket in
  ~/.uml/<random>/ and leaves it behind; here they are in the instance's dir.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar, Sequence

from harness.drivers import kernels
from harness.drivers.base import (
    BACKEND_PORTS,
    Driver,
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
)
from harness.drivers.gvisor import GUEST_PYTHON, GUEST_TESTS, GUEST_USER, nofile_limit

AGENT_SOURCE = Path(__file__).with_name("uml_agent.py")
AGENT_IN_GUEST = "opt/iomux/uml_agent.py"
UNREACHABLE = "UML guest: no network but its own loopback, not reachable from the host"
#: Marks the UML process and everything it forks, for sweep and destroy.
ENV_MARK = "IOMUX_UML_INSTANCE"
BOOT_TIMEOUT_S = 120.0


class Channel:
    """The host's end of the agent's serial line: requests out, replies by id."""

    def __init__(self, to_guest: IO[bytes], from_guest: IO[bytes]) -> None:
        self._out = to_guest
        self._in = from_guest
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._replies: dict[int, dict[str, Any]] = {}
        self._next = 1
        self.closed = False
        self.noise: list[bytes] = []
        threading.Thread(target=self._read, daemon=True, name="uml-channel").start()

    def _read(self) -> None:
        for line in self._in:
            try:
                reply = json.loads(line)
            except ValueError:
                self.noise = [*self.noise, line[:200]][-20:]
                continue
            with self._cond:
                self._replies[int(reply.get("id", -1))] = reply
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_reply(self, request_id: int, timeout: float) -> dict[str, Any]:
        """The reply to ``request_id``; StepTimeout or TargetError (guest gone)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self._replies:
                left = deadline - time.monotonic()
                if self.closed:
                    raise TargetError("the UML guest closed its serial line (it stopped)")
                if left <= 0:
                    raise StepTimeout(f"no reply from the UML guest agent after {timeout:g}s")
                self._cond.wait(left)
            return self._replies.pop(request_id)

    def close(self) -> None:
        """Close both pipes (after the guest is gone)."""
        for stream in (self._out, self._in):
            with contextlib.suppress(OSError):
                stream.close()

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait for its reply."""
        with self._lock:
            request_id = self._next
            self._next += 1
            try:
                self._out.write((json.dumps({**message, "id": request_id}) + "\n").encode())
                self._out.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise TargetError(f"the UML guest is gone: {exc}") from None
        return self.wait_reply(request_id, timeout)


def _exec_dir() -> Path | None:
    """/dev/shm if it is mounted with exec (UML maps its memory file executable)."""
    shm = Path("/dev/shm")
    try:
        return shm if shm.is_dir() and not os.statvfs(shm).f_flag & os.ST_NOEXEC else None
    except OSError:
        return None


class UMLDriver(Driver):
    """Targets that are a User-Mode Linux guest on this host."""

    kind: ClassVar[str] = "uml"

    def __init__(self) -> None:
        self._rootfs: dict[str, Path] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._channels: dict[str, Channel] = {}

    def unavailable_reason(self) -> str | None:
        """UML needs a Linux x86-64 host."""
        if os.uname().sysname != "Linux" or os.uname().machine != "x86_64":
            return "User-Mode Linux runs on x86-64 Linux hosts only"
        return None

    def target_unavailable_reason(self, target: Target) -> str | None:
        """The pinned linux.uml is missing, or the Debian 12 userland cannot be built."""
        return (kernels.kernel_binary(target).missing_reason()
                or kernels.userland_unavailable_reason(target))

    def sweep(self, run_id: str | None = None) -> list[str]:
        """Kill the guests of dead runs (found by ENV_MARK) and remove their dirs."""
        removed = []
        for path in kernels.doomed_dirs(self.kind, run_id):
            killed = kernels.kill_marked(f"{ENV_MARK}={path.name}")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"uml guest {path.name} ({len(killed)} processes)")
        return removed

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """The exported root filesystem with the agent in it, and the kernel's facts."""
        binary = kernels.kernel_binary(target)
        reason = binary.missing_reason()
        if reason:
            raise TargetError(f"build: {reason}")
        rootfs, facts = kernels.ensure_rootfs(target, timeout)
        agent = rootfs / AGENT_IN_GUEST
        source = AGENT_SOURCE.read_bytes()
        if not agent.is_file() or agent.read_bytes() != source:
            tmp = agent.with_name(f".{agent.name}.{os.getpid()}")
            tmp.write_bytes(source)
            tmp.chmod(0o755)
            tmp.replace(agent)  # atomic: another worker may be booting from this tree
        self._rootfs[target.name] = rootfs
        facts["kernel_build"] = binary.facts()
        return facts

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Boot the guest and wait for its agent's first line; destroy on failure."""
        rootfs = self._rootfs.get(target.name)
        if rootfs is None:
            raise TargetError("start: build the target first")
        name = f"iomux-{run_id}-{worker}-{target.name}"
        home = kernels.new_instance_dir(self.kind, name, run_id, rootfs)
        backends = ["auto", *(b for b in target.backends if b in BACKEND_PORTS)]
        instance = Instance(target=target, run_id=run_id, resource_name=name, data={
            "home": str(home), "python": GUEST_PYTHON, "tests_dir": GUEST_TESTS,
            "scratch_dir": "/tmp", "backends": backends, "guest_ports": {},
            "server_pids": {}, "unreachable": UNREACHABLE,
            "test_scale": target.options.get("test_scale")})
        to_guest_r, to_guest_w = os.pipe()
        from_guest_r, from_guest_w = os.pipe()
        log = open(home / "console.log", "wb")  # noqa: SIM115 - the guest keeps it
        binary = kernels.kernel_binary(target)
        argv = [*binary.argv0(), f"mem={target.options.get('mem', '1024M')}",
                "root=/dev/root", "rootfstype=hostfs", f"rootflags={rootfs}", "ro",
                f"init=/{AGENT_IN_GUEST}", f"ssl0=fd:{to_guest_r},fd:{from_guest_w}",
                "ssl=null", f"con0=null,fd:{log.fileno()}", "con=null",
                f"uml_dir={home}", f"umid={target.name}",
                f"IOMUX_HOSTNAME={target.name}", f"IOMUX_NOFILE={nofile_limit()[1]}"]
        env = {"PATH": "/usr/bin:/bin", ENV_MARK: name, "TMPDIR": str(_exec_dir() or home),
               **binary.env()}
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=home,
                                    pass_fds=(to_guest_r, from_guest_w, log.fileno()),
                                    start_new_session=True)
        finally:
            for fd in (to_guest_r, from_guest_w):
                os.close(fd)
            log.close()
        self._procs[name] = proc
        instance.data["pid"] = proc.pid
        channel = Channel(os.fdopen(to_guest_w, "wb"), os.fdopen(from_guest_r, "rb"))
        self._channels[name] = channel
        try:
            hello = channel.wait_reply(0, min(timeout, BOOT_TIMEOUT_S))
            instance.data["release"] = hello.get("release")
        except BaseException as exc:
            tail = _last_line(home / "console.log")
            self.destroy(instance, 30)
            if isinstance(exc, (StepTimeout, TargetError)):
                raise type(exc)(f"start: UML did not boot: {exc} ({tail})") from None
            raise
        return instance

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        """One ``iomux serve`` per backend, then one ``iomux check`` echo each."""
        deadline = time.monotonic() + timeout
        for backend in instance.data["backends"]:
            port = BACKEND_PORTS[backend]
            # setsid's child outlives this exec: the agent waits only for setsid.
            # Its output goes to a file: the agent reads the exec's pipes to EOF.
            started = self.exec(instance, [
                "sh", "-c", 'log=$1; shift; setsid -f "$@" >"$log" 2>&1 </dev/null', "sh",
                f"/tmp/iomux-serve-{backend}.log", "iomux", "serve", "--backend", backend,
                "--port", str(port), "--host", "127.0.0.1", "--quiet", "--ready-file",
                f"/tmp/iomux-ready-{backend}.json"], 30)
            if started.rc != 0:
                raise TargetError(f"healthy: iomux serve --backend {backend}: "
                                  f"{started.stderr.strip()[:200]}")
        for backend in instance.data["backends"]:
            port = BACKEND_PORTS[backend]
            while True:
                ready = self.exec(instance, ["cat", f"/tmp/iomux-ready-{backend}.json"], 30)
                if ready.rc == 0 and ready.stdout.strip():
                    break
                if time.monotonic() > deadline:
                    raise StepTimeout(f"healthy: no ready file for {backend} after {timeout:g}s")
                time.sleep(0.3)
            instance.data["guest_ports"][backend] = port
            instance.data["server_pids"][backend] = int(json.loads(ready.stdout).get("pid", 0))
            check = self.exec(instance, ["iomux", "check", f"127.0.0.1:{port}", "--timeout",
                                         "5"], 30)
            if check.rc != 0:
                raise TargetError(f"healthy: iomux check of {backend} on {port} exited "
                                  f"{check.rc}: {(check.stderr or check.stdout).strip()[:200]}")

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` in the guest through the agent, which kills it at ``timeout``."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("exec takes an argv list, not a string")
        channel = self._channels.get(instance.resource_name)
        if channel is None:
            raise TargetError(f"{instance.resource_name}: the guest is not running")
        reply = channel.request({"op": "exec", "argv": [str(a) for a in argv],
                                 "timeout": timeout, "user": user or GUEST_USER}, timeout + 15)
        if reply.get("timed_out"):
            raise StepTimeout(f"exec: {argv[0]} in {instance.resource_name}: timed out after "
                              f"{timeout:g}s")
        return ExecResult(argv=list(argv), rc=int(reply["rc"]),
                          stdout=base64.b64decode(reply["stdout"]).decode(errors="replace"),
                          stderr=base64.b64decode(reply["stderr"]).decode(errors="replace"))

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """None: no testinfra backend reaches into a UML guest without a network."""
        raise TargetError(f"{instance.resource_name}: {UNREACHABLE}")

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        """``base64`` inside, decoded here (kernels.copy_via_exec)."""
        return kernels.copy_via_exec(functools.partial(self.exec, instance),
                                     instance.resource_name, path, dest, timeout)

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        """The guest's console (kernel messages and the agent's own)."""
        dest.mkdir(parents=True, exist_ok=True)
        log = Path(instance.data["home"]) / "console.log"
        if not log.is_file():
            return []
        return [Path(shutil.copy(log, dest / f"{instance.resource_name}.console.log"))]

    def destroy(self, instance: Instance, timeout: float) -> None:
        """Power the guest off through its agent, then kill its process group and
        anything still marked as this instance's; remove its dir. Safe twice."""
        name = instance.resource_name
        channel = self._channels.pop(name, None)
        proc = self._procs.pop(name, None)
        if channel is not None and proc is not None and proc.poll() is None:
            with contextlib.suppress(StepTimeout, TargetError):
                channel.request({"op": "poweroff"}, min(10.0, timeout))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(min(10.0, timeout))
        pid = instance.data.get("pid")
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(pid), signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        kernels.kill_marked(f"{ENV_MARK}={name}")
        if channel is not None:
            channel.close()
        shutil.rmtree(instance.data["home"], ignore_errors=True)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else "(no output)"
