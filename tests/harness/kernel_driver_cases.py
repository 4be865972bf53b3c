"""The cases every kernel driver (harness/drivers/kernels.py's KernelDriver) must pass,
written once in the manner of CPython's test mix-ins (Lib/test/test_selectors.py).

A driver's test module holds one subclass of ``KernelDriverCases``: it names the
driver, the targets (``target_name``, a class-scoped parametrisation) and how to
find a guest's host processes, and keeps the kind's quirks (what its kernel reports,
how a broken start fails) as its own tests. Each case runs against the real
binaries; a target whose binary or userland cannot be had here is skipped with the
reason (scripts/fetch-kernels.sh install fetches the binaries).
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any, ClassVar, Iterator

import pytest

from harness.drivers import kernel_builds, kernels
from harness.drivers.base import Instance, StepTimeout, Target, TargetError
from harness.targets import load

#: Words a shell would take apart; exec must hand each over as one argument.
HOSTILE = ["; rm -rf /", "'single'", '"double"', "$(id)", "`id`", "a b", "*", "\\", "-x"]


def targets_on_one_worker(*names: str) -> list[Any]:
    """``target_name`` values for a subclass's class-scoped parametrisation, each in an
    xdist group of its own, so that one worker runs all of a target's cases: its
    class-scoped guest is then booted once, not once on every worker that drew one of
    its cases (make unit runs on several workers, --dist loadgroup)."""
    return [pytest.param(name, marks=pytest.mark.xdist_group(f"driver-cases-{name}"))
            for name in names]


class KernelDriverCases:
    """The shared cases; a subclass sets the class attributes and ``guest_pids``."""

    driver: ClassVar[kernels.KernelDriver]
    #: A kernel_build version that is nowhere on this machine.
    missing_version: ClassVar[str]
    #: The failure message when a started guest has no host process.
    no_process: ClassVar[str]

    def guest_pids(self, instance: Instance) -> list[int]:
        """The host processes of ``instance``'s guest."""
        raise NotImplementedError

    def check_build(self, target: Target, built: dict[str, Any]) -> None:
        """The kind's own build facts (a subclass adds its checks)."""

    def host_leftovers(self, instance: Instance) -> list[str]:
        """What of ``instance``'s guest is on the host outside its directory and its
        processes (gVisor: the sandbox's cgroups); none by default."""
        return []

    # -- fixtures ----------------------------------------------------------------------

    # Class-scoped, as the module-scoped ones were before the mix-in: one build and
    # one guest per target for all the cases that only use it.

    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, target_name: str) -> Target:
        target = next(t for t in load() if t.name == target_name)
        reason = cls.driver.unavailable_reason() or cls.driver.build_unavailable_reason(target)
        if reason:
            pytest.skip(f"not run: {reason}")
        return target

    @pytest.fixture(scope="class")
    @classmethod
    def bootable(cls, target: Target) -> Target:
        """The target, where its kernel can also run a process on this host (UML's
        pinned builds cannot on some CPUs: harness/drivers/uml.py)."""
        reason = cls.driver.target_unavailable_reason(target)
        if reason:
            pytest.skip(f"not run: {reason}")
        return target

    @pytest.fixture(scope="class")
    @classmethod
    def built(cls, target: Target) -> dict[str, Any]:
        return cls.driver.build(target, timeout=1800)

    @pytest.fixture(scope="class")
    @classmethod
    def instance(cls, bootable: Target, built: dict[str, Any]) -> Iterator[Instance]:
        run_id = f"test-{uuid.uuid4().hex[:8]}"
        inst = cls.driver.start(bootable, run_id, "t0", timeout=120)
        try:
            cls.driver.wait_healthy(inst, timeout=120)
            yield inst
        finally:
            cls.driver.destroy(inst, timeout=60)
            cls.driver.sweep(run_id)

    # -- the cases ---------------------------------------------------------------------

    def test_build_records_version_and_sha256_of_the_binary_that_runs(
            self, target: Target, built: dict[str, Any]) -> None:
        facts = built["kernel_build"]
        binary = kernel_builds.kernel_binary(target)
        assert facts["version"] == target.options["kernel_build"]["version"]
        assert facts["sha256"] == kernel_builds.sha256_of.__wrapped__(str(binary.path))
        self.check_build(target, built)

    def test_exec_passes_argv_as_data_and_keeps_rc_and_streams(self, instance: Instance) -> None:
        echoed = self.driver.exec(instance, ["printf", "%s\\n", *HOSTILE], 30)
        assert echoed.rc == 0
        assert echoed.stdout.splitlines() == HOSTILE
        failed = self.driver.exec(instance, ["sh", "-c", "echo out; echo err >&2; exit 7"], 30)
        assert (failed.rc, failed.stdout, failed.stderr) == (7, "out\n", "err\n")

    def test_exec_timeout_raises_step_timeout(self, instance: Instance) -> None:
        with pytest.raises(StepTimeout, match="timed out after 1s"):
            self.driver.exec(instance, ["sleep", "30"], 1)
        left = self.driver.exec(instance, ["sh", "-c", "ps -eo args | grep -c '^sleep 30' || true"],
                                30)
        assert left.stdout.strip() == "0"

    def test_guest_runs_commands_unprivileged_on_a_read_only_root(self,
                                                                  instance: Instance) -> None:
        ids = self.driver.exec(instance, ["id", "-u"], 30)
        assert ids.stdout.strip() == "10001"
        write = self.driver.exec(instance, ["touch", "/opt/iomux/x"], 30)
        assert write.rc != 0, "the root filesystem is writable"
        caps = self.driver.exec(instance, ["grep", "^CapEff", "/proc/self/status"], 30)
        assert caps.stdout.split()[1].strip("0") == ""

    def test_servers_answer_inside_and_copy_from(self, instance: Instance,
                                                 tmp_path: Path) -> None:
        assert set(instance.guest.guest_ports) == set(instance.data["backends"])
        made = self.driver.exec(instance, ["sh", "-c", "head -c 3000 /dev/urandom > /tmp/blob"],
                                30)
        assert made.rc == 0
        inside = self.driver.exec(instance, ["sha256sum", "/tmp/blob"], 30).stdout.split()[0]
        copied = self.driver.copy_from(instance, "/tmp/blob", tmp_path / "blob", 30)
        assert kernel_builds.sha256_of.__wrapped__(str(copied)) == inside
        with pytest.raises(TargetError):
            self.driver.copy_from(instance, "/tmp/absent", tmp_path / "absent", 30)

    def test_destroy_leaves_no_process_and_is_safe_twice(self, bootable: Target,
                                                         built: dict[str, Any]) -> None:
        inst = self.driver.start(bootable, f"test-{uuid.uuid4().hex[:8]}", "t1", timeout=120)
        assert self.guest_pids(inst), self.no_process
        self.driver.destroy(inst, timeout=60)
        assert self.guest_pids(inst) == []
        assert self.host_leftovers(inst) == []
        assert not Path(inst.data["home"]).exists()
        self.driver.destroy(inst, timeout=60)

    def test_sweep_removes_a_dead_runs_guest(self, bootable: Target,
                                             built: dict[str, Any]) -> None:
        run_id = f"test-{uuid.uuid4().hex[:8]}"
        inst = self.driver.start(bootable, run_id, "t3", timeout=120)
        try:
            made = self.host_leftovers(inst)
            removed = self.driver.sweep(run_id)
            assert len(removed) == 1 and inst.resource_name in removed[0]
            assert self.guest_pids(inst) == []
            # A sweep kills; what only the kind's own stop would remove must go too.
            assert self.host_leftovers(inst) == [], f"{removed[0]}; it made {made}"
        finally:
            self.driver.destroy(inst, timeout=60)

    def test_missing_binary_is_one_line_with_the_fix(self, target: Target) -> None:
        options = {**target.options, "kernel_build": {**target.options["kernel_build"],
                                                      "version": self.missing_version}}
        reason = self.driver.target_unavailable_reason(dataclasses.replace(target,
                                                                           options=options))
        assert reason is not None
        assert self.missing_version in reason and "scripts/fetch-kernels.sh install" in reason
        assert len(f"not run: {reason}") <= 100 and "\n" not in reason
