"""Where a docker target's base image comes from, in this order:

1. already on the engine: the registry image (``target.image``), else the
   offline base built earlier for the same recipe;
2. a registry: ``target.image`` is pulled once (the default, for people who
   have a registry);
3. offline: when the engine cannot pull (no registry reachable, as on an
   air-gapped CI box), a Debian base is built from the package archive with
   ``debootstrap --variant=minbase`` and imported with the SDK's
   ``import_image`` as ``iomux-base/debian:<suite>-<recipe hash>``.

``IOMUX_BASE_SOURCE=registry|offline`` forces one source; the default ``auto``
follows the order above. A failed pull is remembered for an hour (in the cache
directory) so that a warm run never waits on an unreachable registry again.

Also here, for the target images built over these bases (``images``): the
cache directory and the build locks, and running one build step with a deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from harness import reasons
from harness.drivers.base import (
    LABEL_PROJECT,
    PROJECT,
    StepTimeout,
    Target,
    TargetError,
    TargetUnavailable,
    call_with_timeout,
    one_line,
    run_argv,
)
from harness.drivers.docker.engine import docker_errors
from harness.drivers.owners import exclusive_lock

REPO_ROOT = Path(__file__).resolve().parents[3]
BASE_REPO = "iomux-base/debian"
LABEL_RECIPE = "io.iomux.recipe"

#: Bump when the offline recipe changes in a way the hash inputs do not show.
RECIPE_VERSION = "2"
#: python3 for iomux; procps (ps) and iproute2 (ss) for testinfra's host checks;
#: strace so that the registration probe can count system calls in the target.
DEBOOTSTRAP_INCLUDE = ("python3", "procps", "iproute2", "strace")
#: Debian suite -> the Python it ships, for the host-side wheel download.
DEBIAN_SUITES: Mapping[str, str] = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PULL_TIMEOUT = 60.0
PULL_FAILURE_TTL = 3600.0


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """The image a target is built FROM."""

    ref: str
    image_id: str
    #: "local" (found on the engine), "registry" (pulled now) or "debootstrap" (built now)
    source: str
    seconds: float


def cache_dir() -> Path:
    """Where wheels, locks and remembered pull failures live (``IOMUX_CACHE_DIR``)."""
    path = Path(os.environ.get("IOMUX_CACHE_DIR", str(REPO_ROOT / ".cache" / "iomux-images")))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    """Serialise one build across xdist workers and concurrent runs on this host.

    The locks live in the temporary directory, not the cache directory: image
    tags belong to the engine, shared by every checkout and cache on the host."""
    with exclusive_lock(Path(tempfile.gettempdir()) / "iomux-image-locks" / f"{name}.lock"):
        yield


def offline_recipe(target: Target) -> dict[str, Any] | None:
    """The debootstrap recipe of a target: ``[target.offline]`` in targets.toml, else
    derived from a ``debian:<suite>[-slim]`` image name; None if there is none."""
    raw = target.options.get("offline")
    recipe: dict[str, Any] = dict(raw) if isinstance(raw, Mapping) else {}
    if not recipe.get("suite") and target.image:
        match = re.fullmatch(r"(?:docker\.io/)?(?:library/)?debian:([a-z]+)(?:-slim)?",
                             target.image)
        if match and match.group(1) in DEBIAN_SUITES:
            recipe["suite"] = match.group(1)
    if not recipe.get("suite"):
        return None
    recipe.setdefault("method", "debootstrap")
    recipe.setdefault("variant", "minbase")
    recipe["include"] = sorted(set(DEBOOTSTRAP_INCLUDE) | set(recipe.get("include", ())))
    return recipe


def recipe_tag(recipe: Mapping[str, Any]) -> str:
    """``iomux-base/debian:<suite>-<hash>`` of an offline recipe (the mirror is left
    out of the hash: any mirror of the archive gives the same base)."""
    key = json.dumps({"v": RECIPE_VERSION, "suite": recipe["suite"], "variant": recipe["variant"],
                      "include": recipe["include"]}, sort_keys=True)
    return f"{BASE_REPO}:{recipe['suite']}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def debian_mirror() -> str:
    """The Debian mirror: ``IOMUX_DEBIAN_MIRROR``, else the host's apt sources, else
    deb.debian.org."""
    env = os.environ.get("IOMUX_DEBIAN_MIRROR")
    if env:
        return env
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                # deb822 "URIs: X" or one-line "deb X suite ...", main archive only
                match = re.match(r"\s*(?:URIs:|deb)\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s*", line)
                if match and "security" not in match.group(1):
                    return match.group(1)
    return DEFAULT_MIRROR


class BaseImageBuilder:
    """Finds, pulls or builds base images on one Docker engine."""

    def __init__(self, client: Any, log: Any = None) -> None:
        self.client = client
        self._log = log
        self._pull_errors: dict[str, str] = {}

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    def _local_image(self, ref: str) -> Any | None:
        try:
            return self.client.images.get(ref)
        except docker_errors().ImageNotFound:
            return None

    def _pull_failures_path(self) -> Path:
        return cache_dir() / "pull-failures.json"

    def _remembered_pull_failure(self, ref: str) -> str | None:
        if ref in self._pull_errors:
            return self._pull_errors[ref]
        try:
            data = json.loads(self._pull_failures_path().read_text())
        except (OSError, ValueError):
            return None
        entry = data.get(ref)
        if isinstance(entry, dict) and time.time() - float(entry.get("at", 0)) < PULL_FAILURE_TTL:
            return str(entry.get("error", "pull failed"))
        return None

    def _remember_pull_failure(self, ref: str, error: str) -> None:
        self._pull_errors[ref] = error
        path = self._pull_failures_path()
        with file_lock("pull-failures"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data[ref] = {"at": time.time(), "error": error}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            tmp.replace(path)

    def try_pull(self, ref: str, timeout: float = PULL_TIMEOUT) -> str | None:
        """Pull ``ref`` once; return None on success, else why not (one line).

        The SDK's pull has no overall timeout, so it runs under the watchdog
        (``call_with_timeout``), abandoned on timeout (the daemon gives up on its own)."""
        remembered = self._remembered_pull_failure(ref)
        if remembered is not None and os.environ.get("IOMUX_BASE_SOURCE") != "registry":
            return remembered
        repo, _, tag = ref.rpartition(":") if ":" in ref.split("/")[-1] else (ref, "", "latest")
        try:
            call_with_timeout(f"pull {ref}", timeout, lambda: self.client.images.pull(repo, tag=tag))
            return None
        except StepTimeout:
            error = f"no answer from the registry within {timeout:g}s"
        except Exception as exc:  # any SDK/daemon failure means "cannot pull"
            # the engine's own words (APIError.explanation), not the HTTP wrapping
            error = one_line(Exception(getattr(exc, "explanation", None) or exc))
        self._remember_pull_failure(ref, error)
        return error

    def base_unavailable_reason(self, target: Target) -> str | None:
        """Why no base image can be had for ``target`` here, or None. Checks in the
        order ``ensure_base`` tries (a failed pull is remembered, not repeated)."""
        mode = os.environ.get("IOMUX_BASE_SOURCE", "auto")
        recipe = offline_recipe(target)
        if mode != "offline" and target.image and self._local_image(target.image) is not None:
            return None
        if mode != "registry" and recipe is not None \
                and self._local_image(recipe_tag(recipe)) is not None:
            return None
        error = "IOMUX_BASE_SOURCE=offline"
        if mode != "offline" and target.image:
            pulled = self.try_pull(target.image)
            if pulled is None:
                return None
            error = pulled
        if mode == "registry" or recipe is None:
            return reasons.no_image(target.image, error, None)
        missing = debootstrap_missing()
        if missing:
            return reasons.no_image(target.image, error, missing)
        return None

    def ensure_base(self, target: Target, deadline: float) -> BaseImage:
        """Find, pull or debootstrap the base image of ``target``."""
        mode = os.environ.get("IOMUX_BASE_SOURCE", "auto")
        if mode not in ("auto", "registry", "offline"):
            raise TargetError(f"IOMUX_BASE_SOURCE must be auto, registry or offline, not {mode!r}")
        recipe = offline_recipe(target)
        started = time.monotonic()
        if mode != "offline" and target.image:
            found = self._local_image(target.image)
            if found is not None:
                return BaseImage(target.image, found.id, "local", time.monotonic() - started)
        if mode != "registry" and recipe is not None:
            found = self._local_image(recipe_tag(recipe))
            if found is not None:
                return BaseImage(recipe_tag(recipe), found.id, "local", time.monotonic() - started)
        error = "IOMUX_BASE_SOURCE=offline"
        if mode != "offline" and target.image:
            pulled = self.try_pull(target.image, min(PULL_TIMEOUT, remaining(deadline, "pull")))
            if pulled is None:
                image = self.client.images.get(target.image)
                return BaseImage(target.image, image.id, "registry", time.monotonic() - started)
            error = pulled
        if mode == "registry" or recipe is None:
            # No base image can be had here (no registry, no offline recipe).
            raise TargetUnavailable(reasons.no_image(target.image, error, None))
        self.log(f"{target.name}: the engine cannot pull ({error}); "
                 f"building the base from the Debian archive")
        tag = recipe_tag(recipe)
        with file_lock(tag.replace("/", "_").replace(":", "_")):
            found = self._local_image(tag)  # another worker may have built it meanwhile
            if found is None:
                found = self.debootstrap_import(recipe, tag, deadline)
                return BaseImage(tag, found.id, "debootstrap", time.monotonic() - started)
        return BaseImage(tag, found.id, "local", time.monotonic() - started)

    def debootstrap_import(self, recipe: Mapping[str, Any], tag: str, deadline: float) -> Any:
        """Build a Debian root filesystem with debootstrap and import it as ``tag``."""
        missing = debootstrap_missing()
        if missing:
            raise TargetUnavailable(reasons.Reason(
                f"no image: debian {recipe['suite']} not built, {missing}"))
        mirror = str(recipe.get("mirror") or debian_mirror())
        work = Path(tempfile.mkdtemp(prefix="iomux-debootstrap-"))
        rootfs, tarball = work / "rootfs", work / "rootfs.tar"
        try:
            argv = ["debootstrap", f"--variant={recipe['variant']}",
                    f"--include={','.join(recipe['include'])}", "--components=main",
                    str(recipe["suite"]), str(rootfs), mirror]
            self.log(f"debootstrap {recipe['suite']} from {mirror}")
            run_step(argv, remaining(deadline, "debootstrap"), "debootstrap")
            _trim_rootfs(rootfs)
            run_step(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
                 remaining(deadline, "debootstrap tar"), "debootstrap tar")
            repo, _, tagname = tag.rpartition(":")
            changes = [f"LABEL {LABEL_PROJECT}={PROJECT}",
                       f"LABEL {LABEL_RECIPE}={tagname}",
                       "ENV LANG=C.UTF-8",
                       'CMD ["/bin/sh"]']
            self.client.api.import_image_from_file(str(tarball), repository=repo, tag=tagname,
                                                   changes=changes)
            return self.client.images.get(tag)
        finally:
            _remove_tree(work)

    # -- target images -----------------------------------------------------


def debootstrap_missing() -> str | None:
    """Why the offline recipe cannot run on this host, or None."""
    if shutil.which("debootstrap") is None:
        return reasons.DEBOOTSTRAP_MISSING
    if os.geteuid() != 0:
        return reasons.DEBOOTSTRAP_ROOT
    return None


def remaining(deadline: float, step: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise StepTimeout(f"build: timed out before {step}")
    return left


def run_step(argv: list[str], timeout: float, step: str) -> None:
    result = run_argv(argv, timeout, step)
    if result.rc != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines() or ["no output"]
        raise TargetError(f"{step} failed (exit {result.rc}): {detail[-1]}")


def _trim_rootfs(rootfs: Path) -> None:
    """Drop what a container never needs: package caches, docs, device nodes
    (the engine mounts its own /dev)."""
    for rel in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
                "usr/share/info", "usr/share/locale", "dev"):
        path = rootfs / rel
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name not in ("lock", "locale.alias"):  # apt's lock; glibc's aliases
                    child.unlink()


def _remove_tree(path: Path) -> None:
    """Remove a debootstrap directory, unmounting first: an interrupted debootstrap
    can leave proc/sys mounted inside it, and rmtree must never walk into those."""
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(path) + "/")), reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True, timeout=30)
    shutil.rmtree(path, ignore_errors=True)
