"""The gvisor driver against the real runsc builds (targets.toml's gvisor-2022,
gvisor-2024): the cases every kernel driver passes (kernel_driver_cases.py: build,
exec, lock-down, servers, copy_from, destroy, sweep, a missing binary), and
gVisor's own: its kernel really is gVisor's, runsc reports its version, and a
failed start leaves no process.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from kernel_driver_cases import KernelDriverCases, targets_on_one_worker

from harness.drivers import kernels
from harness.drivers.base import Instance, Target, TargetError
from harness.drivers.gvisor import GVisorDriver, runsc_platform, sandbox_cgroups

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("target_name", targets_on_one_worker("gvisor-2022", "gvisor-2024"),
                         scope="class")
class TestGVisorDriver(KernelDriverCases):
    driver: ClassVar[kernels.KernelDriver] = GVisorDriver()
    missing_version: ClassVar[str] = "0.0~19990101.0-1"
    no_process: ClassVar[str] = "no runsc process found for a started sandbox"

    def guest_pids(self, instance: Instance) -> list[int]:
        return kernels.marked_pids(f"--root={instance.data['state_dir']}")

    def host_leftovers(self, instance: Instance) -> list[str]:
        return [str(p) for p in sandbox_cgroups(instance.resource_name)]

    def test_a_running_sandbox_has_cgroups_named_after_it(self, instance: Instance) -> None:
        # What the sweep and destroy cases check is gone: it is there while it runs.
        assert sandbox_cgroups(instance.resource_name), "runsc made no cgroup for the sandbox"

    def test_a_background_sandbox_gets_its_lower_cpu_weight(self, bootable: Target,
                                                            built: dict[str, Any]) -> None:
        # harness.scheduling: off the critical path, the sandbox's own cgroup gets the
        # lower weight, since the worker's nice value does not reach into it.
        driver = self.driver
        driver.cpu_shares = 110
        try:
            inst = driver.start(bootable, f"test-{uuid.uuid4().hex[:8]}", "t4", timeout=120)
        finally:
            driver.cpu_shares = None
        try:
            cgroups = sandbox_cgroups(inst.resource_name)
            shares = [(p / "cpu.shares").read_text().strip() for p in cgroups
                      if (p / "cpu.shares").exists()]
            weights = [int((p / "cpu.weight").read_text()) for p in cgroups
                       if (p / "cpu.weight").exists()]
            # cgroup v1: cpu.shares as given; v2: cpu.weight, converted from it, is
            # below the default 100.
            assert shares == ["110"] or (weights and max(weights) < 100), (cgroups, shares,
                                                                           weights)
        finally:
            driver.destroy(inst, timeout=60)

    def check_build(self, target: Target, built: dict[str, Any]) -> None:
        # runsc reports its own version: the upstream date of the Debian version.
        facts = built["kernel_build"]
        assert facts["reports"][0].split()[-1] in facts["version"]
        assert Path(built["rootfs"], "opt/iomux/venv/bin/python").exists()

    def test_kernel_is_gvisors_and_the_userland_is_debian_12(self, instance: Instance) -> None:
        release = self.driver.exec(instance, ["uname", "-r"], 30)
        # gVisor reports a fixed, fake Linux release; the host runs a real one.
        assert release.stdout.strip() == "4.4.0"
        dmesg = self.driver.exec(instance, ["cat", "/etc/debian_version"], 30)
        assert dmesg.stdout.startswith("12.")
        # The sandbox cannot tell which platform runs it; the claims take it from here.
        assert instance.guest.kernel_platform == {"gvisor-2022": "ptrace",
                                                  "gvisor-2024": "systrap"}[instance.target.name]

    def test_failed_start_leaves_no_process(self, target: Target,
                                            built: dict[str, Any]) -> None:
        broken = dataclasses.replace(target, options={**target.options,
                                                      "runsc_flags": ["--platform=no-such"]})
        run_id = f"test-{uuid.uuid4().hex[:8]}"
        home = kernels.STATE_BASE / "gvisor" / f"iomux-{run_id}-t2-{target.name}"
        with pytest.raises(TargetError, match="runsc run exited"):
            self.driver.start(broken, run_id, "t2", timeout=60)
        assert kernels.marked_pids(f"--root={home / 'state'}") == []
        assert not home.exists()


def test_runsc_platform_is_read_from_its_flags() -> None:
    assert runsc_platform(["--platform=systrap", "--overlay2=none"]) == "systrap"
    assert runsc_platform(["--debug", "--platform", "ptrace"]) == "ptrace"
    assert runsc_platform(["--overlay2=none"]) is None
    assert runsc_platform(["--platform="]) is None


def test_sandbox_cgroups_are_looked_for_in_every_cgroup_hierarchy(tmp_path: Path) -> None:
    # A v1 controller, the v1 named hierarchy, cgroup2, and a tmpfs that is not a cgroup.
    for mount in ("cpu", "systemd", "unified", "tmp"):
        (tmp_path / mount / "iomux-r-w-gvisor-2024").mkdir(parents=True)
    (tmp_path / "pids").mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"31 23 0:28 / {tmp_path} rw,relatime - tmpfs tmpfs rw,mode=755\n"
        f"32 31 0:29 / {tmp_path}/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        f"33 31 0:30 / {tmp_path}/pids rw,relatime shared:9 - cgroup cgroup rw,pids\n"
        f"40 31 0:37 / {tmp_path}/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
        f"41 31 0:38 / {tmp_path}/unified rw,relatime - cgroup2 cgroup2 rw\n"
        f"50 23 0:40 / {tmp_path}/tmp rw - tmpfs tmpfs rw\n")
    found = sandbox_cgroups("iomux-r-w-gvisor-2024", mountinfo)
    assert sorted(p.parent.name for p in found) == ["cpu", "systemd", "unified"]
    assert sandbox_cgroups("iomux-other", mountinfo) == []
    assert sandbox_cgroups("x", tmp_path / "absent") == []
