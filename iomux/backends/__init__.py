"""The backend registry: name -> Multiplexer class, availability, and ``auto``.

Availability is what the running ``select`` module offers (each class's
``available()`` asks ``hasattr(select, ...)``), never the OS's name: a Linux
without epoll or a BSD with an unusual Python is judged on what it has.
"""

from __future__ import annotations

from iomux.backends.base import EVENT_ERROR, EVENT_READ, EVENT_WRITE, Multiplexer
from iomux.backends.epoll import EpollEdgeMultiplexer, EpollMultiplexer
from iomux.backends.kqueue import KqueueEdgeMultiplexer, KqueueMultiplexer
from iomux.backends.poll import PollMultiplexer
from iomux.backends.select import SelectMultiplexer
from iomux.errors import UsageError

# Type names for the checker only: importing typing is 8% of what `iomux serve`
# costs to start (iomux/backends/base.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Type

__all__ = [
    "AUTO_RANKING",
    "BACKENDS",
    "EVENT_ERROR",
    "EVENT_READ",
    "EVENT_WRITE",
    "KNOWN",
    "Multiplexer",
    "auto",
    "available",
    "get",
    "resolve",
]

BACKENDS: Dict[str, Type[Multiplexer]] = {
    cls.name: cls
    for cls in (
        SelectMultiplexer,
        PollMultiplexer,
        EpollMultiplexer,
        EpollEdgeMultiplexer,
        KqueueMultiplexer,
        KqueueEdgeMultiplexer,
    )
}
KNOWN: List[str] = [*BACKENDS, "auto"]

# auto: O(ready) kernel-side interest lists first, then poll (no fd limit), then select.
AUTO_RANKING = ("epoll", "kqueue", "poll", "select")


def available() -> List[str]:
    """Return the names of the backends this kernel offers, in registry order."""
    return [name for name, cls in BACKENDS.items() if cls.available()]


def auto() -> str:
    """Return the name ``auto`` stands for on this kernel."""
    offered = available()
    for name in AUTO_RANKING:
        if name in offered:
            return name
    raise UsageError("no backend is available: this Python's select module has no select()")


def resolve(name: str) -> str:
    """Return the concrete backend name for ``name`` (``auto`` resolved).

    Raises:
        UsageError: ``name`` is unknown or not available here; the one-line
            message lists the available backends.
    """
    if name == "auto":
        return auto()
    offered = available()
    if name not in BACKENDS:
        raise UsageError(
            f"unknown backend {name!r}; available here: {', '.join(offered)} (and auto)"
        )
    if name not in offered:
        raise UsageError(
            f"backend {name!r} is not available on this kernel; available here: "
            f"{', '.join(offered)} (and auto)"
        )
    return name


def get(name: str) -> Type[Multiplexer]:
    """Return the Multiplexer class for ``name`` (``auto`` allowed).

    Raises:
        UsageError: as ``resolve``.
    """
    return BACKENDS[resolve(name)]
