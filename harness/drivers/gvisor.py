"""The ``gvisor`` kind: the Debian 12 userland on gVisor's kernel (``runsc``).

gVisor is a user-space kernel in Go, with its own epoll and its own TCP/IP stack
(netstack), so what the suites see inside it is gVisor's answer, not Linux's.
Each instance is an OCI bundle over the shared read-only root filesystem
(harness/drivers/kernels.py), run with

    runsc --root=<private state dir> --network=none --platform=P run --detach ID

and commands run in it through ``runsc exec``; ``runsc kill`` + ``delete
--force`` destroy it. Facts about runsc on this machine that this relies on:

- ``--network=none`` still gives the sandbox netstack's own loopback, so
  127.0.0.1 inside goes through gVisor's TCP. Nothing of it is reachable from
  the host, so the black-box and host suites are not run (``unreachable``).
- ``--network=sandbox`` as root adds a veth pair, a network namespace and
  iptables NAT/FORWARD rules on the host before it fails ("cannot run with
  network enabled in root network namespace"): never used. ``--platform=kvm``
  hangs here. The 2022 build has ``ptrace``; the 2024 build ``systrap``.
- The 2024 build overlays the root with a file store written into the root
  directory itself unless ``--overlay2=none``: targets.toml passes that, since
  the root filesystem is shared and read-only.
- ``runsc exec`` has no timeout of its own: every command is wrapped in
  coreutils ``timeout -k 5 T`` inside, as the docker kind does.
- Syscall-heavy work is about 10x slower than the host with ptrace, 6x with
  systrap; pure Python about 1x.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

from harness.drivers import kernels
from harness.drivers.base import (
    BACKEND_PORTS,
    Driver,
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    run_argv,
)

GUEST_PYTHON = "/opt/iomux/venv/bin/python"
GUEST_TESTS = "/opt/iomux/tests/server"
#: The in-image user (docker/Dockerfile): the servers and every exec run as it.
GUEST_USER = "10001:10001"
UNREACHABLE = "gVisor network=none sandbox: only its own loopback, not reachable from the host"
TIMEOUT_CODES = (124, 137)
#: The sandbox's init: one ``iomux serve`` per "backend:port" argument, each with
#: a ready file in /tmp, then wait (a server whose backend is missing just exits).
INIT_SCRIPT = ('for spec in "$@"; do b=${spec%%:*}; p=${spec#*:}; '
               'iomux serve --backend "$b" --port "$p" --host 127.0.0.1 --quiet '
               '--ready-file "/tmp/iomux-ready-$b.json" & done; wait')


def nofile_limit() -> tuple[int, int]:
    """The open-file limit a debian-12 container gets here: dockerd's own, which it
    inherits from this host, so the harness's (the probes open 10,000 fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


def bundle_config(rootfs: Path, env: Sequence[str], argv: Sequence[str],
                  hostname: str) -> dict[str, Any]:
    """The OCI config: read-only root, a tmpfs /tmp, no capabilities,
    no-new-privileges, the image's user and environment."""
    uid, gid = (int(x) for x in GUEST_USER.split(":"))
    soft, hard = nofile_limit()
    no_caps: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "permitted",
                                                    "inheritable", "ambient")}
    return {
        "ociVersion": "1.0.2", "hostname": hostname,
        "root": {"path": str(rootfs), "readonly": True},
        "process": {"user": {"uid": uid, "gid": gid}, "args": list(argv), "env": list(env),
                    "cwd": "/tmp", "noNewPrivileges": True, "capabilities": no_caps,
                    "rlimits": [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": soft}]},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "mode=755"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=256m"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts",
                                                      "mount")]},
    }


class GVisorDriver(Driver):
    """Targets that are a gVisor sandbox on this host."""

    kind: ClassVar[str] = "gvisor"

    def __init__(self) -> None:
        self._rootfs: dict[str, Path] = {}

    # -- the engine
    def unavailable_reason(self) -> str | None:
        """gVisor needs Linux and root here (runsc run without --rootless)."""
        import os
        import sys

        if not sys.platform.startswith("linux"):
            return "gVisor runs on Linux hosts only"
        if os.geteuid() != 0:
            return "the gvisor kind runs runsc as root (rootless mode cannot run run --detach)"
        return None

    def target_unavailable_reason(self, target: Target) -> str | None:
        """The pinned runsc is missing, or the Debian 12 userland cannot be built."""
        return (kernels.kernel_binary(target).missing_reason()
                or kernels.userland_unavailable_reason(target))

    @staticmethod
    def _runsc(instance: Instance, *words: str) -> list[str]:
        target = instance.target
        flags = [str(f) for f in target.options.get("runsc_flags", [])]
        return [*kernels.kernel_binary(target).argv0(), f"--root={instance.data['state_dir']}",
                "--network=none", *flags, *words]

    # -- lifecycle
    def sweep(self, run_id: str | None = None) -> list[str]:
        """Destroy sandboxes left by dead runs (their state dirs under STATE_BASE)."""
        removed = []
        for path in kernels.doomed_dirs(self.kind, run_id):
            killed = kernels.kill_marked(f"--root={path / 'state'}")
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"gvisor sandbox {path.name} ({len(killed)} processes)")
        return removed

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """The exported Debian 12 root filesystem, and the facts of the runsc that runs."""
        binary = kernels.kernel_binary(target)
        reason = binary.missing_reason()
        if reason:
            raise TargetError(f"build: {reason}")
        rootfs, facts = kernels.ensure_rootfs(target, timeout)
        self._rootfs[target.name] = rootfs
        version = run_argv([*binary.argv0(), "--version"], 30, "runsc --version")
        facts["kernel_build"] = {**binary.facts(),
                                 "reports": version.stdout.strip().splitlines()[:1]}
        return facts

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Write the bundle and ``runsc run --detach`` it; destroy on any failure."""
        rootfs = self._rootfs.get(target.name)
        if rootfs is None:
            raise TargetError("start: build the target first")
        name = f"iomux-{run_id}-{worker}-{target.name}"
        home = kernels.new_instance_dir(self.kind, name, run_id, rootfs)
        backends = ["auto", *(b for b in target.backends if b in BACKEND_PORTS)]
        instance = Instance(target=target, run_id=run_id, resource_name=name, data={
            "home": str(home), "state_dir": str(home / "state"), "python": GUEST_PYTHON,
            "tests_dir": GUEST_TESTS, "scratch_dir": "/tmp", "backends": backends,
            "guest_ports": {}, "server_pids": {}, "unreachable": UNREACHABLE,
            "test_scale": target.options.get("test_scale")})
        (home / "state").mkdir()
        (home / "bundle").mkdir()
        argv = ["/bin/sh", "-c", INIT_SCRIPT, "iomux-init",
                *(f"{b}:{BACKEND_PORTS[b]}" for b in backends)]
        config = bundle_config(rootfs, kernels.image_env(rootfs), argv, target.name)
        (home / "bundle" / "config.json").write_text(json.dumps(config, indent=1))
        try:
            # The sandbox keeps the stdio it is given: a file, so that nothing
            # waits for it to close (run_argv's pipes would wait for the sandbox).
            with open(home / "init.log", "wb") as log:
                proc = subprocess.run(
                    self._runsc(instance, f"--log={home / 'runsc.log'}", "run", "--bundle",
                                str(home / "bundle"), "--detach", name),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=timeout,
                    check=False)
            if proc.returncode != 0:
                raise TargetError(f"start: runsc run exited {proc.returncode}: "
                                  f"{_last_line(home / 'init.log')}")
        except subprocess.TimeoutExpired:
            self.destroy(instance, timeout)
            raise StepTimeout(f"start: runsc run timed out after {timeout:g}s") from None
        except BaseException:
            self.destroy(instance, timeout)
            raise
        return instance

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        """Every backend's ready file, then one ``iomux check`` echo per backend."""
        deadline = time.monotonic() + timeout
        pending = list(instance.data["backends"])
        while pending:
            for backend in list(pending):
                ready = self.exec(instance, ["cat", f"/tmp/iomux-ready-{backend}.json"], 30)
                if ready.rc == 0 and ready.stdout.strip():
                    info = json.loads(ready.stdout)
                    instance.data["guest_ports"][backend] = BACKEND_PORTS[backend]
                    instance.data["server_pids"][backend] = int(info.get("pid", 0))
                    pending.remove(backend)
            if pending and time.monotonic() > deadline:
                raise StepTimeout(f"healthy: no ready file after {timeout:g}s for "
                                  f"{', '.join(pending)} ({_last_line(Path(instance.data['home']) / 'init.log')})")
            if pending:
                time.sleep(0.5)
        for backend, port in instance.data["guest_ports"].items():
            check = self.exec(instance, ["iomux", "check", f"127.0.0.1:{port}", "--timeout", "5"],
                              max(10.0, deadline - time.monotonic()))
            if check.rc != 0:
                raise TargetError(f"healthy: iomux check of {backend} on {port} exited "
                                  f"{check.rc}: {(check.stderr or check.stdout).strip()[:200]}")

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """``runsc exec`` as the image's user, under ``timeout -k 5 T`` inside."""
        if isinstance(argv, (str, bytes)):
            raise TypeError("exec takes an argv list, not a string")
        wrapped = ["timeout", "-k", "5", f"{max(timeout, 0.1):g}", *[str(a) for a in argv]]
        started = time.monotonic()
        result = run_argv(self._runsc(instance, "exec", "--user", user or GUEST_USER, "--cwd",
                                      "/tmp", instance.resource_name, *wrapped),
                          timeout + 15, step=f"exec {argv[0]} in {instance.resource_name}")
        if result.rc in TIMEOUT_CODES and time.monotonic() - started >= timeout:
            raise StepTimeout(f"exec: {argv[0]} in {instance.resource_name}: timed out after "
                              f"{timeout:g}s")
        result.argv = list(argv)
        return result

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """None: no testinfra backend reaches into a gVisor sandbox."""
        raise TargetError(f"{instance.resource_name}: {UNREACHABLE}")

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        """``base64`` inside, decoded here (kernels.copy_via_exec)."""
        return kernels.copy_via_exec(functools.partial(self.exec, instance),
                                     instance.resource_name, path, dest, timeout)

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        """runsc's own log, the init's output and the bundle's config."""
        dest.mkdir(parents=True, exist_ok=True)
        home = Path(instance.data["home"])
        saved = []
        for name in ("runsc.log", "init.log", "bundle/config.json"):
            if (home / name).is_file():
                saved.append(Path(shutil.copy(home / name, dest / f"{instance.resource_name}."
                                              f"{name.replace('/', '-')}")))
        return saved

    def destroy(self, instance: Instance, timeout: float) -> None:
        """``runsc kill`` + ``delete --force``, then any runsc process of this
        state dir is killed and the state dir removed. Safe to call twice."""
        home = Path(instance.data["home"])
        if not home.is_dir():
            return
        budget = max(5.0, min(timeout, 60.0) / 2)
        for words in (("kill", "--all", instance.resource_name, "KILL"),
                      ("delete", "--force", instance.resource_name)):
            with contextlib.suppress(StepTimeout, TargetError):
                run_argv(self._runsc(instance, *words), budget, step=f"runsc {words[0]}")
        kernels.kill_marked(f"--root={instance.data['state_dir']}")
        shutil.rmtree(home, ignore_errors=True)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else "(no output)"
