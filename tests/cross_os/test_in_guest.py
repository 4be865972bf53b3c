"""Suite "in-guest": iomux's own behaviour tests and ``iomux probe``, run inside the target.

Inside the target the tests run on its kernel and in its network namespace, so
this is where kernel behaviour (half-close, refused connects, ET wake-ups) is
judged; the black-box suite only sees it through the engine's port forwarding.
The driver says where things are: ``instance.data["tests_dir"]`` is the target's
copy of tests/server (baked into container images at /opt/iomux/tests/server;
the working tree's tests/server for ``local``), ``python`` the interpreter that
has pytest, ``scratch_dir`` a writable directory.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from harness.drivers.base import Target, TargetError
from harness.plugin import RunningTarget

pytestmark = pytest.mark.suite("in-guest")

#: The behaviour suite takes about a minute here; a VM under emulation is slower.
INNER_TIMEOUT = 1800.0


def _python(rt: RunningTarget) -> str:
    return str(rt.instance.data.get("python", "python3"))


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def parse_junit(path: Path, via: str) -> list[dict[str, Any]]:
    """One ``{suite, name, outcome, duration, via}`` per <testcase> of a JUnit XML file."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        name = f"{classname}::{case.get('name', '?')}" if classname else case.get("name", "?")
        outcome = "passed"
        message = ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                message = child.get("message", "")
                break
            if child.tag == "skipped":
                outcome = "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
                message = child.get("message", "")
        entry: dict[str, Any] = {"suite": "in-guest", "name": name, "outcome": outcome,
                                 "duration": round(float(case.get("time") or 0), 4), "via": via}
        if message:
            entry["message"] = message.strip().splitlines()[0][:300] if message.strip() else ""
        tests.append(entry)
    return tests


def test_probe(running_target: RunningTarget, target: Target) -> None:
    """``iomux probe --json`` in the target: record its facts, check the declared ones."""
    result = running_target.exec([_python(running_target), "-m", "iomux", "probe", "--json",
                                  "--probes", "none"], timeout=300)
    assert result.rc == 0, f"iomux probe exited {result.rc}: {_tail(result.stderr)}"
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
    data = running_target.instance.data
    tests_dir = data.get("tests_dir")
    assert tests_dir, "the driver did not say where the in-guest tests are (data['tests_dir'])"
    scratch = str(data.get("scratch_dir", "/tmp"))
    inner_xml = f"{scratch}/iomux-in-guest.xml"
    argv = [_python(running_target), "-m", "pytest", "-p", "no:cacheprovider", "-q",
            str(tests_dir), "--junitxml", inner_xml]
    result = running_target.exec(argv, timeout=INNER_TIMEOUT)
    (running_target.report_dir / "in-guest.txt").write_text(result.stdout + result.stderr)
    # pytest's exit status: 0 all passed, 1 some failed; anything else means the
    # suite itself could not run (usage error, no tests, internal error).
    assert result.rc in (0, 1), (f"inner pytest exited {result.rc}:\n"
                                 f"{_tail(result.stdout + result.stderr)}")
    try:
        local_xml = running_target.copy_from(inner_xml, tmp_path / "in-guest.xml")
    except TargetError:
        # Docker's archive API reads the container's root filesystem, not the
        # tmpfs mounted on /tmp (the root is read-only), so read it through exec.
        cat = running_target.exec([_python(running_target), "-c",
                                   "import sys; sys.stdout.write(open(sys.argv[1]).read())",
                                   inner_xml], timeout=60)
        assert cat.rc == 0, f"cannot read {inner_xml} in the target: {_tail(cat.stderr)}"
        local_xml = tmp_path / "in-guest.xml"
        local_xml.write_text(cat.stdout)
    via = request.node.nodeid
    if via.rfind("@") > via.rfind("]"):  # an xdist group suffix
        via = via.rsplit("@", 1)[0]
    via = via.split("/")[-1]  # the name the plugin files this test under
    inner = parse_junit(local_xml, via)
    assert inner, "the in-guest suite ran no test"
    running_target.record("inner_tests", inner)
    failed = [f"{t['name']}: {t.get('message', '')}" for t in inner
              if t["outcome"] in ("failed", "error")]
    if failed:
        pytest.fail(f"{len(failed)} of {len(inner)} in-guest tests failed:\n  "
                    + "\n  ".join(failed), pytrace=False)
    assert result.rc == 0, _tail(result.stdout)
