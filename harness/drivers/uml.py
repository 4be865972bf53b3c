"""The ``uml`` kind: the Debian 12 userland on a User-Mode Linux kernel.

User-Mode Linux is a real Linux kernel built to run as an ordinary process, so
its epoll, TCP and socket options are that version's own, on one vCPU. Each
instance boots the pinned ``linux.uml`` (harness/drivers/kernel_builds.py) with

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
- The pinned builds (6.1um4, 6.12um1) cannot run a process on a CPU with AVX-512,
  PKU or AMX. UML sets the FPU state of its guest processes with PTRACE_SETREGSET
  (NT_X86_XSTATE) from an 832-byte buffer (sizeof(struct _xstate): x87, SSE,
  AVX), and Linux takes that regset only whole (xstateregs_set: count must be
  the host's XSAVE size, else EFAULT). Where the XSAVE area is 832 bytes (an
  AVX2 CPU without PKU) they boot; on a Sapphire Rapids host here (avx512f,
  amx_tile: 11,008 bytes, measured with ptrace) init dies at once with
  "userspace - ptrace set fp regs failed, errno = 14" and the kernel panics.
  Later UML kernels size the buffer from the host (host_fp_size). So whether a
  build runs is measured, not guessed: ``fpu_refusal`` boots it once with
  init=/bin/true on the host's own root (about 1 s) and reads that line.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, ClassVar, Iterator, Sequence

from harness.drivers import kernel_builds, kernels
from harness.drivers.base import (
    BACKEND_PORTS,
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    serve_argv,
)

AGENT_SOURCE = Path(__file__).with_name("uml_agent.py")
AGENT_IN_GUEST = "opt/iomux/uml_agent.py"
UNREACHABLE = "UML guest: no network but its own loopback, not reachable from the host"
#: Marks the UML process and everything it forks, for sweep and destroy.
ENV_MARK = "IOMUX_UML_INSTANCE"
BOOT_TIMEOUT_S = 120.0
#: What the pinned builds print when Linux refuses their FPU state (module docstring).
FPU_REFUSED = "ptrace set fp regs failed"
FPU_PROBE_TIMEOUT_S = 60.0


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


# A guest's processes all run on one host CPU (``host_cpu``). Each of the guest's
# system calls is two ptrace stops: the guest process stops, the UML kernel's own host
# process runs, then the guest process again. With a second host core free, the host
# scheduler wakes each of them on the other core, and every system call pays two
# cross-core wake-ups. Measured here (2026-12-07, 2 cores, the uml-6-1 target alone):
# unpinned, 223 s of wall and 145 core-s, and select-poll-cost-grows read
# poll t(10000)/t(0) = 6.2, an unexpected difference (Linux: >= 10); under taskset,
# 120 s, 81 core-s, and 41.9 (with this driver's pin: 129 s and 98 core-s). In a full
# matrix, where the other core is busy, it took 160 s unpinned.
# The guest has one vCPU, so one host CPU is all it can use anyway.
def host_cpu(worker: str) -> int:
    """The host CPU for a guest started by xdist ``worker`` (gw0, gw1, ...; any other
    name counts as 0): the worker's number modulo the CPUs this process may use, so
    that two guests tested at once sit on different CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    digits = worker[len(worker.rstrip("0123456789")):]
    return allowed[int(digits or 0) % len(allowed)]


@contextlib.contextmanager
def _children_on_cpu(cpu: int) -> Iterator[None]:
    """Processes this thread starts in the block inherit an affinity of ``cpu`` alone
    (sched_setaffinity with pid 0 is the calling thread's, and fork copies it); the
    thread's own comes back after."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _cpu_flags(*wanted: str) -> list[str]:
    """Those of ``wanted`` that /proc/cpuinfo lists for this CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    return [flag for flag in wanted if flag in flags]


def fpu_refused_reason(binary: kernel_builds.KernelBinary, console: str) -> str | None:
    """The one-line reason for a console that shows Linux refusing the build's
    FPU state (module docstring), or None."""
    if FPU_REFUSED not in console:
        return None
    flags = "/".join(_cpu_flags("avx512f", "amx_tile", "pku")) or "large-XSAVE"
    return (f"{binary.package} {binary.version} cannot run on this CPU: Linux refuses "
            f"the 832 bytes of FPU state it sets for a process, since this {flags} CPU's "
            f"XSAVE area is larger (\"{FPU_REFUSED}, errno = 14\") "
            f"(needs a CPU without AVX-512/PKU/AMX)")


@functools.cache
def fpu_refusal(binary: kernel_builds.KernelBinary) -> str | None:
    """Boot ``binary`` once with init=/bin/true on the host's root, read-only, and
    return ``fpu_refused_reason`` of its console (once per process and build).

    Any other outcome is None: init=/bin/true always ends in a panic ("Attempted to
    kill init"), and a boot that fails for another reason is ``start``'s to report.
    """
    with tempfile.TemporaryDirectory(prefix="iomux-uml-probe-") as home:
        argv = [*binary.argv0(), "mem=64M", "root=/dev/root", "rootfstype=hostfs",
                "rootflags=/", "ro", "init=/bin/true", "con0=null,fd:1", "con=null",
                f"uml_dir={home}", "umid=fpu-probe"]
        env = {"PATH": "/usr/bin:/bin", ENV_MARK: Path(home).name,
               "TMPDIR": str(_exec_dir() or home), **binary.env()}
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env, cwd=home,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=FPU_PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            out = b""
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return fpu_refused_reason(binary, out.decode(errors="replace"))


class UMLDriver(kernels.KernelDriver):
    """Targets that are a User-Mode Linux guest on this host."""

    kind: ClassVar[str] = "uml"
    keep_reason: ClassVar[str] = "the guest is reached over the harness's own pipes"
    unreachable: ClassVar[str] = UNREACHABLE
    noun: ClassVar[str] = "uml guest"
    console: ClassVar[str] = "console.log"
    logs: ClassVar[tuple[str, ...]] = ("console.log",)
    ready_poll_s: ClassVar[float] = 0.3
    #: ``mem``: the guest's memory (``mem=`` on the kernel's command line).
    options_allowed: ClassVar[frozenset[str]] = kernels.KernelDriver.options_allowed | {"mem"}

    def __init__(self) -> None:
        super().__init__()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._channels: dict[str, Channel] = {}

    def unavailable_reason(self) -> str | None:
        """UML needs a Linux x86-64 host."""
        if os.uname().sysname != "Linux" or os.uname().machine != "x86_64":
            return "User-Mode Linux runs on x86-64 Linux hosts only"
        return None

    def target_unavailable_reason(self, target: Target) -> str | None:
        """As every kernel kind's, and the build must be able to run a process on
        this CPU (``fpu_refusal``)."""
        return (self.build_unavailable_reason(target)
                or fpu_refusal(kernel_builds.kernel_binary(target)))

    def _marker(self, home: Path) -> str:
        """ENV_MARK in the environment of the UML process and all it forks."""
        return f"{ENV_MARK}={home.name}"

    def _prepare_rootfs(self, rootfs: Path) -> None:
        """The agent, as the guest's init."""
        agent = rootfs / AGENT_IN_GUEST
        source = AGENT_SOURCE.read_bytes()
        if not agent.is_file() or agent.read_bytes() != source:
            tmp = agent.with_name(f".{agent.name}.{os.getpid()}")
            tmp.write_bytes(source)
            tmp.chmod(0o755)
            tmp.replace(agent)  # atomic: another worker may be booting from this tree

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Boot the guest and wait for its agent's first line; destroy on failure."""
        instance, rootfs = self._new_instance(target, run_id, worker)
        name = instance.resource_name
        home = Path(instance.data["home"])
        to_guest_r, to_guest_w = os.pipe()
        from_guest_r, from_guest_w = os.pipe()
        log = open(home / "console.log", "wb")  # noqa: SIM115 - the guest keeps it
        binary = kernel_builds.kernel_binary(target)
        argv = [*binary.argv0(), f"mem={target.options.get('mem', '1024M')}",
                "root=/dev/root", "rootfstype=hostfs", f"rootflags={rootfs}", "ro",
                f"init=/{AGENT_IN_GUEST}", f"ssl0=fd:{to_guest_r},fd:{from_guest_w}",
                "ssl=null", f"con0=null,fd:{log.fileno()}", "con=null",
                f"uml_dir={home}", f"umid={target.name}",
                f"IOMUX_HOSTNAME={target.name}", f"IOMUX_NOFILE={kernels.nofile_limit()[1]}"]
        env = {"PATH": "/usr/bin:/bin", ENV_MARK: name, "TMPDIR": str(_exec_dir() or home),
               **binary.env()}
        cpu = host_cpu(worker)
        instance.data["host_cpu"] = cpu
        try:
            with _children_on_cpu(cpu):
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
            tail = kernels.log_tail(home / "console.log")
            with contextlib.suppress(OSError):
                tail = fpu_refused_reason(binary, (home / "console.log").read_text(
                    errors="replace")) or tail
            self.destroy(instance, 30)
            if isinstance(exc, (StepTimeout, TargetError)):
                raise type(exc)(f"start: UML did not boot: {exc} ({tail})") from None
            raise
        return instance

    def _start_servers(self, instance: Instance) -> None:
        """One ``iomux serve`` per backend, detached (the agent has no init to do it)."""
        for backend in instance.data["backends"]:
            # setsid's child outlives this exec: the agent waits only for setsid.
            # Its output goes to a file: the agent reads the exec's pipes to EOF.
            started = self.exec(instance, [
                "sh", "-c", 'log=$1; shift; setsid -f "$@" >"$log" 2>&1 </dev/null', "sh",
                f"/tmp/iomux-serve-{backend}.log",
                *serve_argv(backend, BACKEND_PORTS[backend], quiet=True,
                            ready_file=kernels.ready_file(backend))], 30)
            if started.rc != 0:
                raise TargetError(f"healthy: iomux serve --backend {backend}: "
                                  f"{started.stderr.strip()[:200]}")

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` in the guest through the agent, which kills it at ``timeout``."""
        kernels.check_argv(argv)
        channel = self._channels.get(instance.resource_name)
        if channel is None:
            raise TargetError(f"{instance.resource_name}: the guest is not running")
        reply = channel.request({"op": "exec", "argv": [str(a) for a in argv],
                                 "timeout": timeout, "user": user or kernels.GUEST_USER},
                                timeout + 15)
        if reply.get("timed_out"):
            raise kernels.exec_timed_out(instance, argv, timeout)
        return ExecResult(argv=list(argv), rc=int(reply["rc"]),
                          stdout=base64.b64decode(reply["stdout"]).decode(errors="replace"),
                          stderr=base64.b64decode(reply["stderr"]).decode(errors="replace"))

    def _stop(self, instance: Instance, timeout: float) -> None:
        """Power the guest off through its agent, then kill its process group."""
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
        if channel is not None:
            channel.close()
