"""One owner for the learning rate: a factor times each param group's own base LR.

Batch scaling, milestone decay, warm-up and the divergence guard's rollback scale are all
factors; :class:`LRScaler` multiplies each param group's base LR by their product, so an
optimizer with per-group LRs (a smaller LR for the embeddings, say) keeps its ratios while
the batch grows. The base LRs live in the param groups themselves (key ``base_lr``), so
they travel in ``optimizer.state_dict()`` and a resumed run scales the same bases.

This module also owns the rules that make the factors: the batch-scaling rules
(:func:`scaling_factor`), the milestone schedule (:func:`milestones_reached`,
:func:`step_decay`) and heavy-ball stability (:func:`stability_limit`, :func:`stability`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from largebatch import checks
from largebatch.errors import InvalidTypeError, InvalidValueError, StateError

__all__ = [
    "LRScaler",
    "BASE_LR_KEY",
    "lrs_kept",
    "SCALING_RULES",
    "ADAPTIVE_OPTIMIZERS",
    "scaling_factor",
    "rule_for",
    "milestones_reached",
    "step_decay",
    "stability_limit",
    "stability",
    "momentum_of",
    "is_adaptive",
    "critical_lr",
    "tempered_factor",
]

#: where each param group keeps the LR that factors multiply
BASE_LR_KEY = "base_lr"


@contextlib.contextmanager
def lrs_kept(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Put each param group's ``lr`` back as it was on entry when the block ends, however
    it ends, and take away the ``base_lr`` that a run keeps there: a run scales and decays
    the LRs of the optimizer it is given, and a second run with the same optimizer (an
    instance, or a factory that returns one it closes over) must start from the LRs the
    user set, not from where the first run left them."""
    missing = object()
    before = [(g, g["lr"], g.get(BASE_LR_KEY, missing)) for g in optimizer.param_groups]
    try:
        yield
    finally:
        for group, lr, base in before:
            group["lr"] = lr
            if base is missing:
                group.pop(BASE_LR_KEY, None)
            else:
                group[BASE_LR_KEY] = base


#: LR scaling rules for a batch ``scale`` times the base batch (see :func:`scaling_factor`)
SCALING_RULES = ("linear", "sqrt", "adascale")

#: Optimizers that divide by a running second moment of the gradient (Adam's family and
#: its relatives). Their LR scales with the square root of the batch: the SDE view of
#: adaptive methods (Malladi et al. 2022) gives sqrt scaling where it gives linear for SGD.
ADAPTIVE_OPTIMIZERS = (
    "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "SparseAdam", "Adafactor", "Adagrad",
    "Adadelta", "RMSprop",
)  # fmt: skip


def rule_for(rule: str, optimizer: torch.optim.Optimizer | None) -> str:
    """The LR scaling rule in force: ``rule`` itself, or for ``"auto"`` the rule of the
    optimizer's family: ``sqrt`` for an adaptive optimizer (one of
    :data:`ADAPTIVE_OPTIMIZERS`, a subclass of one, or any optimizer whose defaults carry
    Adam's ``betas``), ``linear`` for SGD and anything else (None: the default SGD)."""
    if rule != "auto":
        return checks.choice(rule, "rule_for", "rule", SCALING_RULES)
    if optimizer is None:
        return "linear"
    return "sqrt" if is_adaptive(optimizer) else "linear"


def is_adaptive(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` divides by a running second moment of the gradient: one of
    :data:`ADAPTIVE_OPTIMIZERS`, a subclass of one, or any optimizer whose defaults carry
    Adam's ``betas``."""
    family = {cls.__name__ for cls in type(optimizer).__mro__}
    return bool(family & set(ADAPTIVE_OPTIMIZERS)) or "betas" in optimizer.defaults


def scaling_factor(rule: str, scale: float, noise_scale: float | None, base_batch: int) -> float:
    """LR factor for a batch ``scale`` times ``base_batch``.

    - ``linear``: ``scale`` (Goyal et al.);
    - ``sqrt``: ``sqrt(scale)`` (Krizhevsky; Hoffer et al.);
    - ``adascale``: the gain ``r = scale (phi + B0) / (phi + scale B0)`` with ``phi`` the
      gradient noise scale (Johnson et al., AdaScale): close to ``scale`` while the batch
      is small against ``phi``, close to 1 once it is far above. It is AdaScale's
      ``(sigma^2 + |G|^2) / (sigma^2 / scale + |G|^2)`` with ``sigma^2 = tr(Sigma) / B0``
      and ``phi = tr(Sigma) / |G|^2``, each estimate clamped at 0 as AdaScale does. So at
      the limits: ``phi = inf`` (the meter's reading when the measured ``|G|^2`` is zero
      or negative: pure noise) gives ``scale``; ``phi <= 0`` (a trace measured at zero or
      below) gives 1. Without a measurement (None or NaN) it is 1.

    ``scale`` must be finite and > 0, ``base_batch`` an integer >= 1.
    """
    checks.choice(rule, "scaling_factor", "rule", SCALING_RULES)
    scale = checks.number(scale, "scaling_factor", "scale", low=0.0, low_open=True)
    base_batch = checks.integer(base_batch, "scaling_factor", "base_batch", minimum=1)
    if rule == "linear":
        return scale
    if rule == "sqrt":
        return math.sqrt(scale)
    if noise_scale is None or math.isnan(noise_scale) or noise_scale <= 0:  # adascale
        return 1.0
    if math.isinf(noise_scale):  # |G|^2 clamped at 0: all noise
        return scale
    return scale * (noise_scale + base_batch) / (noise_scale + scale * base_batch)


def milestones_reached(epoch: float, milestones: Iterable[float]) -> int:
    """How many of ``milestones`` the 0-based ``epoch`` (whole or fractional) has reached.

    A milestone ``m`` is reached from epoch index ``m`` on (the (m+1)-th epoch). Every
    milestone schedule counts through this: :func:`step_decay`, the batch growth of
    ``IncreaseBatchInsteadOfDecay`` and the decay of ``NoiseScaleBatch``.
    """
    return sum(1 for m in milestones if epoch >= m)


def step_decay(epoch: float, milestones: Iterable[float], decay: float) -> float:
    """LR factor at 0-based ``epoch``: ``decay`` to the number of milestones reached."""
    return decay ** milestones_reached(epoch, milestones)


def _edge(momentum: float) -> float:
    """``2 (1 + momentum)``: the curvature times LR at which heavy-ball SGD turns unstable
    along the top eigenvector of a quadratic. The one place of the stability formula."""
    return 2.0 * (1.0 + momentum)


def stability_limit(eigenvalue: float, momentum: float) -> float:
    """The largest stable LR of heavy-ball SGD on a quadratic of top curvature
    ``eigenvalue`` (finite, > 0): ``2 (1 + momentum) / eigenvalue``; ``momentum`` in
    [0, 1)."""
    eigenvalue = checks.number(eigenvalue, "stability_limit", "eigenvalue", low=0.0, low_open=True)
    momentum = checks.number(
        momentum, "stability_limit", "momentum", low=0.0, high=1.0, high_open=True
    )
    return _edge(momentum) / eigenvalue


def stability(eigenvalue: float | None, lr: float, momentum: float) -> float | None:
    """``eigenvalue * lr / (2 (1 + momentum))``: where ``lr`` stands against the stability
    limit of heavy-ball SGD on a quadratic of that top curvature (1 is the limit,
    :func:`stability_limit`); None without an eigenvalue.

    The metrics records' ``stability``. Unchecked, since a measured eigenvalue may be
    zero or negative; written as a product rather than ``lr / stability_limit(...)``,
    which would round differently.
    """
    if eigenvalue is None:
        return None
    return eigenvalue * lr / _edge(momentum)


def critical_lr(sharpness: float, optimizer: torch.optim.Optimizer) -> float:
    """The largest stable LR of ``optimizer`` given the ``sharpness`` along its update
    direction (:class:`largebatch.meters.SharpnessMeter`, finite and > 0):

    - SGD-type (heavy ball, momentum ``m``): :func:`stability_limit` with the sharpness
      in place of the top eigenvalue, ``2 (1 + m) / s``;
    - Adam-type (:func:`is_adaptive`, ``betas = (b1, b2)``), with ``s`` the
      preconditioned sharpness: ``(2 + 2 b1) / ((1 - b1) s)``, where adaptive methods
      were seen to train at the edge of stability (Cohen et al. 2022, "Adaptive gradient
      methods at the edge of stability").
    """
    sharpness = checks.number(sharpness, "critical_lr", "sharpness", low=0.0, low_open=True)
    group = optimizer.param_groups[0]
    if is_adaptive(optimizer) and "betas" in group:
        beta1 = float(group["betas"][0])
        return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * sharpness)
    return stability_limit(sharpness, momentum_of(optimizer))


def tempered_factor(before: float, proposed: float, limit: float | None) -> float:
    """The LR factor a growth may take (the stability safeguard's rule): ``proposed``,
    capped at ``limit`` (the factor of the largest stable LR the gauge read for the
    grown batch, :func:`critical_lr`; None: no reading, nothing capped), but never
    below ``before``, the factor in force before the growth: the safeguard tempers the
    LR's rise, it does not cut the LR the run was training at."""
    if limit is None or proposed <= before:
        return proposed
    return max(before, min(proposed, limit))


def momentum_of(optimizer: torch.optim.Optimizer) -> float:
    """The first param group's ``momentum`` (0 for an optimizer without one)."""
    return float(optimizer.param_groups[0].get("momentum", 0.0) or 0.0)


class LRScaler:
    """Applies an LR factor to every param group of ``optimizer``.

    Args:
        optimizer: any ``torch.optim.Optimizer``. Each group's ``lr`` when the scaler is
            made becomes its base (unless the group already has one, as after loading a
            state dict saved with it).
        scheduler: optional ``torch.optim.lr_scheduler`` object of the caller's. Then the
            bases are the scheduler's latest LRs (``get_last_lr()``); step it through
            :meth:`step_scheduler`, which lets it work on the unscaled LRs (most
            schedulers multiply the group's current LR, which would compound the factor).

    Example::

        scaler = LRScaler(optimizer)
        decision = controller.decision()
        scaler.apply(decision.lr_factor)      # lr = base_lr * factor, per group
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        who = type(self).__name__
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidTypeError(
                f"{who}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if scheduler is not None and not callable(getattr(scheduler, "get_last_lr", None)):
            raise InvalidTypeError(
                f"{who}: scheduler must be a torch.optim.lr_scheduler object (with "
                f"get_last_lr), got {type(scheduler).__name__}"
            )
        self.optimizer = optimizer
        self.scheduler = scheduler
        for group in optimizer.param_groups:
            group.setdefault(BASE_LR_KEY, float(group["lr"]))
        self.factor = 1.0

    def bases(self) -> list[float]:
        """Each group's unscaled LR."""
        if self.scheduler is not None:
            return [float(lr) for lr in self.scheduler.get_last_lr()]
        return [float(group[BASE_LR_KEY]) for group in self.optimizer.param_groups]

    def apply(self, factor: float) -> None:
        """Set every group's LR to its base times ``factor`` (finite, > 0)."""
        self.factor = checks.number(
            factor, f"{type(self).__name__}.apply", "factor", low=0.0, low_open=True
        )
        for group, base in zip(self.optimizer.param_groups, self.bases(), strict=True):
            group["lr"] = base * self.factor

    def step_scheduler(self) -> None:
        """``scheduler.step()`` on the unscaled LRs, then the factor again."""
        if self.scheduler is None:
            raise InvalidValueError(
                f"{type(self).__name__}.step_scheduler: this LRScaler was made without a scheduler"
            )
        for group, base in zip(self.optimizer.param_groups, self.bases(), strict=True):
            group["lr"] = base
        self.scheduler.step()
        self.apply(self.factor)

    def state_dict(self) -> dict[str, Any]:
        return checks.tagged(type(self).__name__, {"factor": self.factor, "bases": self.bases()})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s state: the factor, and (without a scheduler)
        the bases, one finite LR >= 0 per param group. A damaged state changes nothing."""
        who = type(self).__name__
        where = f"{who}.load_state_dict"
        state = checks.state_of(state, who, ("factor", "bases"))
        factor = checks.number(state["factor"], where, "factor", low=0.0, low_open=True)
        bases = state["bases"]
        groups = len(self.optimizer.param_groups)
        if not isinstance(bases, (list, tuple)) or len(bases) != groups:
            got = f"{len(bases)}" if isinstance(bases, (list, tuple)) else type(bases).__name__
            raise StateError(
                f"{where}: bases must be a list of {groups} LRs, one per param group, got {got}"
            )
        bases = [checks.number(b, where, f"bases[{i}]", low=0.0) for i, b in enumerate(bases)]
        if self.scheduler is None:
            for group, base in zip(self.optimizer.param_groups, bases, strict=True):
                group[BASE_LR_KEY] = base
        self.apply(factor)
