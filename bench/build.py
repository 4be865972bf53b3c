"""Compile the C ceiling server and the C load client at bench time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

C_DIR = Path(__file__).resolve().parent / "c"
# -lm: the client's nearest-rank percentile uses ceil().
PROGRAMS = {"echo_epoll": [], "loadclient": ["-lm"]}


def compiler() -> str | None:
    """The C compiler to use ($CC is not consulted: `cc` is what every Unix has), or None."""
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def build(name: str, out_dir: Path) -> tuple[Path | None, str | None]:
    """Compile ``bench/c/<name>.c`` into ``out_dir``.

    Returns (path, None) on success, or (None, one-line reason) when there is no
    compiler or the compile failed, so the runner can report that peer as not run.
    """
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc, clang) on PATH"
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / name
    argv = [cc, "-O2", "-Wall", "-o", str(exe), str(C_DIR / f"{name}.c"), *PROGRAMS[name]]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip())
        return None, f"{name}.c did not compile: {first[:200]}"
    return exe, None
