"""The userland of the ``gvisor`` and ``uml`` kinds: one Debian 12 root filesystem
for both, so that the kernel is the only thing that changes between
``debian-12`` (docker) and these targets.

The root filesystem is the built ``debian-12`` image (harness/drivers/docker/images.py, through
the docker driver), exported once with ``docker create`` + ``docker export`` and
unpacked under ``ROOTFS_DIR/<target>-<image id>/``: cached by the image's content,
so a changed image (new iomux, new tests) gives a new tree. Both kinds use it
read-only; each instance writes only to its own tmpfs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.drivers.base import LABEL_PROJECT, PROJECT, Target, TargetError
from harness.drivers.owners import owner_label

ROOTFS_DIR = Path(os.environ.get("IOMUX_ROOTFS_DIR", "/var/cache/iomux/rootfs"))
#: The docker target whose image is the userland of every gvisor/uml target.
DEFAULT_USERLAND = "debian-12"
#: The image's ENV (PATH with the venv, HOME=/tmp, ...), saved beside the tree.
IMAGE_ENV = ".image-env.json"
#: An export unused this long after a newer one exists is removed.
SUPERSEDED_AFTER_S = 900.0


def userland_target(target: Target) -> Target:
    """The docker target (targets.toml) whose image is ``target``'s userland."""
    from harness import targets as targets_mod

    name = str(target.options.get("userland", DEFAULT_USERLAND))
    for declared in targets_mod.load(targets_mod.DEFAULT_PATH):
        if declared.name == name and declared.kind == "docker":
            return declared
    raise TargetError(f"{target.name}: userland {name!r} is not a docker target in targets.toml")


def userland_unavailable_reason(target: Target) -> str | None:
    """Why the userland image cannot be had here (no Docker engine, no base), or None."""
    from harness.drivers import get_driver

    docker = get_driver("docker")
    reason = docker.unavailable_reason()
    if reason is None:
        reason = docker.target_unavailable_reason(userland_target(target))
    return f"the Debian 12 userland needs docker: {reason}" if reason else None


def ensure_rootfs(target: Target, timeout: float,
                  instances: Path) -> tuple[Path, dict[str, Any]]:
    """Build (or find) the userland image and its exported tree; return the tree
    and the build facts (``cached``, ``seconds``, image, rootfs). ``instances`` holds
    the instances' directories (``<kind>/<name>/owner``), whose trees are in use."""
    from harness.drivers import get_driver
    from harness.drivers.docker.base_images import file_lock
    from harness.drivers.docker.driver import DockerDriver
    from harness.drivers.docker.engine import LABEL_OWNER, remove_container

    started = time.monotonic()
    docker = get_driver("docker")
    assert isinstance(docker, DockerDriver)
    userland = userland_target(target)
    facts = docker.build(userland, timeout)
    image_id = str(facts["image_id"]).split(":")[-1]
    dest = ROOTFS_DIR / f"{userland.name}-{image_id[:16]}"
    cached = (dest / ".exported").is_file()
    if cached:
        os.utime(dest)  # in use: not superseded for another SUPERSEDED_AFTER_S
    if not cached:
        with file_lock(f"rootfs-{userland.name}"):
            if not (dest / ".exported").is_file():
                client = docker.client(userland)
                container = client.containers.create(
                    facts["image_id"], command=["true"],
                    labels={LABEL_PROJECT: PROJECT, LABEL_OWNER: owner_label()})
                tmp = dest.with_name(dest.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                try:
                    _untar(container.export(), tmp, max(10.0, timeout - (time.monotonic()
                                                                          - started)))
                finally:
                    remove_container(container)
                env = client.images.get(facts["image_id"]).attrs["Config"].get("Env") or []
                (tmp / IMAGE_ENV).write_text(json.dumps(env) + "\n")
                (tmp / ".exported").write_text(f"{facts['image_id']}\n")
                shutil.rmtree(dest, ignore_errors=True)
                tmp.rename(dest)
                _remove_superseded(dest, instances)
    return dest, {"cached": bool(cached and facts.get("cached")),
                  "seconds": round(time.monotonic() - started, 3),
                  "image": facts.get("image"), "image_id": facts.get("image_id"),
                  "rootfs": str(dest), "rootfs_cached": cached}


def _remove_superseded(current: Path, instances: Path) -> None:
    """Remove older exports of the same userland that no instance has used for
    SUPERSEDED_AFTER_S (a concurrent run on an older image may still use one)."""
    prefix = current.name.rsplit("-", 1)[0] + "-"
    cutoff = time.time() - SUPERSEDED_AFTER_S
    in_use = set()
    for owner in instances.glob("*/*/owner"):  # every instance not yet destroyed
        with contextlib.suppress(OSError, ValueError):
            in_use.add(str(json.loads(owner.read_text()).get("rootfs")))
    for sibling in current.parent.glob(prefix + "*"):
        if sibling != current and str(sibling) not in in_use \
                and sibling.stat().st_mtime < cutoff:
            shutil.rmtree(sibling, ignore_errors=True)


def _untar(stream: Any, dest: Path, timeout: float) -> None:
    """Unpack a ``docker export`` stream with tar(1): owners, modes and links kept."""
    deadline = time.monotonic() + timeout
    with subprocess.Popen(["tar", "-x", "--numeric-owner", "-f", "-", "-C", str(dest)],
                          stdin=subprocess.PIPE, stderr=subprocess.PIPE) as tar:
        assert tar.stdin is not None
        try:
            for chunk in stream:
                tar.stdin.write(chunk)
                if time.monotonic() > deadline:
                    tar.kill()
                    raise TargetError(f"build: docker export timed out after {timeout:g}s")
            tar.stdin.close()
            err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
        except BrokenPipeError:
            err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
        if tar.wait() != 0:
            raise TargetError(f"build: unpacking the exported root filesystem failed: "
                              f"{err.strip().splitlines()[-1] if err.strip() else tar.returncode}")


def image_env(rootfs: Path) -> list[str]:
    """The userland image's ENV as ``NAME=VALUE`` words (docker/Dockerfile's ENV)."""
    words = json.loads((rootfs / IMAGE_ENV).read_text())
    return [str(w) for w in words]
