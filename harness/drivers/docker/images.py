"""Images of the container targets, built with the Docker SDK and cached by content.

Where a target's base image comes from, in this order:

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

The target image is ``docker/Dockerfile`` built FROM that base over a context
assembled here (wheels downloaded on the host for the target's Python, plus
``tests/server``), tagged ``iomux/<target>:<content hash>`` and
``iomux/<target>:latest`` (what compose.yaml runs). The hash covers the
Dockerfile, the base image id, the iomux sources, the in-guest suite and the
guest's test wheels, so a warm build finds its tag and builds nothing.

The guest's pytest and hypothesis are resolved for the target's own Python: the
host's versions where they install there (both ends then run the same), else
the newest release that does (pytest 9 needs Python 3.10, so a Debian 11 target
on 3.9 gets pytest 8). The package supports 3.9, so every Python it supports
can be a target.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
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
    call_with_timeout,
    exclusive_lock,
    one_line,
    run_argv,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
TARGET_REPO_PREFIX = "iomux"
BASE_REPO = "iomux-base/debian"
LABEL_TARGET = "io.iomux.target"
LABEL_CONTENT = "io.iomux.content"
LABEL_RECIPE = "io.iomux.recipe"

#: Bump when the offline recipe changes in a way the hash inputs do not show.
RECIPE_VERSION = "2"
#: python3 for iomux; procps (ps) and iproute2 (ss) for testinfra's host checks;
#: strace so that the registration probe can count system calls in the target.
DEBOOTSTRAP_INCLUDE = ("python3", "procps", "iproute2", "strace")
#: The test directories baked into every image (under /opt/iomux/tests/) and
#: run there by the cross-OS suites: the behaviour suite and the fault suite,
#: which imports the behaviour suite's server helper from ../server.
IN_GUEST_SUITES = ("server", "faults")
#: Debian suite -> the Python it ships, for the host-side wheel download.
DEBIAN_SUITES: Mapping[str, str] = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}
#: The in-guest suites' test tools, resolved per target Python (dependency_wheels).
GUEST_TOOLS = ("pytest", "hypothesis")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PULL_TIMEOUT = 60.0
PULL_FAILURE_TTL = 3600.0
#: A target image replaced by a newer build is removed once it is this old.
SUPERSEDED_AFTER_S = 900.0
_SKIP_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


class ImageUnavailable(TargetError):
    """No base image can be had for a target here (no registry, no offline recipe)."""


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """The image a target is built FROM."""

    ref: str
    image_id: str
    #: "local" (found on the engine), "registry" (pulled now) or "debootstrap" (built now)
    source: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What ``build_target`` did, for the report."""

    tag: str
    image_id: str
    cached: bool
    seconds: float
    base: BaseImage
    #: the guest's test tools and their versions ({"pytest": "8.4.2", ...})
    tools: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def facts(self) -> dict[str, Any]:
        """The report's build facts: at least ``cached`` and ``seconds``."""
        return {"cached": self.cached, "seconds": round(self.seconds, 3), "image": self.tag,
                "image_id": self.image_id, "base": self.base.ref,
                "base_source": self.base.source, "base_seconds": round(self.base.seconds, 3),
                "guest_tools": dict(self.tools)}


def docker_sdk() -> Any:
    """The Docker SDK module, imported on first use (a machine without it can still
    load the harness). Imported by name because the repository's own ``docker/``
    directory would otherwise shadow it for the type checker."""
    return importlib.import_module("docker")


def docker_errors() -> Any:
    """``docker.errors`` of the SDK (see ``docker_sdk``)."""
    return importlib.import_module("docker.errors")


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


def _tree_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_NAMES)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if not f.endswith(".pyc"))
    return files


def _hash_paths(digest: Any, base: Path, paths: list[Path]) -> None:
    for path in paths:
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")


def source_paths() -> list[Path]:
    """The files the iomux wheel is built from."""
    paths = [REPO_ROOT / "pyproject.toml", *_tree_files(REPO_ROOT / "iomux")]
    readme = REPO_ROOT / "README.md"
    return [*paths, readme] if readme.exists() else paths


def host_pytest_version() -> str:
    """The host's pytest: what a target gets where it installs there (guest_tool_specs)."""
    import pytest

    return str(pytest.__version__)


def host_hypothesis_version() -> str:
    """The host's hypothesis (the fault suite's random clients); see guest_tool_specs."""
    import hypothesis

    return str(hypothesis.__version__)


class ImageBuilder:
    """Builds base and target images on one Docker engine."""

    def __init__(self, client: Any, log: Any = None) -> None:
        self.client = client
        self._log = log
        self._pull_errors: dict[str, str] = {}

    def log(self, message: str) -> None:
        if self._log is not None:
            self._log(message)

    # -- base images -------------------------------------------------------

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
            pulled = self.try_pull(target.image, min(PULL_TIMEOUT, _remaining(deadline, "pull")))
            if pulled is None:
                image = self.client.images.get(target.image)
                return BaseImage(target.image, image.id, "registry", time.monotonic() - started)
            error = pulled
        if mode == "registry" or recipe is None:
            raise ImageUnavailable(reasons.no_image(target.image, error, None))
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
            raise ImageUnavailable(reasons.Reason(
                f"no image: debian {recipe['suite']} not built, {missing}"))
        mirror = str(recipe.get("mirror") or debian_mirror())
        work = Path(tempfile.mkdtemp(prefix="iomux-debootstrap-"))
        rootfs, tarball = work / "rootfs", work / "rootfs.tar"
        try:
            argv = ["debootstrap", f"--variant={recipe['variant']}",
                    f"--include={','.join(recipe['include'])}", "--components=main",
                    str(recipe["suite"]), str(rootfs), mirror]
            self.log(f"debootstrap {recipe['suite']} from {mirror}")
            _run(argv, _remaining(deadline, "debootstrap"), "debootstrap")
            _trim_rootfs(rootfs)
            _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
                 _remaining(deadline, "debootstrap tar"), "debootstrap tar")
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

    def content_hash(self, target: Target, base: BaseImage, python: str,
                     wheels: list[Path]) -> str:
        """The hash a target image is tagged with: everything that goes into it
        (the guest's wheels by file name: a name carries its version)."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"recipe": RECIPE_VERSION, "target": target.name,
                                  "base": base.image_id, "python": python,
                                  "wheels": sorted(w.name for w in wheels)},
                                 sort_keys=True).encode())
        _hash_paths(digest, REPO_ROOT, [DOCKERFILE, *source_paths(),
                                        *(f for suite in IN_GUEST_SUITES
                                          for f in _tree_files(REPO_ROOT / "tests" / suite))])
        return digest.hexdigest()[:16]

    def build_target(self, target: Target, timeout: float) -> BuildResult:
        """Make ``iomux/<target>:<content hash>`` exist; build only when it does not."""
        started = time.monotonic()
        deadline = started + timeout
        base = self.ensure_base(target, deadline)
        python = target_python(target)
        repo = f"{TARGET_REPO_PREFIX}/{target.name}"
        wheels = dependency_wheels(python, deadline)
        content = self.content_hash(target, base, python, wheels)
        tag = f"{repo}:{content}"
        with file_lock(f"target-{target.name}"):
            found = self._local_image(tag)
            if found is not None:
                found.tag(repo, "latest")
                return BuildResult(tag, found.id, True, time.monotonic() - started, base,
                                   guest_tool_versions(wheels))
            with tempfile.TemporaryDirectory(prefix="iomux-context-") as ctx:
                self._assemble_context(Path(ctx), wheels, deadline)
                try:
                    image_id = self._docker_build(Path(ctx), target, base, tag, content,
                                                  deadline)
                except TargetError as exc:
                    # A cached layer removed under us (another run's cleanup): once
                    # more, without the layer cache.
                    if "parent" not in str(exc) and "No such image" not in str(exc):
                        raise
                    image_id = self._docker_build(Path(ctx), target, base, tag, content,
                                                  deadline, nocache=True)
            image = self.client.images.get(image_id)
            image.tag(repo, "latest")
            self._remove_superseded(target, image.id)
            return BuildResult(tag, image.id, False, time.monotonic() - started, base,
                               guest_tool_versions(wheels))

    def _assemble_context(self, ctx: Path, dependencies: list[Path], deadline: float) -> None:
        wheels, pip = ctx / "wheels", ctx / "pip"
        wheels.mkdir()
        pip.mkdir()
        for wheel in [*self.iomux_wheel(deadline), *dependencies]:
            if wheel.name.startswith("pip-"):
                # pip runs from its wheel in the build (python pip.whl/pip): a fixed
                # name, since a shell glob cannot reach inside a file
                shutil.copy2(wheel, pip / "pip.whl")
            else:
                shutil.copy2(wheel, wheels / wheel.name)
        shutil.copy2(DOCKERFILE, ctx / "Dockerfile")
        for suite in IN_GUEST_SUITES:
            shutil.copytree(REPO_ROOT / "tests" / suite, ctx / "tests" / suite,
                            ignore=shutil.ignore_patterns(*_SKIP_NAMES, "*.pyc"))

    def iomux_wheel(self, deadline: float) -> list[Path]:
        """The iomux wheel of the working tree, built once per source hash.

        It is built from a copy of the sources so that setuptools' build/ and
        egg-info never land in the shared work tree."""
        digest = hashlib.sha256()
        _hash_paths(digest, REPO_ROOT, source_paths())
        out = cache_dir() / "iomux-wheel" / digest.hexdigest()[:16]
        with file_lock("iomux-wheel"):
            found = sorted(out.glob("iomux-*.whl"))
            if found:
                return found
            with tempfile.TemporaryDirectory(prefix="iomux-src-") as tmp:
                src = Path(tmp) / "src"
                shutil.copytree(REPO_ROOT / "iomux", src / "iomux",
                                ignore=shutil.ignore_patterns(*_SKIP_NAMES, "*.pyc"))
                shutil.copy2(REPO_ROOT / "pyproject.toml", src / "pyproject.toml")
                readme = REPO_ROOT / "README.md"
                if readme.exists():
                    shutil.copy2(readme, src / "README.md")
                else:  # pyproject names a readme; the wheel does not need the real one
                    (src / "README.md").write_text("iomux\n")
                staging = Path(tmp) / "wheel"
                # With setuptools and wheel on the host, the build needs no network;
                # otherwise pip fetches them into an isolated build environment.
                local = all(importlib.util.find_spec(m) is not None
                            for m in ("setuptools", "wheel"))
                isolation = ["--no-build-isolation", "--no-index"] if local else []
                _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                      "--quiet", "--disable-pip-version-check", "-w", str(staging), str(src)],
                     _remaining(deadline, "iomux wheel"), "iomux wheel")
                out.parent.mkdir(parents=True, exist_ok=True)
                staging.replace(out)
            return sorted(out.glob("iomux-*.whl"))

    def _docker_build(self, ctx: Path, target: Target, base: BaseImage, tag: str,
                      content: str, deadline: float, nocache: bool = False) -> str:
        from iomux import __version__

        labels = {LABEL_PROJECT: PROJECT, LABEL_TARGET: target.name, LABEL_CONTENT: content,
                  "org.opencontainers.image.created":
                      datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "org.opencontainers.image.revision": git_revision()}
        # The offline base already has python3: nothing in the build needs a
        # network, so it gets none. A registry base installs python3 with apt/apk.
        network = "none" if base.source != "registry" and base.ref.startswith(BASE_REPO) else None
        stream = self.client.api.build(
            path=str(ctx), dockerfile="Dockerfile", tag=tag, rm=True, forcerm=True, pull=False,
            nocache=nocache,
            decode=True, labels=labels, network_mode=network,
            buildargs={"BASE_IMAGE": base.ref, "IOMUX_VERSION": __version__})
        image_id: str | None = None
        tail: list[str] = []
        for chunk in stream:
            if time.monotonic() > deadline:
                stream.close()  # closing the connection cancels the classic build
                raise StepTimeout(f"build: {target.name}: docker build did not finish in time")
            if "error" in chunk:
                detail = " ".join(str(chunk.get("error", "")).split())
                output = " | ".join(" ".join(t.split()) for t in tail[-3:])
                raise TargetError(f"build: {target.name}: docker build failed: {detail[-200:]} "
                                  f"(last output: {output[-300:]})")
            line = str(chunk.get("stream", "")).strip()
            if line:
                tail.append(line)
            aux = chunk.get("aux")
            if isinstance(aux, dict) and "ID" in aux:
                image_id = str(aux["ID"])
        if image_id is None:
            raise TargetError(f"build: {target.name}: docker build returned no image id")
        return image_id

    def _remove_superseded(self, target: Target, keep_id: str) -> None:
        """Remove older content tags of this target: not those in use, nor recent
        ones (a concurrent run over a different work tree may be about to start one)."""
        cutoff = time.time() - SUPERSEDED_AFTER_S
        for image in self.client.images.list(filters={"label": f"{LABEL_TARGET}={target.name}"}):
            created = parse_created(str(image.attrs.get("Created", "")))
            if image.id == keep_id or created is None or created > cutoff:
                continue
            for ref in image.tags or [image.id]:
                with contextlib.suppress(docker_errors().APIError):
                    self.client.images.remove(ref, noprune=False)


def target_python(target: Target) -> str:
    """The target's Python as MAJOR.MINOR: from targets.toml, else its Debian suite."""
    if target.python:
        return target.python
    recipe = offline_recipe(target)
    if recipe is not None:
        return DEBIAN_SUITES[str(recipe["suite"])]
    raise TargetError(f"build: {target.name}: targets.toml gives no python version")


def _pip_download(python: str, specs: list[str], dest: Path, deadline: float,
                  step: str, no_deps: bool = False) -> None:
    # pytest, hypothesis and their dependencies are pure Python: py3-none-any wheels,
    # so the host's platform tags do for any Linux target. --python-version makes
    # pip honour each release's Requires-Python for the target's interpreter.
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
          "--only-binary=:all:", "--python-version", python, "-d", str(dest),
          *(["--no-deps"] if no_deps else []), *specs],
         _remaining(deadline, step), step)


def guest_tool_specs(python: str, deadline: float, scratch: Path) -> list[str]:
    """``pytest==<host's>`` where the host's release installs on Python ``python``,
    else plain ``pytest`` (the newest release that does); the same for hypothesis."""
    pins = {"pytest": host_pytest_version(), "hypothesis": host_hypothesis_version()}
    specs = []
    for tool in GUEST_TOOLS:
        try:
            _pip_download(python, [f"{tool}=={pins[tool]}"], scratch / tool, deadline,
                          f"{tool} for Python {python}", no_deps=True)
        except TargetError as exc:
            if "No matching distribution" not in str(exc) \
                    and "Requires-Python" not in str(exc):
                raise  # PyPI unreachable, say: not a question of versions
            specs.append(tool)
        else:
            specs.append(f"{tool}=={pins[tool]}")
    return specs


def dependency_wheels(python: str, deadline: float) -> list[Path]:
    """pytest and hypothesis (see ``guest_tool_specs``) with their dependencies, and
    pip itself, as wheels for Python ``python``; downloaded once from PyPI on the host."""
    out = cache_dir() / "wheels" / (f"py{python}-pytest{host_pytest_version()}"
                                     f"-hypothesis{host_hypothesis_version()}")
    with file_lock(f"wheels-py{python}"):
        if not (out / ".complete").exists():
            staging = Path(tempfile.mkdtemp(prefix="iomux-wheels-", dir=cache_dir()))
            try:
                specs = guest_tool_specs(python, deadline, staging / "probe")
                shutil.rmtree(staging / "probe", ignore_errors=True)
                _pip_download(python, [*specs, "pip"], staging, deadline, "wheel download")
                # pip download --python-version honours Requires-Python but evaluates
                # environment markers for the host's interpreter, so the target's own
                # (exceptiongroup and tomli below 3.11) are fetched here.
                for _ in range(5):
                    extra = _marker_requirements(python, sorted(staging.glob("*.whl")))
                    if not extra:
                        break
                    _pip_download(python, extra, staging, deadline, "wheel download")
                (staging / ".complete").write_text(" ".join(specs) + "\n")
                shutil.rmtree(out, ignore_errors=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                staging.replace(out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return sorted(out.glob("*.whl"))


def _marker_requirements(python: str, wheels: list[Path]) -> list[str]:
    """Requirements of ``wheels`` that apply on Python ``python`` by their markers and
    have no wheel among them yet."""
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    have = {canonicalize_name(w.name.split("-", 1)[0]) for w in wheels}
    env = {"python_version": python, "python_full_version": f"{python}.0", "extra": ""}
    wanted: list[str] = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            meta = next((n for n in archive.namelist() if n.endswith(".dist-info/METADATA")), None)
            text = archive.read(meta).decode() if meta else ""
        for line in text.splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or not req.marker.evaluate(env):
                continue
            if canonicalize_name(req.name) not in have:
                have.add(canonicalize_name(req.name))
                wanted.append(f"{req.name}{req.specifier}")
    return wanted


def guest_tool_versions(wheels: list[Path]) -> dict[str, str]:
    """``{"pytest": "8.4.2", ...}`` from the wheel file names (name-version-...whl)."""
    found = {}
    for wheel in wheels:
        name, _, rest = wheel.name.partition("-")
        if name in GUEST_TOOLS:
            found[name] = rest.split("-", 1)[0]
    return found


def debootstrap_missing() -> str | None:
    """Why the offline recipe cannot run on this host, or None."""
    if shutil.which("debootstrap") is None:
        return reasons.DEBOOTSTRAP_MISSING
    if os.geteuid() != 0:
        return reasons.DEBOOTSTRAP_ROOT
    return None


def git_revision() -> str:
    """The work tree's commit, or "unknown" (read-only: ``git rev-parse``)."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def parse_created(text: str) -> float | None:
    """The engine's RFC 3339 "Created" (nanoseconds, Z) as a POSIX time."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", text)
    if match is None:
        return None
    parsed = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    return parsed.replace(tzinfo=datetime.timezone.utc).timestamp()


def _remaining(deadline: float, step: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise StepTimeout(f"build: timed out before {step}")
    return left


def _run(argv: list[str], timeout: float, step: str) -> None:
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


def _docker_targets(names: list[str]) -> list[Target]:
    from harness.targets import load, select_targets

    chosen = select_targets(load(), names or None)
    return [t for t in chosen if t.kind == "docker"]


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.drivers.docker.images build [NAME ...]``: build the container targets'
    images (what ``make compose-up`` runs first)."""
    parser = argparse.ArgumentParser(prog="python -m harness.drivers.docker.images")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("names", nargs="*", help="targets of targets.toml (default: every docker one)")
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args(argv)
    try:
        client = docker_sdk().from_env()
        client.ping()
    except Exception as exc:
        print(f"python -m harness.drivers.docker.images: error: no Docker daemon: {one_line(exc)}", file=sys.stderr)
        return 1
    from harness.targets import TargetsError

    try:
        targets = _docker_targets(args.names)
    except TargetsError as exc:
        print(f"python -m harness.drivers.docker.images: error: {exc}", file=sys.stderr)
        return 2
    builder = ImageBuilder(client, log=lambda m: print(m, file=sys.stderr))
    status = 0
    for target in targets:
        try:
            result = builder.build_target(target, args.timeout)
        except ImageUnavailable as exc:
            # asked for by name, a target without an image is an error; in "every
            # docker target" it is what make test-all-os reports as not run
            print(f"{target.name}: not built: {exc}", file=sys.stderr)
            status = 1 if args.names else status
            continue
        except (TargetError, StepTimeout) as exc:
            print(f"{target.name}: not built: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{target.name}: {result.tag} ({'cached' if result.cached else 'built'} in "
              f"{result.seconds:.1f}s; base {result.base.ref}, {result.base.source})")
    return status


if __name__ == "__main__":
    sys.exit(main())
