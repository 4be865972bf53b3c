"""The one interface every target kind implements, and the floor the drivers share.

A driver is thin, in the manner of testinfra's backends: it knows how to bring
one kind of target up and down and how to run a command inside it; the
lifecycle (harness.lifecycle) decides when each step runs, with a timeout each.

Every resource a driver creates carries the labels ``LABEL_PROJECT`` and
``LABEL_RUN`` so that ``sweep()`` can find what an interrupted run left behind.

Below the interface is what every kind uses, kept here so that each import
arrow points down, to this module: the watchdog (``call_with_timeout``), an
error as one line (``one_line``) and the ``iomux serve`` command line
(``serve_argv``). Beside it, on the same floor, harness.drivers.owners says who
owns a resource (``owner_label``/``owner_alive``) and holds the exclusive file
lock (``exclusive_lock``).

What a driver tells the suites about a running target is the typed ``Guest``
record (``Instance.guest``); what it keeps for itself stays in ``Instance.data``.
``Driver.validate`` checks a targets.toml entry against the keys its kind
declares, and ``TargetUnavailable`` is the one error of a target that cannot be
had here (reported "not run", never failed).
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, ClassVar, Collection, Iterable, Mapping, Sequence, TypeVar

from harness import reasons

T = TypeVar("T")

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


class TargetUnavailable(TargetError):
    """The target cannot be had here (no base image, no box, no kernel binary, no
    driver): the run reports it "not run: <message>" rather than failed."""


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
class Guest:
    """What the suites (tests/cross_os, harness/guest_suites.py) read of a running
    target; its driver fills it in ``start`` and ``wait_healthy``.

    Paths are the guest's own (inside the container or VM; on this machine for the
    local kind)."""

    #: The interpreter inside the target that has iomux and pytest (the in-guest
    #: suites run on it, and the host suite's probes).
    python: str = "python3"
    #: The in-guest copy of tests/server (tests/faults is beside it); None: the
    #: driver offers no in-guest suites.
    tests_dir: str | None = None
    #: A directory inside the target the suites may write to (JUnit files).
    scratch_dir: str = "/tmp"
    #: The directory commands are run from, where the target's iomux is the working
    #: tree's (the local kind: the repository); None: the guest's default.
    cwd: str | None = None
    #: backend -> the port its server listens on inside the target; empty: the
    #: suites take ``BACKEND_PORTS`` of the backends they started.
    guest_ports: dict[str, int] = dataclasses.field(default_factory=dict)
    #: backend -> the pid of its server inside the target; empty: not known, and the
    #: host suite counts every ``iomux serve`` it finds as the target's.
    server_pids: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Why nothing in the target is reachable from this host (gvisor, uml): the
    #: black-box and host suites are then "not run: <unreachable>"; None: reachable.
    unreachable: str | None = None
    #: IOMUX_TEST_SCALE of the in-guest fault suite (smaller sizes, waits stretched
    #: by the inverse) on a slow guest; None: the suite's full sizes.
    test_scale: float | None = None
    #: The kernel version the claims are judged by where ``uname`` does not tell it;
    #: None: the target's ``kernel_version`` option, its kernel build, or uname.
    kernel_version: str | None = None
    #: How the kernel runs where the guest cannot see it (gVisor's runsc platform,
    #: ``ptrace`` or ``systrap``); None: the probe run's own (iomux.facts).
    kernel_platform: str | None = None


@dataclasses.dataclass
class Instance:
    """A running target: what a driver needs to reach it again."""

    target: Target
    run_id: str
    resource_name: str
    #: backend name -> (host, port) on this machine, always 127.0.0.1
    echo_ports: dict[str, tuple[str, int]] = dataclasses.field(default_factory=dict)
    #: What the suites read (python, tests dir, ports, ...): see Guest.
    guest: Guest = dataclasses.field(default_factory=Guest)
    #: The driver's private state (its container id, run directory, ssh config):
    #: for the driver alone, and its own tests; the suites read ``guest``.
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


#: Keys of a targets.toml entry that every kind takes (harness/targets.py reads the
#: first six itself; ``weight`` is the scheduler's, ``timeouts`` the lifecycle's,
#: ``kernel`` and ``kernel_version`` the claims suite's).
COMMON_KEYS = frozenset({"name", "kind", "os_family", "backends", "python", "description",
                         "weight", "timeouts", "kernel", "kernel_version"})
#: The lifecycle's steps, by name (harness.lifecycle.SEQUENCE holds them in order): the
#: keys of ``step_timeouts`` and of a target's ``[target.timeouts]`` table.
STEP_NAMES = frozenset({"sweep", "attach", "build", "start", "healthy", "test", "logs",
                        "keep", "destroy"})
#: The keys of the tables every kind takes.
COMMON_TABLES: Mapping[str, frozenset[str]] = {"timeouts": STEP_NAMES}


def _named(keys: Iterable[str], allowed: Iterable[str]) -> list[str]:
    """``'key'``, with ``(did you mean 'other'?)`` where one of ``allowed`` is close."""
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        named.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return named


class Driver(abc.ABC):
    """Bring one kind of target up and down, and run commands inside it."""

    kind: ClassVar[str]
    #: Step timeouts (seconds) where this kind is slower than the lifecycle's
    #: sequence (harness.lifecycle.SEQUENCE), e.g. ``{"start": 1500}``.
    step_timeouts: ClassVar[Mapping[str, float]] = {}
    #: Whether the host reaches the guest's ports through a userland proxy that
    #: accepts for a server that is not there and distorts TCP half-close.
    ports_proxied: ClassVar[bool] = False
    #: Keys of its targets.toml entry a target of this kind must have (``image``,
    #: ``box`` and any table the driver cannot do without).
    options_required: ClassVar[frozenset[str]] = frozenset()
    #: Keys it may have beyond those and ``COMMON_KEYS``; any other is a mistake.
    options_allowed: ClassVar[frozenset[str]] = frozenset()
    #: Of those, the tables (``[target.offline]``, say), with the keys each takes.
    option_tables: ClassVar[Mapping[str, frozenset[str]]] = {}
    #: The CPU weight (cgroup ``cpu.shares``, default 1024) of the guests this driver
    #: starts next, set by the harness for a target off the critical path
    #: (harness.scheduling). A kind whose guest runs in a cgroup it makes (gVisor's
    #: sandbox) applies it there, where the worker's nice value does not reach;
    #: None: the default.
    cpu_shares: int | None = None

    @classmethod
    def validate(cls, target: Target) -> None:
        """Check ``target``'s keys against the kind's: a missing required key or an
        unknown one (a misspelt ``[target.ofline]`` table, say) raises TargetError,
        one line naming the target, the key, and the keys the kind takes."""
        keys = set(target.options) | {k for k in ("image", "box") if getattr(target, k)}
        where = f"target {target.name!r}"
        missing = sorted(cls.options_required - keys)
        if missing:
            raise TargetError(f"{where}: a {cls.kind} target needs "
                              + ", ".join(repr(k) for k in missing))
        allowed = COMMON_KEYS | cls.options_required | cls.options_allowed
        unknown = sorted(keys - allowed)
        if unknown:
            named = _named(unknown, allowed)
            raise TargetError(f"{where}: unknown key{'s' if len(named) > 1 else ''} "
                              f"{', '.join(named)}; a {cls.kind} target takes: "
                              f"{', '.join(sorted(allowed))}")
        tables = {**COMMON_TABLES, **cls.option_tables}
        for table in sorted(set(tables) & set(target.options)):
            value, takes = target.options[table], tables[table]
            if not isinstance(value, Mapping):
                raise TargetError(f"{where}: {table!r} is a table ([target.{table}]) of "
                                  f"{', '.join(sorted(takes))}")
            unknown = sorted(set(value) - takes)
            if unknown:
                named = _named(unknown, takes)
                raise TargetError(f"{where}: [target.{table}] has unknown "
                                  f"key{'s' if len(named) > 1 else ''} {', '.join(named)}; "
                                  f"it takes: {', '.join(sorted(takes))}")

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """Return None if this kind's engine is usable here, else why not, in one line
        (``"no Docker daemon: ..."``, ``"vagrant executable was not found"``)."""

    def target_unavailable_reason(self, target: Target) -> str | None:
        """Why this one target cannot run here although the engine can (no box, say)."""
        return None

    @abc.abstractmethod
    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        """Remove resources labelled as ours (only those of ``run_id`` when given),
        never those named in ``spare`` (kept targets of the current tree and recipe,
        or taken over by a run still going: harness.kept_targets).

        ``targets`` are the run's targets of this kind: a kind whose resources
        live in more than one place (a docker target's own engine) sweeps each
        place they name as well. Returns what was removed, for the log."""

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

    # -- kept targets (``--destroy=never|passing``; harness.kept_targets) ---------------

    #: Whether a target of this kind that ``--destroy`` keeps can be taken over by a
    #: later run (``attach``). A kind that cannot says why in ``keep_reason``.
    keepable: ClassVar[bool] = False
    keep_reason: ClassVar[str] = "its driver cannot reach a target again from another run"
    #: The files (paths relative to the checkout, files or directories) that go
    #: into a target of this kind: baked into its image, copied or mounted. A kept
    #: target is reused only while they are unchanged.
    kept_inputs: ClassVar[tuple[str, ...]] = ()

    def kept_recipe(self, target: Target) -> dict[str, Any]:
        """Facts besides targets.toml and ``kept_inputs`` that decide what a target
        of this kind is (the box it boots, the engine it runs on); JSON values."""
        return {}

    def attach(self, kept: Instance, timeout: float) -> Instance | None:
        """Take over a kept target: ``kept`` is the Instance as it was kept (its
        target, run id, resource name, echo ports and data). Return it, brought up to
        date (echo ports read again), if its resources are still there and running;
        None if it cannot be reused (the lifecycle destroys it and starts anew).
        ``wait_healthy`` runs after it."""
        return None


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


# -- the watchdog ----------------------------------------------------------------------

#: Seconds the watchdog waits past a step's timeout before it stops waiting for
#: the driver, which should have raised StepTimeout itself by then.
GRACE = 15.0

#: After a Ctrl-C, how long a step that creates things (start) is still waited
#: for, so that what it made is known and destroyed rather than orphaned.
INTERRUPT_WAIT = 60.0


def call_with_timeout(step: str, timeout: float, fn: Callable[[], T],
                      finish_on_interrupt: bool = False, grace: float | None = None) -> T:
    """Run ``fn`` in a watchdog thread.

    Parameters: ``step`` names the step in the error; ``timeout <= 0`` means no
    watchdog; ``grace`` (default ``GRACE``) is how long past ``timeout`` the
    watchdog still waits. Ctrl-C reaches only the main thread, and ``fn`` goes on
    in its own: with ``finish_on_interrupt`` the KeyboardInterrupt waits (up to
    INTERRUPT_WAIT) for ``fn`` to finish first, so that its side effects are complete.

    Returns what ``fn`` returned. Raises what ``fn`` raised, or StepTimeout
    naming ``step`` if it outlives ``timeout`` plus the grace."""
    if timeout <= 0:
        return fn()
    grace = GRACE if grace is None else grace
    box: dict[str, Any] = {}
    # An Event, not Thread.join: a join interrupted by Ctrl-C marks a thread that
    # is still running as stopped (CPython 3.11's fix for bpo-45274 releases
    # its state lock), so a second join would not wait.
    done = threading.Event()

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # carried over to the calling thread
            box["error"] = exc
        finally:
            done.set()

    # A daemon thread: a driver call that never returns must not keep the
    # interpreter alive at exit.
    thread = threading.Thread(target=body, name=f"iomux-{step}", daemon=True)
    thread.start()
    try:
        done.wait(timeout + grace)
    except KeyboardInterrupt:
        if finish_on_interrupt:
            done.wait(min(timeout + grace, INTERRUPT_WAIT))
        raise
    if not done.is_set():
        raise StepTimeout(f"{step}: timed out after {timeout:g}s (the driver did not return)")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


# -- one-line errors -------------------------------------------------------------------

#: The longest error line ``one_line`` makes by default: room for an engine's
#: sentence inside a TargetError. Twice a "not run" line (harness.reasons.LIMIT),
#: which reasons.fit() cuts such an error down to where it becomes one.
ONE_LINE_LIMIT = 2 * reasons.LIMIT


def one_line(error: BaseException | str, limit: int | None = ONE_LINE_LIMIT) -> str:
    """An exception (or a text) as one line for a message.

    Parameters: ``limit``, the longest line (None: the whole first line).
    Returns the first line of the text, runs of white space folded, cut to
    ``limit`` with "..."; an exception without text gives its type's name."""
    lines = str(error).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


# -- the echo server's command line ----------------------------------------------------

def serve_argv(backend: str, port: int, host: str = "127.0.0.1", *,
               ready_file: str | None = None, quiet: bool = False,
               python: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """The ``iomux serve`` command line of one backend's server.

    Parameters: ``python`` runs ``<python> -m iomux`` (else the ``iomux`` script
    on the guest's PATH); ``ready_file`` is where the server writes its port and
    pid once it listens; ``quiet`` drops its per-connection log; ``extra`` words
    go last (``--stop-on-stdin``)."""
    argv = [python, "-m", "iomux"] if python else ["iomux"]
    argv += ["serve", "--backend", backend, "--host", host, "--port", str(port)]
    if ready_file is not None:
        argv += ["--ready-file", ready_file]
    if quiet:
        argv.append("--quiet")
    return [*argv, *extra]
