"""The ``docker`` target kind: Linux containers through the Docker SDK.

Everything goes through the SDK: no shell strings anywhere. Commands run inside
a container are argv lists given to ``exec_run``. A target runs on the engine
``engines.resolve_engine`` gives it (its ``docker_host`` or
``docker_context`` in targets.toml, else the default one); each engine has its own
client and image builder, and the sweep visits every engine the run's targets name.
``transport`` holds commands, files and logs.

Facts about the engine this relies on:

- A port published with an empty HostPort gets one chosen by the engine; it is
  read back from the container's NetworkSettings after start (no racy "find a
  free port" on the host). It is bound on the engine's machine: HostIp 127.0.0.1
  keeps a local engine's off every other interface; a remote engine's is on its
  host (``Engine.bind_address``, ``Engine.published_host``).
- Docker's userland proxy sits between a published port and the container:
  it accepts a connection even when nothing listens inside and it distorts
  half-close, so kernel behaviour is judged only by the in-guest suite.
- Labels set on an image are inherited by its containers; ownership is
  therefore carried by labels set at ``run`` time (run id, owner pid).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Any, ClassVar, Collection, Mapping, Sequence

from harness import reasons
from harness.drivers.base import (
    BACKEND_PORTS,
    ECHO_PORT,
    LABEL_PROJECT,
    LABEL_RUN,
    PROJECT,
    Driver,
    Guest,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    one_line,
    serve_argv,
)
from harness.drivers.docker.engine import (
    LABEL_OWNER,
    LABEL_WORKER,
    docker_errors,
    docker_name,
    docker_sdk,
    remove_container,
    sweep_engine,
)
from harness.drivers.docker.engines import Engine, engines_of, resolve_engine
from harness.drivers.docker.images import BuildResult, ImageBuilder
from harness.drivers.docker.servers import BackendServers, ready_file

# Owner liveness is every driver's (harness.drivers.base); re-exported for the
# tests that know it from here.
from harness.drivers.owners import owner_alive as owner_alive
from harness.drivers.owners import owner_label
from harness.reasons import Reason

#: The in-container user (docker/Dockerfile); anything but root.
CONTAINER_USER = "10001:10001"
GUEST_PYTHON = "/opt/iomux/venv/bin/python"
GUEST_TESTS = "/opt/iomux/tests/server"
PIDS_LIMIT = 512
HEALTH_INTERVAL_S = 2.0


class DockerDriver(BackendServers, Driver):
    """Linux container targets on a Docker engine."""

    kind: ClassVar[str] = "docker"
    #: Docker's userland proxy (see the module docstring).
    ports_proxied: ClassVar[bool] = True
    #: ``image``: the registry base image; ``offline``: its debootstrap recipe
    #: (docker/base_images.py); ``docker_host`` or ``docker_context``: the engine,
    #: if not the default one (docker/engines.py).
    options_required: ClassVar[frozenset[str]] = frozenset({"image"})
    options_allowed: ClassVar[frozenset[str]] = frozenset({"offline", "docker_host",
                                                                 "docker_context"})
    #: [target.offline], the debootstrap recipe (base_images.offline_recipe).
    option_tables: ClassVar[Mapping[str, frozenset[str]]] = {
        "offline": frozenset({"suite", "mirror", "include", "method", "variant"})}
    keepable: ClassVar[bool] = True
    #: What an image is built from (docker/images.py's content hash covers the same,
    #: less the guest's wheels, which follow the target's Python in targets.toml).
    kept_inputs: ClassVar[tuple[str, ...]] = (
        "pyproject.toml", "README.md", "iomux", "tests/server", "tests/faults",
        "docker/Dockerfile", "harness/drivers/docker/images.py",
        "harness/drivers/docker/base_images.py", "harness/drivers/docker/guest_wheels.py")

    def __init__(self, log: Any = None) -> None:
        self._clients: dict[str, Any] = {}
        self._builders: dict[str, ImageBuilder] = {}
        self._log = log
        self._lock = threading.RLock()
        #: target name -> the content tag build() made or found, for start()
        self._images: dict[str, str] = {}

    # -- the engine --------------------------------------------------------

    def engine(self, target: Target | None = None) -> Engine:
        """``target``'s engine (the default one for None); see docker/engines.py."""
        return resolve_engine(target)

    def client(self, target: Target | None = None) -> Any:
        """The SDK client for ``target``'s engine, one per engine."""
        return self._client_of(self.engine(target))

    def _client_of(self, engine: Engine) -> Any:
        with self._lock:
            if engine.base_url not in self._clients:
                self._clients[engine.base_url] = engine.client(timeout=120)
            return self._clients[engine.base_url]

    def builder(self, target: Target) -> ImageBuilder:
        """The image builder of ``target``'s engine."""
        engine = self.engine(target)
        with self._lock:
            if engine.base_url not in self._builders:
                self._builders[engine.base_url] = ImageBuilder(self._client_of(engine),
                                                               log=self._log)
            return self._builders[engine.base_url]

    def published_host(self, target: Target) -> str:
        """Where this machine reaches ``target``'s published ports: 127.0.0.1 for an
        engine on this machine, else the engine's host."""
        return self.engine(target).published_host

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
        """Why the target's own engine (when it names one) does not answer, or
        ``"no image: ..."`` when neither a registry nor an offline recipe can give
        this target a base image (Alpine here)."""
        try:
            engine = self.engine(target)
        except TargetError as exc:
            return Reason(str(exc))
        if engine.label != "default":  # the default one is unavailable_reason's
            try:
                self._client_of(engine).ping()
            except Exception as exc:  # refused, no socket, TLS, ssh...
                return Reason(f"no Docker engine at {engine.label} (start it, or fix "
                              f"the target's docker_host/docker_context)",
                              f"{type(exc).__name__}: {exc}")
        return self.builder(target).base_unavailable_reason(target)

    # -- lifecycle ---------------------------------------------------------

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        """On the default engine and every engine ``targets`` name, remove our
        containers and networks (all of ``run_id``'s, or those whose owner process
        died; never those named in ``spare``) and, without a run id, our dangling
        images. An engine that does not
        answer is one line of the result, not a failure."""
        engines, removed = engines_of(targets)
        for engine in engines:
            try:
                found = sweep_engine(self._client_of(engine), run_id, spare)
            except Exception as exc:  # refused, no socket, TLS, ssh...
                removed.append(f"engine {engine.label}: not swept: {one_line(exc)}")
                continue
            where = "" if engine.label == "default" else f" (engine {engine.label})"
            removed += [f"{what}{where}" for what in found]
        return removed

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """Build (or find cached) ``iomux/<target>:<content hash>``."""
        try:
            result: BuildResult = self.builder(target).build_target(target, timeout)
        except (StepTimeout, TargetError):  # TargetUnavailable included: already one line
            raise
        except Exception as exc:  # an SDK or engine error: one line for the report
            raise TargetError(f"build: {target.name}: {one_line(exc)}") from exc
        self._images[target.name] = result.tag
        return result.facts()

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Run the target's image hardened: non-root, read-only root with a tmpfs
        /tmp, no capabilities, no-new-privileges, a pids limit, ports on
        127.0.0.1 only (a remote engine's: on its host) with host ports chosen by
        the engine."""
        errors = docker_errors()
        engine = self.engine(target)
        client = self._client_of(engine)
        name = docker_name(target.name, run_id, worker)
        labels = {LABEL_PROJECT: PROJECT, LABEL_RUN: run_id, LABEL_WORKER: worker,
                  LABEL_OWNER: owner_label(), "io.iomux.target": target.name}
        backends = ["auto", *(b for b in target.backends if b in BACKEND_PORTS and b != "auto")]
        ports = {f"{BACKEND_PORTS[b]}/tcp": (engine.bind_address, None) for b in backends}
        # What the cross-OS suites read (tests/cross_os): where the in-guest suite
        # and its interpreter are, a writable directory, and per backend the
        # port and pid of its server inside the container (filled by wait_healthy).
        instance = Instance(target=target, run_id=run_id, resource_name=name,
                            guest=Guest(python=GUEST_PYTHON, tests_dir=GUEST_TESTS,
                                        scratch_dir="/tmp"),
                            data={"network": name, "backends": backends})
        deadline = time.monotonic() + timeout
        try:
            client.networks.create(name, driver="bridge", labels=labels, check_duplicate=True)
            container = client.containers.run(
                self._images.get(target.name, f"iomux/{target.name}:latest"),
                command=serve_argv("auto", ECHO_PORT, "0.0.0.0", ready_file=ready_file("auto")),
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
            instance.echo_ports[backend] = (engine.published_host, int(binding["HostPort"]))
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
                            guest=Guest(python=kept.guest.python,
                                        tests_dir=kept.guest.tests_dir,
                                        scratch_dir=kept.guest.scratch_dir),
                            data={**kept.data, "container_id": container.id})
        published = self.published_host(kept.target)
        for backend in kept.data.get("backends", ["auto"]):
            binding = bound.get(f"{BACKEND_PORTS[backend]}/tcp") or []
            if not binding:
                return None
            instance.echo_ports[backend] = (published, int(binding[0]["HostPort"]))
        deadline = time.monotonic() + timeout
        for backend in instance.echo_ports:
            if backend == "auto" or not self._read_ready(instance, backend,
                                                         BACKEND_PORTS[backend]):
                continue
            check = self.exec(instance, ["iomux", "check", f"127.0.0.1:{BACKEND_PORTS[backend]}",
                                         "--timeout", "2"],
                              max(5.0, min(10.0, deadline - time.monotonic())))
            if check.rc != 0:
                self.exec(instance, ["rm", "-f", ready_file(backend)], 10)
        # wait_healthy reads every ready file again.
        instance.guest.guest_ports.clear()
        instance.guest.server_pids.clear()
        return instance

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
