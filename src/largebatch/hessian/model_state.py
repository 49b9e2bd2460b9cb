"""Leave a model exactly as it was found: train/eval mode, buffers and ``.grad`` fields."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["ModelStateSnapshot", "preserved_model_state"]


class ModelStateSnapshot:
    """The mode of every sub-module, a copy of every buffer and each parameter's ``.grad``.

    ``restore()`` puts them back in place: buffers are copied into the same tensors (so
    references held elsewhere stay valid) and each ``.grad`` is the very object it was
    (or ``None``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._modes = [(module, module.training) for module in model.modules()]
        self._buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self._grads = [(p, p.grad) for p in model.parameters()]

    def restore(self) -> None:
        # Set each module's flag directly: model.train(mode) would also overwrite
        # sub-modules that were deliberately in another mode.
        for module, training in self._modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in self._buffers:
                buffer.copy_(saved)
        for param, grad in self._grads:
            param.grad = grad


@contextmanager
def preserved_model_state(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Context in which ``model`` may be used freely; on exit its state is as on entry.

    With ``eval_mode`` the model is switched to eval mode inside (batch-norm uses its
    running statistics, dropout is off).
    """
    snapshot = ModelStateSnapshot(model)
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        snapshot.restore()
