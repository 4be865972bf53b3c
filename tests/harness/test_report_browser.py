"""report.html in a real browser: headless Chromium loads a report made by a harness
run, with no console errors; the verdict grid (and the claims grid, when there are
claims) is visible; the page is no wider than a 1,400-pixel window; a screenshot is
saved beside the report (and under reports/browser/ for a person to look at).

How: Chromium's --dump-dom prints the DOM after the load; a copy of the page gets a
small inline script that measures the page and writes what it found into the DOM.
Console messages (a script error, a resource that did not load) are read from
Chromium's own log (--enable-logging=stderr), where each is a "CONSOLE" line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 1400, 1000
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# One worker runs the module (make unit: --dist loadgroup), so its report is made once.
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed "
                                 "(apt-get install chromium; make unit does)"),
              pytest.mark.xdist_group("report-browser")]

PROBE = """<script>
(function () {
  var out = {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
             visible: {}};
  ["verdict", "verdict-grid", "timing-bars", "claims"].forEach(function (id) {
    var el = document.getElementById(id);
    if (!el) { out.visible[id] = null; return; }
    var box = el.getBoundingClientRect(), style = getComputedStyle(el);
    out.visible[id] = box.width > 0 && box.height > 0 && style.visibility !== "hidden"
                      && style.display !== "none";
  });
  var pre = document.createElement("pre");
  pre.id = "iomux-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>"""


def chromium(*args: str, profile: Path, height: int = HEIGHT) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={profile}", f"--window-size={WIDTH},{height}",
            "--hide-scrollbars", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report made by the harness: the local target (a few black-box tests) and a
    docker target whose engine is not there (a not-run row with its reason)."""
    tmp = tmp_path_factory.mktemp("browser")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["DOCKER_HOST"] = f"unix://{tmp}/no-docker.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "harness.plugin", "-p", "no:cacheprovider",
         "tests/cross_os", "--reports-dir", str(tmp / "reports"), "--targets", "local,debian-12",
         "-n", "0", "-k", "round_trip or probe or not_root"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env, check=False)
    run = (tmp / "reports" / "latest").resolve()
    assert (run / "report.html").exists(), proc.stdout[-3000:] + proc.stderr[-2000:]
    return run


def test_report_loads_clean_and_fits_the_window(report: Path) -> None:
    html = (report / "report.html").read_text()
    assert "<script" not in html.lower()  # the page itself needs none (offline)
    probed = report / "report.probe.html"
    probed.write_text(html.replace("</body>", PROBE + "</body>", 1))
    with tempfile.TemporaryDirectory(prefix="iomux-chromium-") as profile:
        proc = chromium("--dump-dom", probed.as_uri(), profile=Path(profile))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console_lines(proc.stderr) == [], console_lines(proc.stderr)
    match = re.search(r'<pre id="iomux-probe">(.*?)</pre>', proc.stdout, re.S)
    assert match, proc.stdout[-2000:]
    found = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert found["innerWidth"] == WIDTH
    assert found["scrollWidth"] <= found["innerWidth"], found
    assert found["visible"]["verdict"] and found["visible"]["verdict-grid"], found
    assert found["visible"]["timing-bars"], found
    results = json.loads((report / "results.json").read_text())
    if results.get("claims"):
        assert found["visible"]["claims"], found
    # The not-run reason reads the same in the page as in results.json.
    docker = next(t for t in results["targets"] if t["name"] == "debian-12")
    assert docker["status"] == "not run"
    assert f"not run: {docker['reason']}" in html


def test_screenshot_is_saved_with_the_report(report: Path) -> None:
    shot = report / "report.png"
    with tempfile.TemporaryDirectory(prefix="iomux-chromium-") as profile:
        proc = chromium(f"--screenshot={shot}", (report / "report.html").as_uri(),
                        profile=Path(profile), height=2400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert console_lines(proc.stderr) == [], console_lines(proc.stderr)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A copy where a person finds it (reports/ is the run's reports directory).
    keep = REPO / "reports" / "browser"
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy2(shot, keep / "report.png")
    shutil.copy2(report / "report.html", keep / "report.html")
