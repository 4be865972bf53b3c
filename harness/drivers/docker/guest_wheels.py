"""The guest's test tools for a docker target image: pytest, hypothesis and
pytest-xdist with their dependencies, and pip, as wheels for the target's own Python, downloaded
once on the host (a container never reaches PyPI).

They are resolved for the target's Python: the host's versions where they
install there (both ends then run the same), else the newest release that does
(pytest 9 needs Python 3.10, so a Debian 11 target on 3.9 gets pytest 8). The
package supports 3.9, so every Python it supports can be a target.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from harness.drivers.base import Target, TargetError
from harness.drivers.docker.base_images import (
    DEBIAN_SUITES,
    cache_dir,
    file_lock,
    offline_recipe,
    remaining,
    run_step,
)

#: The in-guest suites' test tools, resolved per target Python (dependency_wheels):
#: pytest; hypothesis for the fault suite's random clients; pytest-xdist so that a
#: target with more than one CPU runs its inner suites in parallel (guest_suites.py).
#: The Dockerfile installs these names (its GUEST_TOOLS build argument).
GUEST_TOOLS = ("pytest", "hypothesis", "pytest-xdist")


def host_tool_version(tool: str) -> str:
    """The host's release of ``tool``: what a target gets where it installs there
    (guest_tool_specs)."""
    from importlib.metadata import version

    return version(tool)


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
    run_step([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
          "--only-binary=:all:", "--python-version", python, "-d", str(dest),
          *(["--no-deps"] if no_deps else []), *specs],
         remaining(deadline, step), step)


def guest_tool_specs(python: str, deadline: float, scratch: Path) -> list[str]:
    """``pytest==<host's>`` where the host's release installs on Python ``python``,
    else plain ``pytest`` (the newest release that does); the same for each of GUEST_TOOLS."""
    pins = {tool: host_tool_version(tool) for tool in GUEST_TOOLS}
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
    """GUEST_TOOLS (see ``guest_tool_specs``) with their dependencies, and pip
    itself, as wheels for Python ``python``; downloaded once from PyPI on the host."""
    out = cache_dir() / "wheels" / "-".join(
        [f"py{python}", *(f"{tool}{host_tool_version(tool)}" for tool in GUEST_TOOLS)])
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
    """``{"pytest": "8.4.2", ...}`` from the wheel file names (name-version-...whl,
    the name with ``_`` for ``-``)."""
    tools = {tool.replace("-", "_"): tool for tool in GUEST_TOOLS}
    found = {}
    for wheel in wheels:
        name, _, rest = wheel.name.partition("-")
        if name in tools:
            found[tools[name]] = rest.split("-", 1)[0]
    return found
