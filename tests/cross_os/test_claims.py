"""Suite "claims": run every behaviour probe inside each target and judge the
write-up's claims against expected.json (issues 5 and 14).

One ``iomux probe --json`` run per target (a session fixture, so every test of
a target shares it); the observations and the claim records go into the
target's entry of results.json whatever the assertions below decide.

- The kernel the probe run detected (iomux.facts: gVisor by its fixed uname)
  must be the one the target declares (``kernel`` in targets.toml, else its
  os_family); the records are judged with the detected one.
- Every claim is judged twice: does the write-up's claim hold here, and does
  this kernel show what expected.json expects of it. An observation that
  contradicts its kernel's expectation is an unexpected difference, and
  fails its claim's test by name.
- On every Linux-ABI kernel the core Linux claims must be measurable: the
  select limit, linear poll, flat epoll, LT 3 and ET 1, half-close events.
  kqueue claims must be measurable wherever a kqueue kernel runs.
- The whole probe suite must finish within 60 s per target.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, List, Optional

import pytest

from harness.drivers.base import Target
from harness.running_target import RunningTarget
from iomux.probes import claims

pytestmark = pytest.mark.suite("claims")

#: The issue's limit for the whole probe suite; measured around the exec, so it
#: includes the interpreter start and the engine's exec overhead (tolerant).
PROBE_LIMIT_S = 60.0
EXEC_TIMEOUT_S = 300.0

LINUX_CLAIMS = ["select-fd-limit", "select-poll-cost-grows", "epoll-kqueue-flat",
                "level-edge-byte", "level-edge-listen", "halfclose-events"]
KQUEUE_CLAIMS = ["epoll-kqueue-flat", "level-edge-byte", "level-edge-listen",
                 "halfclose-events", "reset-events", "nonfile-process-exit",
                 "nonfile-timer", "nonfile-signal"]


@dataclasses.dataclass
class ProbeRun:
    rc: int
    seconds: float
    stderr: str
    document: Dict[str, Any]
    records: Dict[str, Dict[str, Any]]


def _python(rt: RunningTarget) -> str:
    return rt.instance.guest.python


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else "(no output)"


@pytest.fixture(scope="session")
def probe_run(running_target: RunningTarget, target: Target) -> ProbeRun:
    """``iomux probe --json`` inside the target, once; recorded with its claims."""
    t0 = time.monotonic()
    result = running_target.exec([_python(running_target), "-m", "iomux", "probe", "--json"],
                                 timeout=EXEC_TIMEOUT_S)
    seconds = time.monotonic() - t0
    document: Dict[str, Any] = {}
    if result.rc == 0:
        try:
            document = json.loads(result.stdout)
        except ValueError:
            document = {}
    records: List[Dict[str, Any]] = []
    if isinstance(document.get("probes"), dict):
        document["probe_wall_s"] = round(seconds, 3)
        running_target.record("probe", document)
        kernel = detected_kernel(document, target)
        records = claims.evaluate(target.name, target.os_family, document["probes"],
                                  kernel=kernel,
                                  kernel_version=kernel_version(running_target, kernel, document),
                                  kernel_platform=(running_target.instance.guest.kernel_platform
                                                   or document.get("kernel_platform")))
        running_target.record("claims", records)
    return ProbeRun(result.rc, seconds, result.stderr, document,
                    {r["id"]: r for r in records})


def declared_kernel(target: Target) -> str:
    """The kernel a target declares: ``kernel`` in targets.toml, else its os_family's."""
    declared = target.options.get("kernel")
    return str(declared) if declared else target.os_family


def detected_kernel(document: Dict[str, Any], target: Target) -> str:
    """The kernel family the probe run detected (iomux.facts), else the declared one."""
    found = document.get("kernel_family")
    return str(found) if isinstance(found, str) and found else declared_kernel(target)


def kernel_version(rt: RunningTarget, kernel: str, document: Dict[str, Any]) -> Optional[str]:
    """The version expected.json's ranges are read against.

    Linux: the release the probe run saw (uname -r). gVisor reports a fixed
    uname, so its version (the runsc release, "0.0~20221219.0-2+b3") comes
    from the harness: ``kernel_version`` of the instance's Guest or the target's
    options, else ``[target.kernel_build] version``; None where none says.
    """
    for value in (rt.instance.guest.kernel_version, rt.target.options.get("kernel_version")):
        if isinstance(value, str) and value:
            return value
    if kernel == "gvisor":
        build = rt.target.options.get("kernel_build")
        value = build.get("version") if isinstance(build, dict) else None
        return str(value) if value else None
    release = document.get("kernel")
    return str(release) if isinstance(release, str) and release else None


def _require(run: ProbeRun) -> None:
    if run.rc != 0:
        pytest.fail(f"iomux probe --json exited {run.rc}: {_tail(run.stderr)}", pytrace=False)
    if not run.records:
        pytest.fail("iomux probe --json printed no behaviour probes", pytrace=False)


def _has_kqueue(run: ProbeRun) -> bool:
    backends = run.document.get("backends") or []
    return "kqueue" in backends


def test_probe_suite_within_budget(probe_run: ProbeRun) -> None:
    """The whole probe suite finishes within 60 s on this target."""
    _require(probe_run)
    assert probe_run.seconds <= PROBE_LIMIT_S, (
        f"probe suite took {probe_run.seconds:.1f}s; per probe: "
        + ", ".join(f"{k}={v.get('elapsed_s')}" for k, v in probe_run.document["probes"].items()))


def test_every_probe_ran(probe_run: ProbeRun) -> None:
    """No probe crashed (a missing mechanism is an observation, not an error)."""
    _require(probe_run)
    errors = {name: rec["error"] for name, rec in probe_run.document["probes"].items()
              if isinstance(rec, dict) and "error" in rec}
    assert errors == {}


def test_every_claim_has_a_record(probe_run: ProbeRun) -> None:
    """One record per claim of expected.json, each with a verdict and, unless it agrees, why."""
    _require(probe_run)
    assert sorted(probe_run.records) == sorted(c["id"] for c in claims.load_expected())
    for record in probe_run.records.values():
        assert record["verdict"] in (claims.AGREES, claims.DIFFERS, claims.NOT_MEASURABLE)
        assert record["verdict"] == claims.AGREES or record["why"], record["id"]
        assert record["claim_verdict"] in (claims.HOLDS, claims.REFUTED, claims.NOT_MEASURABLE)
        assert record["cell"] in claims.CELLS, record["id"]
        if record["cell"] == claims.CELL_EXPECTED:
            assert record["expected_reason"], record["id"]


def test_detected_kernel_is_the_declared_one(probe_run: ProbeRun, target: Target) -> None:
    """The probe run's kernel (gVisor or Linux, by its traits) is the one targets.toml names."""
    _require(probe_run)
    found = probe_run.document.get("kernel_family")
    evidence = probe_run.document.get("kernel_evidence")
    assert found == declared_kernel(target), (
        f"{target.name} declares kernel {declared_kernel(target)!r} but the probe run "
        f"detected {found!r} ({evidence})")


@pytest.mark.parametrize("claim_id", [c["id"] for c in claims.load_expected()])
def test_claim_matches_kernel_expectation(probe_run: ProbeRun, claim_id: str) -> None:
    """The observation matches this kernel's expectation (agrees or an expected difference)."""
    _require(probe_run)
    record = probe_run.records[claim_id]
    assert record["cell"] in claims.CELLS, record
    bad = claims.unexpected([record])
    assert not bad, f"unexpected difference: {bad[0]} (observed {record['observed']})"
    if record["cell"] == claims.CELL_NOT_RUN:
        pytest.skip(f"{claim_id} not run: {record['why']}")


def test_no_unexpected_difference(probe_run: ProbeRun) -> None:
    """No claim's observation contradicts its kernel's expectation; each one is named."""
    _require(probe_run)
    bad = claims.unexpected(list(probe_run.records.values()))
    assert not bad, "unexpected differences:\n" + "\n".join(bad)


@pytest.mark.parametrize("claim_id", LINUX_CLAIMS)
def test_linux_claims_measurable(probe_run: ProbeRun, target: Target, claim_id: str) -> None:
    """On a Linux-ABI kernel (Linux, gVisor): the core Linux claims are measured and match."""
    if target.os_family != "linux":
        pytest.skip(f"{target.name} is {target.os_family}, not linux")
    _require(probe_run)
    record = probe_run.records[claim_id]
    assert record["cell"] in (claims.CELL_AGREES, claims.CELL_EXPECTED), (
        f"{claim_id}: {record['cell']}: {record['why']} (observed {record['observed']})")


@pytest.mark.parametrize("claim_id", KQUEUE_CLAIMS)
def test_kqueue_claims_measurable(probe_run: ProbeRun, target: Target, claim_id: str) -> None:
    """Where a kqueue kernel runs: flat kevent, EV_CLEAR once, EV_EOF, native non-file events."""
    _require(probe_run)
    if not _has_kqueue(probe_run):
        pytest.skip(f"no kqueue kernel on {target.name} ({target.os_family}): "
                    "kqueue claims not run here")
    record = probe_run.records[claim_id]
    assert record["cell"] in (claims.CELL_AGREES, claims.CELL_EXPECTED), (
        f"{claim_id}: {record['cell']}: {record['why']} (observed {record['observed']})")
