"""Choosing the parameters a Hessian is taken over, and flat <-> per-parameter vectors.

The Hessian engine works with flat 1-D vectors of length ``dim`` (the number of selected
scalars); these helpers convert between that layout and one tensor per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

__all__ = ["ParamSpec", "flatten", "select_parameters", "unflatten"]

#: What may select parameters: a name (exact, or a module prefix such as ``"fc1"``), a
#: parameter tensor, a sub-module, or an iterable of those.
ParamSpec = str | torch.Tensor | nn.Module | Iterable[str | torch.Tensor | nn.Module]


def select_parameters(
    model: nn.Module, params: ParamSpec | None = None
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``model`` chosen by ``params``, in model order.

    ``None`` selects every parameter with ``requires_grad``. Names match a parameter
    exactly or any parameter under a module prefix (``"0"`` matches ``"0.weight"``).

    Raises:
        ValueError: a name or tensor that is not in the model, a chosen parameter that
            does not require grad, or an empty selection.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen_ids = {id(p) for _, p in named if p.requires_grad}
    else:
        items = [params] if isinstance(params, str | torch.Tensor | nn.Module) else list(params)
        chosen_ids = set()
        for item in items:
            chosen_ids |= _ids_of(model, named, item)
    chosen = [(name, p) for name, p in named if id(p) in chosen_ids]
    if not chosen:
        raise ValueError("no parameters selected for the Hessian")
    frozen = [name for name, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(f"selected parameters do not require grad: {', '.join(frozen)}")
    return chosen


def _ids_of(
    model: nn.Module, named: list[tuple[str, nn.Parameter]], item: str | torch.Tensor | nn.Module
) -> set[int]:
    if isinstance(item, nn.Module):
        ids = {id(p) for p in item.parameters()}
    elif isinstance(item, torch.Tensor):
        ids = {id(item)}
    else:
        ids = {id(p) for name, p in named if name == item or name.startswith(item + ".")}
    known = {id(p) for _, p in named}
    if not ids or not ids <= known:
        raise ValueError(f"{_describe(item)} does not name parameters of {type(model).__name__}")
    return ids


def _describe(item: object) -> str:
    if isinstance(item, str):
        return f"parameter name {item!r}"
    return f"a {type(item).__name__}"


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``tensors`` into one flat 1-D tensor (copies)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split flat ``vector`` (shape ``(sum of numels,)``) into views shaped like ``like``."""
    sizes = [t.numel() for t in like]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(
            f"expected a flat vector of length {sum(sizes)}, got shape {tuple(vector.shape)}"
        )
    return [chunk.view_as(t) for chunk, t in zip(vector.split(sizes), like, strict=True)]
