"""The one interface every target kind implements.

A driver is thin, in the manner of testinfra's backends: it knows how to bring
one kind of target up and down and how to run a command inside it; the
lifecycle (harness.lifecycle) decides when each step runs, with a timeout each.

Every resource a driver creates carries the labels ``LABEL_PROJECT`` and
``LABEL_RUN`` so that ``sweep()`` can find what an interrupted run left behind.
"""

from __future__ import annotations

import abc
import dataclasses
import subprocess
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

LABEL_PROJECT = "io.iomux.project"
LABEL_RUN = "io.iomux.run"
PROJECT = "iomux"

#: Ports the echo servers listen on inside a target: the ``auto`` backend on
#: ECHO_PORT, and each named backend on its own port so that the black-box
#: suite can reach every backend a target offers through one published range.
ECHO_PORT = 7000
BACKEND_PORTS: Mapping[str, int] = {
    "auto": 7000,
    "select": 7001,
    "poll": 7002,
    "epoll": 7003,
    "epoll-et": 7004,
    "kqueue": 7005,
    "kqueue-et": 7006,
}


class StepTimeout(Exception):
    """An external step took longer than its timeout; the message names the step."""


class TargetError(Exception):
    """A target could not be brought up or used; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One entry of targets.toml."""

    name: str
    kind: str
    os_family: str
    backends: tuple[str, ...]
    image: str | None = None
    box: str | None = None
    python: str | None = None
    description: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExecResult:
    """What a command run inside a target returned."""

    argv: Sequence[str]
    rc: int
    stdout: str
    stderr: str


@dataclasses.dataclass
class Instance:
    """A running target: what a driver needs to reach it again."""

    target: Target
    run_id: str
    resource_name: str
    #: backend name -> (host, port) on this machine, always 127.0.0.1
    echo_ports: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


class Driver(abc.ABC):
    """Bring one kind of target up and down, and run commands inside it."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """Return None if this kind's engine is usable here, else why not, in one line
        (``"no Docker daemon: ..."``, ``"vagrant executable was not found"``)."""

    def target_unavailable_reason(self, target: Target) -> str | None:
        """Why this one target cannot run here although the engine can (no box, say)."""
        return None

    @abc.abstractmethod
    def sweep(self, run_id: str | None = None) -> list[str]:
        """Remove resources labelled as ours (only those of ``run_id`` when given).

        Returns what was removed, for the log."""

    @abc.abstractmethod
    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """Make the target's image or box ready; cached by content.

        Returns facts for the report, at least ``{"cached": bool, "seconds": float}``."""

    @abc.abstractmethod
    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """Start the target with a name unique to this run and worker."""

    @abc.abstractmethod
    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        """Block until the target's echo server answers; raise StepTimeout."""

    @abc.abstractmethod
    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` inside the target. ``argv`` is a list; no shell is involved."""

    @abc.abstractmethod
    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """The testinfra host spec and keyword arguments for ``testinfra.get_host``."""

    @abc.abstractmethod
    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        """Copy a file out of the target to ``dest`` (a file path) and return it."""

    @abc.abstractmethod
    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        """Save the target's logs under ``dest`` (called before destroy on failure)."""

    @abc.abstractmethod
    def destroy(self, instance: Instance, timeout: float) -> None:
        """Remove everything ``start`` created. Must be safe to call twice."""


def run_argv(argv: Sequence[str], timeout: float, step: str,
             cwd: Path | None = None, env: Mapping[str, str] | None = None) -> ExecResult:
    """Run a host command given as a list, with a timeout that names the step."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              cwd=cwd, env=None if env is None else dict(env), check=False)
    except subprocess.TimeoutExpired as exc:
        raise StepTimeout(f"{step}: timed out after {timeout:g}s: {argv[0]}") from exc
    except FileNotFoundError as exc:
        raise TargetError(f"{step}: {argv[0]} was not found") from exc
    return ExecResult(argv=list(argv), rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)
