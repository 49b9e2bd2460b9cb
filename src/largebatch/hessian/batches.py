"""Normalizing ``data`` (one ``(inputs, targets)`` pair or an iterable of pairs)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from largebatch.errors import InvalidValueError
from largebatch.inputs import count, each

__all__ = [
    "Batch",
    "Data",
    "as_batches",
    "check_pair",
    "check_finite",
    "is_pair",
    "sample_count",
]

Batch = tuple[Any, Any]
#: One ``(inputs, targets)`` pair, or an iterable of pairs (a list, a DataLoader, ...).
Data = Batch | Iterable[Batch]


def as_batches(
    data: Data, device: torch.device | None = None, who: str = "the probe data"
) -> list[Batch]:
    """``data`` as a list of ``(inputs, targets)`` pairs, tensors moved to ``device``.

    An iterable is read once and kept, so every pass sees the same samples in the same
    order even if the iterable (say a shuffling DataLoader) would not repeat itself.

    Raises:
        ValueError: an element that is not a pair, or no data at all;
            :class:`~largebatch.errors.InvalidValueError` (``who`` named): NaN or
            infinity in an element (see :func:`check_finite`).
    """
    if is_pair(data):
        pairs = [data]
    else:
        pairs = list(data)
        for index, pair in enumerate(pairs):
            if not is_pair(pair):
                raise ValueError(f"data element {index} is not an (inputs, targets) pair")
    if not pairs:
        raise ValueError("data holds no batches")
    for index, pair in enumerate(pairs):
        check_finite(pair, index, who)
    return [(_to(x, device), _to(y, device)) for x, y in pairs]


def check_pair(
    obj: object, index: int, device: torch.device | None = None, who: str = "the probe data"
) -> Batch:
    """One element of streamed data as a pair on ``device``, or a ValueError (an
    InvalidValueError for NaN or infinity, as :func:`check_finite`)."""
    if not is_pair(obj):
        raise ValueError(f"data element {index} is not an (inputs, targets) pair")
    check_finite(obj, index, who)  # type: ignore[arg-type]
    inputs, targets = obj  # type: ignore[misc]
    return _to(inputs, device), _to(targets, device)


def check_finite(batch: Batch, index: int, who: str) -> None:
    """Refuse a pair whose floating-point inputs or targets hold NaN or infinity: the
    curvature of a loss on such data is not a number, and the solvers would fail later
    in a linear-algebra routine with a message that says nothing of the data."""
    inputs, targets = batch
    parts = [*(inputs.values() if isinstance(inputs, Mapping) else [inputs]), targets]
    names = ["inputs"] * (len(parts) - 1) + ["targets"]
    for part, name in zip(parts, names, strict=True):
        if (
            isinstance(part, torch.Tensor)
            and part.is_floating_point()
            and not bool(torch.isfinite(part).all())
        ):
            raise InvalidValueError(
                f"{who}: data element {index}: the {name} hold NaN or infinity; curvature "
                "needs finite data (clean or drop those samples)"
            )


def sample_count(batch: Batch) -> int:
    """Number of samples in ``batch``: the length of its targets (or inputs)."""
    inputs, targets = batch
    if isinstance(targets, torch.Tensor) and targets.dim() > 0:
        return int(targets.shape[0])
    if isinstance(inputs, Mapping) or (isinstance(inputs, torch.Tensor) and inputs.dim() > 0):
        return count(inputs)
    return len(targets)


def is_pair(obj: object) -> bool:
    """One ``(inputs, targets)`` pair (a tuple or list of two, the first a tensor or a dict
    of tensors, see :mod:`largebatch.inputs`)."""
    return (
        isinstance(obj, tuple | list)
        and len(obj) == 2
        and (isinstance(obj[0], torch.Tensor) or _is_tensor_dict(obj[0]))
    )


def _is_tensor_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is not None and (isinstance(obj, torch.Tensor) or _is_tensor_dict(obj)):
        return each(obj, lambda t: t.to(device))
    return obj
