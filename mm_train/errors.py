"""The errors a user's mistake raises. The command line prints each as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake of the user's (a flag, a file, a checkpoint): reported as one line, non-zero exit."""


class ConfigError(UserError, ValueError):
    """A bad flag, flag combination or environment variable; exit status 2 before start-up, else 1."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded (missing, partial, corrupt, or from another layout)."""


class DataError(UserError, ValueError):
    """A data file or record that cannot be used (missing, empty, truncated, unreadable, not what it
    should be, a malformed record)."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when the message is empty), for a one-line
    report of a third-party failure."""
    return next(iter(str(error).strip().splitlines()), type(error).__name__)
