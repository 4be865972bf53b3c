"""Suite "host": what the target looks like from outside, through pytest-testinfra.

Commands go through testinfra's quoting (``host.run("%s -c %s", a, b)``): no
argument is ever interpolated into a shell string by hand.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

import iomux
from harness.drivers.base import BACKEND_PORTS, Target
from harness.running_target import RunningTarget

pytestmark = pytest.mark.suite("host")

# Lists "iomux serve" processes with their real and effective uids, from /proc.
# It runs on the target's own Python so that it needs no ps(1) in a minimal image.
_LINUX_SERVERS = r"""
import json, os
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open("/proc/%s/cmdline" % pid, "rb").read().split(b"\0")
        status = open("/proc/%s/status" % pid).read()
    except OSError:
        continue
    words = [a.decode(errors="replace") for a in argv if a]
    if "iomux" in " ".join(words) and "serve" in words:
        uids = [l.split()[1:3] for l in status.splitlines() if l.startswith("Uid:")][0]
        found.append({"pid": int(pid), "uid": int(uids[0]), "euid": int(uids[1]), "argv": words})
print(json.dumps(found))
"""


def _python(rt: RunningTarget) -> str:
    return rt.instance.guest.python


def _guest_ports(rt: RunningTarget) -> dict[str, int]:
    # Make sure every backend's server is up (a driver may start them on demand).
    for backend in rt.target.backends:
        rt.echo_address(backend)
    declared = rt.instance.guest.guest_ports
    if declared:
        return {str(k): int(v) for k, v in declared.items()}
    return {b: BACKEND_PORTS[b] for b in rt.started_backends if b in BACKEND_PORTS}


def _servers(host: Any, rt: RunningTarget, target: Target) -> list[dict[str, Any]]:
    if target.os_family == "linux":
        found: list[dict[str, Any]] = json.loads(
            host.check_output("%s -c %s", _python(rt), _LINUX_SERVERS))
    else:
        found = []
        for line in host.check_output("ps -ax -o pid= -o uid= -o command=").splitlines():
            pid, uid, command = line.split(None, 2)
            if "iomux" in command and " serve" in command:
                found.append({"pid": int(pid), "uid": int(uid), "euid": int(uid),
                              "argv": command.split()})
    pids = rt.instance.guest.server_pids
    if pids:
        # On a shared host other iomux servers may be running: only ours count.
        ours = {int(p) for p in pids.values()}
        found = [s for s in found if s["pid"] in ours]
    return found


def test_installed_version_is_the_working_tree(host: Any, running_target: RunningTarget) -> None:
    """The iomux the target runs is the version of this working tree."""
    code = "import iomux, sys; sys.stdout.write(iomux.__version__)"
    cwd = running_target.instance.guest.cwd
    if cwd:
        out = host.check_output("cd %s && %s -c %s", cwd, _python(running_target), code)
    else:
        out = host.check_output("%s -c %s", _python(running_target), code)
    assert out.strip() == iomux.__version__


def test_server_runs_as_non_root(host: Any, running_target: RunningTarget,
                                 target: Target) -> None:
    """Every echo server process in the target runs with a non-zero real and effective uid."""
    _guest_ports(running_target)  # every backend's server up first
    servers = _servers(host, running_target, target)
    assert servers, "no iomux serve process found in the target"
    root = [s for s in servers if s["uid"] == 0 or s["euid"] == 0]
    assert not root, f"running as root: {root}"


def test_listens_on_expected_ports(host: Any, running_target: RunningTarget,
                                   target: Target) -> None:
    """Inside the target, each backend's server listens on the port the driver declared."""
    ports = _guest_ports(running_target)
    assert ports, "the driver declared no ports"
    if target.os_family == "linux":
        # /proc/net/tcp{,6}: local address is IP:PORT in hex, state 0A is LISTEN.
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            f = host.file(table)
            if not f.exists:
                continue
            for line in f.content_string.splitlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "0A":
                    listening.add(int(fields[1].rsplit(":", 1)[1], 16))
        missing = {b: p for b, p in ports.items() if p not in listening}
    else:
        missing = {b: p for b, p in ports.items()
                   if not host.socket(f"tcp://{p}").is_listening}
    assert not missing, f"not listening: {missing}"


def test_python_and_kernel(host: Any, running_target: RunningTarget, target: Target) -> None:
    """Record the target's Python version and kernel release; check the declared Python."""
    kernel = host.check_output("uname -r").strip()
    python = host.check_output("%s -c %s", _python(running_target),
                               "import platform; print(platform.python_version())").strip()
    running_target.record("kernel", kernel)
    running_target.record("python", python)
    assert kernel
    if target.python:
        assert python.startswith(target.python + "."), (
            f"targets.toml says Python {target.python}, the target has {python}")
