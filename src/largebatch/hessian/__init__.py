"""Curvature of the loss: Hessian-vector products and the solvers built on them.

- :class:`HessianOperator`: the Hessian of (model, loss, fixed data) as a linear operator,
  optionally restricted to some parameters and all-reduced over torch.distributed ranks.
- :func:`top_eigenvalues`, :func:`hessian_trace`, :func:`spectral_density`: take a model
  with its loss and data, an operator, or a dense symmetric matrix.
- :class:`EigenTracker`: the top eigenvalue during training, warm-started and on a budget.
"""

from largebatch.hessian.batches import as_batches, sample_count
from largebatch.hessian.dense import dense_hessian
from largebatch.hessian.density import spectral_density
from largebatch.hessian.distributed import shard_batch
from largebatch.hessian.eigen import EIGEN_METHODS, top_eigenvalues
from largebatch.hessian.linear_operator import DenseOperator, LinearOperator, operator_for
from largebatch.hessian.model_state import ModelStateSnapshot, preserved_model_state
from largebatch.hessian.operator import (
    HVP_METHODS,
    HessianOperator,
    HessianOperatorError,
    NondeterministicHessianError,
    NoSecondDerivativeError,
    math_attention,
)
from largebatch.hessian.params import flatten, select_parameters, unflatten
from largebatch.hessian.results import DensityResult, EigenResult, TraceResult
from largebatch.hessian.trace import TRACE_METHODS, hessian_trace
from largebatch.hessian.tracker import EigenTracker, TrackerResult

__all__ = [
    "EIGEN_METHODS",
    "HVP_METHODS",
    "TRACE_METHODS",
    "DenseOperator",
    "DensityResult",
    "EigenResult",
    "EigenTracker",
    "HessianOperator",
    "HessianOperatorError",
    "NoSecondDerivativeError",
    "math_attention",
    "LinearOperator",
    "ModelStateSnapshot",
    "NondeterministicHessianError",
    "TraceResult",
    "TrackerResult",
    "as_batches",
    "dense_hessian",
    "flatten",
    "hessian_trace",
    "operator_for",
    "preserved_model_state",
    "sample_count",
    "select_parameters",
    "shard_batch",
    "spectral_density",
    "top_eigenvalues",
    "unflatten",
]
