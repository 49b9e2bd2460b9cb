"""The exact dense Hessian of a small model, straight from ``torch.func.hessian``.

Independent of :class:`HessianOperator` (no Hessian-vector products), so it serves as
ground truth in tests and for tiny models; memory is ``dim**2`` entries.
"""

from __future__ import annotations

import torch
from torch import nn

from largebatch.hessian.batches import Data, as_batches, sample_count
from largebatch.hessian.model_state import preserved_model_state
from largebatch.hessian.operator import LossFn
from largebatch.hessian.params import ParamSpec, flatten, select_parameters, unflatten

__all__ = ["dense_hessian"]


def dense_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    params: ParamSpec | None = None,
    eval_mode: bool = True,
) -> torch.Tensor:
    """Hessian of the sample-weighted mean loss over ``data`` w.r.t. the selected
    parameters, shape ``(dim, dim)``, in the parameters' flat order and dtype.

    The model's mode, buffers and ``.grad`` are restored on return.
    """
    named = select_parameters(model, params)
    names = [name for name, _ in named]
    tensors = [p.detach() for _, p in named]
    batches = as_batches(data, tensors[0].device)
    total = sum(sample_count(b) for b in batches)

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        replaced = dict(zip(names, unflatten(flat, tensors), strict=True))
        losses = [
            loss_fn(torch.func.functional_call(model, replaced, (x,)), y) * sample_count((x, y))
            for x, y in batches
        ]
        return torch.stack(losses).sum() / total

    with preserved_model_state(model, eval_mode):
        return torch.func.hessian(mean_loss)(flatten(tensors)).detach()
