"""Stochastic trace of the Hessian: Hutchinson and Hutch++ with Rademacher probes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from largebatch import checks
from largebatch.hessian.batches import Data
from largebatch.hessian.linear_operator import (
    CountingOperator,
    OperatorLike,
    make_generator,
    operator_for,
    rademacher,
)
from largebatch.hessian.operator import LossFn
from largebatch.hessian.results import TraceResult

__all__ = ["TRACE_METHODS", "hessian_trace"]

TRACE_METHODS = ("hutchinson", "hutch++")

#: Stochastic probes before the ``tol`` rule may stop: the spread of fewer is too noisy an
#: estimate of the standard error (a stopping rule on it would stop on lucky draws).
MIN_PROBES_FOR_TOL = 10


def hessian_trace(
    target: OperatorLike | nn.Module,
    loss_fn: LossFn | None = None,
    data: Data | None = None,
    *,
    probes: int = 100,
    tol: float | None = None,
    max_probes: int = 1000,
    method: str = "hutchinson",
    seed: int | None = None,
    operator_options: Mapping[str, Any] | None = None,
) -> TraceResult:
    """Estimate ``trace(H)`` from products with random +-1 vectors.

    Args:
        probes: products to spend when ``tol`` is None, the least to spend otherwise.
            Hutch++ spends a third on a sketch ``H S``, a third on the exact trace of the
            sketched subspace and a third on Hutchinson probes of the rest.
        tol: keep adding probes until ``stderr <= tol * |estimate|`` (or ``max_probes``),
            judged from :data:`MIN_PROBES_FOR_TOL` stochastic probes on.
        max_probes: most products in all.
        method: ``"hutchinson"`` (``mean z^T H z``) or ``"hutch++"`` (Meyer et al. 2021:
            removes the top of the spectrum exactly, which pays when a few eigenvalues
            dominate, as in trained networks; needs ``probes >= 3``).
        seed: seed of the probes; ``None`` draws one from torch's RNG.
        operator_options: keyword arguments of :class:`HessianOperator` for a model.

    Returns:
        :class:`TraceResult` (see there for what ``stderr`` means with Hutch++).
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {TRACE_METHODS}")
    least = 3 if method == "hutch++" else 1
    probes = checks.integer(probes, "hessian_trace", "probes")
    max_probes = checks.integer(max_probes, "hessian_trace", "max_probes")
    if tol is not None:
        tol = checks.number(tol, "hessian_trace", "tol", low=0.0)
    if probes < least or max_probes < probes:
        raise ValueError(f"need {least} <= probes <= max_probes, got {probes}, {max_probes}")
    with operator_for(target, loss_fn, data, operator_options) as op:
        generator = make_generator(op, seed)
        exact_part, subspace = 0.0, None
        if method == "hutch++":
            exact_part, subspace = _sketched_trace(op, probes // 3, generator)
        samples = _hutchinson(
            op, subspace, probes - op.matvecs, tol, max_probes - op.matvecs, exact_part, generator
        )
        stderr = samples.std().item() / math.sqrt(len(samples)) if len(samples) > 1 else math.nan
        estimate = exact_part + samples.mean().item()
        return TraceResult(estimate, stderr, op.matvecs, len(samples), method)


def _sketched_trace(
    op: CountingOperator, size: int, generator: torch.Generator
) -> tuple[float, torch.Tensor]:
    """Exact trace of ``H`` on an orthonormal basis ``Q`` of ``range(H S)``; returns it
    and ``Q`` as rows, shape ``(size, dim)``."""
    sketch = torch.stack([op.matvec(s) for s in rademacher(size, op, generator)])
    basis = torch.linalg.qr(sketch.T).Q.T
    return sum(float(q.double() @ op.matvec(q).double()) for q in basis), basis


def _hutchinson(
    op: CountingOperator,
    subspace: torch.Tensor | None,
    least: int,
    tol: float | None,
    most: int,
    offset: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Probe values ``z^T H z`` (``z`` projected off ``subspace``), float64, until
    ``least`` are taken and, with ``tol``, the estimate ``offset + mean`` is that precise."""
    values: list[float] = []
    while len(values) < most:
        probe = rademacher(1, op, generator)[0]
        if subspace is not None:
            probe = probe - (subspace @ probe) @ subspace
        values.append(float(probe.double() @ op.matvec(probe).double()))
        if len(values) >= max(least, MIN_PROBES_FOR_TOL if tol is not None else 1):
            if tol is None:
                break
            spread = torch.tensor(values, dtype=torch.float64)
            stderr = spread.std().item() / math.sqrt(len(values))
            if stderr <= tol * abs(offset + spread.mean().item()):
                break
    return torch.tensor(values, dtype=torch.float64)
