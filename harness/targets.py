"""targets.toml -> Target records, and the selection made with ``--targets``.

Every mistake a user can make here (a bad file, an unknown target name) raises
``TargetsError`` whose message is one line; the plugin turns it into a usage
error rather than a traceback.
"""

from __future__ import annotations

import functools
import os
import re
import select
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from harness.drivers import KINDS, DriverUnavailable, driver_class
from harness.drivers.base import BACKEND_PORTS, Target, TargetError

try:  # tomllib is 3.11+; the harness also runs on 3.9/3.10 hosts with tomli.
    import tomllib
except ImportError:  # pragma: no cover - exercised only on old interpreters
    import tomli as tomllib  # type: ignore[no-redef]

#: targets.toml at the root of the repository.
DEFAULT_PATH = Path(__file__).resolve().parent.parent / "targets.toml"

#: Backend names a target may list ("auto" is a choice, not a backend).
KNOWN_BACKENDS = tuple(name for name in BACKEND_PORTS if name != "auto")

#: The value of os_family/backends that means "whatever this machine is".
HOST = "host"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_COMMON_KEYS = {"name", "kind", "os_family", "backends", "image", "box", "python", "description"}


class TargetsError(Exception):
    """targets.toml or a ``--targets`` selection is wrong; the message is one line."""


def host_os_family() -> str:
    """The OS family of the machine running the harness (``linux``, ``freebsd``, ``darwin``)."""
    for family in ("linux", "freebsd", "openbsd", "netbsd", "darwin"):
        if sys.platform.startswith(family):
            return family
    return sys.platform


def host_backends() -> tuple[str, ...]:
    """The backends this machine's Python offers, decided by capability as iomux does."""
    found = ["select"]
    if hasattr(select, "poll"):
        found.append("poll")
    if hasattr(select, "epoll"):
        found += ["epoll", "epoll-et"]
    if hasattr(select, "kqueue"):
        found += ["kqueue", "kqueue-et"]
    return tuple(found)


def _parse_target(raw: Mapping[str, Any], where: str) -> Target:
    def need_str(key: str) -> str:
        value = raw.get(key)
        if not isinstance(value, str) or not value:
            raise TargetsError(f"{where}: '{key}' must be a non-empty string")
        return value

    name = need_str("name")
    if not _NAME_RE.match(name):
        raise TargetsError(f"{where}: name {name!r} must match [a-z0-9][a-z0-9-]*")
    where = f"{where} ({name})"
    kind = need_str("kind")
    if kind not in KINDS:
        raise TargetsError(f"{where}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
    os_family = need_str("os_family")
    if os_family == HOST:
        os_family = host_os_family()

    backends_raw = raw.get("backends")
    if backends_raw == HOST:
        backends = host_backends()
    elif isinstance(backends_raw, list) and backends_raw and all(
            isinstance(b, str) for b in backends_raw):
        unknown = [b for b in backends_raw if b not in KNOWN_BACKENDS]
        if unknown:
            raise TargetsError(f"{where}: unknown backend(s) {', '.join(unknown)}; "
                               f"known: {', '.join(KNOWN_BACKENDS)}")
        backends = tuple(backends_raw)
    else:
        raise TargetsError(f"{where}: 'backends' must be a non-empty list of names or \"host\"")

    optional: dict[str, str | None] = {}
    for key in ("image", "box", "python", "description"):
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            raise TargetsError(f"{where}: '{key}' must be a string")
        optional[key] = value

    weight_raw = raw.get("weight", 1)
    if isinstance(weight_raw, bool) or not isinstance(weight_raw, (int, float)) \
            or weight_raw <= 0:
        raise TargetsError(f"{where}: 'weight' must be a positive number")

    options = {k: v for k, v in raw.items() if k not in _COMMON_KEYS}
    return Target(name=name, kind=kind, os_family=os_family, backends=backends,
                  image=optional["image"], box=optional["box"], python=optional["python"],
                  description=optional["description"] or "", options=options)


def load(path: Path = DEFAULT_PATH) -> list[Target]:
    """Read and check targets.toml; raise TargetsError (one line) if it is wrong."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise TargetsError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise TargetsError(f"{path}: not valid TOML: {exc}") from None
    extra = set(data) - {"target"}
    if extra:
        raise TargetsError(f"{path}: unknown top-level key(s) {', '.join(sorted(extra))}; "
                           "only [[target]] tables are allowed")
    raw_targets = data.get("target")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise TargetsError(f"{path}: declares no [[target]]")
    targets: list[Target] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_targets):
        target = _parse_target(raw, f"{path.name}: target #{index + 1}")
        try:  # the keys its kind takes (Driver.validate): a misspelt table is one line
            driver_class(target.kind).validate(target)
        except DriverUnavailable:
            pass  # not checked: the target is "not run: driver not available: ..."
        except TargetError as exc:
            raise TargetsError(f"{path.name}: {exc}") from None
        if target.name in seen:
            raise TargetsError(f"{path.name}: target {target.name!r} is declared twice")
        seen.add(target.name)
        targets.append(target)
    return targets


def weight(target: Target) -> float:
    """How much a target costs to test here, against a container's 1 (targets.toml
    ``weight``): the scheduler starts the heaviest first, so that the longest target
    does not begin last and leave the run waiting on it alone."""
    return float(target.options.get("weight", 1))


def workers(selected: int, cpus: int | None = None) -> int:
    """How many xdist workers, one target each at a time, for ``selected`` targets.

    Every target's suites are CPU-bound while they run (the fault and behaviour suites,
    an emulated VM), so more targets at once than the cores and one only makes each
    slower and its timing-sensitive checks noisier: on two cores, eleven at once read
    a UML epoll/kqueue-flat ratio of 2.03 that is 1.00 alone, and four at once made
    the emulated VM's tests take 1,091 s (702 s in another four-worker run) and its
    flat ratio read 1.46. IOMUX_WORKERS overrides it."""
    override = os.environ.get("IOMUX_WORKERS", "").strip()
    if override:
        try:
            cap = int(override)
        except ValueError:
            raise TargetsError(f"IOMUX_WORKERS={override!r}: not a whole number") from None
        if cap < 1:
            raise TargetsError(f"IOMUX_WORKERS={override!r}: must be 1 or more")
    else:
        cap = max(2, (cpus if cpus is not None else (os.cpu_count() or 1)) + 1)
    return max(1, min(selected, cap))


def parse_selection(text: str | None) -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]``; None or blank means "no selection" (every target)."""
    if text is None or not text.strip():
        return None
    names = [part.strip() for part in text.split(",")]
    return [n for n in names if n]


def select_targets(targets: Sequence[Target], names: Iterable[str] | None) -> list[Target]:
    """The targets named in ``names`` (in that order, duplicates dropped), or all of them."""
    if names is None:
        return list(targets)
    by_name = {t.name: t for t in targets}
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise TargetsError(f"unknown target(s) {', '.join(unknown)}; "
                           f"known targets: {', '.join(by_name)}")
    if not wanted:
        raise TargetsError(f"--targets selects nothing; known targets: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


#: Seconds an engine's check (``Driver.unavailable_reason``) and a target's (its image
#: or box, ``target_unavailable_reason``) may take before the target is "not run".
ENGINE_CHECK_S, TARGET_CHECK_S = 60.0, 120.0


def unavailable_reasons(targets: Sequence[Target]) -> dict[str, str | None]:
    """Target name -> None if it can run here, else why not (the whole text: a
    caller fits it to one line). Each kind's engine is checked once, and every
    check under a watchdog, so a wedged daemon is a reason, not a hang."""
    from harness.drivers import KINDS, DriverUnavailable, UnknownKind, get_driver
    from harness.drivers.base import call_with_timeout
    from harness.reasons import driver_missing, engine_check_failed

    by_kind: dict[str, str | None] = {}
    found: dict[str, str | None] = {}
    for target in targets:
        try:
            driver = get_driver(target.kind)
            if target.kind not in by_kind:
                by_kind[target.kind] = call_with_timeout(
                    f"{target.kind} engine check", ENGINE_CHECK_S, driver.unavailable_reason)
            reason = by_kind[target.kind] or call_with_timeout(
                f"{target.name} image/box check", TARGET_CHECK_S,
                functools.partial(driver.target_unavailable_reason, target))
        except (UnknownKind, DriverUnavailable) as exc:
            reason = driver_missing(KINDS.get(target.kind, f"harness.drivers.{target.kind}"), exc)
        except Exception as exc:  # a broken check means "cannot run", as in the harness
            reason = engine_check_failed(target.kind, exc)
        found[target.name] = reason or None
    return found


def availability(targets: Sequence[Target]) -> dict[str, str | None]:
    """Target name -> None if it can run here, else the one-line reason why not
    (what ``make test-all-os`` would print as "not run: ...")."""
    from harness.reasons import fit
    return {name: fit(reason) if reason else None
            for name, reason in unavailable_reasons(targets).items()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.targets [--list|--count|--kinds] [--targets a,b]``.

    ``--list`` (the default) shows each target's kind and OS and whether it can run
    here, and why not; the Makefile uses ``--workers`` for how many xdist workers to
    start (one target each at a time, :func:`workers`) and ``--kinds`` to set up only
    the engines those need."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m harness.targets")
    parser.add_argument("--targets", default=None, help="comma-separated names")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true",
                      help="the targets, their kinds, and whether each can run here (default)")
    what.add_argument("--count", action="store_true", help="print how many are selected")
    what.add_argument("--workers", action="store_true",
                      help="print how many xdist workers to run them with (IOMUX_WORKERS: a cap)")
    what.add_argument("--kinds", action="store_true",
                      help="print the kinds of the selected targets, one a line")
    parser.add_argument("--file", default=str(DEFAULT_PATH), help="the targets file")
    args = parser.parse_args(argv)
    try:
        chosen = select_targets(load(Path(args.file)), parse_selection(args.targets))
    except TargetsError as exc:
        print(f"harness.targets: error: {exc}", file=sys.stderr)
        return 2
    if args.count:
        print(len(chosen))
        return 0
    if args.workers:
        try:
            print(workers(len(chosen)))
        except TargetsError as exc:
            print(f"harness.targets: error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.kinds:
        print("\n".join(dict.fromkeys(t.kind for t in chosen)))
        return 0
    found = availability(chosen)
    print(f"{'target':<12} {'kind':<8} {'os':<8} here")
    for t in chosen:
        reason = found[t.name]
        print(f"{t.name:<12} {t.kind:<8} {t.os_family:<8} "
              f"{'can run' if reason is None else 'not run: ' + reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
