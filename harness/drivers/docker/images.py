"""The docker targets' images, built with the Docker SDK and cached by content.

The target image is ``docker/Dockerfile`` built FROM the target's base image
(``base_images``: found, pulled or debootstrapped) over a context assembled
here (the guest's test wheels, ``guest_wheels``, plus ``tests/server``), tagged
``iomux/<target>:<content hash>`` and ``iomux/<target>:latest`` (what
compose.yaml runs). The hash covers the Dockerfile, the base image id, the iomux
sources, the in-guest suite and the guest's test wheels, so a warm build finds
its tag and builds nothing.

``python -m harness.drivers.docker.images build [NAME ...]`` builds them by hand
(``make compose-up``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from harness.drivers.base import (
    LABEL_PROJECT,
    PROJECT,
    StepTimeout,
    Target,
    TargetError,
    TargetUnavailable,
    one_line,
)
from harness.drivers.docker.base_images import (
    BASE_REPO,
    RECIPE_VERSION,
    REPO_ROOT,
    BaseImage,
    BaseImageBuilder,
    cache_dir,
    file_lock,
    remaining,
    run_step,
)
from harness.drivers.docker.engine import docker_errors, docker_sdk, parse_created
from harness.drivers.docker.guest_wheels import (
    GUEST_TOOLS,
    dependency_wheels,
    guest_tool_versions,
    target_python,
)

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
TARGET_REPO_PREFIX = "iomux"
LABEL_TARGET = "io.iomux.target"
LABEL_CONTENT = "io.iomux.content"
#: The test directories baked into every image (under /opt/iomux/tests/) and
#: run there by the cross-OS suites: the behaviour suite and the fault suite,
#: which imports the behaviour suite's server helper from ../server.
IN_GUEST_SUITES = ("server", "faults")
#: A target image replaced by a newer build is removed once it is this old.
SUPERSEDED_AFTER_S = 900.0
_SKIP_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


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


class ImageBuilder(BaseImageBuilder):
    """Builds target images (over the base images of ``BaseImageBuilder``) on one
    Docker engine."""

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
                run_step([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                      "--quiet", "--disable-pip-version-check", "-w", str(staging), str(src)],
                     remaining(deadline, "iomux wheel"), "iomux wheel")
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
            buildargs={"BASE_IMAGE": base.ref, "IOMUX_VERSION": __version__,
                       "GUEST_TOOLS": " ".join(GUEST_TOOLS)})
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


def git_revision() -> str:
    """The work tree's commit, or "unknown" (read-only: ``git rev-parse``)."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


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
        except TargetUnavailable as exc:
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
