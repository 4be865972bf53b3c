"""The uml driver against the real linux.uml builds (targets.toml's uml-6-1,
uml-6-12): the cases every kernel driver passes (kernel_driver_cases.py: build,
the agent's exec channel, lock-down, servers, copy_from, destroy, sweep, a missing
binary), and UML's own: the kernel really is that version on one vCPU, the agent
is in the tree, and a failed boot leaves no process.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kernel_driver_cases import KernelDriverCases, targets_on_one_worker

from harness.drivers import kernel_builds, kernels
from harness.drivers.base import Instance, StepTimeout, Target, TargetError
from harness.drivers.uml import ENV_MARK, UMLDriver, fpu_refusal, fpu_refused_reason, host_cpu
from harness.targets import load

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target_name", targets_on_one_worker("uml-6-1", "uml-6-12"),
                         scope="class")
class TestUMLDriver(KernelDriverCases):
    driver: ClassVar[kernels.KernelDriver] = UMLDriver()
    missing_version: ClassVar[str] = "5.0um1"
    no_process: ClassVar[str] = "no linux.uml process found for a booted guest"

    def guest_pids(self, instance: Instance) -> list[int]:
        return kernels.marked_pids(f"{ENV_MARK}={instance.resource_name}")

    def check_build(self, target: Target, built: dict[str, Any]) -> None:
        assert Path(built["rootfs"], "opt/iomux/uml_agent.py").is_file()

    def test_kernel_is_that_version_on_one_vcpu(self, target: Target,
                                                instance: Instance) -> None:
        release = self.driver.exec(instance, ["uname", "-r"], 30).stdout.strip()
        # "6.1um4+b13" boots 6.1.x; "6.12um1+b22" boots 6.12.x; the host runs neither.
        series = target.options["kernel_build"]["version"].split("um")[0]
        assert release.startswith(series + "."), release
        assert release == instance.data["release"]
        assert self.driver.exec(instance, ["nproc"], 30).stdout.strip() == "1"
        assert self.driver.exec(instance, ["cat", "/etc/debian_version"],
                                30).stdout.startswith("12.")

    def test_guest_runs_on_one_host_cpu(self, instance: Instance) -> None:
        # Every process of the guest (the UML kernel's and each guest process's host
        # process), as the kernel reports it, is on the one CPU the driver chose.
        self.driver.exec(instance, ["true"], 30)
        pids = self.guest_pids(instance)
        assert len(pids) >= 2, pids
        allowed = {pid: Path(f"/proc/{pid}/status").read_text().split("Cpus_allowed_list:")[1]
                   .split()[0] for pid in pids}
        assert set(allowed.values()) == {str(instance.data["host_cpu"])}, allowed

    def test_failed_boot_leaves_no_process(self, target: Target,
                                           built: dict[str, Any]) -> None:
        # Too little memory for the kernel: it panics during boot, the agent never answers.
        broken = dataclasses.replace(target, options={**target.options, "mem": "2M"})
        run_id = f"test-{uuid.uuid4().hex[:8]}"
        name = f"iomux-{run_id}-t2-{target.name}"
        with pytest.raises((TargetError, StepTimeout), match="UML did not boot"):
            self.driver.start(broken, run_id, "t2", timeout=60)
        assert kernels.marked_pids(f"{ENV_MARK}={name}") == []
        assert not (kernels.STATE_BASE / "uml" / name).exists()


def test_host_cpu_spreads_the_workers_over_the_allowed_cpus() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert host_cpu("gw0") == host_cpu("main") == allowed[0]
    assert [host_cpu(f"gw{i}") for i in range(2 * len(allowed))] == allowed * 2


def test_fpu_refused_reason_reads_the_console_line() -> None:
    binary = kernel_builds.KernelBinary("user-mode-linux", "6.1um4+b13", "bookworm")
    refused = ("Run /bin/true as init process\n"
               "userspace - ptrace set fp regs failed, errno = 14\n"
               "Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n")
    reason = fpu_refused_reason(binary, refused)
    assert reason is not None and reason.startswith(
        "user-mode-linux 6.1um4+b13 cannot run on this CPU")
    assert reason.endswith("(needs a CPU without AVX-512/PKU/AMX)")
    booted = "Run /bin/true as init process\nKernel panic - not syncing: Attempted to kill init!"
    assert fpu_refused_reason(binary, booted) is None


@pytest.mark.parametrize("target_name", ["uml-6-1", "uml-6-12"])
def test_fpu_probe_agrees_with_a_real_boot(target_name: str) -> None:
    """The probe that makes a target "not run" on this CPU says what a real boot
    of that target does: no refusal and the agent answers, or the refusal and a
    start that fails with the same reason."""
    target = next(t for t in load() if t.name == target_name)
    binary = kernel_builds.kernel_binary(target)
    missing = binary.missing_reason()
    if missing:
        pytest.skip(f"not run: {missing}")
    driver = UMLDriver()
    refused = fpu_refusal(binary)
    built = driver.build(target, timeout=1800)
    assert Path(built["rootfs"], "opt/iomux/uml_agent.py").is_file()
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    name = f"iomux-{run_id}-t3-{target.name}"
    if refused is None:
        instance = driver.start(target, run_id, "t3", timeout=120)
        try:
            assert driver.exec(instance, ["true"], 30).rc == 0
        finally:
            driver.destroy(instance, 60)
    else:
        with pytest.raises(TargetError, match="cannot run on this CPU") as failed:
            driver.start(target, run_id, "t3", timeout=120)
        assert refused in str(failed.value)
    assert kernels.marked_pids(f"{ENV_MARK}={name}") == []
