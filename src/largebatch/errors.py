"""User-facing errors.

Anything raised as :class:`UsageError` (or a subclass) is a problem with the user's input:
a bad flag, a missing or corrupt file, a checkpoint that is not ours, a value handed to a
constructor or setter that cannot work. The command line prints it as a single
``error: ...`` line and exits with status 2; no traceback. The value and type errors are
also ``ValueError`` and ``TypeError``, so ``except ValueError`` keeps catching them.
"""

from __future__ import annotations

__all__ = [
    "UsageError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "DivergedError",
    "InvalidValueError",
    "InvalidTypeError",
    "StateError",
    "UserCodeError",
]


class UsageError(Exception):
    """Bad input from the user; the message says what is wrong and what to do."""


class DataError(UsageError):
    """A dataset file is missing, truncated or not in the expected format."""


class InvalidValueError(UsageError, ValueError):
    """A value out of range, not finite, or not one of the choices; names who got it."""


class InvalidTypeError(UsageError, TypeError):
    """A value of the wrong type; names who got it and what it takes."""


class ConfigError(InvalidValueError):
    """An unknown config key, a value of the wrong type or out of range."""


class StateError(InvalidValueError):
    """A ``state_dict`` that belongs to another class or version, or is damaged."""


class CheckpointError(UsageError):
    """A checkpoint that is missing, corrupt, or not written by largebatch."""


class UserCodeError(UsageError):
    """The user's own code (a ``module:callable``, a Dataset, a controller) failed."""


class DivergedError(UsageError):
    """Training produced a non-finite loss; the message suggests a lower learning rate."""
