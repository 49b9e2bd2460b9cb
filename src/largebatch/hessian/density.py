"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from largebatch import checks
from largebatch.hessian.batches import Data
from largebatch.hessian.krylov import LanczosProcess
from largebatch.hessian.linear_operator import (
    CountingOperator,
    OperatorLike,
    make_generator,
    operator_for,
    rademacher,
)
from largebatch.hessian.operator import LossFn
from largebatch.hessian.results import DensityResult

__all__ = ["spectral_density"]

#: The grid reaches this many kernel widths beyond the outermost nodes.
GRID_MARGIN_SIGMAS = 5.0
#: Default kernel width as a fraction of the span of the nodes.
DEFAULT_SIGMA_FRACTION = 0.01


def spectral_density(
    target: OperatorLike | nn.Module,
    loss_fn: LossFn | None = None,
    data: Data | None = None,
    *,
    num_probes: int = 1,
    lanczos_steps: int = 80,
    grid_points: int = 1000,
    sigma: float | None = None,
    seed: int | None = None,
    operator_options: Mapping[str, Any] | None = None,
) -> DensityResult:
    """Eigenvalue density of the Hessian, smoothed with a Gaussian kernel.

    For each probe, ``lanczos_steps`` Lanczos steps (full reorthogonalization) from a
    random +-1 start vector give Gauss quadrature nodes (Ritz values) and weights (squared
    first components of the Ritz vectors); averaging over probes estimates the spectral
    measure, whose mean is ``trace(H) / dim``.

    Args:
        num_probes: random start vectors (cost ``num_probes * lanczos_steps`` products).
        lanczos_steps: Lanczos steps per probe (fewer if the Krylov space is exhausted);
            memory is ``lanczos_steps + 1`` vectors of ``dim`` entries.
        grid_points: points of the output grid, spanning the nodes plus 5 sigma each side.
        sigma: kernel standard deviation in eigenvalue units; default 1% of the span of
            the nodes (or of their magnitude if they all coincide).
        seed: seed of the probes; ``None`` draws one from torch's RNG.
        operator_options: keyword arguments of :class:`HessianOperator` for a model.
    """
    num_probes = checks.integer(num_probes, "spectral_density", "num_probes")
    lanczos_steps = checks.integer(lanczos_steps, "spectral_density", "lanczos_steps")
    grid_points = checks.integer(grid_points, "spectral_density", "grid_points")
    if sigma is not None:
        sigma = checks.number(sigma, "spectral_density", "sigma")
    if num_probes < 1 or lanczos_steps < 1 or grid_points < 2:
        raise ValueError("need num_probes >= 1, lanczos_steps >= 1 and grid_points >= 2")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    with operator_for(target, loss_fn, data, operator_options) as op:
        generator = make_generator(op, seed)
        quadratures = [_quadrature(op, lanczos_steps, generator) for _ in range(num_probes)]
        nodes = torch.cat([n for n, _ in quadratures])
        weights = torch.cat([w for _, w in quadratures]) / num_probes
        width = sigma if sigma is not None else _default_sigma(nodes)
        grid, density = _smooth(nodes, weights, width, grid_points)
        return DensityResult(grid, density, nodes, weights, width, op.matvecs, num_probes)


def _quadrature(
    op: CountingOperator, steps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    process = LanczosProcess(op, rademacher(1, op, generator)[0], steps, generator)
    # An invariant Krylov space makes the quadrature exact: stop there.
    while not process.full and not process.broke_down:
        process.step()
    pairs = process.ritz()
    return pairs.theta, pairs.coords[0] ** 2


def _default_sigma(nodes: torch.Tensor) -> float:
    span = float(nodes.max() - nodes.min())
    scale = span if span > 0 else max(float(nodes.abs().max()), 1.0)
    return DEFAULT_SIGMA_FRACTION * scale


def _smooth(
    nodes: torch.Tensor, weights: torch.Tensor, sigma: float, points: int
) -> tuple[torch.Tensor, torch.Tensor]:
    margin = GRID_MARGIN_SIGMAS * sigma
    grid = torch.linspace(
        float(nodes.min()) - margin, float(nodes.max()) + margin, points, dtype=torch.float64
    )
    offsets = (grid[:, None] - nodes[None, :]) / sigma
    kernel = torch.exp(-0.5 * offsets**2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights
    # Renormalize so the discrete (trapezoid) integral is exactly 1.
    return grid, density / torch.trapezoid(density, grid)
