"""Every "not run" reason the harness can produce: one line, at most 100 characters
(155 for the FreeBSD image line), ending in what to do; no registry host or DNS server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import reasons
from harness.drivers import KINDS, driver_class
from harness.drivers.docker.driver import DockerDriver
from harness.drivers.docker.images import ImageBuilder
from harness.drivers.vagrant.driver import VagrantDriver
from harness.targets import load

#: A pull error as a Docker engine words it: registry host and DNS server inside.
PULL_ERROR = ('Get "https://registry-1.docker.io/v2/": dial tcp: lookup registry-1.docker.io '
              "on 10.0.2.3:53: read udp 10.0.2.15:40514->10.0.2.3:53: i/o timeout")


def assert_well_formed(reason: str | None) -> None:
    assert reason is not None
    line = reasons.PREFIX + reason
    assert "\n" not in line
    assert len(line) <= reasons.limit_for(reason), (len(line), line)
    assert reasons.is_well_formed(reason), f"says no fix in a trailing (...): {line}"


@pytest.mark.parametrize("reason", [
    reasons.DOCKER_SDK, reasons.DOCKER_ENGINE, reasons.INTERRUPTED, reasons.NO_TEST_RAN,
    reasons.driver_missing("harness.drivers.docker.driver", ImportError("No module named 'docker'")),
    reasons.driver_missing("harness.drivers.uml",
                           ImportError("No module named 'harness.drivers.uml'")),
    reasons.engine_check_failed("vagrant", RuntimeError("x" * 500)),
])
def test_fixed_reasons(reason: str) -> None:
    assert_well_formed(reason)


@pytest.mark.parametrize("image", ["alpine:3.20", "debian:bookworm", None])
@pytest.mark.parametrize("offline", [None, reasons.DEBOOTSTRAP_MISSING, reasons.DEBOOTSTRAP_ROOT])
@pytest.mark.parametrize("error", [PULL_ERROR, "no answer from the registry within 60s",
                                   "manifest unknown", "unauthorized: login", "EOF"])
def test_no_image_reasons_name_no_host(image: str | None, offline: str | None,
                                       error: str) -> None:
    reason = reasons.no_image(image, error, offline)
    assert_well_formed(reason)
    for leak in ("registry-1", "docker.io/v2", "10.0.2.3", "10.0.2.15", ":53"):
        assert leak not in reason
    assert error in reason.detail  # the engine's words go to the target's log


def test_fit_keeps_the_fix_and_the_detail() -> None:
    long = "something broke: " + "very " * 40 + "(apt-get install thing)"
    fitted = reasons.fit(long)
    assert_well_formed(fitted)
    assert fitted.endswith("(apt-get install thing)")
    assert getattr(fitted, "detail", "") == " ".join(long.split())


def _no_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))


def test_docker_engine_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    assert_well_formed(DockerDriver().unavailable_reason())


@pytest.mark.parametrize("missing", ["vagrant", "virsh", "qemu-system-x86_64"])
def test_vagrant_reasons(missing: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A PATH with every tool the check looks for but one; stubs that answer like
    # a working install, so that the check gets as far as the missing one.
    for tool in ("vagrant", "virsh", "qemu-system-x86_64"):
        if tool != missing:
            stub = tmp_path / tool
            stub.write_text("#!/bin/sh\necho vagrant-libvirt\n")
            stub.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("VAGRANT_DEFAULT_PROVIDER", raising=False)
    assert_well_formed(VagrantDriver().unavailable_reason())


def test_vagrant_libvirt_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for tool, body in (("vagrant", "echo vagrant-libvirt"), ("qemu-system-x86_64", "true"),
                       ("virsh", "echo 'error: failed to connect to the hypervisor' >&2; exit 1")):
        (tmp_path / tool).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/bin:/usr/bin")
    reason = VagrantDriver().unavailable_reason()
    assert_well_formed(reason)
    assert "failed to connect" in getattr(reason, "detail", "")


def test_vagrant_box_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = VagrantDriver()
    monkeypatch.setattr(driver, "box_installed", lambda box: False)
    monkeypatch.setattr(driver, "_local_box_cached", lambda target: False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for target in load():
        if target.kind == "vagrant":
            reason = driver.target_unavailable_reason(target)
            if reason is not None:
                assert_well_formed(reason)


def test_every_docker_target_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No engine image, no registry, no debootstrap: each docker target's reason.
    monkeypatch.setenv("IOMUX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    builder = ImageBuilder(client=None)
    monkeypatch.setattr(builder, "_local_image", lambda ref: None)
    monkeypatch.setattr(builder, "try_pull", lambda ref, timeout=0: PULL_ERROR)
    seen = 0
    for target in load():
        if target.kind == "docker":
            assert_well_formed(builder.base_unavailable_reason(target))
            seen += 1
    assert seen >= 3


def test_every_kind_without_its_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Every registered kind (the gVisor/UML ones too), on a machine with nothing installed.
    _no_tools(monkeypatch, tmp_path)
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    for kind in KINDS:
        try:
            driver = driver_class(kind)()
            reason = driver.unavailable_reason()
        except Exception as exc:  # what the plugin turns a broken check into
            reason = reasons.engine_check_failed(kind, exc)
        if reason is not None:
            assert_well_formed(reasons.fit(reason))


def test_targets_list_says_what_can_run_here(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/nothing.sock"}
    proc = subprocess.run([sys.executable, "-m", "harness.targets", "--list", "--targets",
                           "local,debian-12"], capture_output=True, text=True, timeout=120,
                          env=env, check=False, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert rows["local"].split()[1:] == ["local", "linux", "can", "run"]
    assert rows["debian-12"].endswith(f"not run: {reasons.DOCKER_ENGINE}")
    kinds = subprocess.run([sys.executable, "-m", "harness.targets", "--kinds", "--targets",
                            "local,debian-12,debian-13"], capture_output=True, text=True,
                           timeout=60, check=False, cwd=Path(__file__).resolve().parents[2])
    assert kinds.stdout.split() == ["local", "docker"]
