"""Measurements taken during training, as meters with fixed hooks.

A controller declares the measurements it may ask for (``controller.measures``) and, at
each decision point, the ones it wants now (``controller.wants``). The loop builds one
meter per declared measurement and calls the hooks of those that are wanted:

- :meth:`Meter.after_backward` after each micro-batch's backward pass (its gradient is
  in ``.grad``, accumulated with the earlier micro-batches of the update);
- :meth:`Meter.at_slice` instead, under torchrun, for a meter that asks for it
  (:meth:`Meter.reads_slice`): the squared norm of this rank's gradient, taken before
  the ranks' gradients meet;
- :meth:`Meter.at_update` once the update's gradient is complete, before the step;
- :meth:`Meter.at_decision` at a decision point; it returns the numbers for the
  metrics records, and :meth:`Meter.told` makes of them what the controller is told.

Before a decision point the loop starts from each meter's :meth:`Meter.empty`, the record
of a point where that meter did not measure, so a record holds the same keys whether or
not a meter was wanted there.

A meter's state is plain data with ``state_dict()``/``load_state_dict()``, so it joins the
checkpoint and a run resumes exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from largebatch import checks, inputs
from largebatch.distributed import World, all_reduce_, shard
from largebatch.errors import InvalidTypeError, InvalidValueError, StateError
from largebatch.hessian import EigenTracker, HessianOperatorError, preserved_model_state
from largebatch.lr import critical_lr, is_adaptive

__all__ = [
    "Meter",
    "Point",
    "CurvatureMeter",
    "GradientNoiseMeter",
    "SharpnessMeter",
    "preconditioner",
    "update_direction",
    "EIGENVALUE",
    "NOISE_SCALE",
    "time_of",
    "noise_estimates",
    "reads_micro_batches",
]

#: the measurement the curvature meter provides
EIGENVALUE = "eigenvalue"
#: the measurement the gradient-noise meter provides
NOISE_SCALE = "gns"


@dataclass(frozen=True)
class Point:
    """Where training stands at a hook: epochs finished, samples seen (cumulative), and
    whether this decision point is an epoch's end."""

    epoch: int
    samples: int
    epoch_end: bool


class Meter:
    """Base class: every hook does nothing."""

    #: keys :meth:`at_decision` always returns (None when not measured), for the records
    record_keys: tuple[str, ...] = ()
    #: :meth:`at_decision` takes Hessian-vector products: it gets the model whole (under
    #: ``parallel: fsdp``, a copy at the current weights)
    whole_model = False

    def plan(self, batch: int, micro: int, window: int | None) -> tuple[int, int]:
        """How the loop should run updates of ``batch`` samples for this meter:
        ``(micro-batch, stride)``. The per-update hooks are called on every ``stride``-th
        update of the run (counted from its first), and those updates run in micro-batches
        of at most the returned size. ``micro`` is the run's own micro-batch, ``window``
        the samples between decision points (None: an epoch). The base class takes every
        update as the loop runs it."""
        return micro, 1

    def after_backward(self, model: nn.Module, samples: int, batch_samples: int) -> None:
        """A micro-batch of ``samples`` of the update's ``batch_samples`` is in ``.grad``."""

    def reads_slice(self, batch_samples: int) -> bool:
        """Whether, in an update of ``batch_samples``, this meter reads :meth:`at_slice`
        instead of :meth:`after_backward` (every rank must answer the same)."""
        return False

    def at_slice(self, sq_norm: torch.Tensor | None, samples: int, batch_samples: int) -> None:
        """Under torchrun, when :meth:`reads_slice`: this rank's slice of ``samples`` of
        the update's ``batch_samples`` gave a gradient, weighted by ``samples /
        batch_samples``, of squared 2-norm ``sq_norm`` (float64; None when the slice is
        empty), taken before the ranks' gradients met."""

    def at_update(self, model: nn.Module, point: Point) -> None:
        """The update's gradient is complete (all ranks summed), before the optimizer step."""

    def at_decision(self, model: nn.Module, point: Point) -> dict[str, Any]:
        """Numbers for the metrics record (and, through :meth:`told`, the controller) at a
        decision point."""
        return {}

    @classmethod
    def empty(cls) -> dict[str, Any]:
        """The record of a decision point where this meter did not measure: each of
        :attr:`record_keys` with None."""
        return dict.fromkeys(cls.record_keys)

    def told(self, numbers: Mapping[str, Any]) -> dict[str, Any]:
        """What the controller is told of ``numbers`` (this meter's :meth:`at_decision`
        at a decision point): by default the numbers themselves."""
        return dict(numbers)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


def reads_micro_batches(meter: Meter, batch_samples: int) -> bool:
    """Whether ``meter`` reads the gradient after each micro-batch of an update of
    ``batch_samples`` (it overrides :meth:`Meter.after_backward` and does not read
    :meth:`Meter.at_slice` instead): under torchrun it must see this rank's own
    gradients, so that update's gradients meet only after its backward passes."""
    overrides = type(meter).after_backward is not Meter.after_backward
    return overrides and not meter.reads_slice(batch_samples)


class CurvatureMeter(Meter):
    """The top Hessian eigenvalue, from an :class:`~largebatch.hessian.EigenTracker` on a
    fixed probe set: at every ``every_epochs``-th epoch end (and, with ``every_samples``,
    only once that many samples have passed since the last estimate, so short epochs do
    not pay for an estimate each), and at any decision point inside an epoch where a
    controller wants it.

    ``usable_eigenvalue`` in the returned numbers is what a controller may act on (and
    :meth:`told` hands it over as ``eigenvalue``): None when the estimate failed, is not
    finite, or (``strict``) did not reach its tolerance within the budget, so a bad
    estimate keeps the batch where it is. ``eigenvalue`` is whatever finite value was
    computed, for the records. With ``strict=False`` (the reference code's 10 power
    iterations) an unconverged estimate is used as it is.
    """

    record_keys = (
        "eigenvalue",
        "eig_residual",
        "eig_matvecs",
        "eig_converged",
        "eig_s",
        "eig_error",
    )
    whole_model = True

    def __init__(
        self,
        tracker: EigenTracker,
        every_epochs: int = 1,
        strict: bool = True,
        every_samples: int | None = None,
    ) -> None:
        who = type(self).__name__
        if not isinstance(tracker, EigenTracker):
            raise InvalidTypeError(
                f"{who}: tracker must be an EigenTracker, got {type(tracker).__name__}"
            )
        self.tracker = tracker
        self.every_epochs = checks.integer(every_epochs, who, "every_epochs", minimum=1)
        self.every_samples = _optional_int(every_samples, who, "every_samples", 1)
        self.strict = strict
        self.last_samples: int | None = None  # samples seen at the last estimate

    @classmethod
    def empty(cls) -> dict[str, Any]:
        """The record of a decision point where nothing was estimated (no matrix-vector
        products, no time; ``usable_eigenvalue``, for :meth:`told`, None)."""
        return {
            "eigenvalue": None,
            "eig_residual": None,
            "eig_matvecs": 0,
            "eig_converged": None,
            "eig_s": 0.0,
            "eig_error": None,
            "usable_eigenvalue": None,
        }

    def at_decision(self, model: nn.Module, point: Point) -> dict[str, Any]:
        record = self.empty()
        # at epoch ends every `every_epochs`, and at least `every_samples` apart; at a
        # point inside an epoch whenever wanted
        if point.epoch_end and (point.epoch + 1) % self.every_epochs:
            return record
        since = None if self.last_samples is None else point.samples - self.last_samples
        if point.epoch_end and self.every_samples and since is not None:
            if since < self.every_samples:
                return record
        self.last_samples = point.samples
        started = time.perf_counter()
        try:
            result = self.tracker.estimate(model)
        except HessianOperatorError as exc:
            record.update(eig_s=time.perf_counter() - started, eig_error=str(exc))
            return record
        value = result.eigenvalue
        finite = math.isfinite(value)
        record.update(
            eigenvalue=value if finite else None,
            eig_residual=float(result.residuals[0]),
            eig_matvecs=result.matvecs,
            eig_converged=bool(result.converged),
            eig_s=time.perf_counter() - started,
        )
        if finite and (result.converged or not self.strict):
            record["usable_eigenvalue"] = value
        return record

    def told(self, numbers: Mapping[str, Any]) -> dict[str, Any]:
        """The numbers, with ``eigenvalue`` the one a controller may act on: the usable
        eigenvalue (None when the estimate failed, is not finite, or was not converged
        under ``strict``)."""
        return {**numbers, EIGENVALUE: numbers.get("usable_eigenvalue")}

    def state_dict(self) -> dict[str, Any]:
        return checks.tagged(
            type(self).__name__,
            {"tracker": self.tracker.state_dict(), "last_samples": self.last_samples},
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if isinstance(state, Mapping) and "generator" in state:
            self.tracker.load_state_dict(state)  # from before: the tracker's state alone
            return
        who = type(self).__name__
        state = checks.state_of(state, who, ("tracker", "last_samples"))
        last = _optional_int(state["last_samples"], f"{who}.load_state_dict", "last_samples", 0)
        self.tracker.load_state_dict(state["tracker"])
        self.last_samples = last


def time_of(record: Mapping[str, Any]) -> float:
    """Seconds a meter's record says it spent (its ``*_s`` fields)."""
    return float(sum(v for k, v in record.items() if k.endswith("_s") and v))


class GradientNoiseMeter(Meter):
    """The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018),
    from the gradients of parts of the update that accumulation computes anyway.

    Let an update's mean gradient ``g`` come from ``B`` samples, and ``g_k`` be the mean
    gradients of some parts of it, of ``b_k`` samples each (at least two parts in all).
    Since ``E|g_k|^2 = |G|^2 + tr(Sigma) / b_k`` and ``E|g|^2 = |G|^2 + tr(Sigma) / B``,
    two unbiased estimates follow, with ``m`` the mean of the measured ``|g_k|^2`` and
    ``b`` the harmonic mean of the ``b_k`` (their common size when equal):

    - ``|G|^2 ~ (B |g|^2 - b m) / (B - b)``;
    - ``tr(Sigma) ~ b B (m - |g|^2) / (B - b)`` (per-sample covariance).

    With ``K`` parts of ``b`` making up the whole update (``B = K b``) these are
    ``(K |g|^2 - m) / (K - 1)`` and ``b K (m - |g|^2) / (K - 1)``.
    Each is smoothed by a bias-corrected exponential moving average and the noise scale
    is the ratio of the two averages, which is far less noisy than the average of
    ratios. ``decay`` is per update of the run: when every ``stride``-th update is
    measured, each measurement decays the averages by ``decay ** stride``, so they span
    the same stretch of training whatever the stride. Updates with a non-finite gradient
    (an fp16 overflow that the loss scaler will skip) are ignored.

    **Which parts** (the small batch ``b``). A part is ``p = micro_batch`` samples, or
    ``B / splits`` rounded up when ``micro_batch`` is None (default: half the batch):

    - one process: consecutive micro-batches of the update, read when they hold ``p``
      samples (at most ``B / 2``; a difference of two gradient copies); only the first
      ``per_update`` parts are read (in sample order), and a short part at the end of
      the update is not;
    - under torchrun, when no rank's slice holds more than ``p`` samples (the default on
      any number of processes): each rank's slice is one part, ``b = B / ranks``, read
      as the squared norm of the rank's gradient before the ranks' gradients meet (in
      DDP's communication hook, or before the flat all-reduce): no copy, no extra
      micro-batch, and under ``ddp`` the update still overlaps its all-reduce with the
      backward pass. Every slice counts. So the small batch is ``B / 2`` on 1 and on 2
      processes (the same samples: 1 and 2 processes estimate alike) and ``B / 4`` on 4
      processes (the same expectation, a different spread);
    - under torchrun with slices larger than ``p`` (a ``micro_batch`` below ``B /
      ranks``), or with ``slices=False``: parts inside each rank's slice, as in one
      process, the first ``per_update`` of the global batch in rank order (so the same
      parts as one process when the slices hold whole parts); that update's gradients
      meet only after its backward passes, one all-reduce of three numbers more.

    What it costs is set by :meth:`plan`: a measured update runs in micro-batches of at
    most ``p`` samples (the loop cuts it further when the run's micro-batches are
    larger; never under torchrun when the slices are the parts, and at least two
    micro-batches in one process). When a decision window holds ``2 * per_window``
    updates or more, only every ``stride``-th update is measured, so that about
    ``per_window`` are (``per_window=None``: every update).

    Which updates are measured depends only on the update count, the batch and the
    window, so ranks agree and a resumed run measures the same updates. Under fp16 loss
    scaling the gradients it sees are scaled: both parts are then in scaled units, and
    their ratio, the noise scale, is unaffected.

    **Under Adam** (``optimizer`` an Adam-type one, :func:`largebatch.lr.is_adaptive`),
    the same estimate is also taken on the gradients as the optimizer scales them,
    divided elementwise by its ``sqrt(v) + eps`` (bias-corrected, from its state before
    the update: :func:`preconditioner`), as adaptdl measures it and McCandlish et al.
    suggest; recorded as ``gns_preconditioned`` beside the plain ``gns``. It is taken
    from the parts of one process or of the micro-batches inside a rank's slice, not
    from whole slices (``gns_preconditioned`` stays None there) nor before the
    optimizer's first step.
    """

    record_keys = (
        "gns", "gns_grad_sq", "gns_trace", "gns_updates", "gns_s", "gns_preconditioned",
    )  # fmt: skip

    def __init__(
        self,
        micro_batch: int | None = None,
        decay: float = 0.95,
        world: Any = None,
        splits: int = 2,
        per_update: int = 2,
        per_window: int | None = 4,
        slices: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        who = type(self).__name__
        self.micro_batch = _optional_int(micro_batch, who, "micro_batch", 1)
        self.decay = checks.number(decay, who, "decay", low=0.0, high=1.0, high_open=True)
        self.splits = checks.integer(splits, who, "splits", minimum=2)
        self.per_update = checks.integer(per_update, who, "per_update", minimum=1)
        self.per_window = _optional_int(per_window, who, "per_window", 1)
        self.slices = checks.boolean(slices, who, "slices")
        self.world = world
        self.optimizer = optimizer if optimizer is not None and is_adaptive(optimizer) else None
        # the preconditioned estimate's averages (|G|^2, tr(Sigma), weight)
        self.pre = [0.0, 0.0, 0.0]
        self._reset_update()
        # state: bias-corrected EMAs of |G|^2 and tr(Sigma), and their weight
        self.grad_sq = 0.0
        self.trace = 0.0
        self.weight = 0.0
        self.updates = 0
        self.seconds = 0.0
        #: the last measured update's own (|G|^2, tr(Sigma)), before the averages
        self.last: tuple[float, float] | None = None
        self._stride = 1  # of the updates now being measured (set by plan)

    def _reset_update(self) -> None:
        self._previous: torch.Tensor | None = None  # the gradient at the last part's end
        self._sum_sq: torch.Tensor | float = 0.0  # this rank's sum of |g_k|^2
        self._count = 0  # of parts measured on this rank
        self._inverse = 0.0  # this rank's sum of 1 / b_k
        self._part: int | None = None  # the update's part size (set by its first hook)
        self._filled = 0  # samples in the part now being accumulated
        self._batch = 0  # the update's global batch
        self._limit = self.per_update  # of this rank's parts, those measured
        self._scale: torch.Tensor | None = None  # 1 / (sqrt(v) + eps), flat (Adam)
        self._pre_sq: torch.Tensor | float = 0.0  # this rank's sum of |g_k / P|^2

    def part_size(self, batch: int) -> int:
        """``p``: the samples of a part of an update of ``batch`` samples (``micro_batch``
        or ``batch / splits`` rounded up)."""
        return self.micro_batch or -(-batch // self.splits)

    def _ranks(self) -> int:
        world = self.world
        return world.size if world is not None and getattr(world, "enabled", False) else 1

    def reads_slice(self, batch_samples: int) -> bool:
        ranks = self._ranks()
        if not self.slices or ranks < 2:
            return False
        return -(-batch_samples // ranks) <= self.part_size(batch_samples)

    def plan(self, batch: int, micro: int, window: int | None) -> tuple[int, int]:
        if self.reads_slice(batch):
            size = micro  # each rank's slice is a part: nothing to cut
        else:  # at least two micro-batches
            size = max(1, min(micro, self.part_size(batch), batch // 2))
        stride = 1
        if self.per_window is not None and window is not None:
            stride = max(1, (window // batch) // self.per_window)
        self._stride = stride
        return size, stride

    def after_backward(self, model: nn.Module, samples: int, batch_samples: int) -> None:
        if self._part is None:  # the update's first micro-batch; at least two parts
            self._part = max(1, min(self.part_size(batch_samples), batch_samples // 2))
            self._batch = batch_samples
            self._limit = self.per_update - self._full_before(batch_samples, self._part)
            self._scale = self._inverse_preconditioner(model)
        if self._count >= self._limit:
            return  # enough of this update's parts measured
        self._filled += samples
        if self._filled < self._part:
            return  # the part goes on
        started = time.perf_counter()
        flat = _flat_grad(model)
        if flat is None:
            return
        # the part's backward passes added (filled / batch_samples) * g_k to .grad;
        # kept on the device, summed without a sync until the update
        step = flat if self._previous is None else self._previous.sub_(flat)
        norm = _norm(step).double().square()
        self._sum_sq = self._sum_sq + norm * (batch_samples / self._filled) ** 2
        if self._scale is not None:
            pre = _norm(step * self._scale).double().square()
            self._pre_sq = self._pre_sq + pre * (batch_samples / self._filled) ** 2
        self._count += 1
        self._inverse += 1.0 / self._filled
        self._previous, self._filled = flat, 0
        self.seconds += time.perf_counter() - started

    def at_slice(self, sq_norm: torch.Tensor | None, samples: int, batch_samples: int) -> None:
        self._batch = batch_samples
        if sq_norm is None or samples == 0:
            return  # an empty slice measures nothing
        self._sum_sq = sq_norm.double() * (batch_samples / samples) ** 2
        self._count, self._inverse = 1, 1.0 / samples

    def _full_before(self, batch: int, size: int) -> int:
        """The whole parts of ``size`` in the slices of the ranks before this one, which
        come first in a global batch of ``batch`` samples (as torch.tensor_split cuts)."""
        count = self._ranks()
        if count == 1:
            return 0
        rank = self.world.rank
        slices = [batch // count + (1 if r < batch % count else 0) for r in range(rank)]
        return sum(piece // size for piece in slices)

    def at_update(self, model: nn.Module, point: Point) -> None:
        started = time.perf_counter()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        device = _device_of(model)
        batch = self._batch
        parts = torch.stack(
            [
                torch.as_tensor(self._sum_sq, dtype=torch.float64, device=device),
                torch.tensor(float(self._count), dtype=torch.float64, device=device),
                torch.tensor(self._inverse, dtype=torch.float64, device=device),
                _total_norm(grads).double().square()
                if grads
                else torch.zeros((), dtype=torch.float64, device=device),
            ]
        )
        scale = self._scale
        pre_sq = torch.as_tensor(self._pre_sq, dtype=torch.float64, device=device)
        self._reset_update()
        if self._ranks() > 1:
            import torch.distributed as dist

            # the full gradient is already summed over the ranks: all-reduce the first three
            dist.all_reduce(parts[:3])
        if scale is not None and grads:
            full = torch.cat([g.reshape(-1) for g in grads])
            pre_full = _norm(full * scale).double().square()
        if self._ranks() > 1 and scale is not None:
            import torch.distributed as dist

            dist.all_reduce(pre_sq)  # the full gradient is summed over the ranks already
        sum_sq, count, inverse, full_sq = parts.tolist()
        # skip an update with fewer than two measured parts
        if not grads or count < 2 or not 0 < count / inverse < batch:
            self.seconds += time.perf_counter() - started
            return
        grad_sq, trace = noise_estimates(full_sq, sum_sq / count, count / inverse, batch)
        decay = self.decay**self._stride
        if math.isfinite(grad_sq) and math.isfinite(trace):
            self.last = (grad_sq, trace)
            self.grad_sq = decay * self.grad_sq + (1 - decay) * grad_sq
            self.trace = decay * self.trace + (1 - decay) * trace
            self.weight = decay * self.weight + (1 - decay)
            self.updates += 1
        if scale is not None:
            pre = noise_estimates(float(pre_full), float(pre_sq) / count, count / inverse, batch)
            if all(math.isfinite(v) for v in pre):
                self.pre = [
                    decay * a + (1 - decay) * v for a, v in zip(self.pre, (*pre, 1.0), strict=True)
                ]
        self.seconds += time.perf_counter() - started

    def _inverse_preconditioner(self, model: nn.Module) -> torch.Tensor | None:
        """``1 / (sqrt(v) + eps)`` of the optimizer, flat in the order of the model's
        gradients; None without an Adam-type optimizer or before its first step."""
        if self.optimizer is None:
            return None
        params = [p for p in model.parameters() if p.grad is not None]
        scales = preconditioner(self.optimizer, params)
        if any(s is None for s in scales):
            return None
        return torch.cat([s.reshape(-1) for s in scales]).reciprocal()  # type: ignore[union-attr]

    def estimate(self) -> tuple[float | None, float | None, float | None]:
        """``(noise scale, |G|^2, tr(Sigma))`` from the averages so far (None before any)."""
        if self.weight == 0:
            return None, None, None
        grad_sq, trace = self.grad_sq / self.weight, self.trace / self.weight
        scale = trace / grad_sq if grad_sq > 0 else math.inf
        return scale, grad_sq, trace

    def preconditioned(self) -> float | None:
        """The noise scale of the gradients as Adam scales them (None without one)."""
        grad_sq, trace, weight = self.pre
        if weight == 0:
            return None
        return trace / grad_sq if grad_sq > 0 else math.inf

    def at_decision(self, model: nn.Module, point: Point) -> dict[str, Any]:
        scale, grad_sq, trace = self.estimate()
        seconds, self.seconds = self.seconds, 0.0
        return {
            "gns": scale,
            "gns_grad_sq": grad_sq,
            "gns_trace": trace,
            "gns_updates": self.updates,
            "gns_s": seconds,
            "gns_preconditioned": self.preconditioned(),
        }

    def state_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in ("grad_sq", "trace", "weight", "updates")}
        values["preconditioned"] = list(self.pre)
        who = type(self).__name__
        return checks.tagged(who, checks.plain(values, f"{who}.state_dict()"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the averages; a damaged state (not finite, a negative weight or count)
        is refused, changing nothing."""
        who = type(self).__name__
        state = checks.state_of(
            state, who, ("grad_sq", "trace", "weight", "updates"), optional=("preconditioned",)
        )
        where = f"{who}.load_state_dict"
        pre = state.get("preconditioned", [0.0, 0.0, 0.0])  # older states: none yet
        if not isinstance(pre, (list, tuple)) or len(pre) != 3:
            raise StateError(f"{where}: preconditioned must be 3 numbers, got {pre!r}")
        pre = [checks.number(v, where, "preconditioned") for v in pre]
        # the estimates of |G|^2 and tr(Sigma) may be negative, their weight may not
        grad_sq = checks.number(state["grad_sq"], where, "grad_sq")
        trace = checks.number(state["trace"], where, "trace")
        weight = checks.number(state["weight"], where, "weight", low=0.0)
        updates = checks.integer(state["updates"], where, "updates", minimum=0)
        self.grad_sq, self.trace, self.weight, self.updates = grad_sq, trace, weight, updates
        self.pre = pre


def preconditioner(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]
) -> list[torch.Tensor | None]:
    """Per parameter, what ``optimizer`` divides its gradient by (None: nothing, as SGD):
    ``sqrt(v) + eps`` for Adam-type optimizers (:func:`largebatch.lr.is_adaptive`), with
    ``v`` the bias-corrected second moment in their state (``exp_avg_sq``; None before
    their first step)."""
    if not is_adaptive(optimizer):
        return [None] * len(params)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    found: list[torch.Tensor | None] = []
    for param in params:
        group, state = group_of.get(id(param), {}), optimizer.state.get(param, {})
        if "exp_avg_sq" in state and "step" in state:
            beta2 = float(group.get("betas", (0.9, 0.999))[1])
            second = state["exp_avg_sq"] / (1.0 - beta2 ** float(state["step"]))
            found.append(second.sqrt() + float(group.get("eps", 1e-8)))
        else:
            found.append(None)
    return found


def update_direction(
    optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The direction of ``optimizer``'s step per unit LR for the gradients ``grads`` of
    ``params``: ``-g`` for SGD-type optimizers, ``-g / (sqrt(v) + eps)`` for Adam-type
    ones (:func:`preconditioner`). Momentum is left out: the gauge asks what the
    landscape does to a step along this batch's gradient."""
    return [
        -grad if scale is None else -grad / scale
        for grad, scale in zip(grads, preconditioner(optimizer, params), strict=True)
    ]


class SharpnessMeter(Meter):
    """The stability gauge: the sharpness along an update direction on a fixed probe
    set, from three forward passes (no Hessian products).

    The direction ``u`` is the optimizer's step (:func:`update_direction`: ``-g``, or
    ``-g`` preconditioned by Adam's second moment) for the gradient ``g`` of the first
    ``batch`` samples of the probe (``batch``: the run's, or the one asked for): like a
    training update it carries the batch's noise, whose sharp components are what turn a
    step unstable, and a larger batch gives a less noisy direction. The sharpness along
    it is the symmetric second difference of the whole probe's loss over the step the
    optimizer would take, ``eta u`` (``eta``: the LR, or the one asked for)::

        s = (L(theta + eta u) + L(theta - eta u) - 2 L(theta)) / (eta^2 u.P.u)

    with ``P`` the optimizer's preconditioner (the identity for SGD, ``sqrt(v) + eps``
    for Adam: ``s`` is then the preconditioned sharpness). On a quadratic of Hessian
    ``H`` it is ``u.H.u / u.P.u`` at any ``eta``, the curvature along the step; on a
    network it is the secant curvature over the step itself, so what the loss does at
    that LR counts. Gradient descent along ``u`` turns unstable at ``eta s = 2``.
    (The step at which the loss along ``u`` stops falling, the *critical step*, was
    tried first and is no gauge of stability: along a noisy batch's step near the noise
    floor it is far shorter than any unstable step; on a regression whose curvature is
    2 everywhere, it read limits of 0.10 and 0.67 where the true one is 1.)

    Recorded at a decision point: ``sharpness`` (``s``), ``critical_lr`` (the largest
    stable LR that ``s`` gives the optimizer, :func:`largebatch.lr.critical_lr`; None
    when ``s <= 0``), the forward passes and the seconds. The model's mode, buffers,
    weights and ``.grad`` are as they were afterwards. The passes run in eval mode
    except for batch norm, which uses the batch statistics, as training does: with its
    running statistics a step that scales the weights before a batch norm is not
    renormalised, and the gauge read such steps far sharper than training found them
    (on a batch-norm convnet it tempered 11 growths that ran stably without it). With
    batch norm every rank runs the whole probe, so that the statistics are those of one
    process.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        probe: ``(inputs, targets)`` pairs on the model's device, the same on every rank:
            under torchrun each rank runs its contiguous share of every pair and the
            losses and gradients are summed, so any number of processes reads the same.
        optimizer: whose direction, preconditioner and limit are gauged.
        world: the process group (:class:`~largebatch.distributed.World`; None: one
            process).
    """

    record_keys = ("sharpness", "critical_lr", "sharp_evals", "sharp_s")

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        probe: Sequence[tuple[torch.Tensor, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        world: World | None = None,
    ) -> None:
        who = type(self).__name__
        if not callable(loss_fn):
            raise InvalidTypeError(f"{who}: loss_fn must be callable")
        self.loss_fn, self.optimizer, self.world = loss_fn, optimizer, world or World()
        self.probe = [(x, y) for x, y in probe if len(y)]
        if not self.probe:
            raise InvalidValueError(f"{who}: the probe set holds no sample")
        self.samples = sum(len(y) for _, y in self.probe)
        self._whole = False  # set per reading: batch norm makes every rank run it whole
        self.batch: int | None = None  # the run's batch (set by plan)

    def plan(self, batch: int, micro: int, window: int | None) -> tuple[int, int]:
        self.batch = batch
        return micro, 1

    def _ranks(self) -> World:
        """The ranks that share the probe; one process while batch norm runs on batch
        statistics (every rank then runs the whole probe, as one process would)."""
        return World() if self._whole else self.world

    def _mean_loss(self, model: nn.Module, samples: int) -> torch.Tensor:
        """The mean loss of the probe's first ``samples``, summed over the ranks' shares
        (a graph on this rank's share)."""
        total, left = None, samples
        for x, y in self.probe:
            x, y = inputs.rows(x, slice(None, left)), y[:left]
            left -= len(y)
            x, y = inputs.each(x, lambda t: shard(t, self._ranks())), shard(y, self._ranks())
            if len(y):
                term = self.loss_fn(inputs.run(model, x), y).double() * len(y)
                total = term if total is None else total + term
            if left <= 0:
                break
        if total is None:  # no sample on this rank
            total = torch.zeros((), dtype=torch.float64)
        return total / (samples - max(left, 0))

    def _probe_loss(self, model: nn.Module) -> float:
        with torch.no_grad():
            loss = self._mean_loss(model, self.samples).detach().reshape(1).cpu()
        return float(all_reduce_(loss, self._ranks())[0])

    def _direction(
        self, model: nn.Module, params: list[nn.Parameter], batch: int
    ) -> list[torch.Tensor]:
        """The optimizer's direction for the gradient of the probe's first ``batch``."""
        loss = self._mean_loss(model, batch)
        found = (
            torch.autograd.grad(loss, params, allow_unused=True)
            if loss.requires_grad
            else (None,) * len(params)
        )
        grads = [  # every rank sums every gradient (an unused one is zero)
            all_reduce_(torch.zeros_like(p) if g is None else g, self._ranks())
            for p, g in zip(params, found, strict=True)
        ]
        return update_direction(self.optimizer, params, grads)

    def measure(
        self,
        model: nn.Module,
        batch: int | None = None,
        direction: Sequence[torch.Tensor] | None = None,
        step: float | None = None,
    ) -> tuple[float, int]:
        """``(sharpness, forward passes of the probe)`` along ``direction`` (one tensor
        per trainable parameter), or along the optimizer's direction for a batch of
        ``batch`` samples (None: the run's batch, or half the probe before the run
        planned one; at most the whole probe), over the step ``step`` (None: the LR)."""
        params = [p for p in model.parameters() if p.requires_grad]
        eta = checks.number(
            step or float(self.optimizer.param_groups[0]["lr"]),
            type(self).__name__, "step", low=0.0, low_open=True,
        )  # fmt: skip
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._whole = bool(norms)
        with preserved_model_state(model):
            for norm in norms:  # batch statistics, as training sees them (buffers restored)
                norm.train()
            if direction is None:
                size = batch or self.batch or max(1, self.samples // 2)
                direction = self._direction(model, params, min(size, self.samples))
            scales = preconditioner(self.optimizer, params)
            metric = sum(
                float((d * d).sum() if p is None else (d * d * p).sum())
                for d, p in zip(direction, scales, strict=True)
            )
            saved = [p.detach().clone() for p in params]
            losses = []
            try:
                for t in (0.0, eta, -eta):
                    with torch.no_grad():
                        for p, start, d in zip(params, saved, direction, strict=True):
                            p.copy_(start).add_(d, alpha=t)
                    losses.append(self._probe_loss(model))
            finally:
                with torch.no_grad():
                    for p, start in zip(params, saved, strict=True):
                        p.copy_(start)
        base, plus, minus = losses
        if metric <= 0:  # no step at all (a zero gradient)
            return 0.0, len(losses)
        return (plus + minus - 2 * base) / (eta * eta * metric), len(losses)

    def at_decision(self, model: nn.Module, point: Point) -> dict[str, Any]:
        started = time.perf_counter()
        sharpness, evaluations = self.measure(model)
        stable = math.isfinite(sharpness) and sharpness > 0
        return {
            "sharpness": sharpness if math.isfinite(sharpness) else None,
            "critical_lr": critical_lr(sharpness, self.optimizer) if stable else None,
            "sharp_evals": evaluations,
            "sharp_s": time.perf_counter() - started,
        }


def noise_estimates(
    full_sq: float, mean_sq: float, micro: float, batch: int
) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from one update (McCandlish et al. 2018): the squared
    norm ``full_sq`` of its mean gradient over ``batch`` samples and the mean ``mean_sq``
    of the squared norms of its gradients over parts of ``micro`` samples (``0 < micro <
    batch``; the harmonic mean of the parts' sizes when they differ). Their ratio
    estimates the noise scale ``tr(Sigma) / |G|^2``."""
    grad_sq = (batch * full_sq - micro * mean_sq) / (batch - micro)
    trace = micro * batch * (mean_sq - full_sq) / (batch - micro)
    return grad_sq, trace


def _optional_int(value: Any, who: str, field: str, minimum: int) -> int | None:
    """None, or an integer >= ``minimum``."""
    return None if value is None else checks.integer(value, who, field, minimum=minimum)


def _flat_grad(model: nn.Module) -> torch.Tensor | None:
    """All gradients as one flat tensor (a copy)."""
    grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    return torch.cat(grads) if grads else None


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, without concatenating them (of the whole
    gradient when they are sharded, ``parallel: fsdp``: a collective then)."""
    if any(g.dtype not in (torch.float32, torch.float64) for g in grads):
        grads = [g.float() for g in grads]
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _norm(flat: torch.Tensor) -> torch.Tensor:
    """The 2-norm, summed in at least float32 (a float64 sum of a float32 vector converts
    every element first, which on a small model costs more than the backward pass)."""
    return torch.linalg.vector_norm(flat, dtype=torch.promote_types(flat.dtype, torch.float32))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
