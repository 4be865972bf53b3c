"""The running target the cross-OS suites see (DESIGN.md section 6).

The plugin's ``running_target`` fixture hands each test a ``RunningTarget``: the
targets.toml entry, its driver and its ``Instance``, and the few things a suite
does with them (run a command inside, reach a backend's echo server, copy a file
out, record a value for results.json).

What a suite reads of the target is ``instance.guest``, the typed ``Guest``
record a driver fills (harness.drivers.base); ``instance.data`` is the driver's
own state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from harness.drivers.base import Driver, ExecResult, Instance, Target, TargetError
from harness.lifecycle import TargetLifecycle, call_with_timeout
from harness.progress import EventLog


class RunningTarget:
    """A target that is up, as the cross-OS suites see it (DESIGN.md section 6)."""

    def __init__(self, lifecycle: TargetLifecycle, instance: Instance, report_dir: Path,
                 events: EventLog) -> None:
        self._lifecycle = lifecycle
        self.instance = instance
        self.report_dir = report_dir
        self._events = events
        self._started: dict[str, tuple[str, int]] = {}

    @property
    def target(self) -> Target:
        """The targets.toml entry."""
        return self._lifecycle.target

    @property
    def driver(self) -> Driver:
        """The driver of the target's kind."""
        return self._lifecycle.driver

    def exec(self, argv: Sequence[str], timeout: float = 120,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` (a list, never a shell string) inside the target."""
        return self._lifecycle.exec(list(argv), timeout, user)

    def echo_address(self, backend: str) -> tuple[str, int]:
        """127.0.0.1 and the host port that reaches ``backend``'s echo server.

        A driver that starts only the ``auto`` server with the target (docker)
        offers ``start_backend_server``; it is called once per backend, here."""
        starter = getattr(self.driver, "start_backend_server", None)
        if starter is not None and backend != "auto" and backend not in self._started:
            if backend not in self.target.backends:
                raise TargetError(f"{self.target.name}: does not offer backend {backend}; "
                                  f"offered: {', '.join(self.target.backends)}")
            address = call_with_timeout(f"{self.target.name}: start {backend} server", 60,
                                        lambda: starter(self.instance, backend))
            self._started[backend] = (str(address[0]), int(address[1]))
        try:
            return self.instance.echo_ports[backend]
        except KeyError:
            offered = ", ".join(sorted(self.instance.echo_ports)) or "none"
            raise TargetError(f"{self.target.name}: no echo port for {backend}; "
                              f"offered: {offered}") from None

    @property
    def started_backends(self) -> list[str]:
        """Backends whose servers are known to be up: every echo port, unless the driver
        starts them on demand, in which case ``auto`` and those asked for so far."""
        if getattr(self.driver, "start_backend_server", None) is None:
            return sorted(self.instance.echo_ports)
        return sorted({"auto", *self._started} & set(self.instance.echo_ports))

    def copy_from(self, path: str, dest: Path, timeout: float = 120) -> Path:
        """Copy a file out of the target."""
        return call_with_timeout(f"{self.target.name}: copy {path}", timeout,
                                 lambda: self.driver.copy_from(self.instance, path, dest,
                                                               timeout))

    def record(self, key: str, value: object) -> None:
        """Put ``value`` under ``key`` in this target's entry of results.json."""
        self._events.emit(self.target.name, "record", key=key, value=value)
