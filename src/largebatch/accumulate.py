"""Gradient accumulation with each micro-batch weighted by its share of the batch.

A global batch of ``n`` samples run as micro-batches of ``n_k`` samples gives the gradient
of the whole batch at once when each micro-batch's mean loss is scaled by ``n_k / n``
before its backward pass. Weighting each micro-batch by ``1 / count`` instead (what a
fixed ``loss / accumulation_steps`` does) over-weights a short last micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from largebatch import checks
from largebatch.errors import InvalidValueError

__all__ = ["micro_batches", "backward_share", "accumulate"]


def micro_batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` cut into consecutive pieces of at most ``size`` samples."""
    size = _checked(x, y, size, "micro_batches", "size")  # at the call, not at the first batch
    return ((x[i : i + size], y[i : i + size]) for i in range(0, len(y), size))


def backward_share(
    loss: torch.Tensor,
    samples: int,
    batch_samples: int,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Backward of a micro-batch's mean ``loss``, weighted by ``samples / batch_samples``.

    ``scaler``: the fp16 loss scaler, when there is one.
    """
    weighted = loss * (samples / batch_samples)
    (scaler.scale(weighted) if scaler is not None else weighted).backward()


def accumulate(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batch_size: int,
) -> float:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over the batch ``(x, y)``.

    Runs the batch as micro-batches of at most ``micro_batch_size`` samples; the result
    equals one backward over the whole batch (batch-norm statistics aside). Does not zero
    the gradients first. Returns the batch's mean loss.
    """
    micro_batch_size = _checked(x, y, micro_batch_size, "accumulate", "micro_batch_size")
    total = 0.0
    for xb, yb in micro_batches(x, y, micro_batch_size):
        loss = loss_fn(model(xb), yb)
        backward_share(loss, len(yb), len(y))
        total += float(loss.detach()) * len(yb)
    return total / max(len(y), 1)


def _checked(x: torch.Tensor, y: torch.Tensor, size: int, who: str, field: str) -> int:
    """``size`` as an integer >= 1; ``x`` and ``y`` must hold as many samples."""
    if len(x) != len(y):
        raise InvalidValueError(f"{who}: x has {len(x)} samples but y has {len(y)}")
    return checks.integer(size, who, field, minimum=1)
