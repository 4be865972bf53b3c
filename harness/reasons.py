"""Why a target did not run: one line that says what to do, the same everywhere.

Every "not run" reason the harness produces reads ``not run: <what> (<what to do>)``
and the whole line is at most ``LIMIT`` characters, so that it fits the terminal,
summary.md, report.html and junit.xml alike (the same text in all four). The full
story (an exception, an engine's error text) is a ``Reason``'s ``detail``: the plugin
writes it to the target's log (``reports/<run>/targets/<name>/not-run.log``), never
into the line.

One exception: a FreeBSD "no image" line may be up to ``LONG_LIMIT`` characters. It
must say which file to put where, or which variable to set (issue 11's form), and
the image file name alone is 55 characters: 100 plus that name.
"""

from __future__ import annotations

import re

#: The whole line, "not run: " included.
LIMIT = 100
#: The FreeBSD "no box/image" line: LIMIT plus its image file name (55 characters).
LONG_LIMIT = 155
PREFIX = "not run: "


class Reason(str):
    """A one-line reason that also carries the full text for the target's log."""

    detail: str

    def __new__(cls, line: str, detail: str = "") -> Reason:
        """``line`` is what the user reads; ``detail`` goes to the log."""
        made = super().__new__(cls, line)
        made.detail = detail
        return made


def limit_for(reason: str) -> int:
    """The longest line ``reason`` may make (LONG_LIMIT for the FreeBSD image line)."""
    return LONG_LIMIT if "FreeBSD" in reason and ("image" in reason or "box" in reason) \
        else LIMIT


def fit(reason: str) -> str:
    """``reason`` as one line that fits ``not run: ...`` into its limit.

    A reason that does not fit keeps its head and its fix (the last parenthesis),
    the middle cut with "...", and carries the whole text as its detail."""
    line = " ".join(str(reason).split())
    room = limit_for(line) - len(PREFIX)
    detail = getattr(reason, "detail", "") or ""
    if len(line) <= room:
        return Reason(line, detail) if detail else line
    fix = ""
    match = re.search(r" \([^()]*\)$", line)
    if match and len(match.group(0)) < room // 2:
        fix = match.group(0)
    head = line[:room - len(fix) - 3].rstrip()
    return Reason(head + "..." + fix, detail or line)


#: How a reason without a closing "(fix)" still says what to do.
_IMPERATIVES = re.compile(r"[:,;] (?:or )?(?:put|set|run|install|start|use|add) ")


def is_well_formed(reason: str) -> bool:
    """One line, within its limit, and it says what to do: a "(fix)" at the end, or
    a clause such as ": put X in Y, or set Z"."""
    line = PREFIX + reason
    says_fix = (reason.endswith(")") and "(" in reason) or bool(_IMPERATIVES.search(reason))
    return "\n" not in reason and len(line) <= limit_for(reason) and says_fix


# -- the reasons themselves ------------------------------------------------------------
# Kept here, not spread over the drivers, so that one test can hold them all to the form.

DOCKER_SDK = "no Docker SDK for Python (pip install docker, or make venv)"
DOCKER_ENGINE = "no Docker engine (install docker.io and start dockerd: sudo make setup)"
DEBOOTSTRAP_MISSING = "debootstrap missing (apt-get install debootstrap)"
DEBOOTSTRAP_ROOT = "its offline build needs root (run as root)"
INTERRUPTED = "interrupted before any test of this target ran (run it again)"
NO_TEST_RAN = "no test of this target ran (check the -k/-m selection in PYTEST_ARGS)"


def pull_failure(error: str) -> str:
    """A registry pull error as a few words that name no host or address.

    The engine's text carries the registry's host name and this machine's DNS
    server (``lookup registry-1.docker.io on 10.0.0.2:53: ...``): those belong in
    the log, not in a report that is mailed around."""
    text = error.lower()
    if "timed out" in text or "no answer" in text or "timeout" in text:
        return "registry timed out"
    if ("lookup" in text or "no such host" in text or "dial tcp" in text
            or "connection refused" in text or "network is unreachable" in text):
        return "no registry reachable"
    if "not found" in text or "manifest unknown" in text:
        return "not in the registry"
    if "unauthorized" in text or "denied" in text:
        return "registry refused"
    if "offline" in text:
        return "IOMUX_BASE_SOURCE=offline"
    return "the pull failed"


def no_image(image: str | None, error: str, offline_missing: str | None) -> Reason:
    """A docker target whose base image can be had neither by pull nor offline."""
    why = pull_failure(error)
    if image is None:
        return Reason("no image: none named and no offline recipe (add image to targets.toml)",
                      error)
    what = image
    if offline_missing is None:
        line = f"no image: {what}: {why}, no offline recipe (use a registry)"
    else:
        line = f"no image: {what} not pulled, {offline_missing}"
    return Reason(line, f"pull {what}: {error}")


def driver_missing(module: str, exc: BaseException) -> Reason:
    """A kind whose driver module does not import here: absent from this checkout, or
    one of its own imports (a third-party package) missing."""
    if f"No module named '{module}'" in str(exc):
        return Reason(f"no driver {module} in this checkout (git pull, or drop the target)",
                      f"{type(exc).__name__}: {exc}")
    return Reason(f"driver {module} does not import (pip install -e '.[dev]'; see the log)",
                  f"{type(exc).__name__}: {exc}")


def engine_check_failed(kind: str, exc: BaseException) -> Reason:
    """A driver's availability check that raised: cannot run, the exception to the log."""
    return Reason(f"{kind} engine check failed: {type(exc).__name__} (see the target's log)",
                  f"{type(exc).__name__}: {exc}")
