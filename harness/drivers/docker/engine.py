"""The Docker engine as the ``docker`` kind's modules reach it: the SDK imported on
first use, the engine's time stamps, container names, the sweep of what earlier
runs left (labels and owners), a removal that two sweeps of one engine may race
on, and the one file of a ``get_archive`` stream."""

from __future__ import annotations

import datetime
import importlib
import io
import re
import tarfile
import time
from typing import Any, Collection

from harness.drivers.base import LABEL_PROJECT, LABEL_RUN, PROJECT, TargetError
from harness.drivers.owners import owner_alive

#: "<hostname>:<pid>:<process start ticks>" of the harness process that created
#: a resource; the sweep removes resources whose owner is provably gone.
LABEL_OWNER = "io.iomux.owner"
LABEL_WORKER = "io.iomux.worker"
#: Dangling images of ours younger than this may be a concurrent build's layers.
STALE_IMAGE_S = 3600.0


def docker_sdk() -> Any:
    """The Docker SDK module, imported on first use (a machine without it can still
    load the harness). Imported by name because the repository's own ``docker/``
    directory would otherwise shadow it for the type checker."""
    return importlib.import_module("docker")


def docker_errors() -> Any:
    """``docker.errors`` of the SDK (see ``docker_sdk``)."""
    return importlib.import_module("docker.errors")


def parse_created(text: str) -> float | None:
    """The engine's RFC 3339 "Created" (nanoseconds, Z) as a POSIX time."""
    match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)", text)
    if match is None:
        return None
    parsed = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    return parsed.replace(tzinfo=datetime.timezone.utc).timestamp()


def docker_name(*parts: str) -> str:
    """A container/network name from free text: Docker allows [a-zA-Z0-9][a-zA-Z0-9_.-]*."""
    name = "-".join(re.sub(r"[^a-zA-Z0-9_.-]+", "_", p).strip("_.-") for p in parts if p)
    return ("iomux-" + name)[:120]


def remove_container(container: Any, settle: float = 30.0) -> bool:
    """Force-remove ``container``; True if this call removed it.

    Two sweeps on one engine (parallel runs, or a run and its tests) can reach
    the same leftover: Docker then answers the second with 409 "removal of
    container ... is already in progress". That one is gone, not ours to fail
    on; we wait (up to ``settle`` seconds) until it is, so that removing its
    network next does not find an endpoint still attached.
    """
    errors = docker_errors()
    try:
        container.remove(force=True, v=True)
        return True
    except errors.NotFound:
        return False
    except errors.APIError as exc:
        if exc.status_code != 409 or "already in progress" not in str(exc):
            raise
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        try:
            container.reload()
        except errors.NotFound:
            break
        time.sleep(0.2)
    return False


def sweep_engine(client: Any, run_id: str | None = None, spare: Collection[str] = ()) -> list[str]:
    """Remove our containers and networks (all of ``run_id``'s, or those whose
    owner process died; never those named in ``spare``, kept targets) and, without
    a run id, our dangling images."""
    errors = docker_errors()
    labels = [f"{LABEL_PROJECT}={PROJECT}"]
    if run_id is not None:
        labels.append(f"{LABEL_RUN}={run_id}")

    def doomed(obj_labels: dict[str, str] | None, name: str) -> bool:
        if name in spare:
            return False  # a kept target (harness.kept_targets)
        obj_labels = obj_labels or {}
        if run_id is not None:
            return True
        owner = obj_labels.get(LABEL_OWNER)
        return owner is not None and not owner_alive(owner)

    removed: list[str] = []
    for container in client.containers.list(all=True, filters={"label": labels}):
        if doomed(container.labels, container.name) and remove_container(container):
            removed.append(f"container {container.name}")
    for network in client.networks.list(filters={"label": labels}):
        if doomed(network.attrs.get("Labels"), network.name):
            try:
                network.remove()
                removed.append(f"network {network.name}")
            except errors.NotFound:
                pass
            except errors.APIError:
                pass  # still has endpoints of a live container: not ours to force
    if run_id is None:
        # A build in progress has untagged intermediate images that look
        # dangling: only those older than any build are stale.
        cutoff = time.time() - STALE_IMAGE_S
        dangling = client.images.list(filters={"label": labels[0], "dangling": True})
        for image in dangling:
            created = parse_created(str(image.attrs.get("Created", "")))
            if created is None or created > cutoff:
                continue
            try:
                client.images.remove(image.id)
                removed.append(f"image {image.short_id}")
            except errors.APIError:
                pass  # in use, or a parent of a live image
    return removed


def read_archive(archive: bytes, what: str) -> tuple[bytes | None, str | None]:
    """The one file of a ``get_archive`` tar stream: (its bytes, None), or (None,
    where it points) for a symbolic link; TargetError when it is neither."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = tar.next()
        if member is not None and member.issym():
            return None, member.linkname
        if member is None or not member.isfile():
            raise TargetError(f"{what} is not a file")
        data = tar.extractfile(member)
        assert data is not None  # a regular file member always has data
        return data.read(), None
