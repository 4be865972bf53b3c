"""The ``docker`` target kind: Linux containers through the Docker SDK.

Everything goes through the SDK (``docker.from_env()``, which honours
DOCKER_HOST; a target may name its own engine with ``docker_host`` in
targets.toml): no shell strings anywhere. Commands run inside a container are
argv lists given to ``exec_run``.

Facts about the engine this relies on:

- ``exec_run`` has no timeout. Every exec is wrapped in coreutils (or busybox)
  ``timeout -k 5 T`` *inside* the container, so a stuck command is killed
  where it runs, not merely abandoned; a host-side thread guard catches an
  engine that stops answering.
- A port published with an empty HostPort gets one chosen by the engine; it is
  read back from the container's NetworkSettings after start (no racy "find a
  free port" on the host). HostIp 127.0.0.1 keeps it off every other interface.
- Docker's userland proxy sits between a published port and the container:
  it accepts a connection even when nothing listens inside and it distorts
  half-close, so kernel behaviour is judged only by the in-guest suite.
- Labels set on an image are inherited by its containers; ownership is
  therefore carried by labels set at ``run`` time (run id, owner pid).
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Collection, Sequence

from harness import reasons
from harness.drivers.base import (
    BACKEND_PORTS,
    ECHO_PORT,
    LABEL_PROJECT,
    LABEL_RUN,
    PROJECT,
    Driver,
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    call_with_timeout,
    one_line,
    owner_label,
    serve_argv,
)

# Owner liveness is every driver's (harness.drivers.base); re-exported for the
# tests that know it from here.
from harness.drivers.base import owner_alive as owner_alive
from harness.images import BuildResult, ImageBuilder, docker_errors, docker_sdk, parse_created
from harness.reasons import Reason

#: "<hostname>:<pid>:<process start ticks>" of the harness process that created
#: a resource; sweep() removes resources whose owner is provably gone.
LABEL_OWNER = "io.iomux.owner"
LABEL_WORKER = "io.iomux.worker"
#: The in-container user (docker/Dockerfile); anything but root.
CONTAINER_USER = "10001:10001"
GUEST_PYTHON = "/opt/iomux/venv/bin/python"
GUEST_TESTS = "/opt/iomux/tests/server"
PIDS_LIMIT = 512
#: Dangling images of ours younger than this may be a concurrent build's layers.
STALE_IMAGE_S = 3600.0
HEALTH_INTERVAL_S = 2.0
#: `timeout` exits 124 when the command timed out, 137 when it had to SIGKILL.
TIMEOUT_CODES = (124, 137)


def _docker_name(*parts: str) -> str:
    """A container/network name from free text: Docker allows [a-zA-Z0-9][a-zA-Z0-9_.-]*."""
    name = "-".join(re.sub(r"[^a-zA-Z0-9_.-]+", "_", p).strip("_.-") for p in parts if p)
    return ("iomux-" + name)[:120]


def _ready_file(backend: str) -> str:
    return f"/tmp/iomux-ready-{backend}.json"


def _serve_log(backend: str) -> str:
    return f"/tmp/iomux-serve-{backend}.log"


def remove_container(container: Any, settle: float = 30.0) -> bool:
    """Force-remove ``container``; True if this call removed it.

    Two sweeps on one engine (parallel runs, or a run and its tests) can reach
    the same leftover: Docker then answers the second with 409 "removal of
    container ... is already in progress". That one is gone, not ours to fail
    on; we wait (up to ``settle`` seconds) until it is, so that removing its
    network next does not find an endpoint still attached.
    """
    errors = docker_errors()
    try:
        container.remove(force=True, v=True)
        return True
    except errors.NotFound:
        return False
    except errors.APIError as exc:
        if exc.status_code != 409 or "already in progress" not in str(exc):
            raise
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        try:
            container.reload()
        except errors.NotFound:
            break
        time.sleep(0.2)
    return False


class DockerDriver(Driver):
    """Linux container targets on a Docker engine."""

    kind: ClassVar[str] = "docker"
    keepable: ClassVar[bool] = True
    #: What an image is built from (harness/images.py's content hash covers the same,
    #: less the guest's wheels, which follow the target's Python in targets.toml).
    kept_inputs: ClassVar[tuple[str, ...]] = (
        "pyproject.toml", "README.md", "iomux", "tests/server", "tests/faults",
        "docker/Dockerfile", "harness/images.py")

    def __init__(self, log: Any = None) -> None:
        self._clients: dict[str, Any] = {}
        self._builders: dict[str, ImageBuilder] = {}
        self._log = log
        self._lock = threading.RLock()
        #: target name -> the content tag build() made or found, for start()
        self._images: dict[str, str] = {}

    # -- the engine --------------------------------------------------------

    def client(self, target: Target | None = None) -> Any:
        """The SDK client for ``target``'s engine (``docker_host`` option, else the
        environment: DOCKER_HOST, DOCKER_TLS_VERIFY, DOCKER_CERT_PATH)."""
        docker = docker_sdk()
        host = str(target.options.get("docker_host", "")) if target is not None else ""
        with self._lock:
            if host not in self._clients:
                if host:
                    self._clients[host] = docker.DockerClient(base_url=host, timeout=120)
                else:
                    self._clients[host] = docker.from_env(timeout=120)
            return self._clients[host]

    def builder(self, target: Target) -> ImageBuilder:
        """The image builder of ``target``'s engine."""
        key = str(target.options.get("docker_host", ""))
        with self._lock:
            if key not in self._builders:
                self._builders[key] = ImageBuilder(self.client(target), log=self._log)
            return self._builders[key]

    def unavailable_reason(self) -> str | None:
        """None when the SDK is installed and the engine answers a ping."""
        try:
            docker_sdk()
        except ImportError as exc:
            return Reason(reasons.DOCKER_SDK, str(exc))
        try:
            self.client().ping()
        except Exception as exc:  # connection refused, no socket, TLS, bad DOCKER_HOST...
            # The SDK's words (a 150-character urllib3 error) go to the log only.
            return Reason(reasons.DOCKER_ENGINE, f"{type(exc).__name__}: {exc}")
        return None

    def target_unavailable_reason(self, target: Target) -> str | None:
        """``"no image: ..."`` when neither a registry nor an offline recipe can give
        this target a base image (Alpine here)."""
        return self.builder(target).base_unavailable_reason(target)

    # -- lifecycle ---------------------------------------------------------

    def sweep_sparing(self, spare: Collection[str], run_id: str | None = None) -> list[str]:
        """``sweep``, leaving the containers (and networks) named in ``spare``."""
        return self.sweep(run_id, spare)

    def sweep(self, run_id: str | None = None, spare: Collection[str] = ()) -> list[str]:
        """Remove our containers and networks (all of ``run_id``'s, or those whose
        owner process died; never those named in ``spare``) and, without a run id,
        our dangling images."""
        errors = docker_errors()
        client = self.client()
        labels = [f"{LABEL_PROJECT}={PROJECT}"]
        if run_id is not None:
            labels.append(f"{LABEL_RUN}={run_id}")

        def doomed(obj_labels: dict[str, str] | None, name: str) -> bool:
            obj_labels = obj_labels or {}
            if name in spare:
                return False  # a kept target (harness.kept_targets)
            if run_id is not None:
                return True
            owner = obj_labels.get(LABEL_OWNER)
            return owner is not None and not owner_alive(owner)

        removed: list[str] = []
        for container in client.containers.list(all=True, filters={"label": labels}):
            if doomed(container.labels, container.name) and remove_container(container):
                removed.append(f"container {container.name}")
        for network in client.networks.list(filters={"label": labels}):
            if doomed(network.attrs.get("Labels"), network.name):
                try:
                    network.remove()
                    removed.append(f"network {network.name}")
                except errors.NotFound:
                    pass
                except errors.APIError:
                    pass  # still has endpoints of a live container: not ours to force
        if run_id is None:
            # A build in progress has untagged intermediate images that look
            # dangling: only those older than any build are stale.
            cutoff = time.time() - STALE_IMAGE_S
            dangling = client.images.list(filters={"label": labels[0], "dangling": True})
            for image in dangling:
                created = parse_created(str(image.attrs.get("Created", "")))
                if created is None or created > cutoff:
                    continue
                try:
                    client.images.remove(image.id)
                    removed.append(f"image {image.short_id}")
                except errors.APIError:
                    pass  # in use, or a parent of a live image
        return removed

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """Build (or find cached) ``iomux/<target>:<content hash>``."""
        try:
            result: BuildResult = self.builder(target).build_target(target, timeout)
        except (StepTimeout, TargetError):  # ImageUnavailable included: already one line
            raise
        except Exception as exc:  # an SDK or engine error: one line for the report
            raise TargetError(f"build: {target.name}: {one_line(exc)}") from exc
        self._images[target.name] = result.tag
        return result.facts()

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Run the target's image hardened: non-root, read-only root with a tmpfs
        /tmp, no capabilities, no-new-privileges, a pids limit, ports on
        127.0.0.1 only with host ports chosen by the engine."""
        errors = docker_errors()
        client = self.client(target)
        name = _docker_name(target.name, run_id, worker)
        labels = {LABEL_PROJECT: PROJECT, LABEL_RUN: run_id, LABEL_WORKER: worker,
                  LABEL_OWNER: owner_label(), "io.iomux.target": target.name}
        backends = ["auto", *(b for b in target.backends if b in BACKEND_PORTS and b != "auto")]
        ports = {f"{BACKEND_PORTS[b]}/tcp": ("127.0.0.1", None) for b in backends}
        # What the cross-OS suites read (tests/cross_os): where the in-guest suite
        # and its interpreter are, a writable directory, and per backend the
        # port and pid of its server inside the container (filled by wait_healthy).
        instance = Instance(target=target, run_id=run_id, resource_name=name, data={
            "network": name, "backends": backends, "python": GUEST_PYTHON,
            "tests_dir": GUEST_TESTS, "scratch_dir": "/tmp", "guest_ports": {},
            "server_pids": {}})
        deadline = time.monotonic() + timeout
        try:
            client.networks.create(name, driver="bridge", labels=labels, check_duplicate=True)
            container = client.containers.run(
                self._images.get(target.name, f"iomux/{target.name}:latest"),
                command=serve_argv("auto", ECHO_PORT, "0.0.0.0", ready_file=_ready_file("auto")),
                name=name, hostname=re.sub(r"[^a-zA-Z0-9-]", "-", target.name)[:63],
                detach=True, labels=labels, network=name, ports=ports,
                user=CONTAINER_USER, read_only=True,
                tmpfs={"/tmp": "rw,nosuid,nodev,size=128m,mode=1777"},
                cap_drop=["ALL"], security_opt=["no-new-privileges:true"],
                pids_limit=PIDS_LIMIT, privileged=False, init=True,
                healthcheck={"test": ["CMD", "iomux", "check", f"127.0.0.1:{ECHO_PORT}",
                                      "--timeout", "2"],
                             "interval": int(HEALTH_INTERVAL_S * 1e9),
                             "timeout": int(4e9), "retries": 3, "start_period": int(60e9)},
            )
            instance.data["container_id"] = container.id
            while True:
                container.reload()
                bound = container.attrs["NetworkSettings"]["Ports"] or {}
                if all(bound.get(p) for p in ports):
                    break
                if container.status in ("exited", "dead"):
                    raise TargetError(f"start: {name} exited: {self._last_log_line(container)}")
                if time.monotonic() > deadline:
                    raise StepTimeout(f"start: {name}: ports not published after {timeout:g}s")
                time.sleep(0.1)
        except errors.ImageNotFound as exc:
            self.destroy(instance, timeout)
            raise TargetError(f"start: {target.name}: no image (build it first): "
                              f"{one_line(exc)}") from exc
        except errors.APIError as exc:
            self.destroy(instance, timeout)
            raise TargetError(f"start: {name}: {one_line(exc)}") from exc
        except BaseException:
            self.destroy(instance, timeout)
            raise
        for backend in backends:
            binding = bound[f"{BACKEND_PORTS[backend]}/tcp"][0]
            instance.echo_ports[backend] = ("127.0.0.1", int(binding["HostPort"]))
        return instance

    def attach(self, kept: Instance, timeout: float) -> Instance | None:
        """Take over a kept container: still running under its name, ours and of this
        target; its echo ports read again from its published ports. A backend server
        that no longer answers loses its ready file, so wait_healthy starts it again.
        A container's labels cannot change: its new owner is in the kept record
        (harness.kept_targets), which the sweep reads before it looks at labels."""
        errors = docker_errors()
        try:
            container = self.client(kept.target).containers.get(kept.resource_name)
        except errors.NotFound:
            return None
        labels = container.labels or {}
        if (container.status != "running" or labels.get(LABEL_PROJECT) != PROJECT
                or labels.get("io.iomux.target") != kept.target.name):
            return None
        bound = container.attrs["NetworkSettings"]["Ports"] or {}
        instance = Instance(target=kept.target, run_id=kept.run_id,
                            resource_name=kept.resource_name,
                            data={**kept.data, "container_id": container.id,
                                  "guest_ports": {}, "server_pids": {}})
        for backend in kept.data.get("backends", ["auto"]):
            binding = bound.get(f"{BACKEND_PORTS[backend]}/tcp") or []
            if not binding:
                return None
            instance.echo_ports[backend] = ("127.0.0.1", int(binding[0]["HostPort"]))
        deadline = time.monotonic() + timeout
        for backend in instance.echo_ports:
            if backend == "auto" or not self._read_ready(instance, backend,
                                                         BACKEND_PORTS[backend]):
                continue
            check = self.exec(instance, ["iomux", "check", f"127.0.0.1:{BACKEND_PORTS[backend]}",
                                         "--timeout", "2"],
                              max(5.0, min(10.0, deadline - time.monotonic())))
            if check.rc != 0:
                self.exec(instance, ["rm", "-f", _ready_file(backend)], 10)
        instance.data["guest_ports"], instance.data["server_pids"] = {}, {}
        return instance

    def echo_address(self, instance: Instance, backend: str = "auto") -> tuple[str, int]:
        """127.0.0.1 and the host port published for ``backend``'s container port."""
        try:
            return instance.echo_ports[backend]
        except KeyError:
            raise TargetError(f"{instance.target.name}: no port is published for backend "
                              f"{backend!r}") from None

    def _container(self, instance: Instance) -> Any:
        errors = docker_errors()
        try:
            return self.client(instance.target).containers.get(instance.resource_name)
        except errors.NotFound:
            raise TargetError(f"{instance.resource_name}: the container is gone") from None

    @staticmethod
    def _last_log_line(container: Any) -> str:
        try:
            lines = container.logs(tail=5).decode(errors="replace").strip().splitlines()
        except Exception as exc:  # the container may be gone already
            return f"(no logs: {one_line(exc)})"
        return lines[-1] if lines else "(no output)"

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        """Start one server per backend of the target on its own port (all at
        once), wait for the engine's HEALTHCHECK (``iomux check``) to say healthy,
        then for every backend server's ready file."""
        deadline = time.monotonic() + timeout
        execs = {b: self._launch_backend(instance, b) for b in instance.target.backends
                 if b in instance.echo_ports and b != "auto"}
        self._wait_health_status(instance, deadline, timeout)
        self._read_ready(instance, "auto", ECHO_PORT)
        self._await_backends(instance, execs, deadline, timeout)

    def _read_ready(self, instance: Instance, backend: str, port: int) -> bool:
        probe = self.exec(instance, ["cat", _ready_file(backend)], timeout=10)
        if probe.rc != 0 or not probe.stdout.strip():
            return False
        try:
            info = json.loads(probe.stdout)
        except ValueError:
            return False  # written atomically, so only a foreign file could be torn
        instance.data["guest_ports"][backend] = port
        instance.data["server_pids"][backend] = int(info.get("pid", 0))
        return True

    def _wait_health_status(self, instance: Instance, deadline: float, timeout: float) -> None:
        container = self._container(instance)
        last = "no health check has run yet"
        while True:
            container.reload()
            state = container.attrs["State"]
            health = state.get("Health") or {}
            if health.get("Status") == "healthy":
                return
            if state.get("Status") in ("exited", "dead"):
                raise TargetError(f"healthy: {instance.resource_name} exited with "
                                  f"{state.get('ExitCode')}: {self._last_log_line(container)}")
            checks = health.get("Log") or []
            if checks:
                out = " ".join(str(checks[-1].get("Output", "")).split())[:160]
                last = f"last check exit {checks[-1].get('ExitCode')}: {out or '(no output)'}"
            if time.monotonic() > deadline:
                raise StepTimeout(f"healthy: {instance.resource_name} not healthy after "
                                  f"{timeout:g}s ({last})")
            time.sleep(0.25)

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` in the container under ``timeout -k 5 T`` (see the module
        docstring); raise StepTimeout when it timed out."""
        rc, out, err = self._exec_bytes(instance, argv, timeout, user)
        return ExecResult(argv=list(argv), rc=rc, stdout=out.decode(errors="replace"),
                          stderr=err.decode(errors="replace"))

    def _exec_bytes(self, instance: Instance, argv: Sequence[str], timeout: float,
                    user: str | None = None) -> tuple[int, bytes, bytes]:
        if isinstance(argv, (str, bytes)):
            raise TypeError("exec takes an argv list, not a string")
        container = self._container(instance)
        wrapped = ["timeout", "-k", "5", f"{max(timeout, 0.1):g}", *[str(a) for a in argv]]
        step = f"exec: {argv[0]} in {instance.resource_name}"
        started = time.monotonic()
        try:
            # the watchdog only catches an engine that stops answering; `timeout`
            # inside has killed the command by then
            rc, (out, err) = call_with_timeout(
                step, timeout + 5, lambda: container.exec_run(wrapped, demux=True,
                                                              user=user or ""))
        except StepTimeout:
            raise
        except Exception as exc:  # an SDK or engine error: one line
            raise TargetError(f"{step}: {one_line(exc)}") from exc
        elapsed = time.monotonic() - started
        if rc in TIMEOUT_CODES and elapsed >= timeout:
            raise StepTimeout(f"exec: {argv[0]} in {instance.resource_name}: timed out after "
                              f"{timeout:g}s")
        return int(rc), out or b"", err or b""

    def start_backend_server(self, instance: Instance, backend: str,
                             timeout: float = 30.0) -> tuple[str, int]:
        """Start ``iomux serve --backend B`` on B's own port, detached, and wait for
        its ready file; return its published (127.0.0.1, host port)."""
        if backend == "auto":
            return self.echo_address(instance, "auto")
        exec_id = self._launch_backend(instance, backend)
        self._await_backends(instance, {backend: exec_id}, time.monotonic() + timeout, timeout)
        return self.echo_address(instance, backend)

    def _launch_backend(self, instance: Instance, backend: str) -> str | None:
        """Start B's server detached; None when it is running already."""
        if backend not in BACKEND_PORTS:
            raise TargetError(f"{instance.target.name}: unknown backend {backend!r}")
        self.echo_address(instance, backend)  # a port must be published for it
        port = BACKEND_PORTS[backend]
        if self._read_ready(instance, backend, port):
            return None
        api = self.client(instance.target).api
        # The engine keeps nothing of a detached exec's output, so the server's goes to
        # a file in the container's /tmp that save_logs brings back. The script is a
        # constant; the log's path and the command line are its arguments, never text.
        argv = ["sh", "-c", 'log=$1; shift; exec "$@" >"$log" 2>&1', "sh", _serve_log(backend),
                *serve_argv(backend, port, "0.0.0.0", ready_file=_ready_file(backend),
                            quiet=True)]
        exec_id = api.exec_create(self._container(instance).id, argv)["Id"]
        api.exec_start(exec_id, detach=True)
        return str(exec_id)

    def _await_backends(self, instance: Instance, execs: dict[str, str | None],
                        deadline: float, timeout: float) -> None:
        api = self.client(instance.target).api
        pending = {b: e for b, e in execs.items() if e is not None}
        while pending:
            for backend, exec_id in list(pending.items()):
                if self._read_ready(instance, backend, BACKEND_PORTS[backend]):
                    del pending[backend]
                    continue
                state = api.exec_inspect(exec_id)
                if state.get("Running"):
                    continue
                # gone: a usage error (backend unavailable here) or a crash; it may
                # still have written its ready file just before a later failure
                if self._read_ready(instance, backend, BACKEND_PORTS[backend]):
                    del pending[backend]
                    continue
                raise TargetError(f"{instance.resource_name}: iomux serve --backend {backend} "
                                  f"exited with {state.get('ExitCode')} before it was ready")
            if pending and time.monotonic() > deadline:
                raise StepTimeout(f"healthy: {instance.resource_name}: no ready file after "
                                  f"{timeout:g}s for {', '.join(pending)}")
            if pending:
                time.sleep(0.2)

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """testinfra's docker backend (it runs the docker CLI, which honours
        DOCKER_HOST like the SDK)."""
        return f"docker://{instance.resource_name}", {}

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        """Copy one file out with ``get_archive`` (a tar stream of that file),
        following symbolic links such as /etc/os-release."""
        deadline = time.monotonic() + timeout
        for _ in range(8):
            link = self._copy_one(instance, path, dest, max(0.1, deadline - time.monotonic()))
            if link is None:
                return dest
            path = posixpath.normpath(posixpath.join(posixpath.dirname(path), link))
        raise TargetError(f"copy: {path} in {instance.resource_name}: too many symbolic links")

    def _copy_one(self, instance: Instance, path: str, dest: Path, timeout: float) -> str | None:
        # The archive API reads the container's root filesystem as the engine
        # sees it, which does not include a tmpfs mount such as /tmp (a 404
        # there): such files are read with `cat` inside the container instead.
        container = self._container(instance)
        step = f"copy: {path} from {instance.resource_name}"

        def fetch() -> bytes:
            stream, _stat = container.get_archive(path)
            return b"".join(stream)

        try:
            archive = call_with_timeout(step, timeout, fetch)
        except docker_errors().NotFound:
            rc, out, err = self._exec_bytes(instance, ["cat", path], timeout)
            if rc != 0:
                raise TargetError(f"{step}: {err.decode(errors='replace').strip() or rc}") \
                    from None
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(out)
            return None
        except StepTimeout:
            raise
        except Exception as exc:  # an SDK or engine error: one line
            raise TargetError(f"{step}: {one_line(exc)}") from exc
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.next()
            if member is not None and member.issym():
                return member.linkname
            if member is None or not member.isfile():
                raise TargetError(f"copy: {path} in {instance.resource_name} is not a file")
            data = tar.extractfile(member)
            assert data is not None  # a regular file member always has data
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data.read())
        return None

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        """The container's output (with timestamps) and its inspect JSON."""
        errors = docker_errors()
        dest.mkdir(parents=True, exist_ok=True)
        try:
            container = self.client(instance.target).containers.get(instance.resource_name)
        except errors.NotFound:
            return []
        log_path = dest / f"{instance.resource_name}.log"
        log_path.write_bytes(container.logs(stdout=True, stderr=True, timestamps=True))
        inspect_path = dest / f"{instance.resource_name}.inspect.json"
        inspect_path.write_text(json.dumps(container.attrs, indent=2, sort_keys=True))
        saved = [log_path, inspect_path]
        # The per-backend servers started with exec (start_backend_server) log to /tmp.
        python = str(instance.data.get("python", "python3"))
        with contextlib.suppress(TargetError, StepTimeout):
            found = self.exec(instance, [python, "-c", "import glob; print('\\n'.join(sorted("
                                         f"glob.glob({_serve_log('*')!r}))))"], 30)
            for path in found.stdout.split() if found.rc == 0 else []:
                with contextlib.suppress(TargetError, StepTimeout):
                    saved.append(self.copy_from(
                        instance, path, dest / f"{instance.resource_name}-{Path(path).name}", 60))
        return saved

    def destroy(self, instance: Instance, timeout: float) -> None:
        """Force-remove the container and its network; absent ones are fine."""
        errors = docker_errors()
        client = self.client(instance.target)
        with contextlib.suppress(errors.NotFound):
            remove_container(client.containers.get(instance.resource_name))
        network = instance.data.get("network")
        if network:
            with contextlib.suppress(errors.NotFound):
                client.networks.get(network).remove()
