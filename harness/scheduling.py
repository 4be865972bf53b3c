"""Which worker tests which target, and in what order, under pytest-xdist.

``--dist loadgroup`` should keep one target's tests on one worker (its
``xdist_group``), but xdist 3.8 marks a group by rewriting ``item._nodeid``, which
pytest 9 no longer reads (the node id lives in ``item._id``), so its loadgroup
silently degrades to plain load and one target's tests spread over every worker,
each bringing the target up again. ``target_scheduling`` makes the scheduler the
plugin's ``pytest_xdist_make_scheduler`` returns instead: it finds the target in
the test id, and hands the heaviest waiting target (targets.toml ``weight``) to
the next free worker.

The heaviest target is the run's critical path, so the others yield the CPU to it
while they run beside it (``in_background``): their worker is niced, and a guest
with a cgroup of its own gets the same lower weight (``Driver.cpu_shares``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping, Sequence


def target_of_nodeid(nodeid: str, names: Sequence[str]) -> str | None:
    """The target a test id belongs to: its ``@group`` suffix when xdist added one,
    else the target name its parameter id starts with (ours is parametrised first)."""
    if nodeid.rfind("@") > nodeid.rfind("]"):
        return nodeid.rsplit("@", 1)[1]
    last = nodeid.rsplit("::", 1)[-1]
    if "[" not in last or not last.endswith("]"):
        return None
    ids = last[last.index("[") + 1:-1]
    found = [n for n in names if ids == n or ids.startswith(n + "-")]
    if not found:
        found = [n for n in names if f"-{n}-" in f"-{ids}-"]
    return max(found, key=len) if found else None


def heaviest_first(waiting: list[str], weights: dict[str, float]) -> str:
    """The target (xdist scope) to start next: the heaviest still waiting (longest
    processing time first, so the longest target does not begin last and the run end
    on it alone); ties keep the collection's order, which is targets.toml's."""
    return max(waiting, key=lambda s: (weights.get(s, 1.0), -waiting.index(s)))


def target_scheduling(config: Any, log: Any, names: Sequence[str],
                      weights: dict[str, float]) -> Any:
    """xdist's ``LoadScopeScheduling`` with one scope per target (``names``), the
    heaviest waiting target first (``weights``); xdist is imported only here."""
    from xdist.scheduler import LoadScopeScheduling

    class TargetScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return target_of_nodeid(nodeid, names) or nodeid

        def _assign_work_unit(self, node: Any) -> None:
            if self.workqueue:
                self.workqueue.move_to_end(heaviest_first(list(self.workqueue), weights),
                                           last=False)
            super()._assign_work_unit(node)

    return TargetScheduling(config, log)


# -- CPU priority: the critical path first ---------------------------------------------
#
# Facts of Linux's scheduler (CFS) this relies on:
# - A process's CPU weight follows its nice value: 1024 at nice 0, 110 at nice 10
#   (kernel/sched/core.c, sched_prio_to_weight), and a nice value is inherited by
#   every process (and thread) it starts.
# - A cgroup competes as one entity with the processes and cgroups beside it, at its
#   cpu.shares (v1, default 1024; on v2 runsc and runc turn shares into cpu.weight).
#   So a niced harness process does not lower what runs in a cgroup of its own:
#   here each gVisor sandbox is one at the root of every hierarchy, QEMU runs in
#   libvirt's /machine, and docker's containers all share /docker's 1024.
# Measured on the project's 2-core host: the emulated VM (the heaviest target, so the
# run's end) took 100-169 s to start alone or in a quiet matrix, and 313-346 s beside
# the two CPU-bound gVisor sandboxes in the matrix, whose own end was 400-700 s earlier.

#: The nice value of a worker testing a target off the critical path.
BACKGROUND_NICE = 10
#: The cgroup weight of such a target's guest, where the guest has a cgroup of its
#: own: the weight of nice 10 on cpu.shares' scale (nice 0 is 1024).
BACKGROUND_SHARES = 110
#: ``IOMUX_CPU_PRIORITY``: ``critical-path`` (the default) or ``equal`` (every target
#: at the priority the run was started with).
PRIORITY_POLICIES = ("critical-path", "equal")


def targets_at_once() -> int:
    """How many targets the run tests at once: its xdist workers, one target each
    (xdist tells a worker through PYTEST_XDIST_WORKER_COUNT); 1 without xdist."""
    return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))


def cpu_priority_policy() -> str:
    """``IOMUX_CPU_PRIORITY``, checked (a wrong value is one line)."""
    value = os.environ.get("IOMUX_CPU_PRIORITY", "").strip() or PRIORITY_POLICIES[0]
    if value not in PRIORITY_POLICIES:
        raise ValueError(f"IOMUX_CPU_PRIORITY={value!r}: use one of "
                         f"{', '.join(PRIORITY_POLICIES)}")
    return value


def in_background(name: str, weights: Mapping[str, float], at_once: int,
                  policy: str = "critical-path") -> bool:
    """Whether target ``name`` yields the CPU to the critical path: the run tests
    more than one target at a time (``at_once`` workers), and ``name`` is lighter
    than the heaviest target that runs (``weights``: those targets' weights).
    The heaviest is started first (``heaviest_first``) and the run ends with it, so
    the time the others lose while it runs comes back at the end, where they had
    slack; they use whatever CPU it leaves."""
    if policy == "equal" or at_once < 2 or len(weights) < 2:
        return False
    return weights.get(name, 1.0) < max(weights.values())


def set_nice(value: int) -> int:
    """Set this process's nice value (its main thread, whose children inherit it);
    return the value it has after. Lowering it needs privilege: without, it stays."""
    with contextlib.suppress(PermissionError):
        os.setpriority(os.PRIO_PROCESS, 0, value)
    return os.getpriority(os.PRIO_PROCESS, 0)


def yield_cpu() -> int:
    """Nice this process to BACKGROUND_NICE, never below where it already is (a run
    started under ``nice -n 15`` stays at 15, even as root); return its nice value."""
    return set_nice(max(BACKGROUND_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
