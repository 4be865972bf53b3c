"""Kept targets: the records that let a later run take over a target instead of
building and booting it again (``--destroy=never|passing``, DESIGN.md section 3).

A target that ``--destroy`` keeps, of a kind whose driver can reach it again
(``Driver.keepable``), leaves a JSON record in ``store_dir()``
(``/var/tmp/iomux-kept/<resource>.json``, or ``IOMUX_KEPT_DIR``) holding:

- the target's name and kind, and the checkout (``root``) it came from;
- ``hash``: the content of what went into it (``target_hash``): its targets.toml
  entry, the driver's recipe facts, and the files the driver bakes in, copies or
  mounts (``Driver.kept_inputs``: iomux/, the in-guest suites, the Dockerfile or
  the Vagrantfile and its provisioner);
- ``state`` "kept" or "attached", and ``owner`` (``owner_label``) of the process
  that kept it or has taken it over: a run that attaches a target takes
  ownership, so that a concurrent sweep leaves it alone;
- what the driver needs to reach it again: the Instance's fields, as JSON;
- ``bring_up_s``: the build and start seconds it cost when it was first brought
  up, which the report counts as saved by each reuse (less the attach).

The sweep (``judge``) spares a record whose owner still runs, or that is kept
and matches the current hash of its target; it hands the others back as stale
(another tree, another recipe, a target no longer declared, or an attach whose
run died), and the driver's sweep then removes their resources as it would any
leftover. A record of another checkout is that checkout's to judge, unless the
checkout is gone. Claims, writes and the sweep's reading hold one
``exclusive_lock``, so that two workers never take over the same target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from harness.drivers.base import Driver, Guest, Instance, StepTimeout, Target
from harness.drivers.owners import exclusive_lock, owner_alive, owner_label

#: The checkout whose files go into the targets.
REPO = Path(__file__).resolve().parents[1]
STORE_ENV = "IOMUX_KEPT_DIR"
DEFAULT_STORE = "/var/tmp/iomux-kept"
#: Bump when the record's fields change in a way an older reader would misread.
RECORD_VERSION = 2  # 2: the Guest record beside data
_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}


def store_dir() -> Path:
    """Where the kept records live (``IOMUX_KEPT_DIR``, else /var/tmp/iomux-kept)."""
    return Path(os.environ.get(STORE_ENV) or DEFAULT_STORE)


# -- what went into a target -----------------------------------------------------------

def _files(root: Path, inputs: Iterable[str]) -> list[Path]:
    found: list[Path] = []
    for rel in sorted(set(inputs)):
        path = root / rel
        if path.is_file():
            found.append(path)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            found += [Path(dirpath) / f for f in sorted(filenames) if not f.endswith(".pyc")]
    return found


def tree_hash(inputs: Iterable[str], root: Path = REPO) -> str:
    """The content of ``inputs`` (paths relative to ``root``, files or directories):
    each file's path and bytes. A missing input counts as empty."""
    digest = hashlib.sha256()
    for path in _files(root, inputs):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def target_hash(target: Target, inputs: Sequence[str], recipe: Mapping[str, Any],
                root: Path = REPO, tree: str | None = None) -> str:
    """The hash a kept ``target`` is known by: its targets.toml entry, the driver's
    ``recipe`` facts and the tree of ``inputs`` (``tree``, when already computed)."""
    entry = dataclasses.asdict(target)
    digest = hashlib.sha256(json.dumps({"target": entry, "recipe": dict(recipe)},
                                       sort_keys=True, default=str).encode())
    digest.update((tree if tree is not None else tree_hash(inputs, root)).encode())
    return digest.hexdigest()[:24]


def current_hashes(targets: Iterable[Target], drivers: Mapping[str, Driver],
                   root: Path = REPO) -> dict[str, str]:
    """Target name -> its hash now, for the targets of the keepable kinds in
    ``drivers`` (each tree hashed once): what the sweep judges records against."""
    trees: dict[tuple[str, ...], str] = {}
    found = {}
    for target in targets:
        driver = drivers.get(target.kind)
        if driver is None or not driver.keepable:
            continue
        inputs = tuple(driver.kept_inputs)
        if inputs not in trees:
            trees[inputs] = tree_hash(inputs, root)
        found[target.name] = target_hash(target, inputs, driver.kept_recipe(target), root,
                                         tree=trees[inputs])
    return found


# -- the records -----------------------------------------------------------------------

@dataclasses.dataclass
class KeptRecord:
    """One kept target (see the module docstring for the fields)."""

    target: str
    kind: str
    hash: str
    root: str
    state: str
    owner: str
    resource_name: str
    run_id: str
    echo_ports: dict[str, tuple[str, int]]
    data: dict[str, Any]
    #: the Instance's Guest record, as dataclasses.asdict gives it
    guest: dict[str, Any] = dataclasses.field(default_factory=dict)
    bring_up_s: float | None = None
    kept_by_run: str = ""
    kept_at: str = ""
    failed: bool = False
    version: int = RECORD_VERSION

    @property
    def path(self) -> Path:
        """The record's file in the store."""
        return store_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.resource_name)}.json"

    def instance(self, target: Target) -> Instance:
        """The Instance the record describes, for ``target`` (the current entry)."""
        known = {f.name for f in dataclasses.fields(Guest)}
        guest = Guest(**{k: v for k, v in self.guest.items() if k in known})
        return Instance(target=target, run_id=self.run_id, resource_name=self.resource_name,
                        echo_ports=dict(self.echo_ports), guest=guest,
                        data=json.loads(json.dumps(self.data)))

    def write(self) -> None:
        """Write the record atomically (a reader never sees half of one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True,
                                  default=str) + "\n")
        os.replace(tmp, self.path)

    @classmethod
    def read(cls, path: Path) -> KeptRecord | None:
        """The record in ``path``; None for a file that is not one (of this version)."""
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != RECORD_VERSION:
                return None
            raw["echo_ports"] = {str(b): (str(a[0]), int(a[1]))
                                 for b, a in dict(raw.get("echo_ports") or {}).items()}
            fields = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in fields})
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            return None


def _lock() -> Any:
    return exclusive_lock(store_dir() / ".lock", timeout=60, poll=0.2)


def records() -> list[KeptRecord]:
    """Every readable record in the store, oldest first."""
    found = []
    for path in sorted(store_dir().glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
        record = KeptRecord.read(path)
        if record is not None:
            found.append(record)
    return found


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def keep(instance: Instance, target_hash_: str, run_id: str, failed: bool,
         bring_up_s: float | None, root: Path = REPO) -> KeptRecord:
    """Record ``instance`` as kept by this process, of the tree hashed ``target_hash_``."""
    record = KeptRecord(
        target=instance.target.name, kind=instance.target.kind, hash=target_hash_,
        root=str(root), state="kept", owner=owner_label(),
        resource_name=instance.resource_name, run_id=instance.run_id,
        echo_ports={b: (str(a[0]), int(a[1])) for b, a in instance.echo_ports.items()},
        data=json.loads(json.dumps(instance.data, default=str)),
        guest=json.loads(json.dumps(dataclasses.asdict(instance.guest), default=str)),
        bring_up_s=None if bring_up_s is None else round(bring_up_s, 3),
        kept_by_run=run_id, kept_at=_now(), failed=failed)
    with _lock():
        record.write()
    return record


def claim(target: Target, target_hash_: str, root: Path = REPO) -> KeptRecord | None:
    """Take over a kept record of ``target`` with this hash whose keeper has exited:
    it becomes "attached", owned by this process. None when there is none."""
    with _lock():
        for record in records():
            if (record.target == target.name and record.kind == target.kind
                    and record.root == str(root) and record.hash == target_hash_
                    and record.state == "kept" and not owner_alive(record.owner)):
                record.state, record.owner = "attached", owner_label()
                record.write()
                return record
    return None


def drop(record: KeptRecord) -> None:
    """Forget ``record`` (its target was destroyed, or cannot be reused). Never
    raises: a record left behind is found stale by a later sweep."""
    with contextlib.suppress(OSError, StepTimeout), _lock():
        record.path.unlink(missing_ok=True)


def judge(current: Mapping[str, str], kinds: Iterable[str],
          root: Path = REPO) -> tuple[dict[str, set[str]], list[KeptRecord]]:
    """The sweep's reading of the store, for the records of ``kinds``.

    ``current`` maps every target declared in this checkout (``root``) to its
    current hash. Returns kind -> the resource names to spare, and the stale
    records (whose resources the sweep removes; ``forget`` then drops them)."""
    wanted = set(kinds)
    spare: dict[str, set[str]] = {}
    stale: list[KeptRecord] = []
    with _lock():
        for record in records():
            if record.kind not in wanted:
                continue
            if owner_alive(record.owner):
                keeps = True  # kept by a run still going, or taken over by one
            elif record.state != "kept":
                keeps = False  # the run that took it over died before it could say
            elif record.root != str(root):
                keeps = Path(record.root).is_dir()  # another checkout's to judge
            else:
                keeps = current.get(record.target) == record.hash
            if keeps:
                spare.setdefault(record.kind, set()).add(record.resource_name)
            else:
                stale.append(record)
    return spare, stale


def forget(stale: Sequence[KeptRecord]) -> None:
    """Drop the records the sweep found stale (their resources went with it)."""
    for record in stale:
        drop(record)
