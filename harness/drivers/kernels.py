"""What the ``gvisor`` and ``uml`` kinds share: ``KernelDriver``, the driver both
kinds are, but for how a guest is booted, reached and stopped: the build (the
pinned binary, ``kernel_builds``, and the shared Debian 12 tree, ``userland``),
the instance's private directory and its sweep, the servers' health checked from
inside (nothing in the guest is reachable from the host), ``copy_from`` over
exec, the saved logs and the last of destroy.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import functools
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Mapping, Sequence

from harness.drivers.base import (
    BACKEND_PORTS,
    Driver,
    ExecResult,
    Guest,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    TargetUnavailable,
)
from harness.drivers.kernel_builds import KernelBinary, kernel_binary
from harness.drivers.owners import owner_alive, owner_label
from harness.drivers.userland import ensure_rootfs, userland_unavailable_reason

#: Where the userland (docker/Dockerfile) has the in-guest suite and its Python.
GUEST_PYTHON = "/opt/iomux/venv/bin/python"
GUEST_TESTS = "/opt/iomux/tests/server"
#: The in-image user (docker/Dockerfile): the servers and every exec run as it.
GUEST_USER = "10001:10001"


def nofile_limit() -> tuple[int, int]:
    """The open-file limit a debian-12 container gets here: dockerd's own, which it
    inherits from this host, so the harness's (the probes open 10,000 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def ready_file(backend: str) -> str:
    """Where ``backend``'s server writes its port and pid in the guest, once it listens."""
    return f"/tmp/iomux-ready-{backend}.json"


def log_tail(path: Path) -> str:
    """The last line of a guest's log on the host (cut to 200 characters), "" without one."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else "(no output)"


# -- per-instance state on the host, and what sweep() finds of it ---------------

#: Each instance's private directory (runsc's --root, the bundle, UML's scratch):
#: ``<STATE_BASE>/<kind>/<instance name>/``, with an ``owner`` file that says
#: which run and which harness process made it.
STATE_BASE = Path(os.environ.get("IOMUX_KERNEL_STATE_DIR", "/tmp/iomux-kernels"))


def new_instance_dir(kind: str, name: str, run_id: str, rootfs: Path) -> Path:
    """Make the instance's private directory and record its owner and the root
    filesystem it uses (which is then not removed as superseded)."""
    path = STATE_BASE / kind / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    (path / "owner").write_text(json.dumps({"run": run_id, "owner": owner_label(),
                                            "rootfs": str(rootfs)}) + "\n")
    return path


def doomed_dirs(kind: str, run_id: str | None) -> list[Path]:
    """Instance directories to sweep: all of ``run_id``'s, or (without one) those
    whose owner process is provably gone."""
    found = []
    base = STATE_BASE / kind
    for path in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            owner = json.loads((path / "owner").read_text())
        except (OSError, ValueError):
            owner = {}
        if run_id is not None:
            if owner.get("run") == run_id:
                found.append(path)
        elif not owner_alive(str(owner.get("owner", ""))):
            found.append(path)
    return found


def marked_pids(marker: str) -> list[int]:
    """Host processes whose command line or environment contains ``marker``."""
    pids = []
    needle = marker.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes() or \
                    needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue  # gone, or a kernel thread
    return pids


def kill_marked(marker: str, settle: float = 5.0) -> list[int]:
    """SIGKILL every process marked with ``marker``; wait until they are gone."""
    import signal

    killed = marked_pids(marker)
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + settle
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def copy_via_exec(exec_: Callable[[Sequence[str], float], ExecResult], where: str, path: str,
                  dest: Path, timeout: float) -> Path:
    """Copy ``path`` out of a guest that has no file channel of its own: ``base64``
    inside (the file may be on the guest's tmpfs), decoded here into ``dest``."""
    result = exec_(["base64", "-w", "0", path], timeout)
    if result.rc != 0:
        raise TargetError(f"copy: {path} in {where}: {result.stderr.strip() or result.rc}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(base64.b64decode(result.stdout))
    return dest


def check_argv(argv: Sequence[str]) -> None:
    """Refuse a shell string where an argv list belongs (no shell is ever involved)."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("exec takes an argv list, not a string")


def exec_timed_out(instance: Instance, argv: Sequence[str], timeout: float) -> StepTimeout:
    """The error of a command that the guest killed at its timeout."""
    return StepTimeout(f"exec: {argv[0]} in {instance.resource_name}: timed out after "
                       f"{timeout:g}s")


class KernelDriver(Driver):
    """A kind that runs the shared Debian 12 root filesystem on a pinned kernel binary.

    A subclass says how a guest boots (``start``), runs a command (``exec``) and
    stops (``_stop``), and names what marks its host processes (``_marker``)."""

    #: Why nothing in the guest is reachable from the host (``Guest.unreachable``).
    unreachable: ClassVar[str]
    #: ``kernel_build``: the pinned kernel binary; ``userland``: the docker target
    #: whose image is the guest's tree; ``test_scale``: the fault suite's scale.
    options_required: ClassVar[frozenset[str]] = frozenset({"kernel_build"})
    options_allowed: ClassVar[frozenset[str]] = frozenset({"userland", "test_scale"})
    #: [target.kernel_build], read by kernel_builds.kernel_binary.
    option_tables: ClassVar[Mapping[str, frozenset[str]]] = {
        "kernel_build": frozenset({"package", "version", "suite", "libc6"})}
    #: What one instance is called in the sweep's log ("gvisor sandbox").
    noun: ClassVar[str]
    #: The guest's own output in its directory, whose last line goes into an error.
    console: ClassVar[str]
    #: What ``save_logs`` copies out of the instance's directory.
    logs: ClassVar[tuple[str, ...]]
    #: Seconds between reads of the servers' ready files.
    ready_poll_s: ClassVar[float] = 0.5

    def __init__(self) -> None:
        self._rootfs: dict[str, Path] = {}

    @abc.abstractmethod
    def _marker(self, home: Path) -> str:
        """The text in the command line or environment of every host process of the
        instance whose directory is ``home`` (see ``kill_marked``)."""

    @abc.abstractmethod
    def _stop(self, instance: Instance, timeout: float) -> None:
        """Stop the guest the kind's own way; ``destroy`` then kills what is left."""

    def _start_servers(self, instance: Instance) -> None:
        """Start one ``iomux serve`` per backend (nothing: the guest's init does)."""

    def _remove_leftovers(self, name: str) -> list[str]:
        """Remove what a guest named ``name`` leaves on the host outside its directory
        once its processes are gone (nothing); return what was removed."""
        return []

    def _prepare_rootfs(self, rootfs: Path) -> None:
        """Add what the kind needs to the shared tree before it boots from it (nothing)."""

    def _kernel_facts(self, binary: KernelBinary) -> dict[str, Any]:
        """The report's facts of the kernel binary that runs."""
        return binary.facts()

    def build_unavailable_reason(self, target: Target) -> str | None:
        """The pinned binary is missing, or the Debian 12 userland cannot be built."""
        return kernel_binary(target).missing_reason() or userland_unavailable_reason(target)

    def target_unavailable_reason(self, target: Target) -> str | None:
        """What ``build`` needs is missing (a kind adds what only a boot can tell)."""
        return self.build_unavailable_reason(target)

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        """Kill the guests of dead runs (found by their marker) and remove their dirs."""
        removed = []
        for path in doomed_dirs(self.kind, run_id):
            killed = kill_marked(self._marker(path))
            left = self._remove_leftovers(path.name)
            shutil.rmtree(path, ignore_errors=True)
            also = f", {len(left)} more on the host, such as {left[0]}" if left else ""
            removed.append(f"{self.noun} {path.name} ({len(killed)} processes{also})")
        return removed

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """The exported root filesystem (with what the kind adds), and the kernel's facts."""
        binary = kernel_binary(target)
        reason = binary.missing_reason()
        if reason:
            raise TargetUnavailable(f"build: {reason}")
        rootfs, facts = ensure_rootfs(target, timeout, STATE_BASE)
        self._prepare_rootfs(rootfs)
        self._rootfs[target.name] = rootfs
        facts["kernel_build"] = self._kernel_facts(binary)
        return facts

    def _new_instance(self, target: Target, run_id: str, worker: str) -> tuple[Instance, Path]:
        """The instance ``start`` boots, with its private directory made, and the
        root filesystem ``build`` made ready."""
        rootfs = self._rootfs.get(target.name)
        if rootfs is None:
            raise TargetError("start: build the target first")
        name = f"iomux-{run_id}-{worker}-{target.name}"
        home = new_instance_dir(self.kind, name, run_id, rootfs)
        backends = ["auto", *(b for b in target.backends if b in BACKEND_PORTS)]
        # What the cross-OS suites read (tests/cross_os), as the docker kind gives it.
        instance = Instance(target=target, run_id=run_id, resource_name=name,
                            guest=Guest(python=GUEST_PYTHON, tests_dir=GUEST_TESTS,
                                        scratch_dir="/tmp", unreachable=self.unreachable,
                                        test_scale=target.options.get("test_scale")),
                            data={"home": str(home), "backends": backends})
        return instance, rootfs

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        """The servers started, every backend's ready file, then one ``iomux check``
        echo per backend, from inside."""
        deadline = time.monotonic() + timeout
        self._start_servers(instance)
        pending = list(instance.data["backends"])
        while pending:
            for backend in list(pending):
                ready = self.exec(instance, ["cat", ready_file(backend)], 30)
                if ready.rc == 0 and ready.stdout.strip():
                    info = json.loads(ready.stdout)
                    instance.guest.guest_ports[backend] = BACKEND_PORTS[backend]
                    instance.guest.server_pids[backend] = int(info.get("pid", 0))
                    pending.remove(backend)
            if pending and time.monotonic() > deadline:
                tail = log_tail(Path(instance.data["home"]) / self.console)
                raise StepTimeout(f"healthy: no ready file after {timeout:g}s for "
                                  f"{', '.join(pending)} ({tail})")
            if pending:
                time.sleep(self.ready_poll_s)
        for backend, port in instance.guest.guest_ports.items():
            check = self.exec(instance, ["iomux", "check", f"127.0.0.1:{port}", "--timeout", "5"],
                              max(10.0, deadline - time.monotonic()))
            if check.rc != 0:
                raise TargetError(f"healthy: iomux check of {backend} on {port} exited "
                                  f"{check.rc}: {(check.stderr or check.stdout).strip()[:200]}")

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """None: no testinfra backend reaches into a guest without a network."""
        raise TargetError(f"{instance.resource_name}: {self.unreachable}")

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        """``base64`` inside, decoded here (copy_via_exec)."""
        return copy_via_exec(functools.partial(self.exec, instance), instance.resource_name,
                             path, dest, timeout)

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        """The files of ``logs`` in the instance's directory (the guest's console)."""
        dest.mkdir(parents=True, exist_ok=True)
        home = Path(instance.data["home"])
        saved = []
        for name in self.logs:
            if (home / name).is_file():
                saved.append(Path(shutil.copy(home / name, dest / f"{instance.resource_name}."
                                              f"{name.replace('/', '-')}")))
        return saved

    def destroy(self, instance: Instance, timeout: float) -> None:
        """Stop the guest (``_stop``), kill every host process still marked as the
        instance's, and remove its directory. Safe to call twice."""
        home = Path(instance.data["home"])
        self._stop(instance, timeout)
        kill_marked(self._marker(home))
        self._remove_leftovers(instance.resource_name)
        shutil.rmtree(home, ignore_errors=True)
