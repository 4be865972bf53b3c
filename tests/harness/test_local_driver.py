"""The local kind: the Guest record it fills, and its sweep (what a kill -9 of a run
leaves in the temporary directory)."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path

from harness.drivers.base import Target
from harness.drivers.local import REPO, SCRATCH_MARK, LocalDriver, sweep_scratch


def _scratch(root: Path, name: str, run: str | None) -> Path:
    path = root / name
    path.mkdir()
    (path / "select.log").write_text("listening\n")
    if run is not None:
        (path / SCRATCH_MARK).write_text(run + "\n")
    return path


def test_sweep_removes_only_the_marked_scratch_of_the_runs_it_is_asked_for(tmp_path: Path) -> None:
    dead = _scratch(tmp_path, "iomux-20261202-000000-aaaaaa-gw0-local-x1", "20261202-000000-aaaaaa")
    alive = _scratch(tmp_path, "iomux-20261202-000001-bbbbbb-gw1-local-x2", "20261202-000001-bbbbbb")
    stranger = _scratch(tmp_path, "iomux-20261202-000000-aaaaaa-notes", None)
    removed = sweep_scratch("20261202-000000-aaaaaa", root=tmp_path)
    assert removed == [f"local scratch {dead} (run 20261202-000000-aaaaaa)"]
    assert not dead.exists() and alive.exists() and stranger.exists()
    # No run alive: every marked scratch goes, and only those.
    assert sweep_scratch(None, root=tmp_path) == [f"local scratch {alive} (run 20261202-000001-bbbbbb)"]
    assert not alive.exists() and stranger.exists()


def test_start_and_healthy_fill_the_guest_record_the_suites_read() -> None:
    """What tests/cross_os reads of a local target: the harness's interpreter, the
    working tree's tests/server, a scratch directory of its own, and per backend
    the port and pid of a server that runs here."""
    driver = LocalDriver()
    target = Target(name="local", kind="local", os_family="linux", backends=("select", "poll"))
    driver.build(target, timeout=60)  # picks the interpreter the servers run on
    instance = driver.start(target, f"test-{uuid.uuid4().hex[:8]}", "t1", timeout=60)
    try:
        guest = instance.guest
        assert guest.python == sys.executable
        assert guest.tests_dir == str(REPO / "tests" / "server")
        assert guest.cwd == str(REPO)
        scratch = Path(guest.scratch_dir)
        assert scratch.is_dir() and scratch.name.startswith(instance.resource_name)
        assert (guest.unreachable, guest.test_scale, guest.kernel_version) == (None, None, None)
        assert guest.guest_ports == {} and guest.server_pids == {}  # known once healthy
        driver.wait_healthy(instance, timeout=60)
        assert set(guest.guest_ports) == set(guest.server_pids) == {"select", "poll"}
        for backend, port in guest.guest_ports.items():
            assert instance.echo_ports[backend] == ("127.0.0.1", port)
            os.kill(guest.server_pids[backend], 0)  # a live process of ours
        assert "guest_ports" not in instance.data and "python" not in instance.data
    finally:
        driver.destroy(instance, timeout=30)
    assert not scratch.exists()


def test_build_byte_compiles_the_working_tree_for_the_servers() -> None:
    """The servers run as nobody, who cannot write iomux/__pycache__: build leaves
    every module's bytecode there, up to date, for them to load."""
    # One module's bytecode gone (make unit compiles the tree too): build puts it back.
    gone = Path(importlib.util.cache_from_source(str(REPO / "iomux" / "connection.py")))
    gone.unlink(missing_ok=True)
    LocalDriver().build(Target(name="local", kind="local", os_family="linux",
                               backends=("select",)), timeout=60)
    sources = sorted((REPO / "iomux").glob("**/*.py"))
    assert len(sources) > 10
    for source in sources:
        cached = Path(importlib.util.cache_from_source(str(source)))
        assert cached.is_file(), f"no bytecode for {source}"
        assert cached.stat().st_mtime >= source.stat().st_mtime, f"stale bytecode for {source}"
