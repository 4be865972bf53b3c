"""Bringing a gvisor or uml target up and down leaves the host's network as it was:
the same links (``ip -o link``), network namespaces (``ip netns list``) and
iptables/nft rules, while the target is up and after it is gone.

This is the rule runsc breaks in ``--network=sandbox`` mode as root: before it
fails, it adds a veth pair, a network namespace and iptables NAT/FORWARD rules.

The machine is shared: a Docker engine that other runs use at the same time
adds its own bridges (``br-<id>``), the veths enslaved to them and its DOCKER
chains whenever a container network comes or goes, and the host fault suite
(tests/faults/test_network_faults.py) makes its own namespace and veth pair
(``iomuxf-<pid>-<n>``, ``iofh<pid><n>``) for its black hole, and the second
Docker engine of tests/harness/test_remote_engine.py has a bridge of its own
(``iomuxe2<8 hex>``) while it runs. Only those,
recognised by their owners' names, are left out of the comparison; anything
else that changes fails the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from typing import Any

import pytest

from harness.drivers import get_driver
from harness.drivers.base import Driver, Target
from harness.targets import load

pytestmark = pytest.mark.slow
NAMES = ["gvisor-2022", "gvisor-2024", "uml-6-1", "uml-6-12"]
#: Docker's bridges and veths, the host fault suite's veths, the second engine's bridge;
#: Docker's chains and rules.
_OTHERS_LINK = re.compile(r"^\d+: (br-[0-9a-f]{12}|veth[0-9a-f]{7}|iofh\d+|iomuxe2[0-9a-f]{8})"
                          r"(@\S+)?: ")
_FAULT_NETNS = re.compile(r"^iomuxf-\d+-\d+$")
_DOCKER_RULE = re.compile(r"docker|DOCKER|br-[0-9a-f]{12}")
#: Docker's hairpin NAT for a published port of a container on a user-defined network
#: (nat POSTROUTING, the container's own address as source and destination); it names
#: neither Docker nor a bridge.
_DOCKER_HAIRPIN = re.compile(r"^-A POSTROUTING -s (\d+\.\d+\.\d+\.\d+)/32 -d \1/32 "
                             r"-p tcp -m tcp --dport \d+ -j MASQUERADE$")
#: Packet and byte counters, which move with any traffic.
_COUNTERS = re.compile(r"\[\d+:\d+\]|counter packets \d+ bytes \d+")


def _run(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        return f"({argv[0]} not installed)"
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout if proc.returncode == 0 else f"({argv[0]} failed: {proc.stderr.strip()})"


def network_state() -> dict[str, list[str]]:
    """The host's links, namespaces and firewall rules, less Docker's and counters."""
    links = []
    for line in _run("ip", "-o", "link").splitlines():
        if _OTHERS_LINK.match(line):
            continue
        # A link's index and name are what matter; its state and statistics move.
        links.append(" ".join(line.split()[:2]))
    rules = {}
    for name, argv in (("iptables", ("iptables-save",)), ("ip6tables", ("ip6tables-save",)),
                       ("nft", ("nft", "list", "ruleset"))):
        rules[name] = [_COUNTERS.sub("", line).strip() for line in _run(*argv).splitlines()
                       if line.strip() and not line.startswith("#")
                       and not _DOCKER_RULE.search(line)
                       and not _DOCKER_HAIRPIN.match(line.strip())]
    netns = [line.split()[0] for line in _run("ip", "netns", "list").splitlines()
             if line.strip() and not _FAULT_NETNS.match(line.split()[0])]
    return {"links": links, "netns": netns, **rules}


def _target(name: str) -> Target:
    return next(t for t in load() if t.name == name)


@pytest.mark.parametrize("name", NAMES)
def test_target_up_and_down_leaves_host_network_unchanged(name: str) -> None:
    target = _target(name)
    driver: Driver = get_driver(target.kind)
    reason = driver.unavailable_reason() or driver.target_unavailable_reason(target)
    if reason:
        pytest.skip(f"not run: {reason}")
    driver.build(target, timeout=1800)
    before = network_state()
    run_id = f"test-{uuid.uuid4().hex[:8]}"
    instance: Any = driver.start(target, run_id, "net", timeout=120)
    try:
        driver.wait_healthy(instance, timeout=120)
        # Loopback TCP inside the target works: its stack is up, and its own.
        echo = driver.exec(instance, ["iomux", "check", "127.0.0.1:7000", "--timeout", "5"], 30)
        assert echo.rc == 0, echo.stderr
        during = network_state()
    finally:
        driver.destroy(instance, timeout=60)
        driver.sweep(run_id)
    after = network_state()
    assert during == before, "the host's network changed while the target was up"
    assert after == before, "the host's network changed after the target was destroyed"


def test_the_comparison_sees_a_new_namespace() -> None:
    """The check can fail: a network namespace made here shows up in it."""
    if shutil.which("ip") is None:
        pytest.skip("not run: iproute2 is not installed")
    before = network_state()
    name = f"iomux-test-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        assert network_state()["netns"] != before["netns"]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=30)
    assert network_state() == before


def test_only_dockers_hairpin_nat_is_left_out() -> None:
    """Docker's per-port hairpin rule is left out; a NAT rule of any other shape (runsc's
    sandbox network adds a subnet's MASQUERADE) is not."""
    hairpin = "-A POSTROUTING -s 172.22.0.2/32 -d 172.22.0.2/32 -p tcp -m tcp --dport 7004 -j MASQUERADE"
    assert _DOCKER_HAIRPIN.match(hairpin)
    for other in ("-A POSTROUTING -s 172.22.0.2/32 -d 172.22.0.3/32 -p tcp -m tcp --dport 7004 -j MASQUERADE",
                  "-A POSTROUTING -s 10.0.0.0/24 -o eth0 -j MASQUERADE",
                  "-A PREROUTING -s 172.22.0.2/32 -d 172.22.0.2/32 -p tcp -m tcp --dport 7004 -j MASQUERADE"):
        assert not _DOCKER_HAIRPIN.match(other), other
