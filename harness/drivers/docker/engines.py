"""Which Docker engine a docker target runs on, and where that engine's ports are.

A target names its engine in targets.toml with one of:

- ``docker_host``: a daemon URL as DOCKER_HOST takes it: ``unix:///path.sock``,
  ``tcp://HOST:PORT`` (plain TCP; for TLS, use a context) or ``ssh://[USER@]HOST``
  (through the ``ssh`` client, as the docker CLI does);
- ``docker_context``: a Docker CLI context (``docker context create NAME
  --docker host=...``), resolved with the SDK's ``docker.context.ContextAPI`` to
  its host and its TLS material.

Without either, a target runs on the default engine, the one ``docker`` itself
would use: DOCKER_HOST (with DOCKER_TLS_VERIFY and DOCKER_CERT_PATH), else the
current context (DOCKER_CONTEXT, else config.json's ``currentContext``), else the
local socket. ``resolve_engine`` is the one place that decides; the driver's
clients, image builders, sweep and echo addresses all go through it.

Facts this relies on:

- A port an engine publishes is bound on that engine's machine. An engine reached
  through a unix socket (or tcp/ssh to a loopback address) is on this machine, and
  publishes on 127.0.0.1 only (this machine's rule: nothing of ours listens beyond
  loopback). One reached as tcp://HOST or ssh://HOST publishes on HOST: bound to
  HOST itself when it is an address, else to every address of that machine (an
  engine cannot bind a name, and the name's address seen from here may be one
  that machine does not have, behind NAT).
- ContextAPI looks for contexts in ``contexts/`` beside the config file it finds
  (DOCKER_CONFIG/config.json, else ~/.docker/config.json). With no config.json
  it looks in the working directory instead, so a missing one is said here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

from harness.drivers.base import Target, TargetError, one_line

LOOPBACK = "127.0.0.1"
#: URL schemes of an engine on this machine whatever its address.
LOCAL_SCHEMES = ("", "unix", "npipe", "http+unix")


@dataclasses.dataclass(frozen=True)
class Engine:
    """One Docker engine: how the SDK reaches it and where its published ports are."""

    #: the daemon URL given to the SDK; "" is the SDK's default (the local socket)
    base_url: str
    #: a ``docker.tls.TLSConfig`` (from DOCKER_TLS_VERIFY or a context), or None
    tls: Any = dataclasses.field(default=None, compare=False)
    #: what the logs call it: "default", "context NAME", or the URL
    label: str = dataclasses.field(default="default", compare=False)
    #: the docker CLI's words for the same engine (testinfra runs the CLI)
    cli_args: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def machine(self) -> str | None:
        """The host name or address of the engine's machine; None when it is this one."""
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme in LOCAL_SCHEMES or not url.hostname:
            return None
        if url.hostname == "localhost":
            return None
        try:
            return None if ipaddress.ip_address(url.hostname).is_loopback else url.hostname
        except ValueError:
            return url.hostname  # a name

    @property
    def published_host(self) -> str:
        """Where this machine reaches a port the engine publishes."""
        return self.machine or LOOPBACK

    @property
    def bind_address(self) -> str:
        """The HostIp the engine binds a published port to (see the module docstring)."""
        machine = self.machine
        if machine is None:
            return LOOPBACK
        try:
            return str(ipaddress.ip_address(machine))
        except ValueError:
            return "0.0.0.0"

    def client(self, timeout: int = 120) -> Any:
        """A new SDK client for this engine."""
        from harness.drivers.docker.engine import docker_sdk

        return docker_sdk().DockerClient(
            base_url=self.base_url or None, tls=self.tls if self.tls is not None else False,
            timeout=timeout, use_ssh_client=self.base_url.startswith("ssh://"))


def _context(name: str) -> Engine:
    from docker.context import ContextAPI
    from docker.utils.config import find_config_file

    if find_config_file() is None:
        where = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
        raise TargetError(f"no Docker context {name!r}: no config.json in {where} "
                          f"(the contexts are read beside it)")
    try:
        ctx = ContextAPI.get_context(name)
    except Exception as exc:  # a corrupt meta.json: the SDK's words, one line
        raise TargetError(f"Docker context {name!r}: {one_line(exc)}") from None
    if ctx is None or not ctx.Host:
        raise TargetError(f"no Docker context {name!r} (docker context ls lists them)")
    return Engine(str(ctx.Host), ctx.TLSConfig, f"context {name}", ("--context", name))


def default_engine() -> Engine:
    """The engine ``docker`` would use here (see the module docstring)."""
    from harness.drivers.docker.engine import docker_sdk

    params = docker_sdk().utils.kwargs_from_env()
    if params.get("base_url"):
        return Engine(str(params["base_url"]), params.get("tls"), "default")
    current = os.environ.get("DOCKER_CONTEXT")
    if current is None:
        from docker.context.config import get_current_context_name

        current = get_current_context_name()
    if current and current != "default":
        return dataclasses.replace(_context(current), label="default", cli_args=())
    return Engine("", None, "default")


def resolve_engine(target: Target | None) -> Engine:
    """The engine of ``target`` (its ``docker_host`` or ``docker_context``), else the
    default one; a wrong option is a TargetError of one line."""
    if target is None:
        return default_engine()
    host = target.options.get("docker_host")
    context = target.options.get("docker_context")
    if host is not None and context is not None:
        raise TargetError(f"{target.name}: give docker_host or docker_context, not both")
    for key, value in (("docker_host", host), ("docker_context", context)):
        if value is not None and (not isinstance(value, str) or not value):
            raise TargetError(f"{target.name}: {key} must be a non-empty string")
    if isinstance(host, str):
        if urllib.parse.urlsplit(host).scheme not in ("unix", "tcp", "ssh", "npipe"):
            raise TargetError(f"{target.name}: docker_host {host!r} must be unix://, "
                              f"tcp:// or ssh://")
        return Engine(host, None, host, ("--host", host))
    if isinstance(context, str):
        try:
            return _context(context)
        except TargetError as exc:
            raise TargetError(f"{target.name}: {exc}") from None
    return default_engine()


def engines_of(targets: Iterable[Target]) -> tuple[list[Engine], list[str]]:
    """The default engine and every engine ``targets`` name, each once; and one line
    for each target whose engine cannot be resolved."""
    engines: list[Engine] = []
    problems: list[str] = []
    for target in [None, *targets]:
        try:
            engine = resolve_engine(target)
        except Exception as exc:  # a bad option, a context that is gone
            problems.append(f"engine not resolved: {one_line(exc)}")
            continue
        if engine not in engines:
            engines.append(engine)
    return engines, problems
