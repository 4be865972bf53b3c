"""How the ``docker`` kind reaches into a running container: commands through
``exec_run`` under ``timeout`` inside, files through ``get_archive``, and the
container's logs. The driver (``driver``) is this transport with a lifecycle.

- ``exec_run`` has no timeout. Every exec is wrapped in coreutils (or busybox)
  ``timeout -k 5 T`` *inside* the container, so a stuck command is killed
  where it runs, not merely abandoned; a host-side thread guard catches an
  engine that stops answering.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import time
from pathlib import Path
from typing import Any, Sequence

from harness.drivers.base import (
    ExecResult,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    call_with_timeout,
    one_line,
)
from harness.drivers.docker.engine import docker_errors, read_archive
from harness.drivers.docker.engines import resolve_engine

#: `timeout` exits 124 when the command timed out, 137 when it had to SIGKILL.
TIMEOUT_CODES = (124, 137)


def serve_log(backend: str) -> str:
    """Where ``backend``'s server started with exec logs, in the container's /tmp."""
    return f"/tmp/iomux-serve-{backend}.log"


class ContainerTransport:
    """exec, copy_from, testinfra_spec and save_logs of a container target."""

    def client(self, target: Target | None = None) -> Any:
        """The SDK client of ``target``'s engine (the driver's)."""
        raise NotImplementedError

    def _container(self, instance: Instance) -> Any:
        errors = docker_errors()
        try:
            return self.client(instance.target).containers.get(instance.resource_name)
        except errors.NotFound:
            raise TargetError(f"{instance.resource_name}: the container is gone") from None

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

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """testinfra's docker backend (it runs the docker CLI, which honours
        DOCKER_HOST like the SDK); on a target's own engine, the same backend
        told that engine (harness.drivers.docker.testinfra_backend)."""
        engine = resolve_engine(instance.target)
        if not engine.cli_args:
            return f"docker://{instance.resource_name}", {}
        from harness.drivers.docker.testinfra_backend import register

        return f"{register()}://{instance.resource_name}", {"docker_cli": engine.cli_args}

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
        data, link = read_archive(archive, f"copy: {path} in {instance.resource_name}")
        if link is not None:
            return link
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data or b"")
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
        python = instance.guest.python
        with contextlib.suppress(TargetError, StepTimeout):
            found = self.exec(instance, [python, "-c", "import glob; print('\\n'.join(sorted("
                                         f"glob.glob({serve_log('*')!r}))))"], 30)
            for path in found.stdout.split() if found.rc == 0 else []:
                with contextlib.suppress(TargetError, StepTimeout):
                    saved.append(self.copy_from(
                        instance, path, dest / f"{instance.resource_name}-{Path(path).name}", 60))
        return saved
