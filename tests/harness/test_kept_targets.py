"""Kept and warm targets: the lifecycle's table under ``--destroy``, the kept-record
store (harness/kept_targets.py), the sweep that spares a kept target of the current
tree, and the report of a reuse. A fake driver records every call; the store is a
temporary directory, and every owner counts as exited unless a test says otherwise
(the records here are all written by this one process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Collection, Iterator, Sequence

import pytest
from test_lifecycle import TARGET, FakeDriver, phases

from harness import kept_targets
from harness.drivers.base import Instance, Target, TargetError
from harness.lifecycle import DOWN_STEPS, UP_STEPS, TargetLifecycle, destroys, sweep_leftovers
from harness.progress import EventLog, iter_events


class KeepableDriver(FakeDriver):
    """A fake kind whose kept targets can be taken over; ``gone`` makes attach find
    nothing, ``unhealthy_once`` fails the first health check."""

    keepable: ClassVar[bool] = True
    kept_inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, gone: bool = False, unhealthy_once: bool = False,
                 fail: dict[str, BaseException] | None = None) -> None:
        super().__init__(fail=fail)
        self.gone = gone
        self.unhealthy_once = unhealthy_once
        self.spared: list[tuple[str | None, list[str]]] = []

    def attach(self, kept: Instance, timeout: float) -> Instance | None:
        self._call("attach", timeout)
        return None if self.gone else kept

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        if self.unhealthy_once:
            self.unhealthy_once = False
            self.calls.append("healthy")
            raise TargetError("healthy: the kept servers are gone")
        super().wait_healthy(instance, timeout)

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        self.spared.append((run_id, sorted(spare)))
        return super().sweep(run_id, targets)


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "kept"
    monkeypatch.setenv(kept_targets.STORE_ENV, str(path))
    alive: set[str] = set()
    monkeypatch.setattr(kept_targets, "owner_alive", lambda owner: owner in alive)
    yield path


def make(tmp_path: Path, driver: FakeDriver, destroy: str = "always",
         run_id: str = "run-1") -> tuple[TargetLifecycle, EventLog]:
    events = EventLog(tmp_path / f"events-{run_id}.jsonl", "gw0")
    return TargetLifecycle(driver, TARGET, run_id, "gw0", tmp_path, events,
                           destroy=destroy), events


def records_of(events: EventLog) -> dict[str, Any]:
    return {e["key"]: e["value"] for e in iter_events(events.path) if e["type"] == "record"}


def errors_of(events: EventLog) -> list[dict[str, Any]]:
    return [e for e in iter_events(events.path) if e["type"] == "error"]


# -- the table, as it runs ----------------------------------------------------------------

def test_the_worker_runs_the_table_around_the_tests() -> None:
    assert [s.name for s in UP_STEPS] == ["attach", "build", "start", "healthy"]
    assert [s.name for s in DOWN_STEPS] == ["logs", "keep", "destroy"]
    assert destroys("always", True) and destroys("passing", False)
    assert not destroys("never", False) and not destroys("passing", True)
    with pytest.raises(ValueError, match="choose one of always, never, passing"):
        destroys("sometimes", False)


@pytest.mark.parametrize(("policy", "failed", "after", "last"), [
    ("always", False, ["destroy"], "done"),
    ("always", True, ["logs", "destroy"], "failed"),
    ("never", False, ["keep"], "kept"),
    ("never", True, ["logs", "keep"], "kept"),
    ("passing", False, ["destroy"], "done"),
    ("passing", True, ["logs", "keep"], "kept"),
])
def test_destroy_policy_decides_the_steps_after_the_tests(
        tmp_path: Path, store: Path, policy: str, failed: bool, after: list[str],
        last: str) -> None:
    driver = KeepableDriver()
    life, events = make(tmp_path, driver, destroy=policy)
    life.bring_up()
    life.tear_down(failed=failed)
    assert life.steps_run == ["build", "start", "healthy", *after]
    assert phases(events)[-1] == last
    kept = [json.loads(p.read_text()) for p in store.glob("*.json")]
    assert len(kept) == (1 if "keep" in after else 0)
    if kept:
        assert kept[0]["state"] == "kept" and kept[0]["failed"] is failed
        assert kept[0]["hash"] == life.kept_hash() and kept[0]["kept_by_run"] == "run-1"
        assert kept[0]["bring_up_s"] >= 0


def test_keep_targets_is_destroy_never(tmp_path: Path) -> None:
    events = EventLog(tmp_path / "events.jsonl", "gw0")
    life = TargetLifecycle(FakeDriver(), TARGET, "run-1", "gw0", tmp_path, events, keep=True)
    assert life.destroy == "never" and life.keep
    with pytest.raises(ValueError):
        TargetLifecycle(FakeDriver(), TARGET, "run-1", "gw0", tmp_path, events,
                        destroy="sometimes")


def test_a_kind_that_cannot_be_taken_over_is_kept_but_not_recorded(tmp_path: Path,
                                                                   store: Path) -> None:
    driver = FakeDriver()  # keepable False
    life, events = make(tmp_path, driver, destroy="never")
    life.bring_up()
    life.tear_down(failed=False)
    assert "destroy" not in driver.calls and not list(store.glob("*.json"))
    assert life.steps_run == ["build", "start", "healthy"]  # nothing to record
    last = [e for e in iter_events(events.path) if e["type"] == "phase"][-1]
    assert last["phase"] == "kept" and "not reusable" in last["detail"]


def test_a_target_that_never_got_healthy_is_kept_for_debugging_only(tmp_path: Path,
                                                                    store: Path) -> None:
    driver = KeepableDriver(fail={"healthy": TargetError("healthy: it fell over")})
    life, _ = make(tmp_path, driver, destroy="passing")
    with pytest.raises(TargetError):
        life.bring_up()
    assert driver.calls == ["build", "start", "healthy", "logs"]
    assert not list(store.glob("*.json"))


def test_an_unusable_store_never_fails_a_target(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv(kept_targets.STORE_ENV, str(blocked))
    driver = KeepableDriver()
    life, events = make(tmp_path, driver, destroy="never")
    life.bring_up()
    life.tear_down(failed=False)
    assert driver.calls == ["build", "start", "healthy"]
    assert not errors_of(events)
    last = [e for e in iter_events(events.path) if e["type"] == "phase"][-1]
    assert last["phase"] == "kept" and "not recorded" in last["detail"]


def test_keep_targets_and_another_destroy_is_a_one_line_usage_error(tmp_path: Path) -> None:
    from test_plugin_e2e import run_harness

    proc, _ = run_harness(tmp_path, "--targets", "local", "--keep-targets", "--destroy=always")
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR
    assert "--keep-targets is --destroy=never, not --destroy=always" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- warm targets ------------------------------------------------------------------------

def keep_one(tmp_path: Path) -> TargetLifecycle:
    first, _ = make(tmp_path, KeepableDriver(), destroy="never", run_id="run-1")
    first.bring_up()
    first.tear_down(failed=False)
    return first


def test_the_next_run_attaches_instead_of_building_and_starting(tmp_path: Path,
                                                                store: Path) -> None:
    keep_one(tmp_path)
    driver = KeepableDriver()
    life, events = make(tmp_path, driver, destroy="always", run_id="run-2")
    instance = life.bring_up()
    assert life.reused and instance.resource_name == "fake-gw0"
    assert driver.calls == ["attach", "healthy"]
    record = json.loads(next(store.glob("*.json")).read_text())
    assert record["state"] == "attached"  # taken over: this run's, not the sweep's
    life.tear_down(failed=False)
    assert life.steps_run == ["attach", "healthy", "destroy"]
    assert not list(store.glob("*.json"))  # destroyed: forgotten
    facts = records_of(events)
    assert facts["reused"] is True
    reuse = facts["reuse"]
    assert reuse["from_run"] == "run-1" and reuse["attach_s"] >= 0
    assert reuse["saved_s"] == pytest.approx(max(0.0, reuse["first_bring_up_s"]
                                                 - reuse["attach_s"]), abs=0.01)
    assert not errors_of(events)


def test_a_reused_target_kept_again_keeps_its_first_bring_up_time(tmp_path: Path,
                                                                  store: Path) -> None:
    first = keep_one(tmp_path)
    spent = round(first.timings["build"] + first.timings["start"], 3)
    life, _ = make(tmp_path, KeepableDriver(), destroy="never", run_id="run-2")
    life.bring_up()
    life.tear_down(failed=False)
    record = json.loads(next(store.glob("*.json")).read_text())
    assert record["state"] == "kept" and record["kept_by_run"] == "run-2"
    assert record["bring_up_s"] == pytest.approx(spent, abs=0.002)


def test_a_kept_target_that_is_gone_is_destroyed_and_built_again(tmp_path: Path,
                                                                 store: Path) -> None:
    keep_one(tmp_path)
    driver = KeepableDriver(gone=True)
    life, events = make(tmp_path, driver, run_id="run-2")
    life.bring_up()
    assert driver.calls == ["attach", "destroy", "build", "start", "healthy"]
    assert not life.reused and not list(store.glob("*.json"))
    assert records_of(events)["reused"] is False
    assert not errors_of(events)  # no failure of the target


def test_a_kept_target_that_is_not_healthy_is_replaced(tmp_path: Path, store: Path) -> None:
    keep_one(tmp_path)
    driver = KeepableDriver(unhealthy_once=True)
    life, events = make(tmp_path, driver, run_id="run-2")
    life.bring_up()
    assert driver.calls == ["attach", "healthy", "destroy", "build", "start", "healthy"]
    assert not life.reused
    assert records_of(events)["reuse"]["why"] == "not healthy"
    assert not errors_of(events)
    life.tear_down(failed=False)
    assert not list(store.glob("*.json"))


def test_two_workers_never_take_over_the_same_target(tmp_path: Path) -> None:
    keep_one(tmp_path)
    digest = kept_targets.target_hash(TARGET, (), {})
    assert kept_targets.claim(TARGET, digest) is not None
    assert kept_targets.claim(TARGET, digest) is None  # attached by the first


def test_a_target_kept_by_a_run_still_going_is_not_taken(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    keep_one(tmp_path)
    monkeypatch.setattr(kept_targets, "owner_alive", lambda owner: True)
    assert kept_targets.claim(TARGET, kept_targets.target_hash(TARGET, (), {})) is None


def test_another_tree_or_recipe_is_not_taken(tmp_path: Path) -> None:
    keep_one(tmp_path)
    other = Target(name=TARGET.name, kind=TARGET.kind, os_family="linux", backends=("poll",))
    assert kept_targets.claim(TARGET, kept_targets.target_hash(TARGET, (), {"box": "b"})) is None
    assert kept_targets.claim(other, kept_targets.target_hash(other, (), {})) is None


# -- the sweep ----------------------------------------------------------------------------

def fake_record(name: str, digest: str, state: str = "kept", run_id: str = "run-0",
                root: Path = kept_targets.REPO) -> kept_targets.KeptRecord:
    record = kept_targets.KeptRecord(
        target=TARGET.name, kind="fake", hash=digest, root=str(root), state=state,
        owner="elsewhere:1:1", resource_name=name, run_id=run_id, echo_ports={}, data={})
    record.write()
    return record


def test_the_sweep_spares_a_kept_target_of_this_tree_and_removes_a_stale_one(
        tmp_path: Path, store: Path) -> None:
    digest = kept_targets.target_hash(TARGET, (), {})
    fake_record("iomux-current", digest)
    fake_record("iomux-other-tree", "0" * 24)
    fake_record("iomux-orphaned-attach", digest, state="attached")
    fake_record("iomux-gone-checkout", "1" * 24, root=tmp_path / "deleted")
    fake_record("iomux-other-checkout", "2" * 24, root=tmp_path)
    driver = KeepableDriver()
    removed = sweep_leftovers({"fake": driver}, None, current={TARGET.name: digest})
    assert removed == {"fake": ["thing-of-any"]}
    assert driver.spared == [(None, ["iomux-current", "iomux-other-checkout"])]
    left = sorted(p.stem for p in store.glob("*.json"))
    assert left == ["iomux-current", "iomux-other-checkout"]


def test_with_another_run_alive_only_dead_runs_lose_their_stale_records(store: Path) -> None:
    fake_record("iomux-dead-run", "0" * 24, run_id="dead")
    fake_record("iomux-finished-run", "0" * 24, run_id="finished")
    driver = KeepableDriver()
    sweep_leftovers({"fake": driver}, ["dead"], current={TARGET.name: "f" * 24})
    assert driver.spared == [("dead", [])]
    assert sorted(p.stem for p in store.glob("*.json")) == ["iomux-finished-run"]


def test_without_hashes_the_sweep_spares_nothing(store: Path) -> None:
    fake_record("iomux-current", kept_targets.target_hash(TARGET, (), {}))
    driver = KeepableDriver()
    sweep_leftovers({"fake": driver}, None)
    assert driver.spared == [(None, [])]


# -- the hash -----------------------------------------------------------------------------

def test_the_hash_follows_the_tree_the_entry_and_the_recipe(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "iomux").mkdir(parents=True)
    (root / "iomux" / "server.py").write_text("print('v1')\n")
    (root / "Dockerfile").write_text("FROM x\n")
    inputs = ("iomux", "Dockerfile", "absent")
    first = kept_targets.target_hash(TARGET, inputs, {}, root)
    (root / "iomux" / "__pycache__").mkdir()
    (root / "iomux" / "__pycache__" / "server.cpython-311.pyc").write_bytes(b"\0")
    (root / "notes.txt").write_text("not an input\n")
    assert kept_targets.target_hash(TARGET, inputs, {}, root) == first
    (root / "iomux" / "server.py").write_text("print('v2')\n")
    second = kept_targets.target_hash(TARGET, inputs, {}, root)
    assert second != first
    assert kept_targets.target_hash(TARGET, inputs, {"box": "other"}, root) != second
    other = Target(name=TARGET.name, kind=TARGET.kind, os_family="linux",
                   backends=("select", "poll"))
    assert kept_targets.target_hash(other, inputs, {}, root) != second
    (root / "iomux" / "server.py").rename(root / "iomux" / "moved.py")
    assert kept_targets.target_hash(TARGET, inputs, {}, root) != second


def test_current_hashes_cover_the_keepable_kinds_only(tmp_path: Path) -> None:
    vm = Target(name="vm", kind="other", os_family="linux", backends=())
    found = kept_targets.current_hashes([TARGET, vm], {"fake": KeepableDriver(),
                                                       "other": FakeDriver()}, tmp_path)
    assert found == {TARGET.name: kept_targets.target_hash(TARGET, (), {}, tmp_path)}


# -- the report ---------------------------------------------------------------------------

def test_the_report_says_reused_and_what_it_saved(tmp_path: Path) -> None:
    from iomux.report import model, text, validate

    entry: dict[str, Any] = {
        "name": "debian-12", "kind": "docker", "status": "passed", "reason": None,
        "os": "linux", "kernel": "6.1", "python": "3.11", "backends": ["select"],
        "suites": {}, "tests": [], "timings": {"build": None, "start": None, "attach": 0.4},
        "reused": True,
        "reuse": {"reused": True, "from_run": "run-1", "attach_s": 0.4,
                  "first_bring_up_s": 20.5, "saved_s": 20.1, "resource": "iomux-x"}}
    failed = {**entry, "name": "debian-vm", "reused": False,
              "reuse": {"reused": False, "from_run": "run-1", "why": "not healthy"}}
    doc = {"run_id": "r", "started": "2026-01-01T00:00:00+00:00", "finished": None,
           "host": {}, "targets": [entry, failed],
           "run": {"destroy": "never", "keep_targets": True}}
    validate(doc)
    assert model.reuse_lines(doc) == [
        "debian-12: reused the target kept by run run-1, attached in 0.4 s, "
        "saved 20.1 s of build and start",
        "debian-vm: the target kept by run run-1 could not be reused (not healthy): "
        "built and started anew"]
    assert "saved 20.1 s" in text.summary_md(doc)
    assert "reused: debian-12 (saved 20.1 s)" in text.summary_table(doc)


# -- the vagrant kind's part, on this machine's libvirt (no VM is booted) ----------------

def test_vagrant_sweep_spares_a_kept_vm_and_attach_wants_it_running(tmp_path: Path) -> None:
    import os
    import shutil
    import subprocess

    from harness.drivers.vagrant import boxes
    from harness.drivers.vagrant import driver as vd

    driver = vd.VagrantDriver()
    if shutil.which("virsh") is None or os.geteuid() != 0:
        pytest.skip("needs libvirt's virsh, as root")
    uri = driver._libvirt_uri()
    if subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, timeout=60,
                      check=False).returncode != 0:
        pytest.skip(f"libvirtd does not answer on {uri}")
    run_id = f"kept-{os.getpid()}"
    tag = f"{run_id}-gw1"
    run_dir = boxes.STATE_ROOT / f"{tag}-debian-vm"
    domain = f"{vd.DOMAIN_PREFIX}{tag}-debian-vm"
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"VAGRANT_DOTFILE_PATH": str(run_dir / "dot-vagrant"), "IOMUX_RUN_ID": tag}
    (run_dir / "owner.json").write_text(json.dumps({
        "io.iomux.project": "iomux", "io.iomux.run": run_id, "worker": "gw1", "tag": tag,
        "machine": "debian-vm", "pid": dead.pid, "env": env}))
    (run_dir / "ssh_config").write_text("Host debian-vm\n  HostName 127.0.0.1\n")
    xml = run_dir / "domain.xml"
    xml.write_text(f"<domain type='qemu'><name>{domain}</name><memory unit='MiB'>64</memory>"
                   "<os><type arch='x86_64'>hvm</type></os></domain>")
    try:
        subprocess.run(["virsh", "-c", uri, "define", str(xml)], check=True,
                       capture_output=True, timeout=60)
        assert driver.sweep(run_id, spare={domain}) == []
        assert domain in driver._domains() and run_dir.is_dir()
        target = Target(name="debian-vm", kind="vagrant", os_family="linux", backends=())
        kept = Instance(target=target, run_id=run_id, resource_name=domain, data={
            "dir": str(run_dir), "env": env, "machine": "debian-vm",
            "ssh_config": str(run_dir / "ssh_config")})
        assert driver.attach(kept, 30) is None  # defined, not running
        assert driver.kept_recipe(target) == {"box": driver.box_for(target)}
    finally:
        subprocess.run(["virsh", "-c", uri, "undefine", domain], capture_output=True,
                       timeout=60, check=False)
        shutil.rmtree(run_dir, ignore_errors=True)
