"""User-facing errors.

Anything raised as :class:`UsageError` (or a subclass) is a problem with the user's input:
a bad flag, a missing or corrupt file, a checkpoint that is not ours. The command line
prints it as a single ``error: ...`` line and exits with status 2; no traceback.
"""

from __future__ import annotations

__all__ = ["UsageError", "DataError", "ConfigError", "CheckpointError", "DivergedError"]


class UsageError(Exception):
    """Bad input from the user; the message says what is wrong and what to do."""


class DataError(UsageError):
    """A dataset file is missing, truncated or not in the expected format."""


class ConfigError(UsageError):
    """An unknown config key, a value of the wrong type or out of range."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, corrupt, or not written by largebatch."""


class DivergedError(UsageError):
    """Training produced a non-finite loss; the message suggests a lower learning rate."""
