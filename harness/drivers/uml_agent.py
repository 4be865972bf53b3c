#!/usr/bin/python3
"""The init of a User-Mode Linux guest (the ``uml`` kind): set the guest up, then
answer exec requests from the host over one serial line.

Standard library only, run by the guest's own /usr/bin/python3 as PID 1 (the
uml driver copies this file into the root filesystem as /opt/iomux/uml_agent.py).

The channel is the UML serial line ``ssl0=fd:R,fd:W``: two pipes of the host's
driver, /dev/ttyS0 in here, put in raw mode (no echo, no CR/LF mapping). One
JSON object per line each way; every reply carries the request's ``id``:

    {"id": 1, "op": "exec", "argv": [...], "timeout": 30, "user": "10001:10001"}
    {"id": 1, "rc": 0, "stdout": "<base64>", "stderr": "<base64>", "timed_out": false}
    {"id": 2, "op": "poweroff"}

Facts about being PID 1 in a UML guest this relies on:

- Orphaned processes are reparented to PID 1, which must reap them. Reaping
  with ``waitpid(-1)`` would steal the exit status of the commands the agent
  runs, so PID 1 forks: the child serves requests (and reaps only its own
  commands), the parent only reaps.
- Kernel parameters of the form ``name=value`` that the kernel does not know
  reach init as environment variables: the driver passes ``IOMUX_HOSTNAME``.
- The root is the host's export of the image through hostfs, read-only; /tmp,
  /dev/shm and /run are the guest's own tmpfs, /dev its devtmpfs.
- There is one vCPU: requests run in threads, their commands in parallel.
"""

import base64
import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import tty
from typing import Any, Dict, Tuple

CHANNEL = "/dev/ttyS0"
#: linux/reboot.h: LINUX_REBOOT_CMD_POWER_OFF
POWER_OFF = 0x4321FEDC
IMAGE_ENV = "/.image-env.json"


def mount(fstype: str, target: str, options: str = "") -> None:
    """mount(8) of a pseudo filesystem; a failure is reported on the console."""
    result = subprocess.run(["mount", "-t", fstype, "-o", options or "defaults", fstype, target],
                            capture_output=True, text=True)
    if result.returncode != 0:
        print(f"uml-agent: mount {fstype} {target}: {result.stderr.strip()}", flush=True)


def set_up() -> None:
    """The guest's pseudo filesystems, loopback and hostname."""
    mount("proc", "/proc", "nosuid,nodev,noexec")
    mount("sysfs", "/sys", "nosuid,nodev,noexec")
    mount("devtmpfs", "/dev", "nosuid,mode=755")
    for path in ("/dev/pts", "/dev/shm"):
        os.makedirs(path, exist_ok=True)
    mount("devpts", "/dev/pts", "nosuid,noexec,gid=5,mode=620,ptmxmode=666")
    mount("tmpfs", "/dev/shm", "nosuid,nodev,mode=1777")
    mount("tmpfs", "/tmp", "nosuid,nodev,mode=1777,size=256m")
    mount("tmpfs", "/run", "nosuid,nodev,mode=755")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=False)
    name = os.environ.get("IOMUX_HOSTNAME")
    if name:
        socket.sethostname(name)
    # The open-file limit of the debian-12 container here (the probes open
    # 10,000 fds); the kernel's default for init is 1024/4096.
    nofile = int(os.environ.get("IOMUX_NOFILE") or 0)
    if nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))


def command_env() -> Dict[str, str]:
    """The image's ENV (docker/Dockerfile): PATH with the venv, HOME=/tmp, ..."""
    env: Dict[str, str] = {"LANG": "C.UTF-8"}
    try:
        with open(IMAGE_ENV) as fh:
            for word in json.load(fh):
                key, _, value = word.partition("=")
                env[key] = value
    except (OSError, ValueError):
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    return env


class Server:
    """Reads requests from the channel, runs each in a thread, writes replies."""

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self.lock = threading.Lock()
        self.env = command_env()

    def reply(self, message: Dict[str, Any]) -> None:
        """Write one reply line (whole, under the lock: threads share the line)."""
        line = (json.dumps(message) + "\n").encode()
        with self.lock:
            view = memoryview(line)
            while view:
                written = os.write(self.channel, view)
                view = view[written:]

    def run(self, request: Dict[str, Any]) -> Tuple[int, bytes, bytes, bool]:
        """Run one command in its own session; kill the session at its timeout."""
        user = request.get("user")
        ids: Dict[str, Any] = {}
        if user:
            uid, _, gid = str(user).partition(":")
            ids = {"user": int(uid), "group": int(gid or uid), "extra_groups": []}
        env = dict(self.env)
        env.update(request.get("env") or {})
        timed_out = False
        try:
            proc = subprocess.Popen(request["argv"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=request.get("cwd") or "/tmp", env=env,
                                    start_new_session=True, **ids)
        except OSError as exc:
            return 127, b"", f"uml-agent: {request['argv'][0]}: {exc.strerror}\n".encode(), False
        try:
            out, err = proc.communicate(timeout=float(request.get("timeout") or 60))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        if proc.returncode is not None and proc.returncode >= 0:
            rc = proc.returncode
        else:
            rc = 128 - (proc.returncode or 0)
        return rc, out, err, timed_out

    def handle(self, request: Dict[str, Any]) -> None:
        """Answer one request (in its own thread)."""
        if request.get("op") == "poweroff":
            self.reply({"id": request.get("id"), "rc": 0})
            power_off()
        try:
            rc, out, err, timed_out = self.run(request)
        except Exception as exc:  # an agent bug must still answer, not hang the host
            rc, out, err, timed_out = 125, b"", f"uml-agent: {exc!r}\n".encode(), False
        self.reply({"id": request.get("id"), "rc": rc, "timed_out": timed_out,
                    "stdout": base64.b64encode(out).decode(),
                    "stderr": base64.b64encode(err).decode()})

    def serve(self) -> None:
        """Say ready, then read request lines until the line closes."""
        self.reply({"id": 0, "ready": True, "release": os.uname().release})
        buffer = b""
        while True:
            chunk = os.read(self.channel, 65536)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                try:
                    request = json.loads(line)
                except ValueError:
                    continue  # line noise before the host's first request
                threading.Thread(target=self.handle, args=(request,), daemon=True).start()


def power_off() -> None:
    """Kill everything, flush, and power the guest off (the UML process exits)."""
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(POWER_OFF)
    os._exit(0)


def main() -> None:
    """Set up, fork the server, and reap as PID 1."""
    set_up()
    channel = os.open(CHANNEL, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(channel)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        try:
            Server(channel).serve()
        finally:
            os._exit(0)
    # PID 1: reap every orphan; when the server is gone, power off.
    while True:
        try:
            done, _status = os.wait()
        except ChildProcessError:
            break
        if done == pid:
            break
    power_off()


if __name__ == "__main__":
    try:
        main()
    except BaseException as exc:  # PID 1 must not exit (the kernel panics): power off
        print(f"uml-agent: {exc!r}", file=sys.stderr, flush=True)
        power_off()
