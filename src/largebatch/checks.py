"""Checks on values handed to public constructors, setters and ``load_state_dict``.

Each check names who got the value and which field, and raises the project's own errors
(:class:`~largebatch.errors.InvalidValueError`, :class:`~largebatch.errors.InvalidTypeError`,
:class:`~largebatch.errors.StateError`: subclasses of ``ValueError``/``TypeError``), so a
bad value fails where it enters, in one line, and not as a ``ZeroDivisionError`` or an
endless loop later. NaN and infinity are bad values everywhere.

A state dict made by :func:`tagged` carries its class name and a format version, so a
state of another class or version is refused with a message that says so; states written
before the tag existed are still read (their keys are checked instead).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from largebatch.errors import InvalidTypeError, InvalidValueError, StateError

__all__ = [
    "integer",
    "number",
    "choice",
    "tagged",
    "state_of",
    "plain",
    "STATE_VERSION",
    "MAX_SEED",
]

#: version of the state dicts that :func:`tagged` writes
STATE_VERSION = 1
#: seeds are kept to 32 bits: numpy takes no more, and derived seeds stay within 64 bits
MAX_SEED: int = 2**32 - 1


def _a(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(
    value: Any,
    who: str,
    field: str,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """``value`` as an ``int`` (Python, NumPy or a one-element integer tensor), in range."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidTypeError(
            f"{who}: {field} must be an integer, got {type(value).__name__} {_show(value)}"
        )
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidValueError(f"{who}: {field} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidValueError(f"{who}: {field} must be <= {maximum}, got {value}")
    return value


def number(
    value: Any,
    who: str,
    field: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite ``float`` in ``[low, high]`` (``low_open``/``high_open``
    exclude an end)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidTypeError(
            f"{who}: {field} must be a number, got {type(value).__name__} {_show(value)}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise InvalidValueError(f"{who}: {field} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else f'{low:g}'}, "
        span += f"{'inf' if high is None else f'{high:g}'}{right}"
        raise InvalidValueError(f"{who}: {field} must be in {span}, got {value:g}")
    return value


def boolean(value: Any, who: str, field: str) -> bool:
    """``value`` as a ``bool`` (Python's or NumPy's; not a number)."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidTypeError(
            f"{who}: {field} must be True or False, got {type(value).__name__} {_show(value)}"
        )
    return bool(value)


def choice(value: Any, who: str, field: str, choices: Iterable[str]) -> str:
    """``value``, which must be one of ``choices``."""
    options = tuple(choices)
    if value not in options:
        raise InvalidValueError(
            f"{who}: {field} must be one of {', '.join(options)}, got {_show(value)}"
        )
    return str(value)


def tagged(who: str, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its class name and format version, for :func:`state_of` to check."""
    return {"class": who, "version": STATE_VERSION, **state}


def state_of(
    state: Any,
    who: str,
    fields: Iterable[str],
    *,
    optional: Iterable[str] = (),
) -> Mapping[str, Any]:
    """Check that ``state`` is a state dict of class ``who`` with keys ``fields`` (and
    perhaps ``optional``); return it. Anything else is a :class:`StateError` that says
    what it is instead."""
    if not isinstance(state, Mapping):
        raise StateError(
            f"{who}.load_state_dict: expected a dict from {who}.state_dict(), got "
            f"{type(state).__name__}"
        )
    owner = state.get("class", who)
    if owner != who:
        raise StateError(
            f"{who}.load_state_dict: this is the state of {_a(str(owner))}, not of "
            f"{_a(who)}; load it into {_a(str(owner))}"
        )
    version = state.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        raise StateError(
            f"{who}.load_state_dict: the state has format version {_show(version)}; this "
            f"largebatch reads version {STATE_VERSION}"
        )
    wanted = list(fields)
    missing = [name for name in wanted if name not in state]
    if missing:
        has = ", ".join(map(repr, list(state)[:6])) or "nothing"
        raise StateError(
            f"{who}.load_state_dict: the state lacks {', '.join(map(repr, missing))}; it is "
            f"not a state of {_a(who)} (it has {has})"
        )
    known = {*wanted, *optional, "class", "version"}
    extra = [name for name in state if name not in known]
    if extra:
        raise StateError(
            f"{who}.load_state_dict: the state holds {', '.join(map(repr, extra[:6]))}, which "
            f"{_a(who)} does not have; it is the state of another class"
        )
    return state


def _plain_key(key: Any, where: str) -> Any:
    """A dict key as :func:`plain` keeps it: a NumPy scalar becomes a Python number."""
    if isinstance(key, np.generic):
        key = key.item()
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise InvalidTypeError(
        f"{where} has a key {_show(key)} of type {type(key).__name__}; keys of a state dict "
        "must be numbers or strings"
    )


def plain(value: Any, where: str) -> Any:
    """``value`` with NumPy scalars as Python numbers (dict keys too) and NumPy arrays as
    tensors, so that ``torch.load(weights_only=True)`` reads it back; any other object is
    refused here, at save time, with ``where`` named (a checkpoint that saves but can never
    load is worse)."""
    if isinstance(value, np.generic):  # before float: np.float64 is a float subclass
        return value.item()
    if value is None or isinstance(
        value, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)
    ):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        return {
            _plain_key(key, where): plain(item, f"{where}[{key!r}]") for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        items = [plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise InvalidTypeError(
        f"{where} is a {type(value).__name__}; a state dict may hold numbers, strings, "
        "tensors, NumPy values and lists or dicts of them"
    )
