"""The uml driver against the real linux.uml builds (targets.toml's uml-6-1,
uml-6-12): build, boot, the agent's exec channel, the kernel really is that
version on one vCPU, the report's facts, a missing binary, destroy and a failed
boot leaving no process, sweep.

A target whose kernel or userland cannot be had here is skipped with the reason
(scripts/fetch-kernels.sh install fetches the binaries).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness.drivers import kernels
from harness.drivers.base import Instance, StepTimeout, Target, TargetError
from harness.drivers.uml import ENV_MARK, UMLDriver
from harness.targets import load

pytestmark = pytest.mark.slow
NAMES = ["uml-6-1", "uml-6-12"]
HOSTILE = ["; rm -rf /", "'single'", '"double"', "$(id)", "`id`", "a b", "*", "\\", "-x"]
_DRIVER = UMLDriver()


def _target(name: str) -> Target:
    return next(t for t in load() if t.name == name)


def _guest_pids(instance: Instance) -> list[int]:
    return kernels.marked_pids(f"{ENV_MARK}={instance.resource_name}")


@pytest.fixture(scope="module", params=NAMES)
def target(request: pytest.FixtureRequest) -> Target:
    target = _target(str(request.param))
    reason = _DRIVER.unavailable_reason() or _DRIVER.target_unavailable_reason(target)
    if reason:
        pytest.skip(f"not run: {reason}")
    return target


@pytest.fixture(scope="module")
def built(target: Target) -> dict[str, Any]:
    return _DRIVER.build(target, timeout=1800)


@pytest.fixture(scope="module")
def instance(target: Target, built: dict[str, Any]) -> Iterator[Instance]:
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    inst = _DRIVER.start(target, run_id, "t0", timeout=120)
    try:
        _DRIVER.wait_healthy(inst, timeout=120)
        yield inst
    finally:
        _DRIVER.destroy(inst, timeout=60)
        _DRIVER.sweep(run_id)


def test_build_records_version_and_sha256_of_the_kernel_that_runs(
        target: Target, built: dict[str, Any]) -> None:
    facts = built["kernel_build"]
    binary = kernels.kernel_binary(target)
    assert facts["version"] == target.options["kernel_build"]["version"]
    assert facts["sha256"] == kernels.sha256_of.__wrapped__(str(binary.path))
    assert Path(built["rootfs"], "opt/iomux/uml_agent.py").is_file()


def test_kernel_is_that_version_on_one_vcpu(target: Target, instance: Instance) -> None:
    release = _DRIVER.exec(instance, ["uname", "-r"], 30).stdout.strip()
    # "6.1um4+b13" boots 6.1.x; "6.12um1+b22" boots 6.12.x; the host runs neither.
    series = target.options["kernel_build"]["version"].split("um")[0]
    assert release.startswith(series + "."), release
    assert release == instance.data["release"]
    assert _DRIVER.exec(instance, ["nproc"], 30).stdout.strip() == "1"
    assert _DRIVER.exec(instance, ["cat", "/etc/debian_version"], 30).stdout.startswith("12.")


def test_exec_passes_argv_as_data_and_keeps_rc_and_streams(instance: Instance) -> None:
    echoed = _DRIVER.exec(instance, ["printf", "%s\\n", *HOSTILE], 30)
    assert echoed.rc == 0
    assert echoed.stdout.splitlines() == HOSTILE
    failed = _DRIVER.exec(instance, ["sh", "-c", "echo out; echo err >&2; exit 7"], 30)
    assert (failed.rc, failed.stdout, failed.stderr) == (7, "out\n", "err\n")


def test_exec_timeout_raises_step_timeout(instance: Instance) -> None:
    with pytest.raises(StepTimeout, match="timed out after 1s"):
        _DRIVER.exec(instance, ["sleep", "30"], 1)
    left = _DRIVER.exec(instance, ["sh", "-c", "ps -eo args | grep -c '^sleep 30' || true"], 30)
    assert left.stdout.strip() == "0"


def test_guest_runs_commands_unprivileged_on_a_read_only_root(instance: Instance) -> None:
    ids = _DRIVER.exec(instance, ["id", "-u"], 30)
    assert ids.stdout.strip() == "10001"
    write = _DRIVER.exec(instance, ["touch", "/opt/iomux/x"], 30)
    assert write.rc != 0, "the root filesystem is writable"
    caps = _DRIVER.exec(instance, ["grep", "^CapEff", "/proc/self/status"], 30)
    assert caps.stdout.split()[1].strip("0") == ""


def test_servers_answer_inside_and_copy_from(instance: Instance, tmp_path: Path) -> None:
    assert set(instance.data["guest_ports"]) == set(instance.data["backends"])
    made = _DRIVER.exec(instance, ["sh", "-c", "head -c 3000 /dev/urandom > /tmp/blob"], 30)
    assert made.rc == 0
    inside = _DRIVER.exec(instance, ["sha256sum", "/tmp/blob"], 30).stdout.split()[0]
    copied = _DRIVER.copy_from(instance, "/tmp/blob", tmp_path / "blob", 30)
    assert kernels.sha256_of.__wrapped__(str(copied)) == inside
    with pytest.raises(TargetError):
        _DRIVER.copy_from(instance, "/tmp/absent", tmp_path / "absent", 30)


def test_destroy_leaves_no_process_and_is_safe_twice(target: Target,
                                                     built: dict[str, Any]) -> None:
    inst = _DRIVER.start(target, f"test-{uuid.uuid4().hex[:8]}", "t1", timeout=120)
    assert _guest_pids(inst), "no linux.uml process found for a booted guest"
    _DRIVER.destroy(inst, timeout=60)
    assert _guest_pids(inst) == []
    assert not Path(inst.data["home"]).exists()
    _DRIVER.destroy(inst, timeout=60)


def test_failed_boot_leaves_no_process(target: Target, built: dict[str, Any]) -> None:
    # Too little memory for the kernel: it panics during boot, the agent never answers.
    broken = dataclasses.replace(target, options={**target.options, "mem": "2M"})
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    name = f"iomux-{run_id}-t2-{target.name}"
    with pytest.raises((TargetError, StepTimeout), match="UML did not boot"):
        _DRIVER.start(broken, run_id, "t2", timeout=60)
    assert kernels.marked_pids(f"{ENV_MARK}={name}") == []
    assert not (kernels.STATE_BASE / "uml" / name).exists()


def test_sweep_removes_a_dead_runs_guest(target: Target, built: dict[str, Any]) -> None:
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    inst = _DRIVER.start(target, run_id, "t3", timeout=120)
    try:
        removed = _DRIVER.sweep(run_id)
        assert len(removed) == 1 and inst.resource_name in removed[0]
        assert _guest_pids(inst) == []
    finally:
        _DRIVER.destroy(inst, timeout=60)


def test_missing_binary_is_one_line_with_the_fix(target: Target) -> None:
    options = {**target.options, "kernel_build": {**target.options["kernel_build"],
                                                  "version": "5.0um1"}}
    reason = _DRIVER.target_unavailable_reason(dataclasses.replace(target, options=options))
    assert reason is not None
    assert "5.0um1" in reason and "scripts/fetch-kernels.sh install" in reason
    assert len(f"not run: {reason}") <= 100 and "\n" not in reason
