"""Top eigenvalues of a symmetric operator: Lanczos (default), power iteration, and the
reference code's power iteration."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from largebatch import checks
from largebatch.hessian.batches import Data
from largebatch.hessian.krylov import (
    LanczosProcess,
    RitzPairs,
    orthogonalize,
    rayleigh_ritz,
    relative_residual,
    vector_norm,
)
from largebatch.hessian.linear_operator import (
    CountingOperator,
    OperatorLike,
    make_generator,
    operator_for,
    rademacher,
)
from largebatch.hessian.operator import LossFn
from largebatch.hessian.results import EigenResult

__all__ = ["EIGEN_METHODS", "STOP_RULES", "error_bounds", "top_eigenvalues"]

EIGEN_METHODS = ("lanczos", "power", "reference")

#: Stopping rules of ``"lanczos"``: on the eigenvalue's error bound, or on the residual.
STOP_RULES = ("error", "residual")

#: The share of the gap seen between Ritz values that the error bound trusts; see
#: :func:`error_bounds`.
GAP_TRUST = 0.5

#: Smallest Lanczos basis; the default is ``max(MIN_KRYLOV_DIM, 2 k + 8)`` vectors.
MIN_KRYLOV_DIM = 20

#: A cold start may miss an eigenvector whose component in the random start vector is
#: below this fraction of a typical component (for Gaussian-like components, a chance of
#: about 0.8 times this fraction); see :func:`_hidden_ruled_out`.
HIDDEN_FRACTION = 1e-3

InitVectors = torch.Tensor | Sequence[torch.Tensor]


def top_eigenvalues(
    target: OperatorLike | nn.Module,
    loss_fn: LossFn | None = None,
    data: Data | None = None,
    *,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    method: str = "lanczos",
    init: InitVectors | None = None,
    seed: int | None = None,
    krylov_dim: int | None = None,
    operator_options: Mapping[str, Any] | None = None,
    min_steps: int | None = None,
    verify: bool = True,
    stop: str = "error",
) -> EigenResult:
    """The ``k`` largest (algebraic) eigenvalues of the Hessian, with eigenvectors.

    Call as ``top_eigenvalues(model, loss_fn, data, ...)`` or ``top_eigenvalues(op, ...)``
    with an operator or a dense symmetric matrix.

    Args:
        k: number of eigenpairs.
        tol: the relative accuracy asked of each eigenvalue. With ``stop="error"`` (the
            default) a pair may stop once its eigenvalue's error bound (see ``stop``) is at
            most ``tol * |l|``; its eigenvector is then accurate to about ``sqrt(tol)``
            (angle in radians, times ``sqrt(|l| / gap)``), and its relative residual may be
            as large, about ``sqrt(tol * gap / |l|)``. With ``stop="residual"``: once the
            relative residual ``|H v - l v| / |l|`` is at most ``tol``, which bounds the
            eigenvalue's error by ``tol`` as well but costs more products. Method
            ``"power"`` always stops on the residual; ``"reference"``: when the
            eigenvalue's relative change between two iterations is below ``tol`` (the
            reference code uses 1e-2).
        max_iter: ``"lanczos"``: at most this many Lanczos steps (products), plus ``k``
            products to measure the final residuals with ``verify``.
            ``"power"``/``"reference"``: at most this many iterations (products) per
            eigenpair; ``"power"`` spends up to twice that on a pair whose dominant
            eigenvalue is negative (it then shifts).
        method: ``"lanczos"`` (full reorthogonalization, thick restart), ``"power"``
            (power iteration with deflation, the reference method, slower) or
            ``"reference"`` (power iteration as the papers' code: largest magnitude,
            stopping on the relative change; pass ``max_iter=10, tol=1e-2`` to match it).
        init: warm start, flat vectors of shape ``(m, dim)`` or ``(dim,)`` (for example a
            previous result's ``vectors``). Lanczos starts from their sum; power iteration
            starts pair i from vector i. Missing ones are random.
        seed: seed of the random start vectors; ``None`` draws one from torch's RNG.
        krylov_dim: Lanczos basis size before a restart (default ``max(20, 2k + 8)``);
            memory is ``krylov_dim + 1`` vectors of ``dim`` entries.
        operator_options: keyword arguments of :class:`HessianOperator` (``params``,
            ``method``, ...) when a model is given.
        min_steps: Lanczos only: steps before convergence may be declared (capped by
            ``max_iter`` and the dimension). Default: 1 with ``init``; on a cold start,
            adaptive. A residual test cannot see an eigenvalue whose eigenvector the
            Krylov space does not hold yet: from a random start with a small component
            along the top eigenvector, a lower eigenvalue can converge first and pass the
            test. A cold start therefore also waits until the Krylov space would have
            amplified any eigenvalue hidden above the converged ones (by more than
            ``tol``) out of the noise, judged from the spectrum seen so far (Chebyshev
            bound, :data:`HIDDEN_FRACTION`), or until it has filled its first basis
            (``krylov_dim`` steps, as ARPACK's initial factorization), whichever comes
            first. On a well-separated spectrum that is well under the basis size; on a
            close pair it is the basis size. Pass an integer to fix the minimum instead.
        verify: Lanczos only: spend ``k`` products to measure the final residuals
            (default). ``False`` takes the products of the Ritz vectors from the Lanczos
            relation ``H V = V T + beta v e^T`` instead, exact up to rounding, and saves
            those ``k`` products.
        stop: Lanczos only. ``"error"``: stop on the eigenvalue's error bound. A Ritz
            value ``theta`` with residual norm ``r`` is within ``r`` of an eigenvalue, and
            within ``r^2 / gap`` of it when no other eigenvalue lies within ``gap``
            (Kato-Temple). The gap is estimated from the other Ritz values: half the
            distance to the nearest one less that one's residual norm (see
            :func:`error_bounds`); a gap no larger than ``r`` is not trusted (the bound is
            then ``r``), and with no other Ritz value the bound is ``r``. The bound is an
            estimate, as the gap is: an eigenvalue the Krylov space has not seen yet may
            lie closer (the cold-start rule of ``min_steps`` guards against one hidden
            above the top, for either rule). ``"residual"``: stop on the relative
            residual (the rule of earlier versions, and the one :class:`EigenTracker`
            uses).

    Returns:
        :class:`EigenResult`; the model's mode, buffers and ``.grad`` are as they were.
        ``residuals`` are the true relative residuals; ``error_bounds`` the relative error
        bounds ``min(r, r^2 / gap) / |l|`` (Lanczos; power iteration: the residuals);
        ``converged`` says whether the rule of ``stop`` holds for every pair.

    Note:
        Single-vector Lanczos may miss a copy of an exactly repeated eigenvalue; use
        ``method="power"`` if that matters.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {EIGEN_METHODS}")
    if stop not in STOP_RULES:
        raise ValueError(f"unknown stop rule {stop!r}; choose one of {STOP_RULES}")
    k = checks.integer(k, "top_eigenvalues", "k", minimum=1)
    max_iter = checks.integer(max_iter, "top_eigenvalues", "max_iter", minimum=1)
    tol = checks.number(tol, "top_eigenvalues", "tol", low=0.0, low_open=True)
    if method == "lanczos" and max_iter < k:
        raise ValueError(f"Lanczos needs max_iter >= k, got max_iter={max_iter}, k={k}")
    with operator_for(target, loss_fn, data, operator_options) as op:
        if k > op.dim:
            raise ValueError(f"k={k} exceeds the dimension {op.dim}")
        generator = make_generator(op, seed)
        starts = _init_rows(init, op)
        if method == "lanczos":
            size = krylov_dim or max(MIN_KRYLOV_DIM, 2 * k + 8)
            if min_steps is None and starts is not None:
                min_steps = 1
            vectors, products, gaps = _lanczos(
                op, k, tol, max_iter, starts, generator, size, min_steps, verify, stop
            )
            change_converged = True
        else:
            vectors, products, change_converged = _power(
                op, k, tol, max_iter, starts, generator, reference=method == "reference"
            )
            gaps = None
        values, vectors, residuals = rayleigh_ritz(vectors, products)
        bounds = residuals
        if gaps is not None:  # the gaps are those of the last Lanczos Ritz values
            norms = residuals * values.abs()
            bounds = relative_residual(_bound(norms, gaps.flip(0)), values)
        if method == "reference":
            converged = change_converged
        else:
            converged = bool(((bounds if stop == "error" else residuals) <= tol).all())
        return EigenResult(values, vectors, residuals, op.matvecs, converged, method, bounds)


def _init_rows(init: InitVectors | None, op: CountingOperator) -> torch.Tensor | None:
    if init is None:
        return None
    rows = init if isinstance(init, torch.Tensor) else torch.stack(list(init))
    rows = rows.reshape(-1, op.dim) if rows.dim() == 1 else rows
    if rows.dim() != 2 or rows.shape[1] != op.dim:
        raise ValueError(f"init must have shape (m, {op.dim}), got {tuple(rows.shape)}")
    return rows.detach().to(dtype=op.dtype, device=op.device)


def _lanczos(
    op: CountingOperator,
    k: int,
    tol: float,
    max_steps: int,
    starts: torch.Tensor | None,
    generator: torch.Generator,
    krylov_dim: int,
    min_steps: int | None,
    verify: bool,
    stop: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k Ritz vectors to ``tol`` (estimated error bound or residual, per ``stop``),
    their products (true ones if ``verify``, else from the Lanczos relation) and the gaps
    of their Ritz values (ascending, see :func:`error_bounds`). ``min_steps=None``:
    adaptive cold rule."""
    start = _warm_start(starts, op, generator)
    process = LanczosProcess(op, start, max(krylov_dim, k + 2), generator)
    keep = min(max(k + 1, process.max_size // 2), process.max_size - 1)
    steps = 0
    while True:
        process.step()
        steps += 1
        if process.size >= k:
            pairs = process.ritz()
            if stop == "error":
                measure = error_bounds(pairs.theta, pairs.estimates, k)
            else:
                measure = pairs.estimates[-k:]
            small = relative_residual(measure, pairs.theta[-k:]) <= tol
            if min_steps is None:
                safe = steps >= krylov_dim or _hidden_ruled_out(pairs, steps, k, tol, op.dim)
            else:
                safe = steps >= min_steps
            settled = bool(small.all()) and safe
            if process.exhausted or settled or steps >= max_steps:
                break
        if process.full:
            process.restart(keep)
    coords = pairs.coords[:, -k:]
    vectors = process.ritz_vectors(coords)
    gaps = _gaps(pairs.theta, pairs.estimates, k)
    if verify:
        return vectors, torch.stack([op.matvec(v) for v in vectors]), gaps
    return vectors, process.ritz_products(pairs.theta[-k:], coords), gaps


def error_bounds(theta: torch.Tensor, residuals: torch.Tensor, k: int) -> torch.Tensor:
    """Error bounds (absolute) of the ``k`` largest of the Ritz values ``theta``
    (ascending), given their residual norms ``residuals`` (same order, absolute).

    A Ritz value ``theta_i`` with residual norm ``r_i`` is within ``r_i`` of an
    eigenvalue, and within ``r_i^2 / gap_i`` of it if no other eigenvalue lies within
    ``gap_i > r_i`` of ``theta_i`` (Kato-Temple). The gap is estimated from the other
    Ritz values: the distance to the nearest one less that one's residual norm, times
    :data:`GAP_TRUST`. The margin is there because a Ritz value approaches its eigenvalue
    from inside the spectrum: after few Lanczos steps (a warm start) the Ritz value below
    ``theta_i`` can lie well below the eigenvalue it will converge to, and the full
    distance then overstated the gap (the dense tests measured bounds up to 1.9 times too
    small; with the margin, none). A gap no larger than ``r_i``, or none (a single Ritz
    value), gives the bound ``r_i``. Returns shape ``(k,)``, ascending like ``theta``.
    """
    return _bound(residuals[-k:], _gaps(theta, residuals, k))


def _gaps(theta: torch.Tensor, residuals: torch.Tensor, k: int) -> torch.Tensor:
    """Estimated gap of each of the ``k`` largest Ritz values to the rest of the
    spectrum (``-inf`` when there is no other Ritz value); see :func:`error_bounds`."""
    distance = (theta[-k:, None] - theta[None, :]).abs() - residuals[None, :]
    own = torch.arange(len(theta) - k, len(theta))
    distance[torch.arange(k), own] = math.inf  # not its own neighbour
    gaps = GAP_TRUST * distance.min(dim=1).values
    return torch.where(torch.isinf(gaps), torch.full_like(gaps, -math.inf), gaps)


def _bound(residuals: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
    """``r^2 / gap`` where the gap is larger than ``r``, else ``r`` (elementwise)."""
    trusted = gaps > residuals
    quadratic = residuals.square() / torch.where(trusted, gaps, torch.ones_like(gaps))
    return torch.where(trusted, quadratic, residuals)


def _hidden_ruled_out(pairs: RitzPairs, steps: int, k: int, tol: float, dim: int) -> bool:
    """Whether ``steps`` Lanczos steps would have brought out an eigenvalue hidden above
    the top Ritz value ``theta_1`` by more than ``tol`` relative.

    The Krylov space holds ``p(H) b`` for every polynomial of degree ``steps - 1``. Give
    one root to each converged Ritz value (relative residual at most ``sqrt(tol)``) and
    use the rest for a Chebyshev polynomial on ``[theta_min, theta_u]``, ``theta_u`` the
    first unconverged Ritz value: the unconverged part stays at most 1 in size while a
    hidden eigenvalue ``l > theta_1 (1 + tol)`` grows by at least ``T_m(x)``,
    ``x = 1 + 2 (theta_1 - theta_u) / (theta_u - theta_min)``, and loses at most a
    factor ``tol |theta_1| / (theta_1 - theta_min)`` to the root at ``theta_1``. Its
    start component is about ``1 / sqrt(dim)`` of the start vector; one below
    :data:`HIDDEN_FRACTION` of that may stay hidden. Ritz values lie inside the spectrum,
    so ``x`` is an estimate, not a bound; the dense test of a close pair hiding from the
    start vector checks the margin.
    """
    theta = pairs.theta
    if len(theta) < k + 2:
        return False
    converged = relative_residual(pairs.estimates, theta) <= math.sqrt(tol)
    count = k
    while count < len(theta) - 1 and bool(converged[-count - 1]):
        count += 1
    top, unconverged, bottom = float(theta[-1]), float(theta[-count - 1]), float(theta[0])
    degree = steps - count - 1
    if degree < 1 or top <= unconverged or unconverged <= bottom or top == 0:
        return False
    x = 1 + 2 * (top - unconverged) / (unconverged - bottom)
    needed = math.sqrt(dim) / HIDDEN_FRACTION * (top - bottom) / (tol * abs(top))
    return math.cosh(degree * math.acosh(x)) >= needed


def _warm_start(
    starts: torch.Tensor | None, op: CountingOperator, generator: torch.Generator
) -> torch.Tensor:
    # The sum of k near-eigenvectors spans them all within k Krylov steps.
    if starts is not None:
        norms = torch.linalg.vector_norm(starts, dim=1, keepdim=True, dtype=torch.float64)
        norms = norms.to(starts.dtype)
        combined = (starts / norms.clamp_min(torch.finfo(op.dtype).tiny)).sum(dim=0)
        if torch.isfinite(combined).all() and torch.linalg.vector_norm(combined) > 0:
            return combined
    return rademacher(1, op, generator)[0]


def _power(
    op: CountingOperator,
    k: int,
    tol: float,
    max_iter: int,
    starts: torch.Tensor | None,
    generator: torch.Generator,
    reference: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Power iteration with deflation; returns vectors, their products, all converged."""
    found: list[torch.Tensor] = []
    products: list[torch.Tensor] = []
    all_converged = True
    for index in range(k):
        start = starts[index] if starts is not None and index < len(starts) else None
        vector, product, converged = _power_pair(
            op, start, found, tol, max_iter, generator, shift=0.0, reference=reference
        )
        value = float(vector.double() @ product.double())
        if value < 0 and not reference:
            # The dominant eigenvalue is negative; shifting by it makes the largest
            # algebraic eigenvalue the dominant one.
            vector, product, converged = _power_pair(
                op, None, found, tol, max_iter, generator, shift=value, reference=False
            )
        found.append(vector)
        products.append(product)
        all_converged = all_converged and converged
    return torch.stack(found), torch.stack(products), all_converged


def _power_pair(
    op: CountingOperator,
    start: torch.Tensor | None,
    found: list[torch.Tensor],
    tol: float,
    max_iter: int,
    generator: torch.Generator,
    shift: float,
    reference: bool,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Iterate ``v <- P (H - shift) v / norm`` with P projecting out ``found``."""
    basis = torch.stack(found) if found else None
    vector = _unit(_deflate(start if start is not None else rademacher(1, op, generator)[0], basis))
    previous: float | None = None
    for iteration in range(max_iter):
        product = op.matvec(vector)
        value = float(vector.double() @ product.double())
        if reference:
            done = previous is not None and abs(value - previous) <= tol * abs(previous)
        else:
            residual = torch.linalg.vector_norm((product - value * vector).double())
            done = bool(relative_residual(residual, torch.tensor(value)) <= tol)
        following = _deflate(product - shift * vector, basis)
        if done or iteration == max_iter - 1 or not bool(following.any()):
            return vector, product, done
        previous = value
        vector = _unit(following)
    raise AssertionError("unreachable")


def _deflate(vector: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    return vector if basis is None else orthogonalize(vector, basis)[0]


def _unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector_norm(vector)
