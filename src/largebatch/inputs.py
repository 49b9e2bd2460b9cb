"""A batch's inputs as the model takes them: one tensor, ``model(x)``, or a dict of tensors
passed as keywords, ``model(**x)`` (as Hugging Face models take their batches), each
entry with one row per sample along its first axis.

Everything that slices, joins, moves or runs a batch's inputs goes through here, so the
loop, the meters and the Hessian never ask which of the two they hold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from largebatch.errors import UsageError

__all__ = ["Inputs", "run", "each", "rows", "count", "join", "joinable", "describe"]

#: One tensor, or a dict of tensors with a first axis over samples.
Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def run(model: Callable[..., Any], x: Inputs) -> Any:
    """``model(x)``, or ``model(**x)`` for a dict."""
    return model(**x) if isinstance(x, Mapping) else model(x)


def each(x: Inputs, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """``fn`` applied to the tensor, or to every entry of the dict."""
    return {key: fn(value) for key, value in x.items()} if isinstance(x, Mapping) else fn(x)


def rows(x: Inputs, index: Any) -> Inputs:
    """The samples at ``index`` (a slice or indices) of every entry."""
    return each(x, lambda t: t[index])


def count(x: Inputs) -> int:
    """Samples in the batch: the first axis of the tensor, or of the dict's first entry."""
    if isinstance(x, Mapping):
        return len(next(iter(x.values()))) if x else 0
    return len(x)


def joinable(parts: Sequence[Inputs]) -> bool:
    """Whether :func:`join` can stack these batches: the same entries, each of one shape
    beyond the sample axis (batches padded to different lengths are not)."""
    if not all(isinstance(p, Mapping) for p in parts):
        return all(isinstance(p, torch.Tensor) for p in parts) and _same_rows(parts)
    keys = [tuple(p) for p in parts]
    if len(set(keys)) > 1:
        return False
    return all(_same_rows([p[key] for p in parts]) for key in keys[0])


def join(parts: Sequence[Inputs]) -> Inputs:
    """The batches one after another (one batch is returned as it is)."""
    if len(parts) == 1:
        return parts[0]
    if not joinable(parts):
        raise UsageError(
            f"batches of inputs {describe(parts[0])} and {describe(parts[1])} cannot be "
            "joined into one; a collate_fn should give every batch the same entries and "
            "shapes beyond the sample axis (pad to a fixed length)"
        )
    if isinstance(parts[0], Mapping):
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return torch.cat(list(parts))


def describe(x: Any) -> str:
    """The per-sample shape of the inputs, for messages: ``(1, 28, 28)`` or
    ``{input_ids: (128,), attention_mask: (128,)}``."""
    if isinstance(x, Mapping):
        shown = ", ".join(f"{key}: {_per_sample(value)}" for key, value in x.items())
        return "{" + shown + "}"
    return _per_sample(x)


def _per_sample(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return str(tuple(shape[1:])) if shape is not None else type(value).__name__


def _same_rows(tensors: Sequence[Any]) -> bool:
    return len({(tuple(t.shape[1:]), t.dtype) for t in tensors}) == 1
