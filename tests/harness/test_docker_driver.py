"""The docker driver against the real engine: build (offline here), start, health,
exec, hardening, the published ports, sweep, destroy.

One container is started for the module and shared by the tests that only look
at it; tests that need their own start and always remove what they made.
Skipped as a whole only when no Docker daemon answers (the reason says why).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness.drivers.base import LABEL_PROJECT, LABEL_RUN, PROJECT, StepTimeout, Target, TargetError
from harness.drivers.docker.driver import DockerDriver, owner_alive
from harness.drivers.docker.engine import LABEL_OWNER, LABEL_WORKER, docker_errors
from harness.drivers.docker.guest_wheels import GUEST_TOOLS
from harness.targets import load

_DRIVER = DockerDriver()
_REASON = _DRIVER.unavailable_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=str(_REASON)), pytest.mark.slow]

#: The target these tests bring up; debian-12 has an offline recipe, so it can be
#: built on a machine without a registry.
TARGET_NAME = os.environ.get("IOMUX_TEST_DOCKER_TARGET", "debian-12")
#: Shell metacharacters and quotes: they must reach the container as plain data.
HOSTILE = ["; rm -rf /", "'single'", '"double"', "$(id)", "`id`", "a b", "*", "\\", "-x"]


def _target(name: str = TARGET_NAME) -> Target:
    return next(t for t in load() if t.name == name)


@pytest.fixture(scope="module")
def driver() -> DockerDriver:
    return _DRIVER


@pytest.fixture(scope="module")
def built(driver: DockerDriver) -> dict[str, Any]:
    # A cold machine debootstraps the base first: about a minute per suite.
    return driver.build(_target(), timeout=1800)


@pytest.fixture(scope="module")
def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def instance(driver: DockerDriver, built: dict[str, Any], run_id: str,
             worker_id: str) -> Iterator[Any]:
    # The worker name carries shell metacharacters on purpose: it is data.
    worker = f"{worker_id}; rm -rf / 'q' \"q\""
    inst = driver.start(_target(), run_id, worker, timeout=120)
    try:
        driver.wait_healthy(inst, timeout=120)
        yield inst
    finally:
        driver.destroy(inst, timeout=60)
        driver.sweep(run_id)


def _attrs(driver: DockerDriver, inst: Any) -> dict[str, Any]:
    container = driver.client().containers.get(inst.resource_name)
    return dict(container.attrs)


def _echo(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def test_build_facts_and_warm_build_is_cached(driver: DockerDriver,
                                              built: dict[str, Any]) -> None:
    assert built["image"].startswith(f"iomux/{TARGET_NAME}:")
    assert built["seconds"] >= 0
    # The work tree is shared with people editing it: a changed content hash
    # between two builds means a real rebuild, so retry until two agree.
    for _ in range(3):
        first = driver.build(_target(), timeout=600)
        second = driver.build(_target(), timeout=600)
        if first["image"] == second["image"]:
            break
    assert second["cached"] is True, second
    assert second["image"] == first["image"]
    image = driver.client().images.get(second["image"])
    labels = image.labels
    assert labels[LABEL_PROJECT] == PROJECT
    assert labels["io.iomux.target"] == TARGET_NAME
    assert labels["org.opencontainers.image.title"] == "iomux"
    assert "org.opencontainers.image.version" in labels
    assert image.attrs["Config"]["User"] not in ("", "0", "root", "0:0")
    assert image.attrs["Config"]["Healthcheck"]["Test"][1:3] == ["iomux", "check"]


def test_started_container_is_hardened(driver: DockerDriver, instance: Any) -> None:
    attrs = _attrs(driver, instance)
    host = attrs["HostConfig"]
    assert attrs["Config"]["User"] not in ("", "0", "root", "0:0")
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host.get("CapAdd")
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"])
    assert 0 < host["PidsLimit"] <= 4096
    assert host["Privileged"] is False
    assert "/tmp" in host["Tmpfs"]
    published = attrs["NetworkSettings"]["Ports"]
    bindings = [b for port in published.values() if port for b in port]
    assert bindings, "no port is published"
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    for port_bindings in host["PortBindings"].values():
        assert {b["HostIp"] for b in port_bindings} == {"127.0.0.1"}


def test_names_and_labels_carry_hostile_text_as_data(driver: DockerDriver, instance: Any,
                                                     run_id: str) -> None:
    attrs = _attrs(driver, instance)
    name = attrs["Name"].lstrip("/")
    assert name == instance.resource_name
    assert all(c.isalnum() or c in "_.-" for c in name), name
    labels = attrs["Config"]["Labels"]
    assert labels[LABEL_RUN] == run_id
    assert labels[LABEL_WORKER].endswith("; rm -rf / 'q' \"q\"")
    assert owner_alive(labels[LABEL_OWNER])


def test_every_backend_echoes_through_its_published_port(driver: DockerDriver,
                                                         instance: Any) -> None:
    expected = {"auto", *_target().backends}
    assert set(instance.echo_ports) == expected
    for backend, address in instance.echo_ports.items():
        assert address[0] == "127.0.0.1"
        payload = f"hello {backend}\n".encode() * 100
        assert _echo(address, payload) == payload, backend
    assert set(instance.guest.server_pids) == expected
    assert all(pid > 1 for pid in instance.guest.server_pids.values())


def test_exec_runs_as_non_root_on_a_read_only_root(driver: DockerDriver, instance: Any,
                                                   built: dict[str, Any]) -> None:
    result = driver.exec(instance, ["id", "-u"], timeout=30)
    assert result.rc == 0 and result.stdout.strip() != "0", result
    assert driver.exec(instance, ["touch", "/iomux-probe"], timeout=30).rc != 0
    assert driver.exec(instance, ["touch", "/tmp/iomux-probe"], timeout=30).rc == 0
    # the in-guest suite's interpreter has pytest, installed offline in the image
    pytest_version = driver.exec(instance, [instance.guest.python, "-m", "pytest",
                                            "--version"], timeout=60)
    assert pytest_version.rc == 0 and "pytest" in pytest_version.stdout + pytest_version.stderr
    # and every guest tool, pytest-xdist among them, at the version the build recorded
    code = ("import json, sys; from importlib.metadata import version; "
            "print(json.dumps({t: version(t) for t in sys.argv[1:]}))")
    tools = driver.exec(instance, [instance.guest.python, "-c", code, *GUEST_TOOLS], timeout=60)
    assert tools.rc == 0, tools.stderr
    assert json.loads(tools.stdout) == built["guest_tools"], tools.stdout
    assert set(built["guest_tools"]) == set(GUEST_TOOLS)
    listing = driver.exec(instance, ["ls", str(instance.guest.tests_dir)], timeout=30)
    assert "conftest.py" in listing.stdout.split()


def test_exec_passes_hostile_arguments_as_data(driver: DockerDriver, instance: Any) -> None:
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    result = driver.exec(instance, ["python3", "-c", code, *HOSTILE], timeout=30)
    assert result.rc == 0, result
    assert json.loads(result.stdout) == HOSTILE
    with pytest.raises(TypeError):
        driver.exec(instance, "id -u", timeout=30)


def test_exec_reports_exit_status_and_streams(driver: DockerDriver, instance: Any) -> None:
    code = "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"
    result = driver.exec(instance, ["python3", "-c", code], timeout=30)
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_exec_timeout_raises_step_timeout(driver: DockerDriver, instance: Any) -> None:
    started = time.monotonic()
    with pytest.raises(StepTimeout, match="timed out"):
        driver.exec(instance, ["sleep", "60"], timeout=1)
    assert time.monotonic() - started < 30


def test_copy_from_and_save_logs(driver: DockerDriver, instance: Any, tmp_path: Path) -> None:
    inside = driver.exec(instance, ["cat", "/etc/os-release"], timeout=30).stdout
    copied = driver.copy_from(instance, "/etc/os-release", tmp_path / "os-release", timeout=60)
    assert copied.read_text() == inside
    # /tmp is a tmpfs, which the engine's archive API cannot see: read from inside
    payload = bytes(range(256)) * 4
    code = "open('/tmp/iomux-copy.bin', 'wb').write(bytes(range(256)) * 4)"
    assert driver.exec(instance, ["python3", "-c", code], timeout=30).rc == 0
    binary = driver.copy_from(instance, "/tmp/iomux-copy.bin", tmp_path / "copy.bin", timeout=60)
    assert binary.read_bytes() == payload
    with pytest.raises(TargetError):
        driver.copy_from(instance, "/no/such/file", tmp_path / "x", timeout=60)
    # A server started with exec leaves its own log, which save_logs brings back too.
    driver.start_backend_server(instance, "select")
    saved = driver.save_logs(instance, tmp_path / "logs")
    assert {p.suffix for p in saved} == {".log", ".json"}
    inspect = json.loads(next(p for p in saved if p.suffix == ".json").read_text())
    assert inspect["Name"].lstrip("/") == instance.resource_name
    main_log = tmp_path / "logs" / f"{instance.resource_name}.log"
    assert b"listening on" in main_log.read_bytes()
    select_log = tmp_path / "logs" / f"{instance.resource_name}-iomux-serve-select.log"
    assert select_log in saved, saved
    assert b"listening on" in select_log.read_bytes() and b"backend=select" in select_log.read_bytes()


def test_start_backend_server_rejects_unpublished_backend(driver: DockerDriver,
                                                         instance: Any) -> None:
    with pytest.raises(TargetError, match="kqueue"):
        driver.start_backend_server(instance, "kqueue")
    # already running: returns the same address without starting a second one
    assert driver.start_backend_server(instance, "poll") == instance.echo_ports["poll"]


def test_testinfra_reaches_the_container(driver: DockerDriver, instance: Any) -> None:
    import testinfra

    spec, kwargs = driver.testinfra_spec(instance)
    assert spec == f"docker://{instance.resource_name}"
    host = testinfra.get_host(spec, **kwargs)
    assert host.check_output("id -u") != "0"
    assert host.socket("tcp://0.0.0.0:7000").is_listening


# A sweep without a run id takes every dead owner's container, a kept one too (the
# kept records are the harness's, harness.kept_targets): never beside the warm-target
# test, which keeps one between its runs.
@pytest.mark.xdist_group("interrupted-runs")
def test_destroy_is_idempotent_and_sweep_removes_leftovers(driver: DockerDriver,
                                                           built: dict[str, Any],
                                                           worker_id: str) -> None:
    assert built["image"]
    client = driver.client()
    errors = docker_errors()
    own_run = f"test-sweep-{uuid.uuid4().hex[:10]}"
    inst = driver.start(_target(), own_run, worker_id, timeout=120)
    # What a kill -9 leaves: a labelled container of a dead owner, and a network.
    dead_owner = f"{socket.gethostname()}:999999999:1"
    assert not owner_alive(dead_owner)
    labels = {LABEL_PROJECT: PROJECT, LABEL_RUN: f"{own_run}-dead", LABEL_OWNER: dead_owner}
    image_id = client.containers.get(inst.resource_name).image.id
    orphan = client.containers.create(image_id, command=["sleep", "300"],
                                      name=f"iomux-orphan-{own_run}", labels=labels)
    orphan_net = client.networks.create(f"iomux-orphan-{own_run}", labels=labels)
    try:
        removed = driver.sweep(own_run)
        assert f"container {inst.resource_name}" in removed
        with pytest.raises(errors.NotFound):
            client.containers.get(inst.resource_name)
        driver.destroy(inst, timeout=60)  # gone already: no error
        driver.destroy(inst, timeout=60)
        # The orphan's owner is dead: a sweep without a run id takes it; a live
        # owner's resources (this very test's, say) it leaves alone.
        alive = driver.start(_target(), f"{own_run}-alive", worker_id, timeout=120)
        try:
            driver.sweep()
            # (on a shared engine another run's sweep may take the orphan first:
            # what counts is that it is gone and the live one is not)
            with pytest.raises(errors.NotFound):
                client.containers.get(orphan.id)
            with pytest.raises(errors.NotFound):
                client.networks.get(orphan_net.id)
            assert client.containers.get(alive.resource_name).status in ("created", "running")
        finally:
            driver.destroy(alive, timeout=60)
            driver.destroy(alive, timeout=60)
        with pytest.raises(errors.NotFound):
            client.containers.get(alive.resource_name)
        with pytest.raises(errors.NotFound):
            client.networks.get(alive.resource_name)
    finally:
        with contextlib.suppress(errors.NotFound):
            orphan.remove(force=True)
        with contextlib.suppress(errors.NotFound):
            orphan_net.remove()
        driver.sweep(own_run)
        driver.sweep(f"{own_run}-alive")


def test_unavailable_engine_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-such.sock")
    reason = DockerDriver().unavailable_reason()
    assert reason == "no Docker engine (install docker.io and start dockerd: sudo make setup)"
    assert "Error while fetching server API version" in getattr(reason, "detail", "")  # the log's


def test_image_without_registry_or_recipe_is_not_run(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("IOMUX_CACHE_DIR", str(tmp_path))  # no remembered pull results
    alpine = _target("alpine")
    driver = DockerDriver()
    builder = driver.builder(alpine)
    if builder._local_image(str(alpine.image)) is not None:
        pytest.skip(f"{alpine.image} is on this engine, so alpine can run here")
    pulls: list[str] = []

    def no_registry(ref: str, timeout: float = 0) -> str:
        pulls.append(ref)
        return "dial tcp: lookup registry-1.docker.io on 10.0.0.2:53: no such host"

    monkeypatch.setattr(builder, "try_pull", no_registry)
    reason = driver.target_unavailable_reason(alpine)
    assert reason == (f"no image: {alpine.image}: no registry reachable, no offline recipe "
                      "(use a registry)")
    assert "registry-1" not in reason and "10.0.0.2" not in reason  # no host, no DNS server
    assert pulls == [alpine.image]
    # a Debian target is never unavailable for want of a registry: it has a recipe
    assert driver.target_unavailable_reason(_target()) is None
