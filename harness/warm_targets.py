"""The lifecycle's steps for kept targets (harness.lifecycle's ``attach`` and
``keep``), apart from the sequence that runs them.

``attach`` takes over a kept target that ``harness.kept_targets.claim`` found
for this tree and recipe: the driver reaches it again (``Driver.attach``), and
the lifecycle's ``healthy`` step then checks it as it would a new one. A kept
target that cannot be reached, or does not answer, is destroyed and forgotten,
and the lifecycle builds and starts a new one: a warm run is never worse than a
cold one, only slower by the attempt. Nothing about a failed reuse is an error
of the target; the report says ``"reused": false`` and why.

``keep`` records a target that ``--destroy`` leaves up, when its kind can be
taken over (``Driver.keepable``) and it became healthy, with the seconds its
build and start cost the first time: what each reuse saves, less its attach.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, TypeVar

from harness import kept_targets
from harness.drivers import base
from harness.drivers.base import Driver, Instance, StepTimeout, Target, TargetError

T = TypeVar("T")


class KeptTargetSteps:
    """The attach and keep steps of ``TargetLifecycle``, which this is mixed into:
    it provides the attributes below and runs every step through ``_step``."""

    driver: Driver
    target: Target
    run_id: str
    timeouts: dict[str, float]
    timings: dict[str, float]
    instance: Instance | None
    reused: bool
    _claimed: kept_targets.KeptRecord | None
    _kept_hash: str | None
    _healthy: bool

    def _step(self, name: str, fn: Callable[[], T], errors: bool = True) -> T:
        raise NotImplementedError

    def _emit(self, type_: str, **fields: Any) -> None:
        raise NotImplementedError

    def _phase(self, phase: str, detail: str = "") -> None:
        raise NotImplementedError

    def kept_hash(self) -> str | None:
        """The hash a kept target of this one is known by; None for a kind that
        cannot keep targets (Driver.keepable)."""
        if self._kept_hash is None and self.driver.keepable:
            self._kept_hash = kept_targets.target_hash(
                self.target, self.driver.kept_inputs, self.driver.kept_recipe(self.target))
        return self._kept_hash

    def _claim(self) -> None:
        """Claim a kept target of this tree and recipe, if there is one."""
        try:
            digest = self.kept_hash()
            if digest is not None:
                self._claimed = kept_targets.claim(self.target, digest)
        except (OSError, StepTimeout) as exc:  # an unreadable tree or store: start anew
            self._emit("record", key="reuse", value={"reused": False, "why": base.one_line(exc)})

    def _attach(self) -> None:
        """The attach step: take the claimed target over, or give it up."""
        record = self._claimed
        assert record is not None  # "if-reusable"
        kept = record.instance(self.target)
        why: list[str] = []

        def attach() -> Instance | None:
            try:
                found = self.driver.attach(kept, self.timeouts["attach"])
            except Exception as exc:  # any failure means: not reusable
                found = None
                why.append(base.one_line(exc))
            self.instance = found  # in the step's thread, as start does (Ctrl-C)
            return found

        try:
            found = self._step("attach", attach, errors=False)
        except (StepTimeout, TargetError) as exc:
            found = None
            why.append(base.one_line(exc))
        if found is None:
            self._discard(kept)
            self._forget_claim(why[0] if why else "its resources are gone")
            return
        self.reused = True
        self._phase("attached", f"{found.resource_name} (kept by run {record.kept_by_run})")

    def _give_up_reuse(self, why: str) -> None:
        """The target taken over does not answer: destroy it, forget its record."""
        instance = self.instance
        self.instance, self.reused = None, False
        if instance is not None:
            self._discard(instance)
        self._forget_claim(why)

    def _discard(self, instance: Instance) -> None:
        """Destroy what is left of a kept target that cannot be reused."""
        with contextlib.suppress(Exception):  # else the next run's sweep removes it
            self._step("destroy", lambda: self.driver.destroy(
                instance, self.timeouts["destroy"]), errors=False)

    def _forget_claim(self, why: str) -> None:
        record = self._claimed
        self._claimed = None
        if record is not None:
            kept_targets.drop(record)
            self._emit("record", key="reused", value=False)
            self._emit("record", key="reuse", value={
                "reused": False, "resource": record.resource_name,
                "from_run": record.kept_by_run, "why": why})

    def _record_reuse(self) -> None:
        """The report's facts of a target taken over and healthy: where it came from
        and the seconds saved (its first build and start, less the attach)."""
        record = self._claimed
        if record is None:
            return
        attach_s = self.timings.get("attach", 0.0)
        first = record.bring_up_s
        self._emit("record", key="reused", value=True)
        self._emit("record", key="reuse", value={
            "reused": True, "resource": record.resource_name, "from_run": record.kept_by_run,
            "kept_at": record.kept_at, "attach_s": round(attach_s, 3),
            "first_bring_up_s": first,
            "saved_s": None if first is None else round(max(0.0, first - attach_s), 3)})

    def _keep(self, instance: Instance, failed: bool) -> tuple[str, str]:
        """The keep step: leave the target up, and record it for a later run when its
        kind can be taken over and it became healthy. Returns the final phase."""
        digest = self.kept_hash()
        if digest is None or not self._healthy:
            why = self.driver.keep_reason if digest is None else "it never became healthy"
            return "kept", f"{instance.resource_name} (not reusable: {why})"
        first = self._claimed.bring_up_s if self._claimed is not None else None
        if first is None and not self.reused:
            first = self.timings.get("build", 0.0) + self.timings.get("start", 0.0)

        def keep() -> None:
            kept_targets.keep(instance, digest, self.run_id, failed, first)

        try:
            self._step("keep", keep, errors=False)
        except Exception:
            return "kept", f"{instance.resource_name} (not recorded: a later sweep removes it)"
        return "kept", instance.resource_name
