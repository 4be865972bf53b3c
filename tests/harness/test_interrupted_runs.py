"""An interrupted harness run leaves nothing behind (issue 6, "Harness reliability").

Each test starts a real run, ``pytest -p harness.plugin tests/cross_os --targets
local,debian-12`` (what ``make test-all-os TARGETS=local,debian-12`` runs), in its
own process group, waits until the run's debian-12 container is up and its
local echo servers are listening, and then interrupts the whole group:

kill -9   nothing in the run gets to clean up: the container and its network must
          be left (that is what the sweep is for), then the next run's start-up
          sweep must remove them, and the local servers must be gone (they stop
          when their stdin pipe from the killed harness closes; the sweep kills
          any that did not).
Ctrl-C    SIGINT to the group, as a terminal sends it: the run itself must tear
          everything down, exit non-zero and report its targets as not passed.

Only resources labelled with the interrupted run's id (``io.iomux.run``) are
looked at: other people's runs on this machine are left alone, as the sweep
leaves them alone. The VM list is checked too (no VM is started here, far too
slow, but no libvirt domain may carry the run's id).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Collection, Iterator, Sequence

import pytest

from harness.drivers.base import (
    LABEL_PROJECT,
    LABEL_RUN,
    PROJECT,
    Driver,
    ExecResult,
    Instance,
    Target,
)
from harness.drivers.local import ENV_RUN, LocalDriver
from harness.lifecycle import TargetLifecycle
from harness.runs import LIVE_DIR

REPO = Path(__file__).resolve().parents[2]
TARGETS = "local,debian-12"
#: How long a run may take to get both targets up (a cold image build is not
#: expected here: tests/harness/test_docker_driver.py builds it first).
UP_TIMEOUT = 240.0


def _docker_reason() -> str | None:
    try:
        from harness.drivers.docker.driver import DockerDriver
    except ImportError as exc:
        return f"no Docker SDK: {exc}"
    reason = DockerDriver().unavailable_reason()
    if reason is not None:
        return reason
    target = next(t for t in _targets() if t.name == "debian-12")
    return DockerDriver().target_unavailable_reason(target)


def _targets() -> list[Any]:
    from harness.targets import load
    return load()


_SKIP = ("finds local servers through /proc (Linux hosts only)"
         if not sys.platform.startswith("linux") else _docker_reason())
#: The tests that interrupt a real run need a Linux host and a debian-12 that can run.
needs_real_run = pytest.mark.skipif(_SKIP is not None, reason=f"cannot run here: {_SKIP}")
# One run's start-up sweep would take the other test's leftovers: one worker.
pytestmark = pytest.mark.xdist_group("interrupted-runs")


class Run:
    """A harness run in its own process group, with a private reports directory."""

    def __init__(self, tmp_path: Path, name: str, *args: str,
                 sigint: signal.Handlers = signal.SIG_DFL) -> None:
        self.reports = tmp_path / f"reports-{name}"
        self.log_path = tmp_path / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p", "no:cacheprovider",
             "tests/cross_os", "--reports-dir", str(self.reports), "--targets", TARGETS, *args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: what a terminal would signal
            # The SIGINT disposition the run inherits is set here, not taken from
            # whatever started this test: SIG_DFL is a terminal's foreground job,
            # SIG_IGN a shell's background job or a CI runner that ignores it.
            preexec_fn=functools.partial(signal.signal, signal.SIGINT, sigint))
        self.run_id: str | None = None

    def find_run_id(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        latest = self.reports / "latest"
        while not latest.is_symlink():
            assert self.proc.poll() is None, f"the run ended early:\n{self.output()}"
            assert time.monotonic() < deadline, f"no reports/latest after {timeout:g}s"
            time.sleep(0.1)
        self.run_id = os.readlink(latest)
        return self.run_id

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.returncode is not None:
                self._log.close()

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def results(self) -> dict[str, Any]:
        assert self.run_id is not None
        path = self.reports / self.run_id / "results.json"
        assert path.exists(), f"no results.json:\n{self.output()}"
        results: dict[str, Any] = json.loads(path.read_text())
        return results

    def kill(self) -> None:
        """The safety net: nothing of this run's process group survives the test."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self._log.close()


def _docker_client() -> Any:
    from harness.drivers.docker.driver import DockerDriver
    return DockerDriver().client()


def _labels(run_id: str) -> dict[str, list[str]]:
    return {"label": [f"{LABEL_PROJECT}={PROJECT}", f"{LABEL_RUN}={run_id}"]}


def _containers(run_id: str) -> list[Any]:
    import docker.errors
    # containers.list inspects each container it lists: one the run removes in
    # between is a 404 (NotFound), and the listing is simply taken again.
    for _ in range(20):
        try:
            return list(_docker_client().containers.list(all=True, filters=_labels(run_id)))
        except docker.errors.NotFound:
            time.sleep(0.1)
    return list(_docker_client().containers.list(all=True, filters=_labels(run_id)))


def _networks(run_id: str) -> list[Any]:
    return list(_docker_client().networks.list(filters=_labels(run_id)))


def _local_servers(run_id: str) -> list[int]:
    """Pids of processes that carry the run's label in their environment, as the
    local driver sets it (harness/drivers/local.py: ENV_RUN)."""
    label = f"{ENV_RUN}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if label in environ:
            found.append(int(entry.name))
    return found


def _domains_of(run_id: str) -> list[str] | None:
    """libvirt domains whose name carries the run's id; None where there is no libvirt."""
    if shutil.which("virsh") is None:
        return None
    uri = os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")
    proc = subprocess.run(["virsh", "-c", uri, "list", "--all", "--name"], capture_output=True,
                          text=True, timeout=60, check=False)
    if proc.returncode != 0:
        return None  # libvirtd not running: no domain can exist
    return [n.strip() for n in proc.stdout.splitlines() if run_id in n]


def _live_runs() -> set[str]:
    """The run ids whose harness holds its live lock now."""
    live = set()
    for lock in LIVE_DIR.glob("*.lock"):
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            live.add(lock.stem)
        finally:
            os.close(fd)
    return live


def _other_runs_alive(except_run: str) -> bool:
    """Whether another harness run holds its live lock (its sweep may then be the one
    that takes our leftovers, so which sweep removed them cannot be asserted)."""
    return bool(_live_runs() - {except_run})


def _phase_reached(run: Run, run_id: str, target: str, phase: str) -> bool:
    events = run.reports / run_id / "events.jsonl"
    try:
        lines = events.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if (event.get("target"), event.get("type"), event.get("phase")) == (
                    target, "phase", phase):
                return True
    return False


def _wait_until_up(run: Run, moment: str = "running", timeout: float = UP_TIMEOUT) -> str:
    """Wait until the run's local servers listen and its debian-12 container is
    ``created`` (the start step is still going), ``running``, or ``testing``."""
    run_id = run.find_run_id()
    deadline = time.monotonic() + timeout
    while True:
        assert run.proc.poll() is None, f"the run ended before its targets were up:\n" \
                                        f"{run.output()}"
        containers = _containers(run_id)
        if moment == "created":
            ready = bool(containers)
        elif moment == "running":
            ready = any(c.status == "running" for c in containers)
        else:
            ready = bool(containers) and _phase_reached(run, run_id, "debian-12", moment)
        if ready and _local_servers(run_id):
            return run_id
        assert time.monotonic() < deadline, \
            f"targets not {moment} after {timeout:g}s:\n{run.output()}"
        time.sleep(0.1)


def _clean_up(run_id: str | None) -> None:
    """Whatever a failed test left: this run's resources only."""
    if run_id is None:
        return
    from harness.drivers.docker.driver import DockerDriver
    DockerDriver().sweep(run_id)
    LocalDriver().sweep(run_id)
    for scratch in Path("/tmp").glob(f"iomux-{run_id}-*"):
        shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (LIVE_DIR / f"{run_id}.lock").unlink()


def _assert_nothing_left(run_id: str) -> None:
    assert _containers(run_id) == [], "containers of the interrupted run remain"
    assert _networks(run_id) == [], "networks of the interrupted run remain"
    assert _local_servers(run_id) == [], "local servers of the interrupted run remain"
    domains = _domains_of(run_id)
    assert not domains, f"libvirt domains of the interrupted run remain: {domains}"


@pytest.fixture(scope="module")
def image() -> None:
    """Build debian-12 first (cached almost always): a run interrupted in the middle
    of a rebuild, because someone just edited the tree, tests something else."""
    from harness.drivers.docker.driver import DockerDriver
    DockerDriver().build(next(t for t in _targets() if t.name == "debian-12"), timeout=1800)


@pytest.fixture
def cleanup(image: None) -> Iterator[list[str]]:
    run_ids: list[str] = []
    try:
        yield run_ids
    finally:
        for run_id in run_ids:
            _clean_up(run_id)


@pytest.mark.slow
@needs_real_run
def test_kill_9_leaves_leftovers_that_the_next_run_sweeps(tmp_path: Path,
                                                          cleanup: list[str]) -> None:
    run = Run(tmp_path, "killed", "-n", "2", "--dist", "loadgroup")
    try:
        run_id = _wait_until_up(run)
        cleanup.append(run_id)
        run.signal_group(signal.SIGKILL)
        assert run.wait(30) == -signal.SIGKILL
    finally:
        run.kill()

    # Nothing ran any clean-up: what the run made is still there, labelled.
    left = {c.name for c in _containers(run_id)}
    nets = {n.name for n in _networks(run_id)}
    assert left, "kill -9 left no container: nothing for the sweep to prove"
    assert nets, "kill -9 left no network"
    assert (LIVE_DIR / f"{run_id}.lock").exists()
    # The killed workers are gone, or zombies not reaped yet (dead all the same):
    # the sweep judges an owner by its pid, and a kill takes a moment to land.
    from harness.drivers.docker.driver import owner_alive
    from harness.drivers.docker.engine import LABEL_OWNER
    owners = {c.labels.get(LABEL_OWNER, "") for c in _containers(run_id)}
    deadline = time.monotonic() + 15
    while any(owner_alive(o) for o in owners) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(owner_alive(o) for o in owners), owners
    # The local servers notice EOF on stdin (their pipe from the dead harness).
    deadline = time.monotonic() + 15
    while _local_servers(run_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _local_servers(run_id) == [], "local servers outlived the killed harness"
    scratch = list(Path(tempfile.gettempdir()).glob(f"iomux-{run_id}-*"))
    assert scratch, "kill -9 left no local scratch directory: nothing for the sweep to prove"

    # Another harness run (a concurrent test's) that starts before the next run's
    # sweep may sweep our leftovers first: every run seen alive until the next run
    # is done counts, not only those alive now (one that started later took them
    # once, in a cold .ci/run).
    seen = _live_runs()
    cheap = ["-n", "1", "--dist", "loadgroup", "-k", "test_python_and_kernel"]
    nxt = Run(tmp_path, "next", *cheap)
    try:
        deadline = time.monotonic() + UP_TIMEOUT
        while nxt.proc.poll() is None and time.monotonic() < deadline:
            seen |= _live_runs()
            time.sleep(0.1)
        rc = nxt.wait(max(1.0, deadline - time.monotonic()))
        next_id = nxt.find_run_id(timeout=1)
        cleanup.append(next_id)
    finally:
        nxt.kill()
    others = bool(seen - {run_id, next_id})
    assert rc == 0, nxt.output()
    _assert_nothing_left(run_id)
    assert not (LIVE_DIR / f"{run_id}.lock").exists()
    swept = nxt.results()["run"]["swept"]
    assert not [p for p in scratch if p.exists()], \
        f"the killed run's scratch directories remain; the next run swept {swept}"
    if not others:
        # No other run was alive to sweep first: this run's sweep took them.
        taken = set(swept.get("docker", []))
        assert {f"container {name}" for name in left} <= taken, swept
        assert {f"network {name}" for name in nets} <= taken, swept
    assert all(t["status"] == "passed" for t in nxt.results()["targets"]), nxt.output()


# Ctrl-C while the container is being created (inside the driver's start step,
# which runs in a watchdog thread the signal does not reach), while it becomes
# healthy, and while its tests run.
# The run inherits SIGINT as a foreground job would (default), and once as a
# background job or a CI step would (ignored): the harness must take Ctrl-C either way.
@pytest.mark.parametrize(("moment", "inherited"), [
    ("created", signal.SIG_DFL), ("running", signal.SIG_DFL), ("testing", signal.SIG_DFL),
    ("running", signal.SIG_IGN)], ids=["created", "running", "testing", "running-sigint-ignored"])
@pytest.mark.slow
@needs_real_run
def test_ctrl_c_tears_everything_down_and_fails_the_run(tmp_path: Path, cleanup: list[str],
                                                        moment: str,
                                                        inherited: signal.Handlers) -> None:
    run = Run(tmp_path, "interrupted", "-n", "2", "--dist", "loadgroup", sigint=inherited)
    try:
        run_id = _wait_until_up(run, moment)
        cleanup.append(run_id)
        run.signal_group(signal.SIGINT)
        rc = run.wait(120)  # every step has a timeout: an interrupted run ends
    finally:
        run.kill()
    out = run.output()
    assert rc not in (0, -signal.SIGKILL), out
    # The run tore itself down: no sweep has run since.
    _assert_nothing_left(run_id)
    assert not (LIVE_DIR / f"{run_id}.lock").exists()
    results = run.results()
    statuses = {t["name"]: t["status"] for t in results["targets"]}
    assert set(statuses) == {"local", "debian-12"}
    assert "passed" not in statuses.values(), (statuses, out)
    for entry in results["targets"]:
        assert entry["reason"], entry
        if entry["status"] == "not run":  # never "not run here" for an interrupted target
            assert "interrupted" in entry["reason"], entry["reason"]


class _SlowStart(Driver):
    """A driver whose start takes a while, and sends this process a Ctrl-C meanwhile."""

    kind = "fake"

    def __init__(self) -> None:
        self.made: list[str] = []
        self.destroyed: list[str] = []

    def unavailable_reason(self) -> str | None:
        return None

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        return []

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        return {"cached": True, "seconds": 0.0}

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        # Runs in the step's watchdog thread; the signal lands in the main thread,
        # which is waiting for this step.
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
        time.sleep(0.6)
        self.made.append(f"fake-{worker}")
        return Instance(target=target, run_id=run_id, resource_name=f"fake-{worker}")

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        pass

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        return ExecResult(argv=list(argv), rc=0, stdout="", stderr="")

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        return "local://", {}

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        return dest

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        return []

    def destroy(self, instance: Instance, timeout: float) -> None:
        self.destroyed.append(instance.resource_name)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="needs the main thread to take SIGINT")
def test_ctrl_c_during_start_still_destroys_what_start_made(tmp_path: Path) -> None:
    """The docker case above in miniature: Ctrl-C while the start step runs in
    its watchdog thread. The instance it makes must still be destroyed."""
    # This test takes Ctrl-C as Python's default handler does; under a parent
    # that ignores SIGINT this process inherited SIG_IGN, so set it for the test.
    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _bring_up_interrupted(tmp_path)
    finally:
        signal.signal(signal.SIGINT, old_handler)


def _bring_up_interrupted(tmp_path: Path) -> None:
    driver = _SlowStart()
    target = Target(name="fake-1", kind="fake", os_family="linux", backends=("select",))
    lifecycle = TargetLifecycle(driver, target, "run-1", "gw9", tmp_path, None)
    with pytest.raises(KeyboardInterrupt):
        lifecycle.bring_up()
    assert driver.made == ["fake-gw9"]
    assert driver.destroyed == ["fake-gw9"]
