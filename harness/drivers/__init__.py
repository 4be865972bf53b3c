"""The registry of target kinds: kind name -> the module holding its Driver.

Modules are imported lazily, on first use, so that a kind whose module (or
whose third-party package, such as the Docker SDK) is missing costs nothing
until a target of that kind is selected, and then only makes that target
"not run: driver not available: ..." instead of breaking the whole run.
"""

from __future__ import annotations

import importlib
from typing import Dict

from harness.drivers.base import Driver, TargetUnavailable

#: kind -> module; the module holds one Driver subclass whose ``kind`` is that name.
KINDS: Dict[str, str] = {
    "local": "harness.drivers.local",
    "docker": "harness.drivers.docker.driver",
    "vagrant": "harness.drivers.vagrant.driver",
    "gvisor": "harness.drivers.gvisor",
    "uml": "harness.drivers.uml",
}

_cache: Dict[str, Driver] = {}


class UnknownKind(ValueError):
    """A kind name that is not in the registry; the message lists the known ones."""


class DriverUnavailable(TargetUnavailable):
    """The kind's module cannot be imported here; the message is one line."""


def driver_class(kind: str) -> type[Driver]:
    """Import and return the Driver subclass for ``kind``."""
    if kind not in KINDS:
        raise UnknownKind(f"unknown target kind {kind!r}; known kinds: {', '.join(KINDS)}")
    module_name = KINDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DriverUnavailable(f"driver not available: {module_name}: {exc}") from None
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, Driver) and value is not Driver
                and getattr(value, "kind", None) == kind):
            return value
    raise DriverUnavailable(f"driver not available: {module_name} defines no Driver "
                            f"with kind = {kind!r}")


def get_driver(kind: str) -> Driver:
    """The (per-process) driver instance for ``kind``; raises UnknownKind or DriverUnavailable."""
    driver = _cache.get(kind)
    if driver is None:
        try:
            driver = driver_class(kind)()
        except (UnknownKind, DriverUnavailable):
            raise
        except Exception as exc:  # a driver whose constructor fails is unavailable, not fatal
            raise DriverUnavailable(f"driver not available: {kind}: "
                                    f"{type(exc).__name__}: {exc}") from None
        _cache[kind] = driver
    return driver
