"""The uml driver against the real linux.uml builds (targets.toml's uml-6-1,
uml-6-12): the cases every kernel driver passes (kernel_driver_cases.py: build,
the agent's exec channel, lock-down, servers, copy_from, destroy, sweep, a missing
binary), and UML's own: the kernel really is that version on one vCPU, the agent
is in the tree, and a failed boot leaves no process.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kernel_driver_cases import KernelDriverCases

from harness.drivers import kernels
from harness.drivers.base import Instance, StepTimeout, Target, TargetError
from harness.drivers.uml import ENV_MARK, UMLDriver

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target_name", ["uml-6-1", "uml-6-12"], scope="class")
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
