"""The libvirt side of the vagrant kind (vagrant-libvirt): which URI, whether
libvirt and QEMU are here, and the domains vagrant made, listed and removed with
``virsh`` (a domain outlives a ``vagrant destroy`` that was interrupted).

- ``LIBVIRT_DEFAULT_URI`` names the connection, as for virsh itself; the system
  one (qemu:///system) is where vagrant-libvirt defines its domains by default.
- ``virsh undefine --remove-all-storage --nvram`` also removes the domain's disk
  volumes, which vagrant-libvirt creates in the default pool.
"""

from __future__ import annotations

import os
import shutil

from harness.drivers.base import StepTimeout, TargetError, run_argv
from harness.drivers.ssh import last_line
from harness.reasons import Reason


class LibvirtDomains:
    """libvirt for the vagrant driver: its URI, what is missing, its domains."""

    def _libvirt_uri(self) -> str:
        return os.environ.get("LIBVIRT_DEFAULT_URI", "qemu:///system")

    def _libvirt_missing(self) -> str | None:
        if shutil.which("virsh") is None:
            return "libvirt not installed (apt-get install libvirt-daemon-system)"
        if shutil.which("qemu-system-x86_64") is None:
            return "QEMU not installed (apt-get install qemu-system-x86)"
        try:
            plugins = run_argv(["vagrant", "plugin", "list"], 60, "vagrant plugin list")
            if "vagrant-libvirt" not in plugins.stdout:
                return "vagrant-libvirt plugin missing (apt-get install vagrant-libvirt)"
            ver = run_argv(["virsh", "-c", self._libvirt_uri(), "version"], 30, "virsh version")
        except (StepTimeout, TargetError) as exc:
            return f"libvirt check failed: {exc} (sudo make setup)"
        if ver.rc != 0:
            return Reason(f"libvirtd does not answer on {self._libvirt_uri()} (sudo make setup)",
                          last_line(ver.stderr))
        return None

    def _domains(self) -> list[str]:
        if shutil.which("virsh") is None:
            return []
        res = run_argv(["virsh", "-c", self._libvirt_uri(), "list", "--all", "--name"], 60,
                       "virsh list")
        return [name.strip() for name in res.stdout.splitlines() if name.strip()]

    def _remove_domains(self, prefix: str) -> list[str]:
        removed = []
        for name in self._domains():
            if not name.startswith(prefix):
                continue
            uri = self._libvirt_uri()
            run_argv(["virsh", "-c", uri, "destroy", name], 60, "virsh destroy")
            run_argv(["virsh", "-c", uri, "undefine", name, "--remove-all-storage", "--nvram"], 60,
                     "virsh undefine")
            removed.append(f"libvirt domain {name}")
        return removed

    def _domain_state(self, name: str) -> str:
        """``virsh domstate`` of ``name`` ("running", "shut off"), "" if there is none."""
        state = run_argv(["virsh", "-c", self._libvirt_uri(), "domstate", name], 60,
                         "virsh domstate")
        return state.stdout.strip() if state.rc == 0 else ""
