"""scripts/setup-engines.sh on a simulated machine: stubs for id, sudo, apt-get,
dpkg-query, docker, dockerd and ip on a PATH that has nothing else of the engines.

The real dockerd and libvirtd others rely on are never touched: the stub dockerd
is a sleeping shell script, and stop is checked to stop only it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "setup-engines.sh"
#: What the stubs replace, and what a fresh machine lacks.
HIDDEN = {"id", "sudo", "apt-get", "dpkg-query", "docker", "dockerd", "debootstrap", "strace",
          "vagrant", "virsh", "libvirtd", "virtlogd", "chromium", "qemu-system-x86_64", "runsc",
          "ip"}
#: The stub dockerd's bridge (IOMUX_DOCKER_BRIDGE): the host's links are never touched.
BRIDGE = "iomuxtest0"


def a_users_shell() -> dict[str, str]:
    """This process's environment as a user's shell has it: without pytest's variables,
    and without the outer make's (MAKELEVEL, MAKEFLAGS), which make a nested make print
    "Entering/Leaving directory" lines no user at a terminal sees (CI's make test does)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PYTEST_") and k not in _MAKE_VARIABLES}


_MAKE_VARIABLES = {"MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "MAKE_TERMOUT",
                   "MAKE_TERMERR"}


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A PATH of every host tool but the engines, plus stubs; uid 1000 without sudo.
    A stub dockerd still up when the test ends (a failed test's) is stopped."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for tool in Path(d).iterdir() if Path(d).is_dir() else []:
            link = bindir / tool.name
            if tool.name not in HIDDEN and not link.exists() and not link.is_symlink():
                link.symlink_to(tool)
    calls = tmp_path / "calls.log"
    uid = tmp_path / "uid"
    uid.write_text("1000\n")
    _stub(bindir, "id", f'if [[ $1 == -u ]]; then cat {uid}; else /usr/bin/id "$@"; fi')
    _stub(bindir, "sudo", f'echo "sudo $*" >>{calls}; echo "sudo: a password is required" >&2; '
                          "exit 1")
    # apt-get "installs" a package by making its command exist.
    _stub(bindir, "apt-get", f'echo "apt-get $*" >>{calls}\n'
          f'for p in "$@"; do case $p in docker.io) cp {bindir}/.dockerd {bindir}/dockerd;; '
          f'strace|debootstrap|chromium) printf "#!/bin/sh\\n" >{bindir}/$p; '
          f'chmod +x {bindir}/$p;; esac; done; exit 0')
    _stub(bindir, "dpkg-query", "exit 1")
    # ip: links are files in links/; `ip link show NAME` and `ip link del NAME`.
    links = tmp_path / "links"
    links.mkdir()
    _stub(bindir, "ip", f'echo "ip $*" >>{calls}; [[ $1 == link ]] || exit 2; '
                        f'case $2 in show) [[ -e {links}/$3 ]];; del) rm {links}/$3;; '
                        "*) exit 2;; esac")
    # dockerd: sleeps, marked up while it runs; docker info answers while it does. Like
    # the real one, it makes its bridge before it answers (so the bridge first, then the
    # mark that docker info reads: the other way round, a cold CI run's check of the
    # bridge came between them) and leaves it behind when it stops.
    up = tmp_path / "dockerd.up"
    _stub(bindir, ".dockerd", f'echo "dockerd $*" >>{calls}; touch {links}/{BRIDGE}; echo $$ >{up}; '
                              f"trap 'rm -f {up}; exit 0' TERM; while :; do sleep 0.1; done")
    _stub(bindir, "docker", f'[[ -s {up} ]] && kill -0 "$(cat {up})" 2>/dev/null')
    yield {"bin": bindir, "calls": calls, "uid": uid, "up": up, "tmp": tmp_path, "links": links}
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(up.read_text()), signal.SIGKILL)


def script_env(machine: dict[str, Path], **env: str) -> dict[str, str]:
    """The script's environment on the simulated machine."""
    return {"PATH": str(machine["bin"]), "HOME": str(machine["tmp"]),
            "IOMUX_SETUP_STATE": str(machine["tmp"] / "state"),
            "IOMUX_SETUP_LEFT_UP": str(machine["tmp"] / "left-up"),
            "IOMUX_SETUP_LOG_DIR": str(machine["tmp"]), "IOMUX_SETUP_WAIT": "10",
            "IOMUX_QEMU_CONF": str(machine["tmp"] / "qemu.conf"),
            "IOMUX_DOCKER_BRIDGE": BRIDGE, **env}


def run(machine: dict[str, Path], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, env=script_env(machine, **env), check=False)


def calls(machine: dict[str, Path]) -> str:
    return machine["calls"].read_text() if machine["calls"].exists() else ""


def test_a_user_who_may_not_install_changes_nothing(machine: dict[str, Path]) -> None:
    proc = run(machine, "start", "docker", "browser")
    assert proc.returncode == 0, proc.stderr
    assert "apt-get" not in calls(machine) and "dockerd" not in calls(machine)
    out = proc.stdout
    assert "not root and no passwordless sudo" in out
    assert "would run: sudo apt-get install strace docker.io debootstrap chromium" in out
    assert "would run: sudo dockerd" in out
    assert all(len(line) <= 120 for line in out.splitlines())


def test_iomux_setup_0_changes_nothing_even_as_root(machine: dict[str, Path]) -> None:
    machine["uid"].write_text("0\n")
    proc = run(machine, "start", "docker", IOMUX_SETUP="0")
    assert proc.returncode == 0
    assert "IOMUX_SETUP=0" in proc.stdout and calls(machine) == ""
    assert "would run: apt-get install" in proc.stdout  # root: no sudo in the hint


def test_check_says_what_is_missing_and_fails(machine: dict[str, Path]) -> None:
    machine["uid"].write_text("0\n")
    proc = run(machine, "--check", "docker")
    assert proc.returncode == 1 and calls(machine) == ""
    assert "missing; would run: apt-get install strace docker.io debootstrap" in proc.stdout


def test_root_installs_starts_is_idempotent_and_stops_only_its_own(
        machine: dict[str, Path]) -> None:
    machine["uid"].write_text("0\n")
    first = run(machine, "start", "docker")
    assert first.returncode == 0, first.stdout + first.stderr
    assert calls(machine).count("apt-get") == 2  # one update, one install of everything
    assert "install -y -qq --no-install-recommends strace docker.io debootstrap" in calls(machine)
    assert "[setup] installing docker.io" in first.stdout
    assert "[setup] starting dockerd" in first.stdout
    pid = int(machine["up"].read_text())
    # The bridge was not there before: it is ours, recorded before dockerd.
    assert (machine["tmp"] / "state").read_text().split() == ["link", BRIDGE, "dockerd", str(pid)]
    assert (machine["links"] / BRIDGE).exists()

    before = calls(machine)
    second = run(machine, "start", "docker")
    assert second.returncode == 0
    assert calls(machine) == before  # installs nothing, starts nothing
    assert second.stdout.strip().splitlines() == [
        "[setup] docker: nothing to install, nothing to start"]

    stop = run(machine, "stop")
    assert stop.returncode == 0
    assert f"stopping dockerd (pid {pid})" in stop.stdout
    assert f"removing the {BRIDGE} bridge dockerd made" in stop.stdout
    assert not (machine["links"] / BRIDGE).exists()
    assert stop.stdout.index("stopping dockerd") < stop.stdout.index("removing the")
    assert not (machine["tmp"] / "state").exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            subprocess.run(["sleep", "0.1"], check=False)


def test_stop_leaves_dockerd_up_while_a_kept_docker_target_needs_it(
        machine: dict[str, Path]) -> None:
    machine["uid"].write_text("0\n")
    assert run(machine, "start", "docker").returncode == 0
    pid = int(machine["up"].read_text())
    store = machine["tmp"] / "kept"
    store.mkdir()
    record = store / "iomux-run-gw0-debian-12.json"  # as harness.kept_targets writes one
    record.write_text('{\n "hash": "abc",\n "kind": "docker",\n "target": "debian-12"\n}\n')
    kept = run(machine, "stop", IOMUX_KEPT_DIR=str(store))
    assert kept.returncode == 0
    assert f"leaving dockerd up (pid {pid}): kept docker targets need it" in kept.stdout
    os.kill(pid, 0)  # still running
    assert (machine["links"] / BRIDGE).exists()  # its bridge stays with it
    # A later run found dockerd up (it starts nothing, its state file is empty) and
    # took the kept target: its stop stops the dockerd the first run left up.
    record.unlink()
    (machine["tmp"] / "state").write_text("")
    stop = run(machine, "stop", IOMUX_KEPT_DIR=str(store))
    assert f"stopping dockerd (pid {pid})" in stop.stdout, stop.stdout + stop.stderr
    assert not (machine["tmp"] / "left-up").exists()
    assert not (machine["links"] / BRIDGE).exists()  # and goes when it is stopped


def test_stop_stops_its_daemons_when_nobody_reads_its_output(machine: dict[str, Path]) -> None:
    """The log reader can go first: a CI step's or a terminal's pipe closed by the
    same SIGTERM or hang-up that ended the run. Its first line must not kill the
    stop with SIGPIPE and leave dockerd up: seen when a .ci/run whose output went
    through a pipe was ended with SIGTERM to its process group."""
    machine["uid"].write_text("0\n")
    assert run(machine, "start", "docker").returncode == 0
    pid = int(machine["up"].read_text())
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: a write gets EPIPE, or SIGPIPE by default
    try:
        # SIGPIPE as a shell started by make has it: default (Python ignores it).
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], stdout=write_end,
                              stderr=write_end, env=script_env(machine), timeout=120, check=False,
                              preexec_fn=lambda: signal.signal(signal.SIGPIPE, signal.SIG_DFL))
    finally:
        os.close(write_end)
    assert stop.returncode == 0, stop.returncode
    assert not (machine["tmp"] / "state").exists()
    assert not (machine["links"] / BRIDGE).exists()
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            subprocess.run(["sleep", "0.1"], check=False)


def test_stop_leaves_a_daemon_it_did_not_start(machine: dict[str, Path]) -> None:
    # A pid in the state file that now belongs to another program is left alone.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (machine["tmp"] / "state").write_text(f"dockerd {sleeper.pid}\n")
        proc = run(machine, "stop")
        assert "left alone" in proc.stdout
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_make_runs_stop_when_the_tests_fail(machine: dict[str, Path], tmp_path: Path) -> None:
    # The Makefile's test-all-os with a stand-in Python whose pytest fails.
    machine["uid"].write_text("0\n")
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\ncase \"$*\" in *--kinds*) echo docker;; *--count*|*--workers*) echo 1;;"
                    " *) exit 1;; esac\n")
    fake.chmod(0o755)
    env = {**a_users_shell(), "PATH": f"{machine['bin']}", "IOMUX_SETUP_LOG_DIR": str(tmp_path),
           "IOMUX_SETUP_WAIT": "10", "TMPDIR": str(tmp_path),
           "IOMUX_SETUP_LEFT_UP": str(tmp_path / "left-up")}
    proc = subprocess.run(["make", "-o", ".venv/.installed", "test-all-os", f"PY={fake}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert proc.returncode != 0
    assert "[setup] starting dockerd" in proc.stdout
    assert "[setup] stopping dockerd" in proc.stdout, proc.stdout + proc.stderr
    assert not machine["up"].exists()


@pytest.mark.long(19)
def test_make_test_all_os_as_a_user_who_may_not_install(machine: dict[str, Path],
                                                        tmp_path: Path) -> None:
    # The README's main command where nothing may be installed: it changes nothing,
    # runs what it can (local), says in one line why the rest did not run, exits 0.
    env = {**a_users_shell(),
           "PATH": str(machine["bin"]),  # not TMPDIR: the local servers run as nobody
           "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    proc = subprocess.run(
        ["make", "-o", ".venv/.installed", "test-all-os", "TARGETS=local,debian-12",
         f"PYTEST_ARGS=-p no:cacheprovider --reports-dir {tmp_path}/reports "
         "-k 'round_trip or probe'"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-2000:]
    assert "apt-get" not in calls(machine) and "dockerd" not in calls(machine)
    assert "[setup] changed nothing (not root and no passwordless sudo)" in out
    assert "debian-12: not run: no Docker engine (install docker.io and start dockerd" in out
    table = out.split("iomux targets", 1)[1].split("short test summary", 1)[0]
    # Every line but the report's path, which is as long as the directory it is in
    # (here pytest's own temporary directory) and cannot be folded.
    assert all(len(line) <= 120 for line in table.splitlines()
               if not line.strip().startswith("report:")), table
    assert out.rstrip().splitlines()[-1].endswith("report.html")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=["ctrl-c", "sigterm", "hang-up"])
def test_make_runs_stop_on_ctrl_c(machine: dict[str, Path], tmp_path: Path, signum: int) -> None:
    # Ctrl-C while the tests run: SIGINT to the whole process group, as a terminal sends
    # it; SIGTERM as a CI runner's stop sends it; SIGHUP as a closed terminal sends it.
    import time

    machine["uid"].write_text("0\n")
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\ncase \"$*\" in *--kinds*) echo docker;; *--count*|*--workers*) echo 1;;"
                    f" *) touch {tmp_path}/testing; exec sleep 60;; esac\n")
    fake.chmod(0o755)
    env = {**a_users_shell(), "PATH": f"{machine['bin']}", "IOMUX_SETUP_LOG_DIR": str(tmp_path),
           "IOMUX_SETUP_WAIT": "10", "TMPDIR": str(tmp_path),
           "IOMUX_SETUP_LEFT_UP": str(tmp_path / "left-up")}
    # The signal as a terminal's foreground job has it: under a parent that ignores
    # it (SIGINT: a background job, a CI step; SIGHUP: nohup) make, its shell and
    # sleep would inherit SIG_IGN, and a shell cannot trap a signal that was ignored
    # when it started.
    def default_handlers() -> None:
        for sig in (signal.SIGINT, signum):
            signal.signal(sig, signal.SIG_DFL)

    proc = subprocess.Popen(["make", "-o", ".venv/.installed", "test-all-os", f"PY={fake}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True,
                            preexec_fn=default_handlers)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "testing").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "testing").exists()
        os.killpg(proc.pid, signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "[setup] starting dockerd" in out
    assert "[setup] stopping dockerd" in out, out
    assert not machine["up"].exists()
    assert list(tmp_path.glob("iomux-setup.*")) == []  # the state file went with it


def test_one_engine_that_fails_leaves_the_others_set_up(machine: dict[str, Path]) -> None:
    """A dockerd that will not start is one line and exit 1; the kernels are still fetched."""
    machine["uid"].write_text("0\n")
    _stub(machine["bin"], ".dockerd", f'echo "dockerd $*" >>{machine["calls"]}; exit 1')
    kernels = machine["tmp"] / "fetch-kernels.sh"
    _stub(machine["tmp"], "fetch-kernels.sh",
          f'echo "fetch-kernels $*" >>{machine["calls"]}; echo "fetched runsc 0.0~test"')
    proc = run(machine, "start", "docker", "gvisor", IOMUX_SETUP_WAIT="2",
               IOMUX_FETCH_KERNELS=str(kernels))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fetch-kernels install" in calls(machine)
    assert "fetched runsc 0.0~test" in proc.stdout
    assert "[setup] set-up of docker failed; their targets are reported not run" in proc.stdout
    assert "dockerd did not answer" in proc.stderr
    # What it did start is still recorded, so stop can take it down.
    assert (machine["tmp"] / "state").read_text().split()[:3] == ["link", BRIDGE, "dockerd"]


def test_the_kernel_kinds_bring_the_docker_engine(machine: dict[str, Path]) -> None:
    """uml (and gvisor) run over the debian-12 image's root: a uml-only run needs dockerd."""
    machine["uid"].write_text("0\n")
    kernels = machine["tmp"] / "fetch-kernels.sh"
    _stub(machine["tmp"], "fetch-kernels.sh", 'echo "nothing to install"')
    proc = run(machine, "start", "uml", IOMUX_FETCH_KERNELS=str(kernels))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[setup] installing docker.io" in proc.stdout
    assert "[setup] starting dockerd" in proc.stdout
    assert run(machine, "stop").returncode == 0


def test_a_bridge_that_was_there_before_dockerd_started_is_left(
        machine: dict[str, Path]) -> None:
    machine["uid"].write_text("0\n")
    (machine["links"] / BRIDGE).touch()  # an engine of the user's made it, say
    assert run(machine, "start", "docker").returncode == 0
    pid = int(machine["up"].read_text())
    assert (machine["tmp"] / "state").read_text().split() == ["dockerd", str(pid)]
    stop = run(machine, "stop")
    assert stop.returncode == 0 and "removing the" not in stop.stdout
    assert (machine["links"] / BRIDGE).exists()
