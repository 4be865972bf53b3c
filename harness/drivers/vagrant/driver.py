"""The ``vagrant`` target kind: a VM per target, brought up with vagrant/Vagrantfile.

Facts this driver relies on (measured on the project's CI machines; issue 4):

- There is no nested KVM: the Debian box runs under QEMU software emulation
  (``libvirt.driver = "qemu"``), so ``vagrant up`` takes about a minute and a
  command in the guest costs a round trip over SSH. One SSH connection is
  reused for every command (ControlMaster) so that the suites do not pay the
  handshake each time.
- vagrant keeps per-project state in ``.vagrant/`` next to the Vagrantfile;
  two runs sharing it would fight over one machine. Each run and worker gets
  its own directory under ``STATE_ROOT`` and points ``VAGRANT_DOTFILE_PATH``
  there; the Vagrantfile takes names and ports from ``IOMUX_*`` variables.
- Every libvirt domain of ours is named ``iomux-<run>-<worker>-<machine>`` and
  every run directory holds ``owner.json`` (project, run id, pid), which is
  how ``sweep`` finds what an interrupted run left: the labels of DESIGN §3.
- ``vagrant up`` now and then fails on its own: here, 1 in about 6 fresh ups
  under load ended with "Vagrant can't use the requested machine because it is
  locked!" while waiting for the boot (a known intermittent vagrant bug,
  hashicorp/vagrant#8468), and a boot under emulation can stall. A bounded
  retry (destroy, then up again) is cheaper than failing the target.
- Boxes (which one a target runs, building those named iomux/...) are
  ``boxes``; commands and files go over SSH (harness/drivers/ssh.py).
- Vagrant's rsync synced folder took 10.3 s of a 52 s ``vagrant up`` here for
  what ``rsync`` does in 1 s over an open SSH master: each of its capability
  checks (rsync installed, the folder made and owned) is an SSH session of its
  own, 0.4 s under emulation. So the harness brings the VM up with
  ``IOMUX_SYNC=harness`` and ``--no-provision`` and then syncs the tree
  (``vagrant/sync-excludes``, the same options) and runs vagrant/provision.sh
  itself, over its one connection (``sync_tree``, ``run_provisioner``); by hand, ``vagrant
  up`` still does both the Vagrant way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, ClassVar, Collection, Mapping, Sequence

from harness.drivers.base import (
    BACKEND_PORTS,
    LABEL_PROJECT,
    LABEL_RUN,
    PROJECT,
    Driver,
    ExecResult,
    Guest,
    Instance,
    StepTimeout,
    Target,
    TargetError,
    run_argv,
)
from harness.drivers.owners import pid_alive
from harness.drivers.ssh import SSHTransport, last_line, shared_connection
from harness.drivers.vagrant.boxes import (
    ROOT,
    STATE_ROOT,
    VAGRANT_DIR,
    VagrantBoxes,
    box_override_var,
)
from harness.drivers.vagrant.libvirt import LibvirtDomains

DOMAIN_PREFIX = "iomux-"
#: Where the working tree goes in the guest (sync_and_provision; the Vagrantfile by hand).
GUEST_TREE = "/vagrant"
#: ``vagrant up`` attempts per start (a boot under emulation sometimes stalls).
UP_ATTEMPTS = 2
PROVISION_RE = re.compile(r"iomux-provision: changed=(\d+)\S*.*")
#: What the tree's copy in the guest leaves out; the Vagrantfile reads the same file.
SYNC_EXCLUDES = VAGRANT_DIR / "sync-excludes"
#: rsync's options: the Vagrantfile's ``rsync__args``.
SYNC_OPTIONS = ("--archive", "--delete", "--checksum")


def sync_excludes(path: Path = SYNC_EXCLUDES) -> list[str]:
    """The rsync ``--exclude`` patterns of ``path``: a pattern a line, ``#`` comments.
    Vagrant leaves out ``.vagrant/`` on its own; the file names it for the harness."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    # Bound-and-closed: another process could take it before QEMU does, which
    # makes `vagrant up` fail, and the retry then picks new ports.
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: How many logs of failed ``vagrant up`` attempts /var/tmp/iomux-vagrant/failed keeps
#: (two per attempt: up.log and console.log), the newest; older ones go.
FAILED_LOGS_KEPT = 20


def keep_newest(directory: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` newest files of ``directory``; return the removed."""
    try:
        files = [p for p in directory.iterdir() if p.is_file()]
    except OSError:
        return []
    files.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    removed = []
    for old in files[keep:]:
        with contextlib.suppress(OSError):
            old.unlink()
            removed.append(old)
    return removed


class VagrantDriver(VagrantBoxes, LibvirtDomains, SSHTransport, Driver):
    """VMs through vagrant: libvirt here (QEMU emulation), VirtualBox or libvirt elsewhere."""

    kind: ClassVar[str] = "vagrant"
    #: A VM under QEMU software emulation boots in about a minute, and a boot may
    #: be retried (UP_ATTEMPTS).
    step_timeouts: ClassVar[Mapping[str, float]] = {"start": 1500, "healthy": 600,
                                                    "destroy": 600}
    #: ``box``: the Vagrant box; ``freebsd``: the FreeBSD image its box is built
    #: from (FreeBSDImage); ``test_scale``: the fault suite's scale (default 0.25).
    options_required: ClassVar[frozenset[str]] = frozenset({"box"})
    options_allowed: ClassVar[frozenset[str]] = frozenset({"freebsd", "test_scale"})
    #: [target.freebsd], read by boxes.FreeBSDImage.of.
    option_tables: ClassVar[Mapping[str, frozenset[str]]] = {
        "freebsd": frozenset({"version", "image", "checksum_file", "url", "sha512"})}
    keepable: ClassVar[bool] = True
    #: What goes into the VM: the box's recipe, the Vagrantfile and its provisioner,
    #: and the parts of the rsync'd tree the guest runs (iomux and the in-guest suites).
    kept_inputs: ClassVar[tuple[str, ...]] = (
        "pyproject.toml", "README.md", "iomux", "tests/server", "tests/faults",
        "vagrant/Vagrantfile", "vagrant/provision.sh", "vagrant/sync-excludes", "vagrant/box")


    # -- availability ---------------------------------------------------------------------

    def unavailable_reason(self) -> str | None:
        """None if vagrant and a hypervisor it can drive are here, else why not."""
        if shutil.which("vagrant") is None:
            return "vagrant not installed (apt-get install vagrant vagrant-libvirt)"
        want = os.environ.get("VAGRANT_DEFAULT_PROVIDER", "")
        libvirt = self._libvirt_missing()
        vbox = None if shutil.which("VBoxManage") else "VBoxManage (VirtualBox) was not found"
        if want == "virtualbox":
            return "no hypervisor: VirtualBox not installed (install it)" if vbox else None
        if want in ("", "libvirt") and libvirt is None:
            return None
        if want == "" and vbox is None:
            return None
        if want not in ("", "libvirt", "virtualbox"):
            return f"no hypervisor: VAGRANT_DEFAULT_PROVIDER={want} (use libvirt or virtualbox)"
        return libvirt  # it names what is missing and what to do

    # -- start ----------------------------------------------------------------------------

    def _env(self, instance: Instance) -> dict[str, str]:
        env = {**os.environ, **instance.data["env"]}
        return env

    def _vagrant(self, instance: Instance, args: Sequence[str], timeout: float,
                 step: str) -> ExecResult:
        return run_argv(["vagrant", *args], timeout, f"{instance.target.name}: {step}",
                        cwd=VAGRANT_DIR, env=self._env(instance))

    def _new_instance(self, target: Target, run_id: str, worker: str) -> Instance:
        tag = f"{_slug(run_id)}-{_slug(worker)}"
        run_dir = STATE_ROOT / f"{tag}-{target.name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        backends = ["auto", *[b for b in target.backends if b in BACKEND_PORTS]]
        guest_ports = {b: BACKEND_PORTS[b] for b in backends}
        host_ports = {b: _free_port() for b in backends}
        ssh_port = _free_port()
        # The UDP-tunnel NIC sends to its own port: a remote port of its own
        # would be a free port now that another run's QEMU may bind later.
        udp_port = _free_port(socket.SOCK_DGRAM)
        env = {
            "VAGRANT_DOTFILE_PATH": str(run_dir / "dot-vagrant"),
            "IOMUX_RUN_ID": tag,
            "IOMUX_SSH_PORT": str(ssh_port),
            "IOMUX_ECHO_PORTS": ",".join(f"{guest_ports[b]}:{host_ports[b]}" for b in backends),
            "IOMUX_BACKENDS": ",".join(f"{b}:{guest_ports[b]}" for b in backends),
            "IOMUX_UDP_PORTS": f"{udp_port}:{udp_port}",
            "IOMUX_CONSOLE_LOG": str(run_dir / "console.log"),
            # The tree and the provisioner go over the harness's SSH (sync_and_provision).
            "IOMUX_SYNC": "harness",
            box_override_var(target): self.box_for(target),
            # vagrant's own checks phone home; nothing here may leave 127.0.0.0/8.
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_BOX_UPDATE_CHECK_DISABLE": "1",
        }
        owner = {LABEL_PROJECT: PROJECT, LABEL_RUN: run_id, "worker": worker, "tag": tag,
                 "machine": target.name, "pid": os.getpid(), "env": env}
        (run_dir / "owner.json").write_text(json.dumps(owner, indent=1))
        return Instance(target=target, run_id=run_id, resource_name=f"{DOMAIN_PREFIX}{tag}-{target.name}",
                        echo_ports={b: ("127.0.0.1", host_ports[b]) for b in backends},
                        # What the cross-OS suites look for (tests/cross_os):
                        # the rsync'd tree and the interpreter that has iomux.
                        guest=Guest(tests_dir=f"{GUEST_TREE}/tests/server",
                                    scratch_dir="/tmp", python="python3",
                                    # Python under QEMU emulation runs ~10x slower:
                                    # the fault suite runs at a quarter of its sizes,
                                    # or at the target's test_scale (targets.toml).
                                    test_scale=float(target.options.get("test_scale", 0.25)),
                                    guest_ports=guest_ports),
                        data={"dir": str(run_dir), "env": env, "machine": target.name})

    def start(self, target: Target, run_id: str, worker: str, timeout: float) -> Instance:
        """``vagrant up`` (bounded retries), then an ssh_config for exec and testinfra.

        Whatever ends an attempt early (a failure, a timeout, Ctrl-C) destroys
        what it created before the exception leaves: a caller that got no
        Instance back has nothing to destroy."""
        began = time.monotonic()
        last = "no time left for vagrant up"
        failed_dir = STATE_ROOT.parent / "failed"
        for attempt in range(1, UP_ATTEMPTS + 1):
            left = timeout - (time.monotonic() - began)
            if left < 30:
                break
            instance = self._new_instance(target, run_id, worker)
            try:
                mark = time.monotonic()
                res = self._vagrant(instance, ["up", target.name, "--no-provision",
                                               "--no-destroy-on-error"], left, "vagrant up")
                if res.rc == 0:
                    # The start's parts, for the event log (lifecycle: "start_steps").
                    steps = {"vagrant_up": round(time.monotonic() - mark, 1)}
                    mark = time.monotonic()
                    self._write_ssh_config(instance)
                    steps["ssh_config"] = round(time.monotonic() - mark, 1)
                    left = timeout - (time.monotonic() - began)
                    prov = self.sync_and_provision(instance, max(30.0, left), steps)
                    if prov.rc == 0:
                        instance.data["attempts"] = attempt
                        instance.data["start_steps"] = steps
                        instance.data["provision"] = self._provision_line(prov.stdout)
                        found = re.search(r"iomux-provision: python=(\S+)", prov.stdout)
                        if found:
                            instance.guest.python = found.group(1)
                        return instance
                    res = ExecResult(argv=res.argv, rc=prov.rc, stdout=res.stdout + prov.stdout,
                                     stderr=res.stderr + prov.stderr)
                    last = f"provisioning failed (exit {prov.rc}): {last_line(prov.stderr or prov.stdout)}"
                else:
                    last = f"vagrant up failed (exit {res.rc}): {last_line(res.stderr or res.stdout)}"
                (Path(instance.data["dir"]) / "up.log").write_text(res.stdout + res.stderr)
            except StepTimeout as exc:
                last = str(exc)
            except BaseException:
                self.destroy(instance, 300)
                raise
            # The run directory goes with the VM; keep this attempt's logs for the report.
            failed_dir.mkdir(parents=True, exist_ok=True)
            for name in ("up.log", "console.log"):
                src = Path(instance.data["dir"]) / name
                if src.exists():
                    shutil.copy(src, failed_dir / f"{instance.resource_name}-{attempt}-{name}")
            keep_newest(failed_dir, FAILED_LOGS_KEPT)
            self.destroy(instance, min(300.0, max(30.0, timeout - (time.monotonic() - began))))
        raise TargetError(f"{target.name}: {last} ({UP_ATTEMPTS} attempts at most; "
                          f"logs under {failed_dir})")

    @staticmethod
    def _provision_line(output: str) -> str:
        lines = [m.group(0).strip() for m in PROVISION_RE.finditer(output)]
        return lines[-1] if lines else ""

    def sync_tree(self, instance: Instance, timeout: float) -> ExecResult:
        """What Vagrant's rsync synced folder does, over the instance's SSH master:
        ``GUEST_TREE`` made and owned by the SSH user (as Vagrant does), then the tree
        rsync'd into it. A failed step's result is returned, not raised; a step that
        times out raises StepTimeout."""
        deadline = time.monotonic() + timeout
        made = self.exec(instance, ["sh", "-c", 'sudo -n mkdir -p "$1" && '
                                    'sudo -n chown "$(id -u):$(id -g)" "$1"', "sh", GUEST_TREE],
                         max(10.0, deadline - time.monotonic()))
        if made.rc != 0:
            return made
        ssh = " ".join(shlex.quote(w) for w in ["ssh", "-F", str(instance.data["ssh_config"])])
        return run_argv(["rsync", *SYNC_OPTIONS, *[f"--exclude={p}" for p in sync_excludes()],
                         "-e", ssh, f"{ROOT}/", f"{self.ssh_host(instance)}:{GUEST_TREE}/"],
                        max(10.0, deadline - time.monotonic()), f"{instance.target.name}: rsync")

    def run_provisioner(self, instance: Instance, timeout: float) -> ExecResult:
        """What Vagrant's shell provisioner does: ``provision.sh`` of the synced tree,
        as root, over the instance's SSH master."""
        return self.exec(instance, ["sh", f"{GUEST_TREE}/vagrant/provision.sh", GUEST_TREE,
                                    instance.data["env"]["IOMUX_BACKENDS"]], timeout, user="root")

    def sync_and_provision(self, instance: Instance, timeout: float,
                           steps: dict[str, float] | None = None) -> ExecResult:
        """``sync_tree``, then ``run_provisioner`` if it worked: the first failed
        step's result, or the provisioner's. ``steps`` gets each one's seconds
        (``sync``, ``provision``)."""
        timed = steps if steps is not None else {}
        mark = time.monotonic()
        deadline = mark + timeout
        synced = self.sync_tree(instance, timeout)
        timed["sync"] = round(time.monotonic() - mark, 1)
        if synced.rc != 0:
            return synced
        mark = time.monotonic()
        res = self.run_provisioner(instance, max(10.0, deadline - mark))
        timed["provision"] = round(time.monotonic() - mark, 1)
        return res

    def provision(self, instance: Instance, timeout: float) -> str:
        """Sync the tree and run the provisioner again (``sync_and_provision``);
        returns its ``iomux-provision: changed=N ...`` line."""
        res = self.sync_and_provision(instance, timeout)
        if res.rc != 0:
            raise TargetError(f"{instance.target.name}: provisioning failed: "
                              f"{last_line(res.stderr or res.stdout)}")
        return self._provision_line(res.stdout)

    def _write_ssh_config(self, instance: Instance) -> None:
        res = self._vagrant(instance, ["ssh-config", instance.data["machine"]], 120,
                            "vagrant ssh-config")
        if res.rc != 0:
            raise TargetError(f"{instance.target.name}: vagrant ssh-config failed: "
                              f"{last_line(res.stderr)}")
        run_dir = Path(instance.data["dir"])
        config, control = shared_connection(res.stdout, str(run_dir))
        instance.data["control_path"] = control
        path = run_dir / "ssh_config"
        path.write_text(config)
        instance.data["ssh_config"] = str(path)

    def ssh_host(self, instance: Instance) -> str:
        """The machine's name: the Host of ``vagrant ssh-config``."""
        return str(instance.data["machine"])

    def kept_recipe(self, target: Target) -> dict[str, Any]:
        """The box the VM boots (``IOMUX_BOX_<TARGET>`` may name another)."""
        return {"box": self.box_for(target)}

    def attach(self, kept: Instance, timeout: float) -> Instance | None:
        """Take over a kept VM: its run directory and ssh_config still there, its
        libvirt domain running, and a command over SSH answered. Its owner.json then
        names this process, so that a sweep leaves it to this run."""
        run_dir = Path(str(kept.data.get("dir", "")))
        config = kept.data.get("ssh_config")
        owner_file = run_dir / "owner.json"
        if not config or not Path(str(config)).is_file() or not owner_file.is_file():
            return None
        if self._domain_state(kept.resource_name) != "running":
            return None
        probe = self.exec(kept, ["true"], max(10.0, min(timeout, 120.0)))
        if probe.rc != 0:
            return None
        owner = json.loads(owner_file.read_text())
        owner["pid"] = os.getpid()
        tmp = owner_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(owner, indent=1))
        os.replace(tmp, owner_file)
        return kept

    # -- use ------------------------------------------------------------------------------

    def wait_healthy(self, instance: Instance, timeout: float) -> None:
        """``iomux check`` from the host through every forwarded echo port."""
        deadline = time.monotonic() + timeout
        for backend, (host, port) in instance.echo_ports.items():
            while True:
                res = run_argv([sys.executable, "-m", "iomux", "check", f"{host}:{port}",
                                "--timeout", "5"], 30, f"{instance.target.name}: iomux check",
                               cwd=ROOT)
                if res.rc == 0:
                    break
                if time.monotonic() > deadline:
                    raise StepTimeout(f"{instance.target.name}: healthy: echo server ({backend}) on "
                                      f"{host}:{port} did not answer within {timeout:g}s: "
                                      f"{last_line(res.stderr or res.stdout)}")
                time.sleep(2)

    def save_logs(self, instance: Instance, dest: Path) -> list[Path]:
        """The guest's serial console (from the host) and, if SSH still works, dmesg."""
        dest.mkdir(parents=True, exist_ok=True)
        saved: list[Path] = []
        console = Path(instance.data["dir"]) / "console.log"
        if console.exists():
            saved.append(Path(shutil.copy(console, dest / "console.log")))
        wanted = {"dmesg.txt": ["dmesg"],
                  "iomux-journal.txt": ["journalctl", "--no-pager", "-u", "iomux-echo@*"]}
        for name, argv in wanted.items():
            try:
                res = self.exec(instance, argv, 60, user="root")
            except (StepTimeout, TargetError):
                continue
            if res.rc == 0 or res.stdout:
                path = dest / name
                path.write_text(res.stdout + res.stderr)
                saved.append(path)
        return saved

    # -- tear down ------------------------------------------------------------------------

    def destroy(self, instance: Instance, timeout: float) -> None:
        """``vagrant destroy -f``, close the SSH master, remove the domain if vagrant left it."""
        run_dir = Path(instance.data["dir"])
        if not run_dir.exists():
            return
        self.close_shared_connection(instance)
        try:
            self._vagrant(instance, ["destroy", "-f", instance.data["machine"]], timeout,
                          "vagrant destroy")
        finally:
            self._remove_domains(instance.resource_name)
            shutil.rmtree(run_dir, ignore_errors=True)

    def sweep(self, run_id: str | None = None, targets: Sequence[Target] = (),
              spare: Collection[str] = ()) -> list[str]:
        """Destroy VMs of earlier runs (never those named in ``spare``): their run
        directories first, then stray domains."""
        removed: list[str] = []
        if STATE_ROOT.is_dir():
            for run_dir in sorted(p for p in STATE_ROOT.iterdir() if p.is_dir()):
                try:
                    owner = json.loads((run_dir / "owner.json").read_text())
                except (OSError, ValueError):
                    shutil.rmtree(run_dir, ignore_errors=True)
                    continue
                if owner.get(LABEL_PROJECT) != PROJECT:
                    continue
                if f"{DOMAIN_PREFIX}{owner.get('tag')}-{owner.get('machine')}" in spare:
                    continue  # a kept target (harness.kept_targets)
                if run_id is not None and owner.get(LABEL_RUN) != run_id:
                    continue
                # Without a run id, a directory whose owner is alive belongs to a run
                # that is still going (another engineer's): not ours to pull.
                if run_id is None and owner.get("pid") != os.getpid() and pid_alive(int(owner.get("pid", 0))):
                    continue
                target = Target(name=owner["machine"], kind=self.kind, os_family="", backends=())
                inst = Instance(target=target, run_id=owner[LABEL_RUN],
                                resource_name=f"{DOMAIN_PREFIX}{owner['tag']}-{owner['machine']}",
                                data={"dir": str(run_dir), "env": owner["env"],
                                      "machine": owner["machine"]})
                try:
                    self.destroy(inst, 300)
                except (StepTimeout, TargetError) as exc:
                    removed.append(f"{inst.resource_name}: {exc}")
                removed.append(f"vagrant machine {inst.resource_name}")
        live = set()
        if STATE_ROOT.is_dir():
            for run_dir in STATE_ROOT.iterdir():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    owner = json.loads((run_dir / "owner.json").read_text())
                    live.add(f"{DOMAIN_PREFIX}{owner['tag']}-")
        prefix = DOMAIN_PREFIX if run_id is None else f"{DOMAIN_PREFIX}{_slug(run_id)}-"
        for name in self._domains():
            if name.startswith(prefix) and not any(name.startswith(p) for p in live):
                removed += self._remove_domains(name)
        return removed
