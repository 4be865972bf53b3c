"""Suite "in-guest": iomux's own behaviour tests and ``iomux probe``, run inside the target.

Inside the target the tests run on its kernel and in its network namespace, so
this is where kernel behaviour (half-close, refused connects, ET wake-ups) is
judged; the black-box suite only sees it through the engine's port forwarding.
The driver says where things are: ``instance.guest.tests_dir`` is the target's
copy of tests/server (baked into container images at /opt/iomux/tests/server;
the working tree's tests/server for ``local``), ``python`` the interpreter that
has pytest, ``scratch_dir`` a writable directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.drivers.base import Target
from harness.guest_suites import run_inner_suite, tail, target_python
from harness.running_target import RunningTarget

pytestmark = pytest.mark.suite("in-guest")


def test_probe(running_target: RunningTarget, target: Target) -> None:
    """``iomux probe --json`` in the target: record its facts, check the declared ones."""
    result = running_target.exec([target_python(running_target), "-m", "iomux", "probe", "--json",
                                  "--probes", "none"], timeout=300)
    assert result.rc == 0, f"iomux probe exited {result.rc}: {tail(result.stderr)}"
    facts = json.loads(result.stdout)
    # "probe" belongs to the claims suite (the behaviour probes, which the
    # report plots); these are the host facts only, so they go under "facts".
    running_target.record("facts", facts)
    running_target.record("os", facts.get("distribution") or facts.get("os"))
    running_target.record("kernel", facts.get("kernel"))
    running_target.record("python", facts.get("python"))
    running_target.record("backends", facts.get("backends"))
    # targets.toml declares what each target should be; a mismatch is a finding.
    assert facts.get("os_family") == target.os_family
    missing = sorted(set(target.backends) - set(facts.get("backends") or []))
    assert not missing, f"targets.toml expects backends the target lacks: {missing}"


def test_behaviour_suite(running_target: RunningTarget, request: pytest.FixtureRequest,
                         tmp_path: Path) -> None:
    """tests/server inside the target; each inner test is reported on its own."""
    tests_dir = running_target.instance.guest.tests_dir
    assert tests_dir, "the driver did not say where the in-guest tests are (guest.tests_dir)"
    run_inner_suite(running_target, request, tmp_path, "in-guest", str(tests_dir))
