"""The ``gvisor`` kind: the Debian 12 userland on gVisor's kernel (``runsc``).

gVisor is a user-space kernel in Go, with its own epoll and its own TCP/IP stack
(netstack), so what the suites see inside it is gVisor's answer, not Linux's.
Each instance is an OCI bundle over the shared read-only root filesystem
(harness/drivers/userland.py), run with

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
- runsc puts a sandbox in a cgroup named after its container id in every
  cgroup hierarchy (the bundle names no ``cgroupsPath``, so the id is the path).
  ``runsc delete`` removes them; a sandbox that is only killed (a sweep of a
  dead run) leaves them: 26 empty ones per hierarchy were found here, left by
  the sweep's own test. ``_remove_leftovers`` removes them (``sandbox_cgroups``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, ClassVar, Sequence

from harness.drivers import kernel_builds, kernels, userland
from harness.drivers.base import (
    BACKEND_PORTS,
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    run_argv,
)

UNREACHABLE = "gVisor network=none sandbox: only its own loopback, not reachable from the host"
TIMEOUT_CODES = (124, 137)
#: The sandbox's init: one ``iomux serve`` per "backend:port" argument, each with
#: its ready file (kernels.ready_file), then wait (a server whose backend is
#: missing just exits).
INIT_SCRIPT = ('for spec in "$@"; do b=${spec%%:*}; p=${spec#*:}; '
               'iomux serve --backend "$b" --port "$p" --host 127.0.0.1 --quiet '
               '--ready-file "/tmp/iomux-ready-$b.json" & done; wait')


def sandbox_cgroups(name: str, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """The cgroup directories runsc made for the sandbox ``name``: ``<mount>/<name>``
    in every mounted cgroup (v1) or cgroup2 hierarchy where it exists."""
    found = []
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields, _, after = line.partition(" - ")
        words = fields.split()
        if len(words) > 4 and after.split(" ", 1)[0] in ("cgroup", "cgroup2"):
            path = Path(words[4]) / name
            if path.is_dir():
                found.append(path)
    return found


def bundle_config(rootfs: Path, env: Sequence[str], argv: Sequence[str],
                  hostname: str, cpu_shares: int | None = None) -> dict[str, Any]:
    """The OCI config: read-only root, a tmpfs /tmp, no capabilities,
    no-new-privileges, the image's user and environment; ``cpu_shares``, the
    sandbox cgroup's CPU weight (harness.scheduling), if not the default."""
    uid, gid = (int(x) for x in kernels.GUEST_USER.split(":"))
    soft, hard = kernels.nofile_limit()
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
                                                      "mount")],
                  **({"resources": {"cpu": {"shares": cpu_shares}}} if cpu_shares else {})},
    }


def runsc_platform(flags: Sequence[Any]) -> str | None:
    """The platform ``--platform=P`` (or ``--platform P``) in runsc's flags names;
    None where they name none (runsc's default, which changed between builds).

    The sandbox cannot see it: the Sentry reports the same fixed uname whatever
    runs it, so the claims' records take it from here."""
    words = [str(f) for f in flags]
    for i, word in enumerate(words):
        if word.startswith("--platform="):
            return word.split("=", 1)[1] or None
        if word == "--platform" and i + 1 < len(words):
            return words[i + 1]
    return None


class GVisorDriver(kernels.KernelDriver):
    """Targets that are a gVisor sandbox on this host."""

    kind: ClassVar[str] = "gvisor"
    keep_reason: ClassVar[str] = "a sandbox starts in seconds: little to save"
    unreachable: ClassVar[str] = UNREACHABLE
    noun: ClassVar[str] = "gvisor sandbox"
    console: ClassVar[str] = "init.log"
    logs: ClassVar[tuple[str, ...]] = ("runsc.log", "init.log", "bundle/config.json")
    #: ``runsc_flags``: runsc's global flags beyond --root and --network=none.
    options_allowed: ClassVar[frozenset[str]] = (kernels.KernelDriver.options_allowed
                                                 | {"runsc_flags"})

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

    @staticmethod
    def _runsc(instance: Instance, *words: str) -> list[str]:
        target = instance.target
        flags = [str(f) for f in target.options.get("runsc_flags", [])]
        return [*kernel_builds.kernel_binary(target).argv0(), f"--root={instance.data['state_dir']}",
                "--network=none", *flags, *words]

    def _marker(self, home: Path) -> str:
        """runsc's ``--root``: on the command line of the sandbox's every process."""
        return f"--root={home / 'state'}"

    def _kernel_facts(self, binary: kernel_builds.KernelBinary) -> dict[str, Any]:
        """The binary's facts and what runsc reports itself to be."""
        version = run_argv([*binary.argv0(), "--version"], 30, "runsc --version")
        return {**binary.facts(), "reports": version.stdout.strip().splitlines()[:1]}

    # -- lifecycle
    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Write the bundle and ``runsc run --detach`` it; destroy on any failure."""
        instance, rootfs = self._new_instance(target, run_id, worker)
        instance.guest.kernel_platform = runsc_platform(target.options.get("runsc_flags", []))
        home = Path(instance.data["home"])
        instance.data["state_dir"] = str(home / "state")
        (home / "state").mkdir()
        (home / "bundle").mkdir()
        argv = ["/bin/sh", "-c", INIT_SCRIPT, "iomux-init",
                *(f"{b}:{BACKEND_PORTS[b]}" for b in instance.data["backends"])]
        config = bundle_config(rootfs, userland.image_env(rootfs), argv, target.name,
                               self.cpu_shares)
        (home / "bundle" / "config.json").write_text(json.dumps(config, indent=1))
        try:
            # The sandbox keeps the stdio it is given: a file, so that nothing
            # waits for it to close (run_argv's pipes would wait for the sandbox).
            with open(home / "init.log", "wb") as log:
                proc = subprocess.run(
                    self._runsc(instance, f"--log={home / 'runsc.log'}", "run", "--bundle",
                                str(home / "bundle"), "--detach", instance.resource_name),
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=timeout,
                    check=False)
            if proc.returncode != 0:
                raise TargetError(f"start: runsc run exited {proc.returncode}: "
                                  f"{kernels.log_tail(home / 'init.log')}")
        except subprocess.TimeoutExpired:
            self.destroy(instance, timeout)
            raise StepTimeout(f"start: runsc run timed out after {timeout:g}s") from None
        except BaseException:
            self.destroy(instance, timeout)
            raise
        return instance

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """``runsc exec`` as the image's user, under ``timeout -k 5 T`` inside."""
        kernels.check_argv(argv)
        wrapped = ["timeout", "-k", "5", f"{max(timeout, 0.1):g}", *[str(a) for a in argv]]
        started = time.monotonic()
        result = run_argv(self._runsc(instance, "exec", "--user", user or kernels.GUEST_USER,
                                      "--cwd", "/tmp", instance.resource_name, *wrapped),
                          timeout + 15, step=f"exec {argv[0]} in {instance.resource_name}")
        if result.rc in TIMEOUT_CODES and time.monotonic() - started >= timeout:
            raise kernels.exec_timed_out(instance, argv, timeout)
        result.argv = list(argv)
        return result

    def _remove_leftovers(self, name: str, settle: float = 5.0) -> list[str]:
        """The sandbox's cgroups (``sandbox_cgroups``), once empty: one that still
        holds a process after ``settle`` seconds is not ours to take, and stays."""
        removed = []
        deadline = time.monotonic() + settle
        for path in sandbox_cgroups(name):
            while True:
                try:
                    os.rmdir(path)
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY for a moment after the kill: a killed task leaves
                    # its cgroup only once it has exited. Later, it is not ours.
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                else:
                    removed.append(str(path))
                    break
        return removed

    def _stop(self, instance: Instance, timeout: float) -> None:
        """``runsc kill`` + ``delete --force`` (destroy then kills any runsc process
        of this state dir)."""
        if not Path(instance.data["home"]).is_dir():
            return
        budget = max(5.0, min(timeout, 60.0) / 2)
        for words in (("kill", "--all", instance.resource_name, "KILL"),
                      ("delete", "--force", instance.resource_name)):
            with contextlib.suppress(StepTimeout, TargetError):
                run_argv(self._runsc(instance, *words), budget, step=f"runsc {words[0]}")
