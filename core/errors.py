"""User errors: bad input (config, names, data, checkpoints) rather than bugs.

Every CLI catches `UserError` and exits with status 2 and one line (`error: <message>`); anything else
is a bug and keeps its traceback. Each family of bad input has its own subclass so callers can be precise.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input; the message is one line naming what to fix."""


class ConfigError(UserError):
    """A bad config key or value; the message names the key and where it came from."""


class UnknownNameError(UserError):
    """A name that is not registered; the message lists the valid names and the closest one."""


class DataError(UserError):
    """Missing or unusable data (no folder, no images, one class only, an empty split)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be found or read; the message names the file."""


def error_line(e: BaseException) -> str:
    """The one line a CLI prints for a user error."""
    text = str(e).strip().splitlines()
    return f"error: {text[0] if text else type(e).__name__}"
