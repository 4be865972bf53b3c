"""harness.drivers.docker.base_images and guest_wheels without an engine: offline recipes, their tags, the mirror."""

from __future__ import annotations

import pytest

from harness.drivers.base import Target
from harness.drivers.docker.base_images import (
    DEBOOTSTRAP_INCLUDE,
    offline_recipe,
    recipe_tag,
)
from harness.drivers.docker.base_images import debian_mirror as mirror_of_host
from harness.drivers.docker.guest_wheels import target_python
from harness.targets import load


def _docker(name: str) -> Target:
    return next(t for t in load() if t.name == name)


def _target(image: str | None, **options: object) -> Target:
    return Target(name="t", kind="docker", os_family="linux", backends=("poll",),
                  image=image, options=options)


def test_recipe_from_targets_toml() -> None:
    recipe = offline_recipe(_docker("debian-13"))
    assert recipe is not None
    assert recipe["suite"] == "trixie"
    assert recipe["variant"] == "minbase"
    assert set(DEBOOTSTRAP_INCLUDE) <= set(recipe["include"])


def test_recipe_derived_from_a_debian_image_name() -> None:
    recipe = offline_recipe(_target("debian:bookworm-slim"))
    assert recipe is not None and recipe["suite"] == "bookworm"
    assert target_python(_target("docker.io/library/debian:trixie")) == "3.13"


@pytest.mark.parametrize("image", ["alpine:3.20", "debian:sid", "ubuntu:24.04", None])
def test_no_recipe_without_a_known_debian_suite(image: str | None) -> None:
    assert offline_recipe(_target(image)) is None


def test_recipe_tag_is_stable_and_follows_the_package_list() -> None:
    base = offline_recipe(_target("debian:bookworm"))
    more = offline_recipe(_target("debian:bookworm", offline={"include": ["tcpdump"]}))
    other_mirror = offline_recipe(_target("debian:bookworm",
                                          offline={"mirror": "http://mirror.invalid/debian"}))
    assert base is not None and more is not None and other_mirror is not None
    assert recipe_tag(base) == recipe_tag(dict(base))
    assert recipe_tag(base).startswith("iomux-base/debian:bookworm-")
    assert recipe_tag(more) != recipe_tag(base)
    # any mirror of the archive gives the same base
    assert recipe_tag(other_mirror) == recipe_tag(base)


def test_mirror_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMUX_DEBIAN_MIRROR", "http://mirror.invalid/debian")
    assert mirror_of_host() == "http://mirror.invalid/debian"
    monkeypatch.delenv("IOMUX_DEBIAN_MIRROR")
    assert mirror_of_host().startswith("http")
