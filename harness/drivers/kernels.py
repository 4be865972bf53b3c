"""What the ``gvisor`` and ``uml`` kinds share: the kernel binaries Debian ships,
and one Debian 12 root filesystem for both, so that the kernel is the only thing
that changes between ``debian-12`` (docker) and these targets.

The binaries (scripts/fetch-kernels.sh puts them there):

- Debian 12's builds are installed packages: ``/usr/bin/runsc``,
  ``/usr/bin/linux.uml``, pinned by the version dpkg reports.
- Debian 13's builds are .deb files unpacked under ``KERNELS_DIR``
  (``<package>-<version>/usr/bin/...``), never installed over the host's.
  Debian 13's ``linux.uml`` is linked against glibc 2.38+ and this host has
  2.36, so it runs on Debian 13's libc6, unpacked beside it. Not as
  ``ld.so linux.uml``: UML sizes its physical memory from where brk starts,
  which is then past ld.so's image ("Too few physical memory!"). The fetch
  script makes ``linux.uml.ld-trixie``, a copy whose PT_INTERP names Debian
  13's loader (patched in place, layout unchanged), run with LD_LIBRARY_PATH.

The root filesystem is the built ``debian-12`` image (harness/images.py, through
the docker driver), exported once with ``docker create`` + ``docker export`` and
unpacked under ``ROOTFS_DIR/<target>-<image id>/``: cached by the image's content,
so a changed image (new iomux, new tests) gives a new tree. Both kinds use it
read-only; each instance writes only to its own tmpfs.

``KernelDriver`` is the driver both kinds are, but for how a guest is booted,
reached and stopped: the build, the instance's private directory and its sweep,
the servers' health checked from inside (nothing in the guest is reachable from
the host), ``copy_from`` over exec, the saved logs and the last of destroy.
"""

from __future__ import annotations

import abc
import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

from harness.drivers.base import (
    BACKEND_PORTS,
    LABEL_PROJECT,
    PROJECT,
    Driver,
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    owner_alive,
    owner_label,
)

KERNELS_DIR = Path(os.environ.get("IOMUX_KERNELS_DIR", "/var/cache/iomux/kernels"))
ROOTFS_DIR = Path(os.environ.get("IOMUX_ROOTFS_DIR", "/var/cache/iomux/rootfs"))
#: The docker target whose image is the userland of every gvisor/uml target.
DEFAULT_USERLAND = "debian-12"
FETCH_HINT = "run scripts/fetch-kernels.sh install"
#: Paths of the executable inside each package.
EXECUTABLES: Mapping[str, str] = {"runsc": "usr/bin/runsc", "user-mode-linux": "usr/bin/linux.uml"}
LIBC_DIR = "usr/lib/x86_64-linux-gnu"
#: The image's ENV (PATH with the venv, HOME=/tmp, ...), saved beside the tree.
IMAGE_ENV = ".image-env.json"
#: An export unused this long after a newer one exists is removed.
SUPERSEDED_AFTER_S = 900.0
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


@dataclasses.dataclass(frozen=True)
class KernelBinary:
    """One pinned build of runsc or linux.uml, as a target declares it."""

    package: str
    version: str
    #: "bookworm" (an installed package) or "trixie" (an unpacked .deb)
    suite: str
    #: the libc6 version whose loader runs it ("" for the host's own)
    libc6: str = ""

    @property
    def path(self) -> Path:
        """Where the executable is."""
        rel = EXECUTABLES[self.package]
        if self.suite == "bookworm":
            return Path("/") / rel
        return KERNELS_DIR / f"{self.package}-{self.version}" / rel

    @property
    def runs(self) -> Path:
        """What is executed: the binary, or its copy on Debian 13's loader."""
        return self.path.with_name(self.path.name + ".ld-trixie") if self.libc6 else self.path

    def argv0(self) -> list[str]:
        """The words that run it."""
        return [str(self.runs)]

    def env(self) -> dict[str, str]:
        """What its environment needs: Debian 13's libc6 for the patched copy."""
        if not self.libc6:
            return {}
        return {"LD_LIBRARY_PATH": str(KERNELS_DIR / f"libc6-{self.libc6}" / LIBC_DIR)}

    def missing_reason(self) -> str | None:
        """Why this build cannot run here (one line with the fix), or None."""
        if self.suite == "bookworm":
            if _dpkg_version(self.package) != self.version:  # absent, or another version
                return f"{self.package} {self.version} not installed ({FETCH_HINT})"
        elif not (self.path.parent.parents[1] / ".unpacked").is_file():
            return f"{self.package} {self.version} not fetched ({FETCH_HINT})"
        if self.libc6 and not (KERNELS_DIR / f"libc6-{self.libc6}" / ".unpacked").is_file():
            return f"libc6 {self.libc6} (for {self.package}) not fetched ({FETCH_HINT})"
        if not os.access(self.runs, os.X_OK):
            return f"{self.runs.name} {self.version} not made ({FETCH_HINT})"
        return None

    def facts(self) -> dict[str, Any]:
        """Version and SHA-256 of the binary that runs, for the report."""
        facts = {"package": self.package, "version": self.version, "suite": self.suite,
                 "binary": str(self.path), "sha256": sha256_of(str(self.path))}
        if self.libc6:
            facts.update(runs=str(self.runs), runs_sha256=sha256_of(str(self.runs)),
                         libc6=self.libc6)
        return facts


def kernel_binary(target: Target) -> KernelBinary:
    """The build ``target`` declares: ``[target.kernel_build]`` in targets.toml."""
    build = target.options.get("kernel_build")
    if not isinstance(build, Mapping) or not all(
            isinstance(build.get(k), str) for k in ("package", "version", "suite")):
        raise TargetError(f"{target.name}: targets.toml needs [target.kernel_build] with "
                          f"package, version and suite")
    if build["package"] not in EXECUTABLES or build["suite"] not in ("bookworm", "trixie"):
        raise TargetError(f"{target.name}: unknown kernel build {dict(build)}")
    return KernelBinary(str(build["package"]), str(build["version"]), str(build["suite"]),
                        str(build.get("libc6", "")))


def _dpkg_version(package: str) -> str:
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = proc.stdout.split()
    return words[3] if proc.returncode == 0 and len(words) == 4 and words[2] == "installed" else ""


@functools.cache
def sha256_of(path: str) -> str:
    """The SHA-256 of a file, read once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def userland_target(target: Target) -> Target:
    """The docker target (targets.toml) whose image is ``target``'s userland."""
    from harness import targets as targets_mod

    name = str(target.options.get("userland", DEFAULT_USERLAND))
    for declared in targets_mod.load(targets_mod.DEFAULT_PATH):
        if declared.name == name and declared.kind == "docker":
            return declared
    raise TargetError(f"{target.name}: userland {name!r} is not a docker target in targets.toml")


def userland_unavailable_reason(target: Target) -> str | None:
    """Why the userland image cannot be had here (no Docker engine, no base), or None."""
    from harness.drivers import get_driver

    docker = get_driver("docker")
    reason = docker.unavailable_reason()
    if reason is None:
        reason = docker.target_unavailable_reason(userland_target(target))
    return f"the Debian 12 userland needs docker: {reason}" if reason else None


def ensure_rootfs(target: Target, timeout: float) -> tuple[Path, dict[str, Any]]:
    """Build (or find) the userland image and its exported tree; return the tree
    and the build facts (``cached``, ``seconds``, image, rootfs)."""
    from harness.drivers import get_driver
    from harness.drivers.docker import LABEL_OWNER, DockerDriver, remove_container
    from harness.images import file_lock

    started = time.monotonic()
    docker = get_driver("docker")
    assert isinstance(docker, DockerDriver)
    userland = userland_target(target)
    facts = docker.build(userland, timeout)
    image_id = str(facts["image_id"]).split(":")[-1]
    dest = ROOTFS_DIR / f"{userland.name}-{image_id[:16]}"
    cached = (dest / ".exported").is_file()
    if cached:
        os.utime(dest)  # in use: not superseded for another SUPERSEDED_AFTER_S
    if not cached:
        with file_lock(f"rootfs-{userland.name}"):
            if not (dest / ".exported").is_file():
                client = docker.client(userland)
                container = client.containers.create(
                    facts["image_id"], command=["true"],
                    labels={LABEL_PROJECT: PROJECT, LABEL_OWNER: owner_label()})
                tmp = dest.with_name(dest.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                try:
                    _untar(container.export(), tmp, max(10.0, timeout - (time.monotonic()
                                                                          - started)))
                finally:
                    remove_container(container)
                env = client.images.get(facts["image_id"]).attrs["Config"].get("Env") or []
                (tmp / IMAGE_ENV).write_text(json.dumps(env) + "\n")
                (tmp / ".exported").write_text(f"{facts['image_id']}\n")
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
                _remove_superseded(dest)
    return dest, {"cached": bool(cached and facts.get("cached")),
                  "seconds": round(time.monotonic() - started, 3),
                  "image": facts.get("image"), "image_id": facts.get("image_id"),
                  "rootfs": str(dest), "rootfs_cached": cached}


def _remove_superseded(current: Path) -> None:
    """Remove older exports of the same userland that no instance has used for
    SUPERSEDED_AFTER_S (a concurrent run on an older image may still use one)."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    cutoff = time.time() - SUPERSEDED_AFTER_S
    in_use = set()
    for owner in STATE_BASE.glob("*/*/owner"):  # every instance not yet destroyed
        with contextlib.suppress(OSError, ValueError):
            in_use.add(str(json.loads(owner.read_text()).get("rootfs")))
    for sibling in current.parent.glob(prefix + "*"):
        if sibling != current and str(sibling) not in in_use \
                and sibling.stat().st_mtime < cutoff:
            shutil.rmtree(sibling, ignore_errors=True)


def _untar(stream: Any, dest: Path, timeout: float) -> None:
    """Unpack a ``docker export`` stream with tar(1): owners, modes and links kept."""
    deadline = time.monotonic() + timeout
    with subprocess.Popen(["tar", "-x", "--numeric-owner", "-f", "-", "-C", str(dest)],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE) as tar:
        assert tar.stdin is not None
        try:
            for chunk in stream:
                tar.stdin.write(chunk)
                if time.monotonic() > deadline:
                    tar.kill()
                    raise TargetError(f"build: docker export timed out after {timeout:g}s")
            tar.stdin.close()
            err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
        except BrokenPipeError:
            err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
        if tar.wait() != 0:
            raise TargetError(f"build: unpacking the exported root filesystem failed: "
                              f"{err.strip().splitlines()[-1] if err.strip() else tar.returncode}")


def image_env(rootfs: Path) -> list[str]:
    """The userland image's ENV as ``NAME=VALUE`` words (docker/Dockerfile's ENV)."""
    words = json.loads((rootfs / IMAGE_ENV).read_text())
    return [str(w) for w in words]


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

    #: Why nothing in the guest is reachable from the host (``instance.data["unreachable"]``).
    unreachable: ClassVar[str]
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

    def _prepare_rootfs(self, rootfs: Path) -> None:
        """Add what the kind needs to the shared tree before it boots from it (nothing)."""

    def _kernel_facts(self, binary: KernelBinary) -> dict[str, Any]:
        """The report's facts of the kernel binary that runs."""
        return binary.facts()

    def target_unavailable_reason(self, target: Target) -> str | None:
        """The pinned binary is missing, or the Debian 12 userland cannot be built."""
        return kernel_binary(target).missing_reason() or userland_unavailable_reason(target)

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = ()) -> list[str]:
        """Kill the guests of dead runs (found by their marker) and remove their dirs."""
        removed = []
        for path in doomed_dirs(self.kind, run_id):
            killed = kill_marked(self._marker(path))
            shutil.rmtree(path, ignore_errors=True)
            removed.append(f"{self.noun} {path.name} ({len(killed)} processes)")
        return removed

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """The exported root filesystem (with what the kind adds), and the kernel's facts."""
        binary = kernel_binary(target)
        reason = binary.missing_reason()
        if reason:
            raise TargetError(f"build: {reason}")
        rootfs, facts = ensure_rootfs(target, timeout)
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
        instance = Instance(target=target, run_id=run_id, resource_name=name, data={
            "home": str(home), "python": GUEST_PYTHON, "tests_dir": GUEST_TESTS, "scratch_dir": "/tmp",
            "backends": backends, "guest_ports": {}, "server_pids": {},
            "unreachable": self.unreachable, "test_scale": target.options.get("test_scale")})
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
                    instance.data["guest_ports"][backend] = BACKEND_PORTS[backend]
                    instance.data["server_pids"][backend] = int(info.get("pid", 0))
                    pending.remove(backend)
            if pending and time.monotonic() > deadline:
                tail = log_tail(Path(instance.data["home"]) / self.console)
                raise StepTimeout(f"healthy: no ready file after {timeout:g}s for "
                                  f"{', '.join(pending)} ({tail})")
            if pending:
                time.sleep(self.ready_poll_s)
        for backend, port in instance.data["guest_ports"].items():
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
        shutil.rmtree(home, ignore_errors=True)
