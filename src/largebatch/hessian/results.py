"""Result records of the Hessian solvers: tensors plus the cost of getting them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DensityResult", "EigenResult", "TraceResult", "NEGATIVE_THRESHOLD"]

#: :meth:`DensityResult.negative_mass` counts nodes below this share of the spectral
#: radius, negated: eigenvalues of the bulk near zero are not counted as negative.
NEGATIVE_THRESHOLD = 0.01


@dataclass
class EigenResult:
    """Top eigenpairs of a symmetric operator.

    Attributes:
        values: float64, shape ``(k,)``, the k largest algebraic eigenvalues, largest first
            (method ``"reference"``: the largest in magnitude, as the reference code).
        vectors: shape ``(k, dim)``, unit eigenvectors as flat vectors in the operator's
            dtype (``HessianOperator.unflatten`` gives the per-parameter layout).
        residuals: float64, shape ``(k,)``, ``|H v - value v| / |value|`` per pair,
            measured with true products (Lanczos with ``verify=False``: from the Lanczos
            relation, exact up to rounding).
        matvecs: Hessian-vector products spent, the final check (if any) included.
        converged: every pair meets the stopping rule: its error bound (``stop="error"``,
            the default) or its residual (``stop="residual"``) is within the tolerance
            (method ``"reference"``: the relative change of the eigenvalue fell below it).
        method: the solver used.
        error_bounds: float64, shape ``(k,)``, the bound on each eigenvalue's relative
            error, ``min(r, r^2 / gap) / |value|`` with ``r`` the residual norm and the
            gap estimated from the other Ritz values (see :func:`top_eigenvalues`); the
            residuals themselves for power iteration. ``None`` when not computed.
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    converged: bool
    method: str
    error_bounds: torch.Tensor | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON, without the vectors."""
        return {
            "values": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "error_bounds": None if self.error_bounds is None else self.error_bounds.tolist(),
            "matvecs": self.matvecs,
            "converged": self.converged,
            "method": self.method,
        }


@dataclass
class TraceResult:
    """Stochastic estimate of the trace.

    Attributes:
        estimate: the trace estimate.
        stderr: standard error of the estimate from the spread of the probe values
            (``nan`` with fewer than two probes). For Hutch++ it is the standard error of
            the stochastic part given the sketched subspace, whose trace is exact; it does
            not include the (smaller) variation due to the random sketch itself.
        matvecs: products spent. probes: random probes averaged (Hutch++: in the
            stochastic part only). method: ``"hutchinson"`` or ``"hutch++"``.

    ``estimate +- 2 stderr`` is an approximate 95% interval (the probe mean is close to
    normal from 10 probes on; the trace tests check its coverage against dense traces).
    """

    estimate: float
    stderr: float
    matvecs: int
    probes: int
    method: str

    @property
    def relative_stderr(self) -> float:
        """``stderr / |estimate|`` (``inf`` for a zero estimate)."""
        return self.stderr / abs(self.estimate) if self.estimate != 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON, with ``relative_stderr``."""
        return {**vars(self), "relative_stderr": self.relative_stderr}


@dataclass
class DensityResult:
    """Smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: float64, shape ``(grid_points,)``, eigenvalue axis.
        density: float64, same shape, non-negative, integrating to 1 over ``grid``
            (trapezoid rule).
        nodes, weights: float64 quadrature nodes (Ritz values) and weights of all probes,
            concatenated; weights sum to 1. ``density`` is their Gaussian smoothing.
        sigma: standard deviation of the Gaussian kernel, eigenvalue units.
        matvecs: products spent. probes: random start vectors used.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    sigma: float
    matvecs: int
    probes: int

    @property
    def min_eigenvalue(self) -> float:
        """The smallest node. A Ritz value never lies below the smallest eigenvalue and
        the extremes converge first, so this approaches the most negative eigenvalue from
        above (exact when the Krylov space is the whole space)."""
        return float(self.nodes.min())

    def negative_mass(self, below: float = NEGATIVE_THRESHOLD) -> float:
        """The estimated share of eigenvalues below ``-below * r``, where r is the
        largest node magnitude (the spectral radius, estimated): the quadrature weight
        of the nodes there. The weights are unsmoothed: the Gaussian kernel would spill
        the bulk of eigenvalues near zero to both sides. ``below=0`` counts every
        negative node, including a bulk near zero whose sign is rounding."""
        if not below >= 0:
            raise ValueError(f"below must be >= 0, got {below}")
        radius = float(self.nodes.abs().max())
        return float(self.weights[self.nodes < -below * radius].sum())

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON."""
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "sigma": self.sigma,
            "matvecs": self.matvecs,
            "probes": self.probes,
            "min_eigenvalue": self.min_eigenvalue,
            "negative_mass": self.negative_mass(),
            "negative_threshold": NEGATIVE_THRESHOLD,
        }
