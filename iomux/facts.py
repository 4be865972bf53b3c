"""iomux probe: the facts of this host that explain how the server behaves here.

Everything is read from the running system by capability or from the kernel's
own files; nothing is assumed from the OS's name. A fact that cannot be read
is None, never a guess.

Which kernel answers the system calls (``kernel_family``) is not the same
question as which ABI it offers (``os_family``): gVisor's Sentry offers the
Linux ABI from user space with its own epoll and TCP/IP stack (netstack), so
Python sees sys.platform "linux" there. Facts used to tell them apart:

- gVisor reports a fixed uname: release "4.4.0" and version
  "#1 SMP Sun Jan 10 15:06:54 PST 2016" (pkg/sentry/kernel/version.go), in
  the 2022 and 2024 builds alike, whatever the host runs; /proc/version
  repeats it. Linux 4.4 was built in 2016 too, but no Linux distribution
  kernel carries that exact build string.
- gVisor's kernel log (/dev/kmsg is absent; ``dmesg`` reads the Sentry's
  syslog) opens with "Starting gVisor...". It is a second witness where dmesg
  may be read; on a real Linux dmesg is often restricted (dmesg_restrict).
- User-Mode Linux is Linux (its own kernel, the Linux TCP stack): family
  "linux", platform "uml". Its /proc/cpuinfo says "vendor_id : User Mode
  Linux" and "model name : UML" (arch/um/kernel/um_arch.c), and every system
  call it serves is a ptrace round trip through the host kernel, so fixed
  per-call costs dwarf small per-fd ones there.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
from typing import Any, Dict, Optional

from iomux import __version__, backends


def _rlimit_nofile() -> Dict[str, Optional[int]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def finite(value: int) -> Optional[int]:
        return None if value == resource.RLIM_INFINITY else int(value)

    return {"soft": finite(soft), "hard": finite(hard)}


def _sysctl(name: str) -> Optional[str]:
    path = shutil.which("sysctl") or next(
        (p for p in ("/sbin/sysctl", "/usr/sbin/sysctl") if os.path.exists(p)), None
    )
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = done.stdout.strip()
    return value if done.returncode == 0 and value else None


def somaxconn() -> Optional[int]:
    """The kernel's cap on a listen() backlog, or None if it cannot be read.

    Linux: /proc/sys/net/core/somaxconn. FreeBSD: kern.ipc.soacceptqueue
    (kern.ipc.somaxconn is its old alias, and the name on macOS and the other BSDs).
    """
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        pass
    for name in ("kern.ipc.soacceptqueue", "kern.ipc.somaxconn"):
        value = _sysctl(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                continue
    return None


#: gVisor's fixed uname -r / uname -v (pkg/sentry/kernel/version.go).
GVISOR_RELEASE = "4.4.0"
GVISOR_VERSION = "#1 SMP Sun Jan 10 15:06:54 PST 2016"


def _dmesg_head() -> Optional[str]:
    path = shutil.which("dmesg")
    if path is None:
        return None
    try:
        done = subprocess.run([path], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout[:2000] if done.returncode == 0 else None


def _is_uml() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "User Mode Linux" in f.read(4096)
    except OSError:
        return False


def kernel_identity() -> Dict[str, Any]:
    """Which kernel runs this process: ``{"family", "platform", "evidence"}``.

    ``family`` is ``gvisor``, ``linux``, ``freebsd``, ``darwin`` (or
    sys.platform's name for another system); ``platform`` is ``uml`` for
    User-Mode Linux and ``native`` otherwise; ``evidence`` says, in one line,
    what it was read from.
    """
    uname = os.uname()
    family = sys.platform.rstrip("0123456789")
    if family != "linux":
        return {"family": family, "platform": "native",
                "evidence": f"sys.platform {sys.platform!r}, uname {uname.sysname}"}
    if uname.release == GVISOR_RELEASE and uname.version == GVISOR_VERSION:
        return {"family": "gvisor", "platform": "native",
                "evidence": f"uname is gVisor's fixed {GVISOR_RELEASE} {GVISOR_VERSION!r}"}
    head = _dmesg_head()
    if head is not None and "Starting gVisor" in head:
        return {"family": "gvisor", "platform": "native",
                "evidence": "dmesg opens with 'Starting gVisor...'"}
    if _is_uml():
        return {"family": "linux", "platform": "uml",
                "evidence": "/proc/cpuinfo says 'User Mode Linux'"}
    return {"family": "linux", "platform": "native",
            "evidence": f"uname {uname.release} {uname.version!r} is not gVisor's"}


def _os_release() -> Optional[str]:
    # The distribution's name, where it says (Linux); the BSDs' uname is enough.
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def collect() -> Dict[str, Any]:
    """Return the host facts as a JSON-ready dict."""
    uname = os.uname()
    offered = backends.available()
    try:
        auto: Optional[str] = backends.auto()
    except Exception:
        auto = None
    identity = kernel_identity()
    return {
        "os": uname.sysname,
        "os_family": sys.platform.rstrip("0123456789"),
        "kernel_family": identity["family"],
        "kernel_platform": identity["platform"],
        "kernel_evidence": identity["evidence"],
        "distribution": _os_release(),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "machine": uname.machine,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "backends": offered,
        "auto": auto,
        "known_backends": list(backends.KNOWN),
        "rlimit_nofile": _rlimit_nofile(),
        "somaxconn": somaxconn(),
        "so_reuseport": hasattr(socket, "SO_REUSEPORT"),
        # FreeBSD 12+ has SO_REUSEPORT_LB even where Python (< 3.12) does not name it.
        "so_reuseport_lb": hasattr(socket, "SO_REUSEPORT_LB") or sys.platform.startswith("freebsd"),
        "iomux": __version__,
    }
