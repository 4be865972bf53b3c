"""The echo servers inside a ``docker`` target: the image's own (``auto``, on
ECHO_PORT) and one per other backend, started with ``exec`` on its own port
(``start_backend_server``), each known to be up by its ready file.

- A server writes its ready file (port and pid, as JSON) atomically once it
  listens, so a file that reads at all is whole (iomux serve --ready-file).
- The engine keeps nothing of a detached exec's output, so a server's goes to a
  file in the container's /tmp that save_logs brings back (transport.serve_log).
"""

from __future__ import annotations

import json
import time

from harness.drivers.base import (
    BACKEND_PORTS,
    Instance,
    StepTimeout,
    TargetError,
    serve_argv,
)
from harness.drivers.docker.transport import ContainerTransport, serve_log


def ready_file(backend: str) -> str:
    """Where ``backend``'s server writes its ready file, in the container's /tmp."""
    return f"/tmp/iomux-ready-{backend}.json"


class BackendServers(ContainerTransport):
    """The per-backend echo servers of a container target, on its transport."""

    def echo_address(self, instance: Instance, backend: str = "auto") -> tuple[str, int]:
        """The engine's published host (127.0.0.1 for a local one) and the host port
        published for ``backend``'s container port."""
        try:
            return instance.echo_ports[backend]
        except KeyError:
            raise TargetError(f"{instance.target.name}: no port is published for backend "
                              f"{backend!r}") from None

    def _read_ready(self, instance: Instance, backend: str, port: int) -> bool:
        probe = self.exec(instance, ["cat", ready_file(backend)], timeout=10)
        if probe.rc != 0 or not probe.stdout.strip():
            return False
        try:
            info = json.loads(probe.stdout)
        except ValueError:
            return False  # written atomically, so only a foreign file could be torn
        instance.guest.guest_ports[backend] = port
        instance.guest.server_pids[backend] = int(info.get("pid", 0))
        return True

    def start_backend_server(self, instance: Instance, backend: str,
                             timeout: float = 30.0) -> tuple[str, int]:
        """Start ``iomux serve --backend B`` on B's own port, detached, and wait for
        its ready file; return its published (host, port)."""
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
        argv = ["sh", "-c", 'log=$1; shift; exec "$@" >"$log" 2>&1', "sh", serve_log(backend),
                *serve_argv(backend, port, "0.0.0.0", ready_file=ready_file(backend),
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
