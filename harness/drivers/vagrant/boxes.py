"""The ``vagrant`` kind's boxes: which box a target runs, whether it is here, and
building the boxes named ``iomux/...`` (vagrant/box/build.sh for Debian,
vagrant/box/freebsd.sh for FreeBSD).

- FreeBSD boxes are built here from the FreeBSD project's own VM images
  (vagrant/box/freebsd.sh): Vagrant Cloud, where the public boxes lived, took no
  new boxes after 2026-10-01 and is phased out by 2026-12-31. A FreeBSD target names its image in targets.toml
  (``[target.freebsd]``); the image and its CHECKSUM.SHA512 file are the user's
  download, looked for in ``IOMUX_IMAGES`` (default ~/.cache/iomux). A box the
  user already has is still taken through ``IOMUX_BOX_<TARGET>``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

from harness.drivers.base import Target, TargetError, TargetUnavailable, run_argv
from harness.drivers.owners import exclusive_lock
from harness.drivers.ssh import last_line

ROOT = Path(__file__).resolve().parents[3]
VAGRANT_DIR = ROOT / "vagrant"
BOX_BUILD = VAGRANT_DIR / "box" / "build.sh"
#: The FreeBSD box recipe: a box from FreeBSD's own VM image, no installer.
FREEBSD_BOX_BUILD = VAGRANT_DIR / "box" / "freebsd.sh"
#: Where FreeBSD images and their checksum files are looked for (vagrant/box/freebsd.sh too).
IMAGES_ENV = "IOMUX_IMAGES"
DEFAULT_IMAGES = "~/.cache/iomux"
#: Per-run vagrant state; short, because ssh's ControlPath must fit a unix socket name.
STATE_ROOT = Path(os.environ.get("IOMUX_VAGRANT_STATE", "/var/tmp/iomux-vagrant")) / "runs"
#: Boxes named with this prefix are built here by vagrant/box/build.sh.
LOCAL_BOX_PREFIX = "iomux/"


def box_override_var(target: Target) -> str:
    """The variable that hands ``target`` a box the user already has (IOMUX_BOX_FREEBSD_14)."""
    return "IOMUX_BOX_" + target.name.upper().replace("-", "_")


@dataclasses.dataclass(frozen=True)
class FreeBSDImage:
    """A FreeBSD target's VM image, as targets.toml's ``[target.freebsd]`` names it."""

    version: str
    file: str
    checksum_file: str
    url: str
    sha512: str = ""

    @classmethod
    def of(cls, target: Target) -> FreeBSDImage | None:
        """The image ``target`` is built from, or None if it names none."""
        raw = target.options.get("freebsd")
        if not isinstance(raw, dict):
            return None
        try:
            return cls(version=str(raw["version"]), file=str(raw["image"]),
                       checksum_file=str(raw["checksum_file"]), url=str(raw["url"]),
                       sha512=str(raw.get("sha512", "")))
        except KeyError as exc:
            raise TargetError(f"{target.name}: [target.freebsd] lacks {exc.args[0]!r} "
                              "in targets.toml") from None

    @staticmethod
    def directory() -> tuple[Path, str]:
        """Where the image is looked for, and how to show it (``~`` kept short)."""
        chosen = os.environ.get(IMAGES_ENV, "")
        shown = chosen or DEFAULT_IMAGES
        return Path(shown).expanduser(), shown

    def missing_reason(self) -> str | None:
        """None if the image and a checksum for it are here, else the one line saying where."""
        where, shown = self.directory()
        has_sum = bool(self.sha512) or (where / self.checksum_file).is_file()
        if (where / self.file).is_file() and has_sum:
            return None
        return (f"no FreeBSD {self.version} image: put {self.file} and its CHECKSUM.SHA512 "
                f"in {shown}, or set {IMAGES_ENV}")


class VagrantBoxes:
    """The box half of the vagrant driver: availability of a target's box, and build."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self._box_list: str | None = None

    def _boxes(self) -> str:
        if self._box_list is None:
            res = run_argv(["vagrant", "box", "list", "--machine-readable"], 60, "vagrant box list")
            self._box_list = res.stdout
        return self._box_list

    def box_installed(self, box: str) -> bool:
        """Whether ``vagrant box list`` has ``box`` (any provider)."""
        return any(line.split(",")[3:4] == [box] for line in self._boxes().splitlines()
                   if ",box-name," in line)

    def target_unavailable_reason(self, target: Target) -> str | None:
        """A public box that is not installed is a reason; an iomux/ box is built
        (a FreeBSD one only from the user's image: its absence is the reason)."""
        if not target.box:
            return f"target {target.name} names no box in targets.toml"
        box = self.box_for(target)
        image = FreeBSDImage.of(target)
        if image is not None and box == target.box:
            return None if self.box_installed(box) else image.missing_reason()
        if box != target.box:
            if self.box_installed(box):
                return None
            family = {"freebsd": "FreeBSD"}.get(target.os_family, target.os_family)
            return (f"no {family} box {box}: not in vagrant box list "
                    f"(vagrant box add it, or unset {box_override_var(target)})")
        if target.box.startswith(LOCAL_BOX_PREFIX):
            if self.box_installed(target.box) or self._local_box_cached(target):
                return None
            if os.geteuid() != 0:
                return f"no box {target.box}: building it needs root (run as root)"
            if shutil.which("debootstrap") is None:
                return f"no box {target.box}: debootstrap missing (apt-get install debootstrap)"
            return None
        if not self.box_installed(target.box):
            family = {"freebsd": "FreeBSD"}.get(target.os_family, target.os_family)
            return f"no {family} box: vagrant box list has no {target.box}"
        return None

    def box_for(self, target: Target) -> str:
        """The box ``target`` runs: the user's through IOMUX_BOX_<TARGET>, else targets.toml's."""
        return os.environ.get(box_override_var(target), "") or target.box or ""

    # -- build ----------------------------------------------------------------------------

    def _local_box_cached(self, target: Target) -> bool:
        res = run_argv([str(BOX_BUILD), "--check"], 60, f"{target.name}: box check",
                       env=self._box_env(target))
        return res.rc == 0

    def _box_env(self, target: Target) -> dict[str, str]:
        return {**os.environ, "IOMUX_BOX_NAME": target.box or ""}

    def build(self, target: Target, timeout: float) -> dict[str, Any]:
        """Build (or find cached) an iomux/ box; public boxes are used as installed."""
        began = time.monotonic()
        image = FreeBSDImage.of(target)
        if image is not None and self.box_for(target) == target.box:
            return self._build_freebsd(target, image, timeout)
        if self.box_for(target) != target.box:
            return {"cached": True, "seconds": 0.0, "box": self.box_for(target)}
        if not (target.box or "").startswith(LOCAL_BOX_PREFIX):
            return {"cached": True, "seconds": 0.0, "box": target.box}
        # One builder at a time across xdist workers; the others then find it cached.
        with exclusive_lock(STATE_ROOT / "box.lock", timeout):
            if self._local_box_cached(target):
                return {"cached": True, "seconds": round(time.monotonic() - began, 1),
                        "box": target.box}
            left = max(1.0, timeout - (time.monotonic() - began))
            res = run_argv([str(BOX_BUILD)], left, f"{target.name}: box build",
                           env=self._box_env(target))
            self._box_list = None
            if res.rc != 0:
                raise TargetError(f"{target.name}: box build failed: {last_line(res.stderr or res.stdout)}")
        return {"cached": False, "seconds": round(time.monotonic() - began, 1), "box": target.box,
                "log": res.stdout.strip().splitlines()[-3:]}

    def _freebsd_env(self, target: Target, image: FreeBSDImage) -> dict[str, str]:
        return {**os.environ, "IOMUX_BOX_NAME": target.box or "",
                "IOMUX_IMAGES": str(image.directory()[0]), "IOMUX_FREEBSD_SHA512": image.sha512}

    def _build_freebsd(self, target: Target, image: FreeBSDImage, timeout: float) -> dict[str, Any]:
        """vagrant/box/freebsd.sh VERSION: verify the image, build and add the box (cached).

        Without the image an installed box of the name is used as it is: the
        recipe cannot tell whether it is current, and nothing here could rebuild it."""
        began = time.monotonic()
        box = target.box or ""
        with exclusive_lock(STATE_ROOT / "box.lock", timeout):
            if image.missing_reason() is not None:
                if self.box_installed(box):
                    return {"cached": True, "seconds": 0.0, "box": box,
                            "image": "absent; the installed box is used as it is"}
                raise TargetUnavailable(f"{target.name}: {image.missing_reason()}")
            env = self._freebsd_env(target, image)
            check = run_argv([str(FREEBSD_BOX_BUILD), image.version, "--check"], 120,
                             f"{target.name}: box check", env=env)
            if check.rc == 0:
                return {"cached": True, "seconds": round(time.monotonic() - began, 1), "box": box}
            left = max(1.0, timeout - (time.monotonic() - began))
            res = run_argv([str(FREEBSD_BOX_BUILD), image.version], left,
                           f"{target.name}: box build", env=env)
            self._box_list = None
            if res.rc != 0:
                raise TargetError(f"{target.name}: box build failed: "
                                  f"{last_line(res.stderr or res.stdout)}")
        return {"cached": False, "seconds": round(time.monotonic() - began, 1), "box": box,
                "image": image.file, "log": res.stdout.strip().splitlines()[-3:]}
