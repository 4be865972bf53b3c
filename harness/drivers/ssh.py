"""Reaching a guest over SSH: the transport of every kind whose guests run sshd
(the ``vagrant`` kind's VMs; any kind that gets an ``ssh_config`` for its guest).

A kind gives each instance an ``ssh_config`` file (``instance.data["ssh_config"]``,
e.g. from ``vagrant ssh-config``) passed through ``shared_connection``, and the
host name in it (``ssh_host``); ``SSHTransport`` then runs commands, copies
files out and hands testinfra the same connection.

- ssh joins its arguments into one shell line on the far side: every word of an
  argv is quoted (``remote_command``), so ``"a; rm -rf /"`` stays one argument.
- One connection for every command (ControlMaster): the handshake under QEMU
  emulation costs about a second; ControlPersist keeps the master after the
  first exec, and ``close_shared_connection`` ends it.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any, Sequence

from harness.drivers.base import ExecResult, Instance, StepTimeout, TargetError, run_argv


def last_line(text: str) -> str:
    """The last non-empty line of a command's output, or "(no output)"."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def remote_command(argv: Sequence[str], user: str | None = None) -> str:
    """The one string ssh sends to the guest's shell for ``argv``: every word quoted.

    ssh joins its arguments into a shell line on the far side, so quoting here is
    what keeps ``"a; rm -rf /"`` one argument (issue 6)."""
    words = list(argv)
    if not words:
        raise TargetError("exec: empty argv")
    if user == "root":
        words = ["sudo", "-n", "--", *words]
    elif user:
        words = ["sudo", "-n", "-u", user, "--", *words]
    return " ".join(shlex.quote(word) for word in words)


def shared_connection(config: str, key: str) -> tuple[str, str]:
    """``config`` (an ssh_config text) with one shared connection for its first
    host, and the master's socket path; ``key`` makes the path unique (a run dir).

    The socket lives at a short fixed-length path: ssh appends 17 characters
    while it sets the master up, and a unix socket path must fit 108 bytes
    (a long run id made ssh fail with exit 255 and, at LogLevel FATAL, no word)."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    control = f"/tmp/iomux-ssh-{digest}"
    extra = (f"  ControlMaster auto\n  ControlPath {control}\n  ControlPersist 600\n"
             "  ServerAliveInterval 15\n  ConnectTimeout 30\n")
    config = re.sub(r"^(Host .*\n)", lambda m: m.group(1) + extra, config, count=1, flags=re.M)
    return config.replace("LogLevel FATAL", "LogLevel ERROR"), control


class SSHTransport:
    """exec, copy_from and testinfra_spec over the instance's ssh_config."""

    def ssh_host(self, instance: Instance) -> str:
        """The guest's ``Host`` in its ssh_config."""
        return str(instance.data["ssh_host"])

    def _ssh_argv(self, instance: Instance) -> list[str]:
        config = instance.data.get("ssh_config")
        if not config:
            raise TargetError(f"{instance.target.name}: not started (no ssh_config)")
        return ["ssh", "-F", config, self.ssh_host(instance)]

    def exec(self, instance: Instance, argv: Sequence[str], timeout: float,
             user: str | None = None) -> ExecResult:
        """Run ``argv`` in the guest over the shared SSH connection, every word quoted."""
        res = run_argv([*self._ssh_argv(instance), "--", remote_command(argv, user)], timeout,
                       f"{instance.target.name}: exec {argv[0] if argv else ''}")
        return ExecResult(argv=list(argv), rc=res.rc, stdout=res.stdout, stderr=res.stderr)

    def testinfra_spec(self, instance: Instance) -> tuple[str, dict[str, Any]]:
        """testinfra's paramiko-free ``ssh://`` backend with our ssh_config (same master)."""
        return (f"ssh://{self.ssh_host(instance)}",
                {"ssh_config": instance.data["ssh_config"]})

    def copy_from(self, instance: Instance, path: str, dest: Path, timeout: float) -> Path:
        """``cat`` the file over SSH into ``dest`` (bytes, not text)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        argv = [*self._ssh_argv(instance), "--", remote_command(["cat", "--", path])]
        try:
            with open(dest, "wb") as out:
                proc = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, timeout=timeout,
                                      check=False)
        except subprocess.TimeoutExpired as exc:
            raise StepTimeout(f"{instance.target.name}: copy {path}: timed out after {timeout:g}s") from exc
        if proc.returncode != 0:
            raise TargetError(f"{instance.target.name}: copy {path} failed: "
                              f"{last_line(proc.stderr.decode(errors='replace'))}")
        return dest

    def close_shared_connection(self, instance: Instance) -> None:
        """End the SSH master of the instance, if it has one (``ssh -O exit``)."""
        config = instance.data.get("ssh_config")
        if config and Path(config).exists():
            with contextlib.suppress(StepTimeout, TargetError):
                run_argv(["ssh", "-F", config, "-O", "exit", self.ssh_host(instance)], 15,
                         "ssh -O exit")
