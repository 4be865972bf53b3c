"""remove_container: a removal another sweep already started counts as gone."""

from __future__ import annotations

from typing import Any

import pytest
from requests import Response

from harness.drivers.docker.engine import docker_errors, remove_container

# ``import docker`` would find the repository's docker/ directory first.
errors: Any = docker_errors()


def _api_error(status: int, explanation: str) -> Any:
    response = Response()
    response.status_code = status
    return errors.APIError("engine said no", response=response, explanation=explanation)


class FakeContainer:
    """Raises what the engine raised; disappears after ``reloads`` reloads."""

    def __init__(self, error: BaseException | None, reloads: int = 2) -> None:
        self.error = error
        self.reloads = reloads
        self.removed = False

    def remove(self, **_: Any) -> None:
        if self.error is not None:
            raise self.error
        self.removed = True

    def reload(self) -> None:
        self.reloads -= 1
        if self.reloads <= 0:
            raise errors.NotFound("gone")


def test_removes_and_says_so() -> None:
    c = FakeContainer(None)
    assert remove_container(c) is True and c.removed


def test_absent_is_not_an_error() -> None:
    assert remove_container(FakeContainer(errors.NotFound("no such container"))) is False


def test_removal_already_in_progress_waits_until_gone() -> None:
    c = FakeContainer(_api_error(409, "removal of container x is already in progress"))
    assert remove_container(c, settle=5) is False
    assert c.reloads <= 0, "did not wait for the other removal to finish"


def test_other_conflicts_still_raise() -> None:
    with pytest.raises(errors.APIError):
        remove_container(FakeContainer(_api_error(409, "container is paused")))
    with pytest.raises(errors.APIError):
        remove_container(FakeContainer(_api_error(500, "already in progress")))
