"""Lanczos with full reorthogonalization and thick restart, and Rayleigh-Ritz.

Shared by the eigenvalue solver (restarted until the wanted Ritz pairs converge) and by
stochastic Lanczos quadrature (a fixed number of steps from a random vector). The small
projected matrix is kept in float64; basis vectors stay in the operator's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from largebatch.hessian.linear_operator import CountingOperator, rademacher

__all__ = [
    "LanczosProcess",
    "RitzPairs",
    "orthogonalize",
    "rayleigh_ritz",
    "relative_residual",
    "vector_norm",
]


def orthogonalize(vectors: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove from ``vectors`` (shape ``(dim,)``) its components along the rows of
    ``basis`` (orthonormal, ``(j, dim)``); two classical Gram-Schmidt passes, which keep
    the basis orthogonal to working precision. Returns (orthogonalized, coefficients).
    """
    coefficients = basis @ vectors
    vectors = vectors - coefficients @ basis
    correction = basis @ vectors
    return vectors - correction @ basis, coefficients + correction


@dataclass
class RitzPairs:
    """Ritz values ``theta`` (ascending, float64), their coordinates ``coords`` (columns)
    in the basis, and each pair's residual norm estimate ``|beta * coords[last, i]|``."""

    theta: torch.Tensor
    coords: torch.Tensor
    estimates: torch.Tensor


class LanczosProcess:
    """Builds an orthonormal Krylov basis ``V`` with ``H V = V T + beta v e_last^T``.

    ``T`` is tridiagonal, or arrowhead plus tridiagonal after a thick restart, so the
    residual norm of a Ritz pair ``(theta, V s)`` is ``beta * |s_last|`` without another
    product. When the Krylov space becomes invariant (``beta`` about zero) the process
    continues from a random vector orthogonal to the basis and sets :attr:`broke_down`.

    Args:
        op: the symmetric operator.
        start: start vector, shape ``(dim,)``; need not be normalized (not zero).
        max_size: basis size at which :meth:`restart` must be called (capped at ``dim``).
        generator: source of the random vectors used after a breakdown.
    """

    def __init__(
        self,
        op: CountingOperator,
        start: torch.Tensor,
        max_size: int,
        generator: torch.Generator,
    ) -> None:
        self.op = op
        self.generator = generator
        self.max_size = min(max_size, op.dim)
        self.basis = torch.zeros(self.max_size + 1, op.dim, dtype=op.dtype, device=op.device)
        self.projected = torch.zeros(self.max_size, self.max_size, dtype=torch.float64)
        self.size = 0
        self.beta = 0.0
        self.broke_down = False
        start = start.to(dtype=op.dtype, device=op.device)
        norm = vector_norm(start)
        if not math.isfinite(norm) or norm == 0:
            raise ValueError("the Lanczos start vector must be finite and non-zero")
        self.basis[0] = start / norm

    @property
    def full(self) -> bool:
        """The basis has ``max_size`` vectors: restart before the next step."""
        return self.size == self.max_size

    @property
    def exhausted(self) -> bool:
        """The basis spans the whole space: its Ritz pairs are exact."""
        return self.size == self.op.dim

    def step(self) -> None:
        """One product: extend the basis by one vector and ``T`` by one column."""
        if self.full:
            raise RuntimeError("Lanczos basis is full; restart() first")
        j = self.size
        product = self.op.matvec(self.basis[j])
        scale = vector_norm(product)
        residual, coefficients = orthogonalize(product, self.basis[: j + 1])
        self.projected[j, j] = float(coefficients[j])
        self.size = j + 1
        beta = vector_norm(residual)
        self.broke_down = beta <= 100 * torch.finfo(self.op.dtype).eps * scale
        if self.exhausted:
            self.beta = 0.0
            return
        if self.broke_down:
            beta = 0.0
            residual = self._fresh_direction()
        self.beta = beta
        self.basis[j + 1] = residual / vector_norm(residual)
        if j + 1 < self.max_size:
            self.projected[j, j + 1] = self.projected[j + 1, j] = beta

    def ritz(self) -> RitzPairs:
        """Ritz pairs of the current basis, ascending."""
        theta, coords = torch.linalg.eigh(self.projected[: self.size, : self.size])
        return RitzPairs(theta, coords, abs(self.beta) * coords[-1].abs())

    def ritz_vectors(self, coords: torch.Tensor) -> torch.Tensor:
        """Vectors ``V @ coords`` for coordinate columns ``coords``; shape ``(m, dim)``."""
        return coords.T.to(self.op.dtype).to(self.op.device) @ self.basis[: self.size]

    def ritz_products(self, theta: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """``H y`` for the Ritz vectors ``y = V s`` of values ``theta`` and coordinate
        columns ``coords``, without a product: ``theta y + beta s_last v_next`` by the
        Lanczos relation (exact up to rounding). Shape ``(m, dim)``."""
        vectors = self.ritz_vectors(coords)
        scale = theta.to(self.op.dtype).to(self.op.device)[:, None]
        products = scale * vectors
        if self.size < self.op.dim and self.beta != 0.0:
            last = (self.beta * coords[-1]).to(self.op.dtype).to(self.op.device)
            products = products + last[:, None] * self.basis[self.size][None, :]
        return products

    def restart(self, keep: int) -> None:
        """Thick restart: keep the ``keep`` largest Ritz pairs and continue from the
        current residual direction (so nothing learned about them is lost)."""
        if not 0 < keep < self.size:
            raise ValueError(f"keep must be in [1, {self.size - 1}], got {keep}")
        pairs = self.ritz()
        theta, coords = pairs.theta[-keep:], pairs.coords[:, -keep:]
        next_direction = self.basis[self.size].clone()
        self.basis[:keep] = self.ritz_vectors(coords)
        self.basis[keep] = next_direction
        self.projected.zero_()
        self.projected[:keep, :keep] = torch.diag(theta)
        # H y_i = theta_i y_i + beta * s_last,i * v_next: the arrowhead's coupling row.
        coupling = self.beta * coords[-1]
        self.projected[keep, :keep] = coupling
        self.projected[:keep, keep] = coupling
        self.size = keep

    def _fresh_direction(self) -> torch.Tensor:
        basis = self.basis[: self.size]
        for _ in range(3):
            candidate, _ = orthogonalize(rademacher(1, self.op, self.generator)[0], basis)
            if vector_norm(candidate) > 1e-3 * self.op.dim**0.5:
                return candidate
        raise RuntimeError("could not find a direction orthogonal to the Krylov basis")


def vector_norm(vector: torch.Tensor) -> float:
    """The 2-norm of a flat vector, accumulated in float64.

    A float32 norm of a million entries can be off by 1e-4 relative (more when a few
    entries hold most of the mass, as Hessian eigenvectors of networks often do); a unit
    vector that is not quite unit biases every Rayleigh quotient by as much.
    """
    return float(torch.linalg.vector_norm(vector, dtype=torch.float64))


def relative_residual(residual: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``residual / |value|`` elementwise, 0 where both are 0 and inf where only value is."""
    ratio = residual / value.abs()
    return torch.where(residual == 0, torch.zeros_like(ratio), ratio)


def rayleigh_ritz(
    vectors: torch.Tensor, products: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best eigenpairs within the span of ``vectors`` given ``products = H vectors``.

    Args:
        vectors, products: shape ``(k, dim)``; the vectors need not be orthonormal.

    Returns:
        values (float64, ``(k,)``, descending), unit vectors ``(k, dim)`` in the input dtype,
        and relative residuals ``|H y - value y| / |value|`` (float64, ``(k,)``).
    """
    # Orthonormalize: Y^T = Q R, so Q = Y^T R^-1 and H Q = (H Y)^T R^-1, no new products.
    q, r = torch.linalg.qr(vectors.T.to(torch.float64))
    hq = torch.linalg.solve_triangular(r, products.T.to(torch.float64), upper=True, left=False)
    projected = q.T @ hq
    values, coords = torch.linalg.eigh((projected + projected.T) / 2)
    order = torch.argsort(values, descending=True)
    values, coords = values[order], coords[:, order]
    eigvectors = (q @ coords).T
    eigproducts = (hq @ coords).T
    residuals = torch.linalg.vector_norm(eigproducts - values[:, None] * eigvectors, dim=1)
    return values, eigvectors.to(vectors.dtype), relative_residual(residuals, values)
