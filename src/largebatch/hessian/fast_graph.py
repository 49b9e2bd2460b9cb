"""Gradient graphs that are cheaper to differentiate a second time.

A Hessian-vector product by double backward differentiates the graph of the first
backward pass. For some layers autograd's second derivative does much more work than the
mathematics needs. While :class:`~largebatch.hessian.HessianOperator` builds a gradient
graph, :func:`fast_double_backward` makes these layers compute the same function through
operations whose second derivative is cheap:

- **Batch-norm on running statistics** (eval mode) is the per-channel affine map
  ``x * scale + shift``. Autograd's double backward of the fused batch-norm kernel is a
  generic formula for the training-mode case (about ten passes over the activations); the
  affine map's is three. On the paper's C1 network this is most of the saving.
- **A convolution whose input needs no gradient** (the first layer): the second
  derivative of ``convolution_backward`` also computes the input gradient of the
  transposed convolution, even when nobody asked for it. Here the first backward computes
  only the weight gradient, through a node whose own backward is one convolution.
- **ReLU and 2-d max-pooling**: their derivatives are piecewise constant in the
  activations, so the second derivative with respect to the activations is zero almost
  everywhere. Autograd still builds that zero as a full-size tensor and adds it into the
  activation gradients; here those nodes send nothing to the activations.

Only modules of exactly these types are rewritten (subclasses may change ``forward``), and
only while the context is open; the result is the same function up to rounding, so the
products are the same Hessian's.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["fast_double_backward", "rewritable_modules"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@contextmanager
def fast_double_backward(model: nn.Module) -> Iterator[int]:
    """Context in which ``model``'s rewritable modules use the cheaper formulations.

    Yields the number of modules rewritten. On exit every module is as it was.
    """
    patched: list[nn.Module] = []
    try:
        for module, forward in rewritable_modules(model):
            module.forward = types.MethodType(forward, module)  # type: ignore[method-assign]
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)


def rewritable_modules(model: nn.Module) -> list[tuple[nn.Module, Callable[..., torch.Tensor]]]:
    """The ``(module, replacement forward)`` pairs :func:`fast_double_backward` applies."""
    found: list[tuple[nn.Module, Callable[..., torch.Tensor]]] = []
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # somebody already replaced it: leave it alone
        kind = type(module)
        if kind in _BATCH_NORMS and _uses_running_stats(module):
            found.append((module, _affine_batch_norm))
        elif kind in _CONVS and _plain_convolution(module):
            found.append((module, _convolution))
        elif kind is nn.ReLU:
            found.append((module, _relu))
        elif kind is nn.MaxPool2d and not module.return_indices:
            found.append((module, _max_pool2d))
    return found


def _uses_running_stats(module: nn.Module) -> bool:
    return not module.training and module.running_mean is not None


def _plain_convolution(module: nn.Module) -> bool:
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _affine_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode batch-norm, ``(x - mean) / sqrt(var + eps) * weight + bias``, as an affine
    map whose second derivative is cheap."""
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    shift = -self.running_mean * scale
    if self.bias is not None:
        shift = shift + self.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


def _convolution(self: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The convolution; when its input needs no gradient, through nodes whose second
    derivative skips the input gradient."""
    if x.requires_grad or not self.weight.requires_grad or not torch.is_grad_enabled():
        return self._conv_forward(x, self.weight, self.bias)
    geometry = _Geometry(self)
    out = _ConstantInputConvolution.apply(x, self.weight, geometry)
    if self.bias is not None:
        out = out + self.bias.view((1, -1) + (1,) * (out.dim() - 2))
    return out


class _Geometry:
    """Stride, padding, dilation and groups of a convolution module."""

    def __init__(self, module: nn.modules.conv._ConvNd) -> None:
        self.stride = list(module.stride)
        self.padding = list(module.padding)
        self.dilation = list(module.dilation)
        self.groups = module.groups
        self.output_padding = [0] * len(self.stride)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.convolution(
            x,
            weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            self.output_padding,
            self.groups,
        )

    def weight_gradient(
        self, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad_out,
            x,
            weight,
            None,
            self.stride,
            self.padding,
            self.dilation,
            False,
            self.output_padding,
            self.groups,
            [False, True, False],
        )
        return grad_weight


class _ConstantInputConvolution(torch.autograd.Function):
    """``conv(x, weight)`` for an ``x`` that needs no gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, geometry: _Geometry) -> Any:
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        return geometry.forward(x, weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        return None, _ConvolutionWeightGradient.apply(grad_out, x, weight, ctx.geometry), None


class _ConvolutionWeightGradient(torch.autograd.Function):
    """The weight gradient of ``conv(x, weight)`` as a function of the output gradient
    (linear in it); its backward is the convolution of ``x`` with the incoming vector."""

    @staticmethod
    def forward(
        ctx: Any, grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry: _Geometry
    ) -> Any:
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        return geometry.weight_gradient(grad_out, x, weight.detach())

    @staticmethod
    def backward(ctx: Any, grad_grad_weight: torch.Tensor) -> Any:
        x, _ = ctx.saved_tensors
        return ctx.geometry.forward(x, grad_grad_weight), None, None, None


def _differentiating(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _relu(self: nn.ReLU, x: torch.Tensor) -> torch.Tensor:
    """ReLU (in place if the module is) whose second derivative sends nothing to ``x``."""
    if not _differentiating(x):
        return nn.ReLU.forward(self, x)
    return _ReLU.apply(x, self.inplace)


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, inplace: bool) -> Any:
        if inplace:
            ctx.mark_dirty(x)
            out = x.relu_()
        else:
            out = x.relu()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        (out,) = ctx.saved_tensors
        return _ReLUGradient.apply(grad_out, out), None


class _ReLUGradient(torch.autograd.Function):
    """``grad_out * (out > 0)``, linear in ``grad_out``; constant in ``out`` a.e."""

    @staticmethod
    def forward(ctx: Any, grad_out: torch.Tensor, out: torch.Tensor) -> Any:
        ctx.save_for_backward(out)
        return torch.ops.aten.threshold_backward(grad_out, out, 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0), None


def _max_pool2d(self: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """2-d max-pooling whose second derivative sends nothing to ``x``."""
    if not _differentiating(x):
        return nn.MaxPool2d.forward(self, x)
    pair = torch.nn.modules.utils._pair
    geometry = (
        pair(self.kernel_size),
        pair(self.stride if self.stride is not None else self.kernel_size),
        pair(self.padding),
        pair(self.dilation),
        bool(self.ceil_mode),
    )
    return _MaxPool2d.apply(x, geometry)


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, geometry: tuple) -> Any:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, *geometry)
        ctx.save_for_backward(x, indices)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        x, indices = ctx.saved_tensors
        return _MaxPool2dGradient.apply(grad_out, x, indices, ctx.geometry), None


class _MaxPool2dGradient(torch.autograd.Function):
    """Scatters ``grad_out`` to the arg-max positions: linear in ``grad_out``, constant in
    the pooled activations a.e.; its adjoint gathers from those positions."""

    @staticmethod
    def forward(
        ctx: Any, grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, geometry: tuple
    ) -> Any:
        ctx.save_for_backward(indices)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *geometry, indices)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        (indices,) = ctx.saved_tensors
        gathered = grad.flatten(-2).gather(-1, indices.flatten(-2)).view_as(indices)
        return gathered, None, None, None
