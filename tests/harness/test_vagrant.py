"""The vagrant target kind, for real where this machine can: the offline Debian box
builds (or is cached), the Vagrantfile parses, a VM comes up, answers through its
forwarded port, runs commands, provisions idempotently, and leaves nothing behind.

The VM test is one test function on purpose: a VM under emulation takes a minute
to boot, and one function keeps it on one xdist worker whatever the --dist mode.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from harness import targets
from harness.drivers import ssh
from harness.drivers.base import Target
from harness.drivers.vagrant import boxes
from harness.drivers.vagrant import driver as vd

ROOT = Path(__file__).resolve().parents[2]
NASTY = "; rm -rf / ; echo 'pwned' \"$(id)\" `id`"


def _vagrant_targets() -> list[Target]:
    return [t for t in targets.load() if t.kind == "vagrant"]


def _target(name: str) -> Target:
    for target in _vagrant_targets():
        if target.name == name:
            return target
    raise AssertionError(f"targets.toml has no vagrant target {name}")


@pytest.fixture(scope="module")
def driver() -> vd.VagrantDriver:
    return vd.VagrantDriver()


@pytest.fixture(scope="module")
def engine_reason(driver: vd.VagrantDriver) -> str | None:
    return driver.unavailable_reason()


def _need_vagrant() -> None:
    if shutil.which("vagrant") is None:
        pytest.skip("vagrant executable was not found")


def _need_vms(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the offline box build needs root (loop devices, chroot)")


# -- pieces that need no VM ----------------------------------------------------------------

def test_remote_command_keeps_each_word_one_argument() -> None:
    argv = ["printf", "%s\\n", NASTY, "it's", ""]
    line = ssh.remote_command(argv)
    assert shlex.split(line) == argv
    # What the guest's shell does with the line, done here by /bin/sh: nothing runs.
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [NASTY, "it's", ""]


def test_remote_command_sudo_prefix() -> None:
    assert shlex.split(ssh.remote_command(["id", "-u"], user="root")) == ["sudo", "-n", "--", "id", "-u"]
    assert shlex.split(ssh.remote_command(["id"], user="nobody")) == [
        "sudo", "-n", "-u", "nobody", "--", "id"]


def test_no_vagrant_is_one_clear_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert vd.VagrantDriver().unavailable_reason() == (
        "vagrant not installed (apt-get install vagrant vagrant-libvirt)")


@pytest.mark.parametrize("sync", ["vagrant", "harness"])
def test_vagrantfile_parses_and_names_the_targets(tmp_path: Path, sync: str) -> None:
    _need_vagrant()
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
           "VAGRANT_CHECKPOINT_DISABLE": "1", "IOMUX_SYNC": sync}
    res = subprocess.run(["vagrant", "validate"], cwd=ROOT / "vagrant", env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    res = subprocess.run(["vagrant", "status", "--machine-readable"], cwd=ROOT / "vagrant", env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    machines = {line.split(",")[1] for line in res.stdout.splitlines() if ",state," in line}
    assert machines == {t.name for t in _vagrant_targets()}


def test_sync_excludes_are_the_patterns_of_the_file(tmp_path: Path) -> None:
    pats = vd.sync_excludes()
    assert {".vagrant/", ".git/", ".venv/", "reports/"} <= set(pats), pats
    assert "iomux/" not in pats and "tests/" not in pats
    f = tmp_path / "excludes"
    f.write_text("# a comment\n\n  a/  \n*.b\n")
    assert vd.sync_excludes(f) == ["a/", "*.b"]


def test_missing_provider_is_named_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_vagrant()
    if shutil.which("VBoxManage"):
        pytest.skip("VirtualBox is installed here; nothing is missing")
    env = {**os.environ, "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
           "VAGRANT_DEFAULT_PROVIDER": "virtualbox", "VAGRANT_CHECKPOINT_DISABLE": "1"}
    res = subprocess.run(["vagrant", "status"], cwd=ROOT / "vagrant", env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode != 0
    assert "VBoxManage (VirtualBox) was not found" in res.stderr
    assert ".rb:" not in res.stderr, "a Ruby backtrace instead of one line"
    monkeypatch.setenv("VAGRANT_DEFAULT_PROVIDER", "virtualbox")
    assert vd.VagrantDriver().unavailable_reason() == (
        "no hypervisor: VirtualBox not installed (install it)")


@pytest.mark.parametrize("name", ["freebsd-14", "freebsd-15"])
def test_freebsd_without_box_or_image_is_not_run(driver: vd.VagrantDriver, name: str,
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _need_vagrant()
    monkeypatch.setenv(boxes.IMAGES_ENV, str(tmp_path))
    target = _target(name)
    monkeypatch.delenv(boxes.box_override_var(target), raising=False)
    image = boxes.FreeBSDImage.of(target)
    assert target.box and image is not None
    if driver.box_installed(target.box):
        assert driver.target_unavailable_reason(target) is None
    else:
        assert driver.target_unavailable_reason(target) == (
            f"no FreeBSD {image.version} image: put {image.file} and its CHECKSUM.SHA512 "
            f"in {tmp_path}, or set IOMUX_IMAGES")


# -- the real thing ------------------------------------------------------------------------

@pytest.mark.slow
def test_offline_box_builds_or_is_cached(driver: vd.VagrantDriver, engine_reason: str | None) -> None:
    _need_vms(engine_reason)
    target = _target("debian-vm")
    first = driver.build(target, 1800)
    again = driver.build(target, 600)
    print(f"\nbox build: {json.dumps(first)}; second call: {json.dumps(again)}")
    assert again["cached"] is True
    assert driver.target_unavailable_reason(target) is None
    assert subprocess.run([str(boxes.BOX_BUILD), "--check"], capture_output=True, text=True,
                          env={**os.environ, "IOMUX_BOX_NAME": target.box or ""},
                          timeout=60, check=False).returncode == 0


@pytest.fixture
def debian_vm(driver: vd.VagrantDriver, engine_reason: str | None,
              tmp_path: Path) -> Iterator[dict[str, Any]]:
    _need_vms(engine_reason)
    target = _target("debian-vm")
    driver.build(target, 1800)
    state: dict[str, Any] = {"target": target, "run_id": f"test-{os.getpid()}", "timings": {}}
    try:
        yield state
    finally:
        # Whatever happened above: nothing of this run may survive it.
        if "instance" in state:
            driver.destroy(state["instance"], 600)
        driver.sweep(state["run_id"])


@pytest.mark.slow
@pytest.mark.long(75)
def test_full_cycle_up_check_exec_provision_destroy(driver: vd.VagrantDriver,
                                                    debian_vm: dict[str, Any],
                                                    tmp_path: Path) -> None:
    target, timings = debian_vm["target"], debian_vm["timings"]
    began = time.monotonic()
    inst = driver.start(target, debian_vm["run_id"], "gw0", 1500)
    debian_vm["instance"] = inst
    timings["up"] = round(time.monotonic() - began, 1)
    assert inst.resource_name.startswith(f"iomux-test-{os.getpid()}-gw0-")
    assert all(host == "127.0.0.1" for host, _ in inst.echo_ports.values())
    # The first provision did the work and said so.
    assert inst.data["provision"].startswith("iomux-provision: changed="), inst.data
    assert not inst.data["provision"].startswith("iomux-provision: changed=0 ")
    # The parts of the start, as the event log gets them (lifecycle: start_steps).
    assert set(inst.data["start_steps"]) == {"vagrant_up", "ssh_config", "sync", "provision"}
    timings.update(inst.data["start_steps"])

    t0 = time.monotonic()
    driver.wait_healthy(inst, 600)
    timings["healthy"] = round(time.monotonic() - t0, 1)

    t0 = time.monotonic()
    res = driver.exec(inst, ["uname", "-r"], 120)
    timings["first_exec"] = round(time.monotonic() - t0, 2)
    assert res.rc == 0, res.stderr
    assert res.stdout.strip().endswith("-cloud-amd64"), res.stdout
    assert res.stdout.strip() != os.uname().release
    t0 = time.monotonic()
    res = driver.exec(inst, ["printf", "%s\\n", NASTY], 60)
    timings["exec"] = round(time.monotonic() - t0, 2)
    assert res.stdout == NASTY + "\n"
    assert driver.exec(inst, ["id", "-u"], 60, user="root").stdout.strip() == "0"
    assert driver.exec(inst, ["sh", "-c", "exit 3"], 60).rc == 3

    # insert_key: the shared insecure key was replaced by this machine's own (issue 6).
    keys = driver.exec(inst, ["cat", ".ssh/authorized_keys"], 60).stdout
    insecure = next(Path("/usr/share/rubygems-integration/all/gems").glob("vagrant-*/keys/vagrant.pub"),
                    None)
    if insecure is not None:
        assert insecure.read_text().split()[1] not in keys
    assert keys.strip(), "no authorized key at all"
    # What the in-guest suite needs is in the box: there is no network to fetch it.
    assert driver.exec(inst, ["python3", "-m", "pytest", "--version"], 120).rc == 0

    # The boot the box trims (vagrant/box/build.sh): no driver for the unused KVM and
    # IDE hardware was loaded, the kernel interfaces nobody mounts are masked, and the
    # initramfs holds the root's drivers, not MODULES=most.
    modules = driver.exec(inst, ["cat", "/proc/modules"], 60).stdout.split("\n")
    loaded = {line.split()[0] for line in modules if line.strip()}
    assert not loaded & {"kvm", "kvm_amd", "ata_piix", "libata"}, sorted(loaded)
    assert "virtio_blk" in loaded, sorted(loaded)
    # As root: the box has no D-Bus, and root's systemctl talks to systemd directly.
    masked = driver.exec(inst, ["systemctl", "is-enabled", "dev-hugepages.mount",
                                "systemd-binfmt.service", "modprobe@fuse.service"], 60, user="root")
    assert masked.stdout.split() == ["masked"] * 3, masked.stdout
    # The box carried provision.sh's echo unit from its build (vagrant/box/build.sh), so
    # the first provisioning left it as it was, older than this boot: no daemon-reload.
    unit = driver.exec(inst, ["sh", "-c", "cat /etc/systemd/system/iomux-echo@.service; "
                              "stat -c %Y /etc/systemd/system/iomux-echo@.service; "
                              "awk '/^btime/ {print $2}' /proc/stat"], 60).stdout
    body, mtime, btime = unit.rsplit("\n", 3)[0] + "\n", *unit.split()[-2:]
    printed = subprocess.run(["sh", str(ROOT / "vagrant" / "provision.sh"), "--print-unit"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    assert body == printed, body
    assert int(mtime) < int(btime), (mtime, btime)
    # Enabled for boot, as `systemctl enable` leaves it (provision.sh makes the link).
    enabled = driver.exec(inst, ["systemctl", "is-enabled", "iomux-echo@auto.service"], 60,
                          user="root")
    assert enabled.stdout.split() == ["enabled"], enabled.stdout
    # The tree the harness synced (sync_and_provision): what the guest runs, owned by
    # the SSH user as Vagrant's rsync leaves it, and nothing vagrant/sync-excludes names.
    listing = set(driver.exec(inst, ["ls", "-A", "/vagrant"], 60).stdout.split())
    assert {"iomux", "tests", "vagrant", "pyproject.toml"} <= listing, sorted(listing)
    assert not listing & {".git", ".venv", "docs", "reports", "bench", "docker"}, sorted(listing)
    owners = driver.exec(inst, ["stat", "-c", "%U", "/vagrant", "/vagrant/iomux/__init__.py"], 60)
    assert owners.stdout.split() == ["vagrant", "vagrant"], owners.stdout
    initrd = driver.exec(inst, ["sh", "-c", "lsinitramfs /boot/initrd.img-* | grep -c '[.]ko'"], 120)
    assert 0 < int(initrd.stdout.strip() or 0) < 40, initrd.stdout

    copied = driver.copy_from(inst, "/etc/os-release", tmp_path / "os-release", 60)
    assert 'VERSION_CODENAME=bookworm' in copied.read_text()

    # The same tree again: the provisioner must find nothing to do.
    t0 = time.monotonic()
    line = driver.provision(inst, 600)
    timings["reprovision"] = round(time.monotonic() - t0, 1)
    assert line.startswith("iomux-provision: changed=0 "), line
    assert line.split("state=")[1] == inst.data["provision"].split("state=")[1]

    logs = driver.save_logs(inst, tmp_path / "logs")
    names = {p.name for p in logs}
    assert {"console.log", "dmesg.txt"} <= names
    assert "Linux version" in (tmp_path / "logs" / "dmesg.txt").read_text()

    spec, kwargs = driver.testinfra_spec(inst)
    assert spec == "ssh://debian-vm" and Path(kwargs["ssh_config"]).is_file()

    t0 = time.monotonic()
    driver.destroy(inst, 600)
    timings["destroy"] = round(time.monotonic() - t0, 1)
    driver.destroy(inst, 600)  # safe twice
    timings["cycle"] = round(time.monotonic() - began, 1)
    print(f"\nvagrant timings (s): {json.dumps(timings)}", file=sys.stderr)
    assert not [d for d in driver._domains() if d.startswith(inst.resource_name)]
    assert not Path(inst.data["dir"]).exists()


def test_sweep_removes_what_a_killed_run_left(driver: vd.VagrantDriver,
                                              engine_reason: str | None) -> None:
    """A run killed with -9 leaves its run directory and its domain: sweep(run) takes both."""
    _need_vms(engine_reason)
    run_id = f"killed-{os.getpid()}"
    tag = f"{run_id}-gw1"
    run_dir = boxes.STATE_ROOT / f"{tag}-debian-vm"
    domain = f"{vd.DOMAIN_PREFIX}{tag}-debian-vm"
    uri = driver._libvirt_uri()
    # A defined (never started) domain with our name stands in for the VM; its
    # owner pid is one that no longer exists.
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "owner.json").write_text(json.dumps({
        "io.iomux.project": "iomux", "io.iomux.run": run_id, "worker": "gw1", "tag": tag,
        "machine": "debian-vm", "pid": dead.pid,
        "env": {"VAGRANT_DOTFILE_PATH": str(run_dir / "dot-vagrant"), "IOMUX_RUN_ID": tag}}))
    xml = run_dir / "domain.xml"
    xml.write_text(f"<domain type='qemu'><name>{domain}</name><memory unit='MiB'>64</memory>"
                   "<os><type arch='x86_64'>hvm</type></os></domain>")
    try:
        subprocess.run(["virsh", "-c", uri, "define", str(xml)], check=True, capture_output=True,
                       timeout=60)
        # Not this run's: left alone.
        assert not [r for r in driver.sweep("some-other-run") if domain in r]
        assert domain in driver._domains()
        removed = driver.sweep(run_id)
        assert any(domain in r for r in removed), removed
        assert domain not in driver._domains()
        assert not run_dir.exists()
    finally:
        subprocess.run(["virsh", "-c", uri, "undefine", domain], capture_output=True, timeout=60,
                       check=False)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_failed_up_logs_keep_only_the_newest(tmp_path: Path) -> None:
    # Interrupted or failed `vagrant up` attempts leave their logs for a person to
    # read; without a bound they piled up in /var/tmp/iomux-vagrant/failed.
    for i in range(25):
        log = tmp_path / f"iomux-run-{i:02d}-up.log"
        log.write_text("boom\n")
        os.utime(log, (1_000_000 + i, 1_000_000 + i))
    removed = vd.keep_newest(tmp_path, 20)
    assert sorted(p.name for p in removed) == [f"iomux-run-{i:02d}-up.log" for i in range(5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"iomux-run-{i:02d}-up.log"
                                                          for i in range(5, 25)]
    assert vd.keep_newest(tmp_path / "absent", 20) == []
