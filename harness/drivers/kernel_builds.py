"""The kernel binaries of the ``gvisor`` and ``uml`` kinds, as Debian ships them,
pinned by version (scripts/fetch-kernels.sh puts them there):

- Debian 12's builds are installed packages: ``/usr/bin/runsc``,
  ``/usr/bin/linux.uml``, pinned by the version dpkg reports.
- Debian 13's builds are .deb files unpacked under ``KERNELS_DIR``
  (``<package>-<version>/usr/bin/...``), never installed over the host's.
  Debian 13's ``linux.uml`` is linked against glibc 2.38+ and this host has
  2.36, so it runs on Debian 13's libc6, unpacked beside it. Not as
  ``ld.so linux.uml``: UML sizes its physical memory from where brk starts,
  which is then past ld.so's image ("Too few physical memory!"). The fetch
  script makes ``linux.uml.ld-trixie``, a copy whose PT_INTERP names Debian
  13's loader (patched in place, layout unchanged), run with LD_LIBRARY_PATH.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Mapping

from harness.drivers.base import Target, TargetError

KERNELS_DIR = Path(os.environ.get("IOMUX_KERNELS_DIR", "/var/cache/iomux/kernels"))
FETCH_HINT = "run scripts/fetch-kernels.sh install"
#: Paths of the executable inside each package.
EXECUTABLES: Mapping[str, str] = {"runsc": "usr/bin/runsc", "user-mode-linux": "usr/bin/linux.uml"}
LIBC_DIR = "usr/lib/x86_64-linux-gnu"


@dataclasses.dataclass(frozen=True)
class KernelBinary:
    """One pinned build of runsc or linux.uml, as a target declares it."""

    package: str
    version: str
    #: "bookworm" (an installed package) or "trixie" (an unpacked .deb)
    suite: str
    #: the libc6 version whose loader runs it ("" for the host's own)
    libc6: str = ""

    @property
    def path(self) -> Path:
        """Where the executable is."""
        rel = EXECUTABLES[self.package]
        if self.suite == "bookworm":
            return Path("/") / rel
        return KERNELS_DIR / f"{self.package}-{self.version}" / rel

    @property
    def runs(self) -> Path:
        """What is executed: the binary, or its copy on Debian 13's loader."""
        return self.path.with_name(self.path.name + ".ld-trixie") if self.libc6 else self.path

    def argv0(self) -> list[str]:
        """The words that run it."""
        return [str(self.runs)]

    def env(self) -> dict[str, str]:
        """What its environment needs: Debian 13's libc6 for the patched copy."""
        if not self.libc6:
            return {}
        return {"LD_LIBRARY_PATH": str(KERNELS_DIR / f"libc6-{self.libc6}" / LIBC_DIR)}

    def missing_reason(self) -> str | None:
        """Why this build cannot run here (one line with the fix), or None."""
        if self.suite == "bookworm":
            if _dpkg_version(self.package) != self.version:  # absent, or another version
                return f"{self.package} {self.version} not installed ({FETCH_HINT})"
        elif not (self.path.parent.parents[1] / ".unpacked").is_file():
            return f"{self.package} {self.version} not fetched ({FETCH_HINT})"
        if self.libc6 and not (KERNELS_DIR / f"libc6-{self.libc6}" / ".unpacked").is_file():
            return f"libc6 {self.libc6} (for {self.package}) not fetched ({FETCH_HINT})"
        if not os.access(self.runs, os.X_OK):
            return f"{self.runs.name} {self.version} not made ({FETCH_HINT})"
        return None

    def facts(self) -> dict[str, Any]:
        """Version and SHA-256 of the binary that runs, for the report."""
        facts = {"package": self.package, "version": self.version, "suite": self.suite,
                 "binary": str(self.path), "sha256": sha256_of(str(self.path))}
        if self.libc6:
            facts.update(runs=str(self.runs), runs_sha256=sha256_of(str(self.runs)),
                         libc6=self.libc6)
        return facts


def kernel_binary(target: Target) -> KernelBinary:
    """The build ``target`` declares: ``[target.kernel_build]`` in targets.toml."""
    build = target.options.get("kernel_build")
    if not isinstance(build, Mapping) or not all(
            isinstance(build.get(k), str) for k in ("package", "version", "suite")):
        raise TargetError(f"{target.name}: targets.toml needs [target.kernel_build] with "
                          f"package, version and suite")
    if build["package"] not in EXECUTABLES or build["suite"] not in ("bookworm", "trixie"):
        raise TargetError(f"{target.name}: unknown kernel build {dict(build)}")
    return KernelBinary(str(build["package"]), str(build["version"]), str(build["suite"]),
                        str(build.get("libc6", "")))


def _dpkg_version(package: str) -> str:
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", package],
                              capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = proc.stdout.split()
    return words[3] if proc.returncode == 0 and len(words) == 4 and words[2] == "installed" else ""


@functools.cache
def sha256_of(path: str) -> str:
    """The SHA-256 of a file, read once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
