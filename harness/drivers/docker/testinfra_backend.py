"""testinfra's docker backend, told which engine: for a target on its own engine.

testinfra's ``docker://NAME`` backend runs ``docker exec`` with whatever engine
the docker CLI would pick from the environment (DOCKER_HOST, the current
context). A target that names its engine (``docker_host``, ``docker_context``)
runs the same CLI with that engine's ``--host URL`` or ``--context NAME`` first.
testinfra finds a backend by the name in its ``BACKENDS`` table, so ``register``
adds this one there; this module is imported only when testinfra is in use.
"""

from __future__ import annotations

from typing import Any

from testinfra.backend import BACKENDS
from testinfra.backend.base import CommandResult
from testinfra.backend.docker import DockerBackend

NAME = "iomux-docker"


class EngineDockerBackend(DockerBackend):  # type: ignore[misc]  # testinfra is untyped here
    """``docker [--host URL | --context NAME] exec [-u USER] NAME /bin/sh -c CMD``."""

    NAME = NAME

    def __init__(self, name: str, *args: Any, docker_cli: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        self.docker_cli = tuple(docker_cli)
        super().__init__(name, *args, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> CommandResult:
        cmd = self.get_command(command, *args)
        engine = "%s " * len(self.docker_cli)
        if self.user is not None:
            out = self.run_local(f"docker {engine}exec -u %s %s /bin/sh -c %s",
                                 *self.docker_cli, self.user, self.name, cmd)
        else:
            out = self.run_local(f"docker {engine}exec %s /bin/sh -c %s",
                                 *self.docker_cli, self.name, cmd)
        out.command = self.encode(cmd)
        return out


def register() -> str:
    """Make the backend known to testinfra; return its name for a host spec."""
    BACKENDS.setdefault(NAME, f"{__name__}.{EngineDockerBackend.__name__}")
    return NAME
