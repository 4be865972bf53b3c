"""The local kind's sweep: what a kill -9 of a run leaves in the temporary directory."""

from __future__ import annotations

from pathlib import Path

from harness.drivers.local import SCRATCH_MARK, sweep_scratch


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
