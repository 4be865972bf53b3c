"""Suite "faults": the fault table of tests/faults/, run inside each target.

The fault suite sits beside the behaviour suite in every target (it imports
the behaviour suite's server helper from ``../server``), so its directory is
found next to ``instance.guest.tests_dir``. A fault that cannot be injected
on a kind of target (no root for a network namespace in a hardened container,
no sch_netem, no dummynet) is skipped inside with its reason, and shows in the
report as skipped, never as passed.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

import pytest

from harness.guest_suites import run_inner_suite
from harness.running_target import RunningTarget

pytestmark = pytest.mark.suite("faults")


def test_fault_suite(running_target: RunningTarget, request: pytest.FixtureRequest,
                     tmp_path: Path) -> None:
    """tests/faults inside the target; each inner test is reported on its own."""
    guest = running_target.instance.guest
    tests_dir = guest.tests_dir
    assert tests_dir, "the driver did not say where the in-guest tests are (guest.tests_dir)"
    faults_dir = posixpath.join(posixpath.dirname(str(tests_dir).rstrip("/")), "faults")
    # Under emulation Python runs about 10x slower: the driver may ask for
    # smaller sizes (IOMUX_TEST_SCALE), which the suite's sizes and timeouts follow.
    scale = guest.test_scale
    env = {"IOMUX_TEST_SCALE": str(scale)} if scale else None
    run_inner_suite(running_target, request, tmp_path, "faults", faults_dir, env)
