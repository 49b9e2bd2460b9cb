"""Normalizing ``data`` (one ``(inputs, targets)`` pair or an iterable of pairs)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["Batch", "Data", "as_batches", "check_pair", "is_pair", "sample_count"]

Batch = tuple[Any, Any]
#: One ``(inputs, targets)`` pair, or an iterable of pairs (a list, a DataLoader, ...).
Data = Batch | Iterable[Batch]


def as_batches(data: Data, device: torch.device | None = None) -> list[Batch]:
    """``data`` as a list of ``(inputs, targets)`` pairs, tensors moved to ``device``.

    An iterable is read once and kept, so every pass sees the same samples in the same
    order even if the iterable (say a shuffling DataLoader) would not repeat itself.

    Raises:
        ValueError: an element that is not a pair, or no data at all.
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
    return [(_to(x, device), _to(y, device)) for x, y in pairs]


def check_pair(obj: object, index: int, device: torch.device | None = None) -> Batch:
    """One element of streamed data as a pair on ``device``, or a ValueError."""
    if not is_pair(obj):
        raise ValueError(f"data element {index} is not an (inputs, targets) pair")
    inputs, targets = obj  # type: ignore[misc]
    return _to(inputs, device), _to(targets, device)


def sample_count(batch: Batch) -> int:
    """Number of samples in ``batch``: the length of its targets (or inputs)."""
    inputs, targets = batch
    for part in (targets, inputs):
        if isinstance(part, torch.Tensor) and part.dim() > 0:
            return int(part.shape[0])
    return len(targets)


def is_pair(obj: object) -> bool:
    """One ``(inputs, targets)`` pair (a tuple or list of two, the first a tensor)."""
    return isinstance(obj, tuple | list) and len(obj) == 2 and isinstance(obj[0], torch.Tensor)


def _to(obj: Any, device: torch.device | None) -> Any:
    if device is not None and isinstance(obj, torch.Tensor):
        return obj.to(device)
    return obj
