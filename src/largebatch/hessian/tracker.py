"""The top Hessian eigenvalue during training: warm-started, on a budget, resumable."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from largebatch import checks
from largebatch.errors import InvalidTypeError, InvalidValueError, StateError
from largebatch.hessian.batches import Data, check_finite, is_pair
from largebatch.hessian.eigen import EIGEN_METHODS, top_eigenvalues
from largebatch.hessian.operator import HessianOperator, LossFn

__all__ = ["REFERENCE_MAX_ITER", "REFERENCE_TOL", "EigenTracker", "TrackerResult"]

#: The papers' reference code: at most 10 power iterations, stopping when the
#: eigenvalue's relative change is below 1e-2, from a new random vector every time.
REFERENCE_MAX_ITER = 10
REFERENCE_TOL = 1e-2
#: the largest seed a torch.Generator takes
_SEED_LIMIT = 2**64 - 1


@dataclass
class TrackerResult:
    """One estimate.

    Attributes:
        values: float64 ``(k,)``, top eigenvalues, largest first.
        residuals: float64 ``(k,)``, relative residuals ``|H v - l v| / |l|`` (the error
            bar: the eigenvalue is off by at most about ``residual * |l|``).
        matvecs: Hessian-vector products spent (the cost).
        seconds: wall time of the estimate, graph building included.
        converged: the stopping rule was met within the budget.
        warm_started: started from the previous estimate's eigenvectors.
    """

    values: torch.Tensor
    residuals: torch.Tensor
    matvecs: int
    seconds: float
    converged: bool
    warm_started: bool

    @property
    def eigenvalue(self) -> float:
        """The top eigenvalue as a float."""
        return float(self.values[0])

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers for JSON (metrics files)."""
        return {
            "eigenvalue": self.eigenvalue,
            "values": self.values.tolist(),
            "residuals": self.residuals.tolist(),
            "matvecs": self.matvecs,
            "seconds": self.seconds,
            "converged": self.converged,
            "warm_started": self.warm_started,
        }


class EigenTracker:
    """Estimates the top Hessian eigenvalue(s) of a model on a probe set, call after call.

    Each :meth:`estimate` starts from the eigenvectors found by the previous one (when
    ``warm_start`` and the parameter count is unchanged), so after a short stretch of
    training a few products suffice. It stops on the relative residual ``tol`` or after
    ``max_matvecs`` products, and reports both. Under torch.distributed every rank must
    call :meth:`estimate` (products are all-reduced) with its own shard of the probe set;
    all ranks get the same result.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, mean loss of a batch.
        data: probe set, one ``(inputs, targets)`` pair or an iterable of pairs (under
            torch.distributed: this rank's shard, see :func:`shard_batch`).
        k: eigenpairs to track.
        tol: relative residual to reach.
        max_matvecs: most products per estimate, a final residual check included
            (``"lanczos"`` needs at least ``k``, ``2 k`` with ``verify``). ``"power"``
            spends at most ``max_matvecs // k`` iterations per pair, twice that for a pair
            whose dominant eigenvalue is negative.
        method: ``"lanczos"``, ``"power"``, or ``"reference"``: the papers' reference code
            (cold random start every time, plain power iteration, at most 10 iterations,
            stop when the relative change is below 1e-2; ``tol``, ``max_matvecs`` and
            ``warm_start`` are then ignored).
        warm_start: reuse the last eigenvectors as the start.
        seed: seed of the tracker's own random stream (start vectors).
        operator_options: keyword arguments of :class:`HessianOperator` (``params``,
            ``method``, ``eval_mode``, ...).
        verify: ``"lanczos"``: spend ``k`` more products to measure the final residuals
            with true products. The default takes them from the Lanczos relation (exact up
            to rounding, see :func:`top_eigenvalues`), which saves those products.
        min_steps: ``"lanczos"``: steps before convergence may be declared; default
            adaptive on a cold start (the first estimate, or after :meth:`reset`: until
            the spectrum seen rules out a hidden larger eigenvalue, at most the basis
            size) and 1 on a warm one (see :func:`top_eigenvalues`).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        data: Data,
        k: int = 1,
        tol: float = 1e-3,
        max_matvecs: int = 100,
        method: str = "lanczos",
        warm_start: bool = True,
        seed: int = 0,
        operator_options: Mapping[str, Any] | None = None,
        verify: bool = False,
        min_steps: int | None = None,
    ) -> None:
        who = type(self).__name__
        if not callable(loss_fn):
            raise InvalidTypeError(f"{who}: loss_fn must be callable, got {type(loss_fn).__name__}")
        if operator_options is not None and not isinstance(operator_options, Mapping):
            raise InvalidTypeError(
                f"{who}: operator_options must be a dict, got {type(operator_options).__name__}"
            )
        method = checks.choice(method, who, "method", EIGEN_METHODS)
        k = checks.integer(k, who, "k", minimum=1)
        least = 2 * k if method == "lanczos" and verify else k
        max_matvecs = checks.integer(max_matvecs, who, "max_matvecs")
        if max_matvecs < least:
            raise InvalidValueError(
                f"{who}: {method} with k={k} needs max_matvecs >= {least}, got {max_matvecs}"
            )
        if is_pair(data) or isinstance(data, (list, tuple)):  # in memory: checked now
            for index, pair in enumerate([data] if is_pair(data) else data):
                if is_pair(pair):
                    check_finite(pair, index, who)
        self.loss_fn = loss_fn
        self.data = data
        self.k = k
        self.tol = checks.number(tol, who, "tol", low=0.0, low_open=True)
        self.max_matvecs = max_matvecs
        self.method = method
        self.warm_start = warm_start and method != "reference"
        self.operator_options = dict(operator_options or {})
        self.verify = verify
        if min_steps is not None:
            min_steps = checks.integer(min_steps, who, "min_steps", minimum=1)
        self.min_steps = min_steps
        self.last: TrackerResult | None = None
        self._vectors: torch.Tensor | None = None
        self._generator = torch.Generator()
        self._generator.manual_seed(
            checks.integer(seed, who, "seed", minimum=0, maximum=_SEED_LIMIT)
        )

    @property
    def vectors(self) -> torch.Tensor | None:
        """The last eigenvectors, flat, shape ``(k, dim)`` on the CPU, or None."""
        return self._vectors

    def estimate(self, model: nn.Module, data: Data | None = None) -> TrackerResult:
        """Top eigenvalue(s) of ``model``'s loss Hessian on the probe set (or ``data``).

        The model's train/eval mode, buffers and ``.grad`` are left as they were.
        """
        started = time.perf_counter()
        seed = int(torch.randint(0, 2**62, (1,), generator=self._generator).item())
        probe = self.data if data is None else data
        with HessianOperator(model, self.loss_fn, probe, **self.operator_options) as op:
            usable = self._vectors is not None and self._vectors.shape[1] == op.dim
            init = self._vectors if self.warm_start and usable else None
            result = top_eigenvalues(op, init=init, seed=seed, **self._solver_settings())
        self._vectors = result.vectors.detach().cpu()
        self.last = TrackerResult(
            values=result.values,
            residuals=result.residuals,
            matvecs=result.matvecs,
            seconds=time.perf_counter() - started,
            converged=result.converged,
            warm_started=init is not None,
        )
        return self.last

    def reset(self) -> None:
        """Forget the eigenvectors: the next estimate starts cold."""
        self._vectors = None

    def state_dict(self) -> dict[str, Any]:
        """Eigenvectors and random state, so a resumed run estimates exactly the same."""
        return checks.tagged(
            type(self).__name__,
            {
                "k": self.k,
                "method": self.method,
                "vectors": self._vectors,
                "generator": self._generator.get_state(),
            },
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; a damaged state changes nothing.

        Raises:
            StateError: a state saved by a tracker with another ``k`` or method, or not
                a tracker's state (a ``ValueError``).
        """
        who = type(self).__name__
        where = f"{who}.load_state_dict"
        state = checks.state_of(state, who, ("k", "method", "vectors", "generator"))
        if state["k"] != self.k or state["method"] != self.method:
            raise StateError(
                f"{where}: the state is for k={state['k']!r}, method={state['method']!r}; "
                f"this tracker has k={self.k}, method={self.method!r}"
            )
        vectors = state["vectors"]
        if vectors is not None and not (
            isinstance(vectors, torch.Tensor)
            and vectors.is_floating_point()
            and vectors.dim() == 2
            and len(vectors) == self.k
        ):
            raise StateError(
                f"{where}: vectors must be None or a float tensor of {self.k} rows, got "
                f"{getattr(vectors, 'shape', type(vectors).__name__)}"
            )
        try:  # on a scratch generator first, so a bad state changes nothing
            torch.Generator().set_state(state["generator"])
        except (RuntimeError, TypeError) as exc:
            reason = " ".join(str(exc).split())[:160]
            raise StateError(f"{where}: generator is not a generator state ({reason})") from None
        self._vectors = None if vectors is None else vectors.detach().cpu().clone()
        self._generator.set_state(state["generator"])

    def _solver_settings(self) -> dict[str, Any]:
        if self.method == "reference":
            return {
                "k": self.k,
                "tol": REFERENCE_TOL,
                "max_iter": REFERENCE_MAX_ITER,
                "method": "reference",
            }
        if self.method == "power":
            return {
                "k": self.k,
                "tol": self.tol,
                "max_iter": self.max_matvecs // self.k,
                "method": "power",
            }
        return {
            "k": self.k,
            "tol": self.tol,
            "max_iter": self.max_matvecs - self.k if self.verify else self.max_matvecs,
            "method": "lanczos",
            "verify": self.verify,
            "min_steps": self.min_steps,
            # the tracker's tol is a residual (its records and CurvatureMeter's strict
            # test rely on that meaning), not top_eigenvalues' default error bound
            "stop": "residual",
        }
