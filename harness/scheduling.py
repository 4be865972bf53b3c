"""Which worker tests which target, and in what order, under pytest-xdist.

``--dist loadgroup`` should keep one target's tests on one worker (its
``xdist_group``), but xdist 3.8 marks a group by rewriting ``item._nodeid``, which
pytest 9 no longer reads (the node id lives in ``item._id``), so its loadgroup
silently degrades to plain load and one target's tests spread over every worker,
each bringing the target up again. ``target_scheduling`` makes the scheduler the
plugin's ``pytest_xdist_make_scheduler`` returns instead: it finds the target in
the test id, and hands the heaviest waiting target (targets.toml ``weight``) to
the next free worker.
"""

from __future__ import annotations

from typing import Any, Sequence


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
