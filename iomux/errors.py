"""Errors a user can cause, each ending in one line and an exit status.

The command line's contract (docs/DESIGN.md section 1): a usage error (bad
flag, unknown or unavailable backend, bad address) exits 2, a run-time error
(port in use, permission denied) exits 1, and both print exactly one line,
``iomux: error: ...``, on stderr. Code deep inside the package raises one of
these; only ``iomux.cli.main`` turns them into the line and the status.
"""

from __future__ import annotations


class IomuxError(Exception):
    """An error that ends the program with one line and ``status``."""

    status: int = 1

    def __init__(self, message: str) -> None:
        # One line by contract: a stray newline would break the tests that parse it.
        super().__init__(" ".join(message.split("\n")))

    @property
    def message(self) -> str:
        """The one-line text, without the ``iomux: error:`` prefix."""
        return str(self.args[0])


class UsageError(IomuxError):
    """The user asked for something that cannot be: exit status 2."""

    status = 2


class RuntimeFailure(IomuxError):
    """A well-formed request that failed while running: exit status 1."""

    status = 1
