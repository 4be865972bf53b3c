"""No shell injection through the harness (issue 6, "Hardening, checked by tests").

Text a user controls (a target name in targets.toml, a path handed to a driver)
must reach the kernel as data: a target name with shell syntax is refused in
one line, and a hostile path given to ``exec``/``copy_from`` of the local and
docker drivers is one argv element, so the command fails with "no such file"
and the sentinel the path tries to create never appears.

The last test is a cheap static guard: no ``shell=True``, ``os.system`` or
``os.popen`` anywhere under harness/.
"""

from __future__ import annotations

import ast
import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness.drivers.base import Guest, Instance, Target, TargetError
from harness.drivers.local import LocalDriver
from harness.targets import TargetsError, load

REPO = Path(__file__).resolve().parents[2]


def _hostile(sentinel: Path, where: Path | str = "/nonexistent-iomux") -> list[str]:
    """Paths that would create ``sentinel`` if any shell ever saw them.

    ``rm -rf /`` appears only where the text never reaches a host shell even in
    the failure being tested for (inside a hardened container, or in a name that
    is refused): GNU rm refuses ``/`` anyway, but a test must not bet on that."""
    return [
        f"{where}/x'; touch {sentinel}; echo '",
        f'{where}/x"; touch {sentinel}; echo "',
        f"{where}/x$(touch {sentinel})",
        f"{where}/x`touch {sentinel}`",
        f"{where}/x && touch {sentinel} #",
        f"{where}/x\ntouch {sentinel}",
    ]


@pytest.fixture
def sentinel() -> Iterator[Path]:
    path = Path("/tmp") / f"PWNED-{uuid.uuid4().hex}"
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- (a) a target name with shell syntax is refused in one line ------------------------------

EVIL_NAMES = [
    "x'; touch /tmp/PWNED; echo '",
    "debian-12; rm -rf /",
    "a b",
    "$(id)",
    "Debian-12",  # upper case: names are [a-z0-9-] only
    "-rf",
]


def _toml_string(text: str) -> str:
    # A TOML basic string: escape backslash and double quote, nothing else is special.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_a_hostile_target_name_is_refused_in_one_line(tmp_path: Path, name: str) -> None:
    path = tmp_path / "targets.toml"
    path.write_text(f"[[target]]\nname = {_toml_string(name)}\nkind = \"local\"\n"
                    f"os_family = \"host\"\nbackends = \"host\"\n")
    with pytest.raises(TargetsError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    assert "must match [a-z0-9][a-z0-9-]*" in message


def test_the_harness_refuses_a_hostile_name_before_running_anything(
        tmp_path: Path, sentinel: Path) -> None:
    name = f"x'; touch {sentinel}; echo '; rm -rf /"
    path = tmp_path / "targets.toml"
    path.write_text(f"[[target]]\nname = {_toml_string(name)}\nkind = \"local\"\n"
                    f"os_family = \"host\"\nbackends = \"host\"\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # The Makefile's helper and the plugin itself, as a user would meet them.
    helper = subprocess.run(
        [sys.executable, "-m", "harness.targets", "--count", "--file", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert helper.returncode == 2
    assert helper.stdout == ""
    lines = helper.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness.targets: error: "), helper.stderr
    assert "must match [a-z0-9][a-z0-9-]*" in lines[0]

    plugin = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p", "no:cacheprovider",
         "tests/cross_os", "--targets-file", str(path),
         "--reports-dir", str(tmp_path / "reports")],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env, check=False)
    assert plugin.returncode == pytest.ExitCode.USAGE_ERROR, plugin.stdout + plugin.stderr
    assert "Traceback" not in plugin.stderr + plugin.stdout
    errors = [line for line in plugin.stderr.splitlines() if "must match" in line]
    assert len(errors) == 1, plugin.stderr
    assert not sentinel.exists()


# -- (b) hostile paths reach the drivers as one argv element ----------------------------------

def _local_instance(tmp_path: Path) -> Instance:
    target = Target(name="local", kind="local", os_family="linux", backends=("select",))
    # exec and copy_from need no running servers: only the working directory.
    return Instance(target=target, run_id=f"test-{uuid.uuid4().hex[:8]}",
                    resource_name="iomux-test-local", guest=Guest(cwd=str(tmp_path)))


def test_local_exec_and_copy_from_take_a_hostile_path_as_data(tmp_path: Path,
                                                              sentinel: Path) -> None:
    driver = LocalDriver()
    instance = _local_instance(tmp_path)
    for path in _hostile(sentinel, tmp_path):
        res = driver.exec(instance, ["ls", "--", path], timeout=30)
        assert res.rc != 0, res
        assert "No such file or directory" in res.stderr, res.stderr
        # ls names exactly the one path it was given: the whole text was one argument
        assert res.stdout == ""
        with pytest.raises(TargetError, match="No such file or directory"):
            driver.copy_from(instance, path, tmp_path / "out" / "copy", timeout=30)
        assert not (tmp_path / "out" / "copy").exists()
    assert not sentinel.exists()


def test_testinfra_quoting_keeps_a_hostile_path_one_word(tmp_path: Path,
                                                         sentinel: Path) -> None:
    testinfra = pytest.importorskip("testinfra")
    host = testinfra.get_host("local://")
    for path in _hostile(sentinel, tmp_path):
        res = host.run("ls -- %s", path)
        assert res.rc != 0
        assert "No such file or directory" in res.stderr, res.stderr
    assert not sentinel.exists()


def _docker_reason() -> str | None:
    try:
        from harness.drivers.docker.driver import DockerDriver
    except ImportError as exc:  # the SDK is missing
        return f"no Docker SDK: {exc}"
    return DockerDriver().unavailable_reason()


@pytest.fixture(scope="module")
def docker_instance() -> Iterator[tuple[Any, Instance]]:
    reason = _docker_reason()
    if reason is not None:
        pytest.skip(reason)
    from harness.drivers.docker.driver import DockerDriver
    driver = DockerDriver()
    target = next(t for t in load() if t.name == "debian-12")
    why = driver.target_unavailable_reason(target)
    if why is not None:
        pytest.skip(why)
    run_id = f"test-inject-{uuid.uuid4().hex[:10]}"
    driver.build(target, timeout=1800)
    try:
        instance = driver.start(target, run_id, "inject", timeout=120)
        yield driver, instance
        driver.destroy(instance, timeout=60)
    finally:
        driver.sweep(run_id)  # whatever start or a failed test left


@pytest.mark.slow
def test_docker_exec_and_copy_from_take_a_hostile_path_as_data(
        docker_instance: tuple[Any, Instance], tmp_path: Path) -> None:
    driver, instance = docker_instance
    inner = Path("/tmp") / f"PWNED-{uuid.uuid4().hex}"  # inside the container
    paths = [*_hostile(inner, "/tmp"), f"/tmp/x; rm -rf /; touch {inner}"]
    for path in paths:
        res = driver.exec(instance, ["ls", "--", path], timeout=30)
        assert res.rc != 0, res
        assert "No such file or directory" in res.stderr, res.stderr
        with pytest.raises(TargetError, match="No such file or directory"):
            driver.copy_from(instance, path, tmp_path / "copy", timeout=30)
        assert not (tmp_path / "copy").exists()
    # The sentinel was never made, and / is intact (the image's files are all there).
    probe = driver.exec(instance, ["test", "-e", str(inner)], timeout=30)
    assert probe.rc == 1, probe
    intact = driver.exec(instance, ["test", "-x", "/opt/iomux/venv/bin/python"], timeout=30)
    assert intact.rc == 0, intact


# -- (c) static guard: no shell anywhere in the harness -------------------------------------

_SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
                ("subprocess", "getstatusoutput"), ("asyncio", "create_subprocess_shell")}


def _shell_uses(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(root)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and (func.value.id, func.attr) in _SHELL_CALLS):
            found.append(f"{where}:{node.lineno}: {func.value.id}.{func.attr}")
        for keyword in node.keywords:
            # shell=<anything but a literal False> may run a shell
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                               and keyword.value.value is False):
                found.append(f"{where}:{node.lineno}: shell=...")
    return found


def test_the_harness_never_runs_a_shell() -> None:
    sources = sorted((REPO / "harness").rglob("*.py"))
    assert len(sources) >= 8, sources  # the guard looks where the code is
    found = [hit for path in sources for hit in _shell_uses(path)]
    assert not found, "a shell in the harness:\n" + "\n".join(found)
    # the text search catches what the AST cannot (an alias, a getattr by name)
    for path in sources:
        text = path.read_text()
        for needle in ("shell=True", "os.system(", "os.popen(", "create_subprocess_shell"):
            assert needle not in text, f"{path.relative_to(REPO)}: {needle}"


def test_the_static_guard_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\nos.system('x')\n"
                   "subprocess.run('x', shell=True)\nos.popen('x')\n"
                   "subprocess.run(['x'], shell=False)\n")
    assert len(_shell_uses(bad, tmp_path)) == 3
