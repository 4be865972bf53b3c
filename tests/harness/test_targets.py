"""targets.toml loading and the --targets selection (harness/targets.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import targets
from harness.targets import TargetsError, load, parse_selection, select_targets

REPO = Path(__file__).resolve().parents[2]

GOOD = """
[[target]]
name = "here"
kind = "local"
os_family = "host"
backends = "host"

[[target]]
name = "box"
kind = "docker"
image = "debian:bookworm"
os_family = "linux"
backends = ["select", "epoll"]
[target.offline]
suite = "bookworm"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "targets.toml"
    path.write_text(text)
    return path


def test_the_repository_file_loads() -> None:
    declared = load()
    names = [t.name for t in declared]
    assert {"local", "debian-12", "debian-13", "alpine", "debian-vm", "freebsd-14"} <= set(names)
    by_name = {t.name: t for t in declared}
    assert by_name["local"].os_family == targets.host_os_family()
    assert by_name["local"].backends == targets.host_backends()
    assert by_name["freebsd-14"].kind == "vagrant"
    assert "kqueue" in by_name["freebsd-14"].backends
    assert by_name["debian-12"].options["offline"]["suite"] == "bookworm"


def test_extra_keys_become_options(tmp_path: Path) -> None:
    box = load(write(tmp_path, GOOD))[1]
    assert box.image == "debian:bookworm"
    assert box.backends == ("select", "epoll")
    assert box.options == {"offline": {"suite": "bookworm"}}


def test_selection_keeps_the_order_asked_for(tmp_path: Path) -> None:
    declared = load(write(tmp_path, GOOD))
    assert [t.name for t in select_targets(declared, ["box", "here", "box"])] == ["box", "here"]
    assert [t.name for t in select_targets(declared, None)] == ["here", "box"]
    assert parse_selection(" here , box,") == ["here", "box"]
    assert parse_selection("  ") is None


def test_unknown_target_lists_the_known_ones(tmp_path: Path) -> None:
    declared = load(write(tmp_path, GOOD))
    with pytest.raises(TargetsError) as info:
        select_targets(declared, ["here", "nope"])
    assert str(info.value) == "unknown target(s) nope; known targets: here, box"
    with pytest.raises(TargetsError, match="selects nothing"):
        select_targets(declared, parse_selection(",") or [])


@pytest.mark.parametrize(("text", "message"), [
    ("[[target]\n", "not valid TOML"),
    ("", "declares no [[target]]"),
    ("[other]\nx = 1\n", "unknown top-level key(s) other"),
    (GOOD.replace('kind = "docker"', 'kind = "podman"'),
     "unknown kind 'podman'; known kinds: local, docker, vagrant"),
    (GOOD.replace('image = "debian:bookworm"\n', ""), "a docker target needs 'image'"),
    (GOOD.replace('"epoll"]', '"iouring"]'), "unknown backend(s) iouring"),
    (GOOD.replace('name = "box"', 'name = "here"'), "'here' is declared twice"),
    (GOOD.replace('name = "box"', 'name = "Box; rm -rf /"'), "must match"),
    (GOOD.replace('backends = ["select", "epoll"]', "backends = []"), "'backends' must be"),
    (GOOD.replace('kind = "local"', 'kind = "local"\nweight = 0'), "'weight' must be a positive"),
    (GOOD.replace('kind = "local"', 'kind = "local"\nweight = "heavy"'), "'weight' must be"),
])
def test_bad_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TargetsError) as info:
        load(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TargetsError, match="no such file"):
        load(tmp_path / "absent.toml")


def test_count_helper() -> None:
    ok = subprocess.run([sys.executable, "-m", "harness.targets", "--count", "--targets",
                         "local,debian-12"], cwd=REPO, capture_output=True, text=True,
                        check=False)
    assert (ok.returncode, ok.stdout.strip()) == (0, "2")
    bad = subprocess.run([sys.executable, "-m", "harness.targets", "--targets", "nope"],
                         cwd=REPO, capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "known targets: local" in bad.stderr


def test_workers_are_capped_at_the_cores_and_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMUX_WORKERS", raising=False)
    assert targets.workers(11, cpus=2) == 3
    assert targets.workers(2, cpus=2) == 2
    assert targets.workers(0, cpus=2) == 1
    assert targets.workers(11, cpus=1) == 2
    assert targets.workers(11, cpus=16) == 11
    assert targets.workers(11, cpus=4) == 5
    monkeypatch.setenv("IOMUX_WORKERS", "2")
    assert targets.workers(11, cpus=64) == 2
    monkeypatch.setenv("IOMUX_WORKERS", "many")
    with pytest.raises(TargetsError, match="IOMUX_WORKERS='many': not a whole number"):
        targets.workers(3)
    monkeypatch.setenv("IOMUX_WORKERS", "0")
    with pytest.raises(TargetsError, match="must be 1 or more"):
        targets.workers(3)


def test_workers_helper_for_the_makefile() -> None:
    env = {"PATH": "/usr/bin:/bin", "IOMUX_WORKERS": "3"}
    ok = subprocess.run([sys.executable, "-m", "harness.targets", "--workers"], cwd=REPO,
                        capture_output=True, text=True, check=False, env=env)
    assert (ok.returncode, ok.stdout.strip()) == (0, "3")
    bad = subprocess.run([sys.executable, "-m", "harness.targets", "--workers"], cwd=REPO,
                         capture_output=True, text=True, check=False,
                         env={**env, "IOMUX_WORKERS": "x"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr


def test_the_heaviest_waiting_target_starts_next(tmp_path: Path) -> None:
    from harness.scheduling import heaviest_first
    declared = {t.name: targets.weight(t) for t in load()}
    assert declared["local"] == 1.0 and declared["debian-vm"] > declared["debian-12"]
    # The emulated VM is the run's critical path: the heaviest, so that it is the
    # one target that keeps its CPU priority (scheduling.in_background).
    assert declared["debian-vm"] == max(declared.values()), declared
    waiting = ["local", "debian-12", "debian-vm", "uml-6-1"]
    assert heaviest_first(waiting, declared) == max(waiting, key=declared.__getitem__)
    assert heaviest_first(["a", "b", "c"], {"b": 2.0, "c": 2.0}) == "b"  # ties: file order
    assert heaviest_first(["a", "b"], {}) == "a"


def test_a_test_id_names_its_target() -> None:
    from harness.scheduling import target_of_nodeid
    names = ["local", "debian-12", "debian-13", "debian-vm"]
    assert target_of_nodeid("t.py::test_x[debian-12-epoll-et]", names) == "debian-12"
    assert target_of_nodeid("t.py::test_x[debian-vm]", names) == "debian-vm"
    assert target_of_nodeid("t.py::test_x[local-select]@local", names) == "local"
    assert target_of_nodeid("t.py::test_x[claim-a-local]", names) == "local"
    assert target_of_nodeid("t.py::test_plain", names) is None
    assert target_of_nodeid("t.py::test_x[debian-1]", names) is None


def test_driver_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness import drivers
    assert drivers.get_driver("local").kind == "local"
    with pytest.raises(drivers.UnknownKind) as info:
        drivers.get_driver("podman")
    known = ", ".join(drivers.KINDS)
    assert str(info.value) == f"unknown target kind 'podman'; known kinds: {known}"
    assert {"local", "docker", "vagrant", "gvisor", "uml"} <= set(drivers.KINDS)
    monkeypatch.setitem(drivers.KINDS, "ghost", "harness.drivers.no_such_module")
    with pytest.raises(drivers.DriverUnavailable, match=r"^driver not available: "):
        drivers.get_driver("ghost")
    monkeypatch.setitem(drivers.KINDS, "ghost", "harness.drivers.base")  # no Driver of that kind
    with pytest.raises(drivers.DriverUnavailable, match="defines no Driver"):
        drivers.get_driver("ghost")


# -- the keys each kind takes (Driver.validate) ----------------------------------------

def test_every_target_of_the_repository_file_passes_its_kinds_validate() -> None:
    from harness.drivers import driver_class
    for declared in load():
        driver_class(declared.kind).validate(declared)


def test_a_misspelt_table_is_one_line_naming_the_target_key_and_allowed_ones(
        tmp_path: Path) -> None:
    with pytest.raises(TargetsError) as info:
        load(write(tmp_path, GOOD.replace("[target.offline]", "[target.ofline]")))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("targets.toml: target 'box': unknown key 'ofline' "
                              "(did you mean 'offline'?); a docker target takes: "), message
    allowed = message.split("takes: ", 1)[1].split(", ")
    assert {"offline", "docker_host", "image", "weight", "timeouts"} <= set(allowed)
    assert allowed == sorted(allowed)


@pytest.mark.parametrize(("kind", "table", "misspelt", "meant"), [
    ("docker", "offline", "suit", "suite"),
    ("vagrant", "freebsd", "checksum", "checksum_file"),
    ("gvisor", "kernel_build", "versoin", "version"),
    ("uml", "kernel_build", "packages", "package"),
    ("local", "timeouts", "star", "start"),
])
def test_a_misspelt_key_inside_a_table_is_one_line(tmp_path: Path, kind: str, table: str,
                                                   misspelt: str, meant: str) -> None:
    from harness.drivers import driver_class
    from harness.drivers.base import COMMON_TABLES
    takes = {**COMMON_TABLES, **driver_class(kind).option_tables}[table]
    required = {"docker": 'image = "i"\n', "vagrant": 'box = "b"\n'}.get(kind, "")
    build = ('[target.kernel_build]\npackage = "runsc"\nversion = "1"\nsuite = "bookworm"\n'
             if kind in ("gvisor", "uml") and table != "kernel_build" else "")
    text = (f'[[target]]\nname = "t"\nkind = "{kind}"\nos_family = "linux"\n'
            f'backends = ["select"]\n{required}{build}[target.{table}]\n{misspelt} = "x"\n')
    if kind in ("gvisor", "uml"):
        text = text.replace(f'{misspelt} = "x"', f'package = "runsc"\n{misspelt} = "x"')
    with pytest.raises(TargetsError) as info:
        load(write(tmp_path, text))
    assert str(info.value) == (
        f"targets.toml: target 't': [target.{table}] has unknown key {misspelt!r} "
        f"(did you mean {meant!r}?); it takes: {', '.join(sorted(takes))}")


def test_a_table_given_as_a_value_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TargetsError) as info:
        load(write(tmp_path, GOOD.replace("[target.offline]\nsuite = \"bookworm\"",
                                          'offline = "bookworm"')))
    assert str(info.value) == ("targets.toml: target 'box': 'offline' is a table "
                               "([target.offline]) of include, method, mirror, suite, variant")


def test_the_step_names_a_timeouts_table_takes_are_the_lifecycles() -> None:
    from harness import lifecycle
    from harness.drivers import KINDS, driver_class
    from harness.drivers.base import STEP_NAMES
    assert {step.name for step in lifecycle.SEQUENCE} == STEP_NAMES
    for kind in KINDS:
        assert set(driver_class(kind).step_timeouts) <= STEP_NAMES, kind


def test_an_unknown_key_of_another_kind_is_refused(tmp_path: Path) -> None:
    # A box is a vagrant key: on a local target it would be silently ignored.
    with pytest.raises(TargetsError) as info:
        load(write(tmp_path, GOOD.replace('kind = "local"', 'kind = "local"\nbox = "x"\nzzz = 1')))
    message = str(info.value)
    assert "target 'here': unknown keys 'box', 'zzz'; a local target takes: " in message
    assert "did you mean" not in message and "\n" not in message


@pytest.mark.parametrize(("kind", "extra", "needs"), [
    ("docker", "", "'image'"),
    ("vagrant", "", "'box'"),
    ("gvisor", "", "'kernel_build'"),
    ("uml", 'mem = "512M"\n', "'kernel_build'"),
])
def test_a_missing_required_key_is_one_line(tmp_path: Path, kind: str, extra: str,
                                            needs: str) -> None:
    text = (f'[[target]]\nname = "t"\nkind = "{kind}"\nos_family = "linux"\n'
            f'backends = ["select"]\n{extra}')
    with pytest.raises(TargetsError) as info:
        load(write(tmp_path, text))
    assert str(info.value) == f"targets.toml: target 't': a {kind} target needs {needs}"


def test_each_kind_takes_the_keys_its_driver_reads() -> None:
    from harness.drivers import driver_class
    from harness.drivers.base import COMMON_KEYS, Target, TargetError
    takes = {"docker": {"offline", "docker_host", "docker_context"}, "vagrant": {"freebsd", "test_scale"},
             "gvisor": {"userland", "test_scale", "runsc_flags"},
             "uml": {"userland", "test_scale", "mem"}, "local": set()}
    for kind, keys in takes.items():
        cls = driver_class(kind)
        assert cls.options_allowed == keys, kind
        other = {"runsc_flags", "mem", "offline", "freebsd"} - keys
        for key in other:
            target = Target(name="t", kind=kind, os_family="linux", backends=("select",),
                            image="i", box="b", options={"kernel_build": {}, key: 1})
            with pytest.raises(TargetError, match=f"unknown key.* '{key}'"):
                cls.validate(target)
    assert {"weight", "timeouts", "kernel", "description"} <= COMMON_KEYS


def test_the_helper_and_the_plugin_show_a_misspelt_table_as_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("[target.offline]", "[target.ofline]"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    helper = subprocess.run([sys.executable, "-m", "harness.targets", "--list", "--file",
                             str(path)], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=60, check=False)
    assert helper.returncode == 2 and helper.stdout == ""
    assert helper.stderr.count("\n") == 1, helper.stderr
    assert "unknown key 'ofline' (did you mean 'offline'?)" in helper.stderr
    plugin = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p", "no:cacheprovider",
         "tests/cross_os", "--targets-file", str(path),
         "--reports-dir", str(tmp_path / "reports")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert plugin.returncode == pytest.ExitCode.USAGE_ERROR, plugin.stdout + plugin.stderr
    assert "Traceback" not in plugin.stderr + plugin.stdout
    errors = [line for line in plugin.stderr.splitlines() if "'ofline'" in line]
    assert len(errors) == 1, plugin.stderr


def test_every_unavailable_error_is_one_target_unavailable() -> None:
    from harness import drivers
    from harness.drivers.base import TargetError, TargetUnavailable
    from harness.results import is_unavailable as _is_unavailable
    assert issubclass(drivers.DriverUnavailable, TargetUnavailable)
    assert issubclass(TargetUnavailable, TargetError)
    assert _is_unavailable(TargetUnavailable("no image: x"))
    assert _is_unavailable(drivers.DriverUnavailable("driver not available: x"))
    assert not _is_unavailable(TargetError("start: broken"))


# -- which targets can run here (make targets, and the run's not-run list) ------------

def test_a_hung_engine_check_is_a_reason_in_make_targets_and_in_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from harness import drivers, runs
    from harness.drivers import base

    release = threading.Event()
    calls: list[str] = []

    class Hung:
        kind = "local"

        def unavailable_reason(self) -> str | None:
            calls.append("engine")
            release.wait(30)  # a wedged daemon's socket
            return None

        def target_unavailable_reason(self, target: base.Target) -> str | None:
            return None

    monkeypatch.setattr(drivers, "get_driver", lambda kind: Hung())
    monkeypatch.setattr(targets, "ENGINE_CHECK_S", 0.2)
    monkeypatch.setattr(base, "GRACE", 0.1)
    declared = load(write(tmp_path, GOOD))
    try:
        shown = targets.availability(declared)
        noted = runs.check_engines(declared, tmp_path)
    finally:
        release.set()
    # One engine check per kind (local, docker) and call, each cut off by the watchdog.
    assert calls == ["engine"] * 4
    for lines in (shown, noted):
        assert set(lines) == {"here", "box"}
        for name, kind in (("here", "local"), ("box", "docker")):
            line = lines[name]
            assert line is not None and "\n" not in line
            assert line.startswith(f"{kind} engine check failed: StepTimeout"), line


def test_only_a_target_lighter_than_the_heaviest_yields_the_cpu() -> None:
    from harness.scheduling import in_background
    weights = {"local": 1.0, "gvisor-2024": 1.5, "debian-vm": 2.6}
    assert [n for n in weights if in_background(n, weights, at_once=3)] == [
        "local", "gvisor-2024"]
    # Ties for the heaviest: both are the critical path.
    assert not in_background("a", {"a": 2.0, "b": 2.0, "c": 1.0}, at_once=2)
    assert in_background("c", {"a": 2.0, "b": 2.0, "c": 1.0}, at_once=2)
    # One target at a time, a single target, or the "equal" policy: nothing yields.
    assert not in_background("local", weights, at_once=1)
    assert not in_background("local", {"local": 1.0}, at_once=3)
    assert not in_background("local", weights, at_once=3, policy="equal")


def test_the_cpu_priority_policy_comes_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.scheduling import cpu_priority_policy
    monkeypatch.delenv("IOMUX_CPU_PRIORITY", raising=False)
    assert cpu_priority_policy() == "critical-path"
    monkeypatch.setenv("IOMUX_CPU_PRIORITY", "equal")
    assert cpu_priority_policy() == "equal"
    monkeypatch.setenv("IOMUX_CPU_PRIORITY", "high")
    with pytest.raises(ValueError, match=r"^IOMUX_CPU_PRIORITY='high': use one of "
                                         r"critical-path, equal$"):
        cpu_priority_policy()


def test_set_nice_is_inherited_and_says_where_it_ended() -> None:
    # In a child: a nice value cannot be taken back without privilege.
    code = ("import os, subprocess, sys; from harness.scheduling import set_nice; "
            "print(set_nice(10)); sys.stdout.flush(); "
            "subprocess.run(['sh', '-c', 'cut -d\" \" -f19 /proc/self/stat'], check=True); "
            "print(set_nice(0))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    start = os.getpriority(os.PRIO_PROCESS, 0)
    assert out[:2] == [str(max(start, 10))] * 2  # set, and what a child started with
    # Back to 0 with privilege (root here); without, it stays where it was.
    assert out[2] == ("0" if os.geteuid() == 0 else str(max(start, 10)))
