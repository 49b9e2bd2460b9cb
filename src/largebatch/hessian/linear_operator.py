"""What the solvers accept, turned into one kind of object.

Every solver takes either a model with its loss and data, an operator (anything with
``matvec(v)`` or ``@``, plus ``dim``, ``dtype``, ``device``), or a dense symmetric matrix.
:func:`operator_for` is the single place that tells these apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from largebatch.hessian.batches import Data
from largebatch.hessian.operator import HessianOperator, LossFn

__all__ = [
    "CountingOperator",
    "DenseOperator",
    "LinearOperator",
    "OperatorLike",
    "make_generator",
    "operator_for",
    "rademacher",
]


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear map on flat vectors of shape ``(dim,)``."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, vector: torch.Tensor) -> torch.Tensor: ...


#: What the solvers take in place of ``(model, loss_fn, data)``.
OperatorLike = LinearOperator | torch.Tensor | Any


class DenseOperator:
    """A dense symmetric ``(dim, dim)`` matrix as an operator."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self.matrix @ vector


class CountingOperator:
    """Wraps any operator, counting the products a solver takes (``matvecs``)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.dim = int(base.dim if hasattr(base, "dim") else base.shape[0])
        self.dtype = getattr(base, "dtype", torch.float64)
        self.device = torch.device(getattr(base, "device", "cpu"))
        self.matvecs = 0
        self._multiply = base.matvec if hasattr(base, "matvec") else base.__matmul__

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        self.matvecs += 1
        return self._multiply(vector.to(dtype=self.dtype, device=self.device))

    def synchronize_seed(self, seed: int) -> int:
        sync = getattr(self.base, "synchronize_seed", None)
        return sync(seed) if sync is not None else seed


@contextmanager
def operator_for(
    target: OperatorLike | nn.Module,
    loss_fn: LossFn | None = None,
    data: Data | None = None,
    operator_options: Mapping[str, Any] | None = None,
) -> Iterator[CountingOperator]:
    """Context giving a :class:`CountingOperator` for any accepted ``target``.

    - ``nn.Module``: a :class:`HessianOperator` on ``(target, loss_fn, data)`` built with
      ``operator_options``, closed (model restored) on exit, whatever happens.
    - ``torch.Tensor``: a dense symmetric matrix.
    - anything with ``matvec`` or ``@``: used as it is; a closed :class:`HessianOperator`
      is opened for the duration and closed again.

    Raises:
        TypeError: arguments that do not fit ``target``'s kind.
    """
    is_model = isinstance(target, nn.Module)
    if is_model and (loss_fn is None or data is None):
        raise TypeError("a model needs loss_fn and data")
    if not is_model and (loss_fn is not None or data is not None or operator_options):
        raise TypeError("loss_fn, data and operator_options go with a model, not an operator")
    with ExitStack() as stack:
        if is_model:
            base = stack.enter_context(
                HessianOperator(target, loss_fn, data, **dict(operator_options or {}))
            )
        elif isinstance(target, torch.Tensor):
            base = DenseOperator(target)
        elif hasattr(target, "matvec") or hasattr(target, "__matmul__"):
            base = target
            if getattr(target, "is_open", True) is False:
                stack.enter_context(target)
        else:
            raise TypeError(f"cannot take Hessian products from a {type(target).__name__}")
        yield CountingOperator(base)


def make_generator(op: CountingOperator, seed: int | None) -> torch.Generator:
    """A CPU generator for ``op``'s random vectors, identical on all ranks.

    ``seed=None`` draws a seed from torch's global RNG, so ``torch.manual_seed`` makes
    runs repeatable.
    """
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator()
    generator.manual_seed(op.synchronize_seed(int(seed)))
    return generator


def rademacher(count: int, op: CountingOperator, generator: torch.Generator) -> torch.Tensor:
    """``count`` random +-1 vectors, shape ``(count, op.dim)``, on ``op``'s device/dtype."""
    signs = torch.randint(0, 2, (count, op.dim), generator=generator) * 2 - 1
    return signs.to(dtype=op.dtype, device=op.device)
