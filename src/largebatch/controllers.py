"""Batch-size controllers: schedulers for the global batch, the LR factor and the
adversarial fraction.

A controller is told what was measured at a decision point (:meth:`step`) and answers
with a :class:`Decision` from there on. Decision points are the epochs' ends and, for a
controller with ``decide_every`` set, every that many samples in between. A controller
declares the measurements it may ask for (``measures``) and those it wants now
(``wants``); the loop runs only those meters (:mod:`largebatch.meters`). Its state is
plain numbers, with ``state_dict()`` and ``load_state_dict()``, so a run resumes exactly.

Constructors, the ``decide_every`` setter and ``load_state_dict`` check what they get
(:mod:`largebatch.checks`); :func:`checked_decision` checks what a controller answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from largebatch import checks
from largebatch.errors import InvalidTypeError, InvalidValueError
from largebatch.lr import (
    SCALING_RULES,
    milestones_reached,
    scaling_factor,
    stability_limit,
    step_decay,  # re-exported: its home is largebatch.lr
)

__all__ = [
    "Decision",
    "BatchController",
    "FixedBatch",
    "LinearScalingWarmup",
    "IncreaseBatchInsteadOfDecay",
    "AdaptiveBatch",
    "NoiseScaleBatch",
    "GROWTH_RULES",
    "progress_efficiency",
    "Seesaw",
    "ScheduledBatch",
    "parse_schedule",
    "CurvatureGuard",
    "step_decay",
    "checked_decision",
]

#: a check of one state value: ``check(value, who, field)`` returns it, or raises
Check = Callable[[Any, str, str], Any]
_COUNT: Check = partial(checks.integer, minimum=0)
_SIZE: Check = partial(checks.integer, minimum=1)
_FRACTION: Check = partial(checks.number, low=0.0, high=1.0)
_POSITIVE: Check = partial(checks.number, low=0.0, low_open=True)


def _noise_scale(value: Any, who: str, field: str) -> float:
    """A noise scale: a number >= 0, or infinity (the reading of pure noise)."""
    if isinstance(value, float) and value == math.inf:
        return value
    return checks.number(value, who, field, low=0.0)


def _optional(check: Check) -> Check:
    """``check``, with None allowed."""
    return lambda value, who, field: None if value is None else check(value, who, field)


def _batches(who: str, base: Any, top: Any, top_name: str = "max_batch") -> tuple[int, int]:
    """``(base_batch, top)``: integers with ``1 <= base_batch <= top``."""
    base, top = _SIZE(base, who, "base_batch"), _SIZE(top, who, top_name)
    if top < base:
        raise InvalidValueError(f"{who}: {top_name} must be >= base_batch ({base}), got {top}")
    return base, top


def _schedule(who: str, milestones: Any, decay: Any) -> tuple[tuple[int, ...], float]:
    """``(milestones, decay)``: epoch numbers >= 0, and a decay factor in (0, 1]."""
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise InvalidTypeError(
            f"{who}: milestones must be a sequence of epoch numbers, got "
            f"{type(milestones).__name__}"
        )
    steps = tuple(_COUNT(m, who, f"milestones[{i}]") for i, m in enumerate(milestones))
    return steps, checks.number(decay, who, "decay", low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True)
class Decision:
    """What to do for one epoch.

    batch_size: global batch (samples per optimizer update, over all ranks).
    lr_factor: multiplies the base LR (batch scaling and milestone decay together).
    adv_ratio: fraction of each micro-batch replaced by adversarial examples, in [0, 1].
    """

    batch_size: int
    lr_factor: float
    adv_ratio: float = 0.0


def checked_decision(controller: BatchController, decision: Any) -> Decision:
    """``decision``, answered by ``controller``, checked: a :class:`Decision` with a batch
    of at least 1, a finite LR factor > 0 and an adversarial fraction in [0, 1]; the
    controller's ``decide_every`` is checked too (a class attribute escapes the setter).
    Anything else is an error that names the controller's class."""
    owner = type(controller).__name__
    every = getattr(controller, "decide_every", None)
    if every is not None:
        _SIZE(every, owner, "decide_every")
    who = f"{owner}.decision()"
    if not isinstance(decision, Decision):
        raise InvalidTypeError(f"{who} must return a Decision, got {type(decision).__name__}")
    return Decision(
        _SIZE(decision.batch_size, who, "batch_size"),
        _POSITIVE(decision.lr_factor, who, "lr_factor"),
        _FRACTION(decision.adv_ratio, who, "adv_ratio"),
    )


class BatchController:
    """Interface. ``epoch`` is the 0-based index of the next epoch to run.

    Every controller carries an adversarial fraction (``adv_ratio``, 0 for none) that
    drops to zero for good from epoch ``adv_stop_epoch``; ABSA also shrinks it as the
    batch grows, the baselines keep it constant (adversarial training at fixed batch).
    """

    name = "base"
    #: measurements :meth:`step` may ask for (names of meters, e.g. ``"eigenvalue"``)
    measures: frozenset[str] = frozenset()
    _decide_every: int | None = None

    def __init__(self, adv_ratio: float = 0.0, adv_stop_epoch: int | None = None) -> None:
        who = type(self).__name__
        self.epoch = 0
        self.adv_ratio = _FRACTION(adv_ratio, who, "adv_ratio")
        self.adv_stop_epoch = _optional(_COUNT)(adv_stop_epoch, who, "adv_stop_epoch")
        #: why the latest :meth:`step` changed the batch ("" when it did not)
        self.last_reason = ""

    @property
    def decide_every(self) -> int | None:
        """Samples between decision points inside an epoch (None: at epoch ends only).
        A subclass may set it as a class attribute instead."""
        return self._decide_every

    @decide_every.setter
    def decide_every(self, value: int | None) -> None:
        self._decide_every = _optional(_SIZE)(value, type(self).__name__, "decide_every")

    @property
    def wants(self) -> frozenset[str]:
        """The measurements wanted at the next decision point (a subset of ``measures``)."""
        return self.measures

    @property
    def wants_eigenvalue(self) -> bool:
        return "eigenvalue" in self.wants

    def current_adv_ratio(self) -> float:
        """The adversarial fraction for epoch ``self.epoch``."""
        if self.adv_stop_epoch is not None and self.epoch >= self.adv_stop_epoch:
            return 0.0
        return self.adv_ratio

    def decision(self) -> Decision:
        """The decision for epoch ``self.epoch``."""
        raise NotImplementedError

    def warmup_factor(self, progress: float) -> float:
        """Extra LR factor at fractional epoch ``self.epoch + progress`` (1 without warm-up)."""
        return 1.0

    def step(self, measurements: Mapping[str, Any] | None = None) -> Decision:
        """Record a decision point; return the decision from there on.

        ``measurements`` holds the wanted meters' numbers and ``epoch_end`` (default True):
        at an epoch's end the controller moves on to epoch ``self.epoch + 1``.
        """
        if is_epoch_end(measurements):
            self.epoch += 1
        return self.decision()

    #: the attributes that make up the state, with the check each is loaded through
    #: (``check(value, who, field) -> value``; ``int`` and ``float`` work too)
    state_fields: tuple[tuple[str, Check], ...] = (("epoch", _COUNT),)

    def state_dict(self) -> dict[str, Any]:
        who = type(self).__name__
        values = {name: getattr(self, name) for name, _ in self.state_fields}
        return checks.tagged(who, checks.plain(values, f"{who}.state_dict()"))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # a subclass that adds keys of its own to state_dict() loads those itself
        own_keys = type(self).state_dict is not BatchController.state_dict
        for name, value in self._checked_state(state, extra=own_keys).items():
            setattr(self, name, value)

    def _checked_state(
        self, state: Any, extra: bool = False, more: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The values of :attr:`state_fields` in ``state``, checked (nothing is set); the
        state must hold the keys ``more`` too, and others only with ``extra``."""
        who = type(self).__name__
        names = [name for name, _ in self.state_fields]
        optional = state if extra and isinstance(state, Mapping) else ()
        state = checks.state_of(state, who, [*names, *more], optional=optional)
        where = f"{who}.load_state_dict"
        return {
            name: _as_check(check)(state[name], where, name) for name, check in self.state_fields
        }


def _as_check(check: Check | type) -> Check:
    """A field's check; a plain ``int`` or ``float`` (as subclasses written before the
    checks declared them) is checked as an integer or a finite number, None allowed."""
    if check is int:
        return _optional(checks.integer)
    if check is float:
        return _optional(checks.number)
    return check  # type: ignore[return-value]


def is_epoch_end(measurements: Mapping[str, Any] | None) -> bool:
    """Whether a decision point's measurements mark an epoch's end (the default)."""
    return bool((measurements or {}).get("epoch_end", True))


class FixedBatch(BatchController):
    """``bl``: the base batch throughout, LR decayed at the milestones."""

    name = "bl"

    def __init__(
        self, batch_size: int, milestones: Sequence[int], decay: float, **adversarial: Any
    ) -> None:
        super().__init__(**adversarial)
        self.batch_size = _SIZE(batch_size, type(self).__name__, "batch_size")
        self.milestones, self.decay = _schedule(type(self).__name__, milestones, decay)

    def decision(self) -> Decision:
        lr_factor = step_decay(self.epoch, self.milestones, self.decay)
        return Decision(self.batch_size, lr_factor, self.current_adv_ratio())


class LinearScalingWarmup(BatchController):
    """``fb`` (Goyal et al.): the large batch from the start, LR scaled by ``B / B0``,
    reached by a linear warm-up from the base LR over the first ``warmup_epochs`` epochs."""

    name = "fb"

    def __init__(
        self,
        base_batch: int,
        batch_size: int,
        milestones: Sequence[int],
        decay: float,
        warmup_epochs: int,
        **adversarial: Any,
    ) -> None:
        super().__init__(**adversarial)
        who = type(self).__name__
        self.base_batch, self.batch_size = _batches(who, base_batch, batch_size, "batch_size")
        self.scale = self.batch_size / self.base_batch
        self.milestones, self.decay = _schedule(who, milestones, decay)
        self.warmup_epochs = _COUNT(warmup_epochs, who, "warmup_epochs")

    def decision(self) -> Decision:
        gain = scaling_factor("linear", self.scale, None, self.base_batch)
        lr_factor = gain * step_decay(self.epoch, self.milestones, self.decay)
        return Decision(self.batch_size, lr_factor, self.current_adv_ratio())

    def warmup_factor(self, progress: float) -> float:
        done = (self.epoch + progress) / self.warmup_epochs if self.warmup_epochs else 1.0
        if done >= 1.0:
            return 1.0
        # From the base LR (1 / scale of the target) up to the scaled LR, linearly.
        return (1.0 + done * (self.scale - 1.0)) / self.scale


class IncreaseBatchInsteadOfDecay(BatchController):
    """``gg`` (Smith et al.): at each milestone the batch grows by ``1 / decay`` in place of
    the LR decay, up to the cap; decays that no longer fit in the batch go to the LR.

    When only part of a growth fits under the cap, the LR takes the rest of the factor, so
    the ratio LR / batch follows the step-decay schedule throughout.
    """

    name = "gg"

    def __init__(
        self,
        base_batch: int,
        max_batch: int,
        milestones: Sequence[int],
        decay: float,
        **adversarial: Any,
    ) -> None:
        super().__init__(**adversarial)
        who = type(self).__name__
        self.base_batch, self.max_batch = _batches(who, base_batch, max_batch)
        self.milestones, self.decay = _schedule(who, milestones, decay)

    def decision(self) -> Decision:
        batch, lr_factor = float(self.base_batch), 1.0
        for _ in range(milestones_reached(self.epoch, self.milestones)):
            grown = min(batch / self.decay, float(self.max_batch))
            lr_factor *= self._lr_step(grown, batch)
            batch = grown
        return Decision(int(round(batch)), lr_factor, self.current_adv_ratio())

    def _lr_step(self, grown: float, batch: float) -> float:
        """The LR factor of one milestone whose growth took the batch from ``batch`` to
        ``grown``: the decay the growth did not make, keeping LR / batch on schedule."""
        return self.decay * grown / batch


class Seesaw(IncreaseBatchInsteadOfDecay):
    """``seesaw`` (Meterez et al. 2024): where the step schedule would multiply the LR by
    ``decay``, the batch grows by ``1 / decay`` and the LR is multiplied by
    ``sqrt(decay)`` (halving the LR becomes doubling the batch with the LR over sqrt 2).

    It keeps ``lr / sqrt(batch)``, the noise temperature of Adam-type optimizers, on the
    step schedule's path, at fewer updates. When only part of a growth fits under the
    cap, the LR takes the rest: a growth by ``g <= 1 / decay`` multiplies the LR by
    ``decay * sqrt(g)``, so at the cap the schedule is a plain decay. Batches are rounded
    to whole samples (a decay of 1 changes nothing). ``gg`` is the same with LR / batch
    kept, the rule for SGD.
    """

    name = "seesaw"

    def _lr_step(self, grown: float, batch: float) -> float:
        return self.decay * math.sqrt(grown / batch)


#: Multipliers of :func:`parse_schedule`'s sample counts.
_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_schedule(text: str | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """A batch schedule: ``"0:32 200k:64 800k:128"`` (or pairs) to ``[(at, batch), ...]``.

    ``at`` counts samples from the start of the run, with an optional ``k``, ``M``, ``G``
    or ``T`` (10^3 ... 10^12); the first entry is at 0 and each later one is further on.
    """
    who = "batch_schedule"
    if isinstance(text, str):
        pairs = []
        for item in text.split():
            at, sep, batch = item.partition(":")
            suffix = at[-1:] if at[-1:] in _SUFFIXES and at[-1:] else ""
            number = at[: len(at) - len(suffix)]
            try:
                value = float(number) * _SUFFIXES[suffix]
                size = int(batch)
            except ValueError:
                raise InvalidValueError(
                    f"{who}: {item!r} is not AT:BATCH (e.g. 200k:64); "
                    f'write the schedule as "0:32 200k:64 800k:128"'
                ) from None
            if not sep or not math.isfinite(value) or value != int(value):
                raise InvalidValueError(f"{who}: {item!r} is not AT:BATCH with a whole AT")
            pairs.append((int(value), size))
    elif isinstance(text, Sequence):
        pairs = [tuple(p) for p in text]  # type: ignore[misc]
    else:
        raise InvalidTypeError(f"{who} must be a string such as \"0:32 200k:64\", got "
                               f"{type(text).__name__}")  # fmt: skip
    if not pairs:
        raise InvalidValueError(f"{who}: the schedule is empty")
    checked = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise InvalidValueError(f"{who}: entry {i} must be (at, batch), got {pair!r}")
        at = checks.integer(pair[0], who, f"entry {i} at", minimum=0)
        size = _SIZE(pair[1], who, f"entry {i} batch")
        checked.append((at, size))
    if checked[0][0] != 0:
        raise InvalidValueError(f"{who}: the first entry must be at 0, got {checked[0][0]}")
    if any(b[0] <= a[0] for a, b in zip(checked, checked[1:], strict=False)):
        raise InvalidValueError(f"{who}: the points must be in increasing order of samples")
    return checked


class ScheduledBatch(BatchController):
    """``schedule``: the batch follows a schedule keyed on samples seen
    (``"0:32 200k:64 800k:128"``, :func:`parse_schedule`), the LR scaled by ``lr_rule``
    from ``base_batch`` (at which the LR is given), with the step decay on top.

    Decision points fall every ``gcd`` of the schedule's points (at most an epoch), so
    each change comes at the first update boundary at or past its point.
    """

    name = "schedule"
    state_fields = (*BatchController.state_fields, ("samples", _COUNT))

    def __init__(
        self,
        schedule: str | Sequence[tuple[int, int]],
        base_batch: int,
        max_batch: int,
        milestones: Sequence[int],
        decay: float,
        num_samples: int,
        lr_rule: str = "linear",
        **adversarial: Any,
    ) -> None:
        super().__init__(**adversarial)
        who = type(self).__name__
        self.schedule = parse_schedule(schedule)
        self.base_batch, self.max_batch = _batches(who, base_batch, max_batch)
        largest = max(b for _, b in self.schedule)
        if largest > self.max_batch:
            raise InvalidValueError(
                f"{who}: the schedule's batch {largest} is above the cap {self.max_batch}"
            )
        self.milestones, self.decay = _schedule(who, milestones, decay)
        self.num_samples = _SIZE(num_samples, who, "num_samples")
        self.lr_rule = checks.choice(lr_rule, who, "lr_rule", ("linear", "sqrt"))
        points = [at for at, _ in self.schedule[1:]]
        self.decide_every = min(math.gcd(*points), self.num_samples) if points else None
        self.samples = 0  # samples seen at the last decision point

    def batch_at(self, samples: int) -> int:
        """The scheduled batch once ``samples`` samples have been seen."""
        return [b for at, b in self.schedule if at <= samples][-1]

    def decision(self) -> Decision:
        batch = self.batch_at(self.samples)
        gain = scaling_factor(self.lr_rule, batch / self.base_batch, None, self.base_batch)
        lr_factor = gain * step_decay(self.epoch, self.milestones, self.decay)
        return Decision(batch, lr_factor, self.current_adv_ratio())

    def step(self, measurements: Mapping[str, Any] | None = None) -> Decision:
        before = self.batch_at(self.samples)
        self.samples = int((measurements or {}).get("samples", self.samples))
        after = self.batch_at(self.samples)
        self.last_reason = f"schedule at {self.samples} samples" if after != before else ""
        return super().step(measurements)


class AdaptiveBatch(BatchController):
    """``abs`` and ``absa``: the batch grows when the top Hessian eigenvalue has fallen.

    At the end of each epoch, while the batch is below the cap, :meth:`step` reads the
    measured ``eigenvalue``: the first one becomes the reference; one at most
    ``reference / decrease_ratio`` becomes the new reference and the batch grows by
    ``growth_factor``; after ``duration`` epochs without growth the batch grows anyway
    (the reference stays). Each growth scales the LR by the batch ratio (``lr_rule``
    ``linear``, the paper's; ``sqrt``: by its square root, the rule for Adam-type
    optimizers) and divides the adversarial fraction by the growth factor; at the cap the
    adversarial fraction is zero and no more eigenvalues are asked for. Milestone LR decay
    multiplies on top. Adversarial training stops for good from epoch ``adv_stop_epoch``.
    A missing or non-finite eigenvalue keeps the batch and the reference as they are.
    """

    name = "abs"
    measures = frozenset({"eigenvalue"})
    state_fields = (
        *BatchController.state_fields,
        ("batch_size", _SIZE),
        ("reference", _optional(checks.number)),  # None until the first estimate
        ("epochs_since_growth", _COUNT),
        ("adv_ratio", _FRACTION),
        ("growths", _COUNT),
    )

    def __init__(
        self,
        base_batch: int,
        max_batch: int,
        milestones: Sequence[int],
        decay: float,
        decrease_ratio: float = 2.0,
        growth_factor: int = 2,
        duration: int = 10,
        adv_ratio: float = 0.0,
        adv_stop_epoch: int | None = None,
        lr_rule: str = "linear",
    ) -> None:
        super().__init__(adv_ratio, adv_stop_epoch)
        who = type(self).__name__
        self.lr_rule = checks.choice(lr_rule, who, "lr_rule", ("linear", "sqrt"))
        self.base_batch, self.max_batch = _batches(who, base_batch, max_batch)
        self.milestones, self.decay = _schedule(who, milestones, decay)
        self.decrease_ratio = _POSITIVE(decrease_ratio, who, "decrease_ratio")
        self.growth_factor = checks.integer(growth_factor, who, "growth_factor", minimum=2)
        self.duration = _SIZE(duration, who, "duration")
        # state
        self.batch_size = self.base_batch
        self.reference: float | None = None
        self.epochs_since_growth = 0
        self.growths = 0

    @property
    def wants(self) -> frozenset[str]:
        return self.measures if self.batch_size < self.max_batch else frozenset()

    def decision(self) -> Decision:
        gain = scaling_factor(
            self.lr_rule, self.batch_size / self.base_batch, None, self.base_batch
        )
        lr_factor = gain * step_decay(self.epoch, self.milestones, self.decay)
        return Decision(self.batch_size, lr_factor, self.current_adv_ratio())

    def step(self, measurements: Mapping[str, Any] | None = None) -> Decision:
        eigenvalue = (measurements or {}).get("eigenvalue")
        self.last_reason = ""
        if self.batch_size < self.max_batch and is_epoch_end(measurements):
            self.epochs_since_growth += 1
            usable = eigenvalue is not None and math.isfinite(eigenvalue)
            if usable and self.reference is None:
                self.reference = float(eigenvalue)
                self.last_reason = "reference"
            elif usable and eigenvalue <= self.reference / self.decrease_ratio:
                self.reference = float(eigenvalue)
                self._grow("eigenvalue")
            elif self.epochs_since_growth >= self.duration:
                self._grow("duration")
        return super().step(measurements)

    def _grow(self, reason: str) -> None:
        self.batch_size = min(self.batch_size * self.growth_factor, self.max_batch)
        self.adv_ratio = (
            0.0 if self.batch_size >= self.max_batch else (self.adv_ratio / self.growth_factor)
        )
        self.epochs_since_growth = 0
        self.growths += 1
        self.last_reason = reason


#: how ``gns`` decides that a doubling is worth it (:class:`NoiseScaleBatch`)
GROWTH_RULES = ("budget", "kappa")


def progress_efficiency(base: int, batch: int, noise_scale: float) -> float:
    """The training progress a sample makes at ``batch`` as a fraction of what it makes
    at ``base``: ``(base + phi) / (batch + phi)``, from McCandlish et al.'s steps
    ``S = S_min (1 + phi / B)`` (progress per sample ``1 / (B + phi)``). A noise scale
    of ``inf`` (no measurable gradient) costs nothing; 0 gives ``base / batch``."""
    if math.isinf(noise_scale):
        return 1.0
    return (base + noise_scale) / (batch + noise_scale)


class NoiseScaleBatch(BatchController):
    """``gns``: the batch doubles while the measured gradient noise scale says the growth
    is worth what it costs.

    Every ``decide_every`` samples it reads ``gns``, the noise scale ``phi`` from
    :class:`~largebatch.meters.GradientNoiseMeter`. By McCandlish et al., the steps to a
    given loss scale as ``1 + phi / B`` and the samples as ``1 + B / phi``: a batch well
    below ``phi`` wastes steps, one well above wastes samples. Within a fixed number of
    epochs the samples are fixed, so a larger batch buys fewer updates with training
    progress: a sample at batch ``B`` makes ``(B0 + phi) / (B + phi)`` of the progress it
    makes at the base batch ``B0`` (:func:`progress_efficiency`).

    ``rule="budget"`` (the default) prices that. The run may give up ``tolerance`` of the
    fixed batch's progress over its ``total_samples``; the progress given up so far is
    counted between decision points from the batch in force and the last reading of
    ``phi``. A doubling is taken when what was given up plus what the doubled batch would
    give up over the remaining samples stays within the allowance: early, with most of
    the run ahead, a growth must be cheap (``phi`` large against the batch); near the
    end, with few samples left, it costs little; within the last decision interval,
    where it would save next to nothing and only raise the final LR, none is taken.
    Since ``phi`` tends to rise as training goes on, the projection errs on the cautious
    side. ``tolerance`` is the one knob: more updates saved for more progress given up.
    ``rule="kappa"`` is the rule before it: double when ``B <= kappa * phi``, whatever
    the cost (on MNIST-1D with an MLP it gave up about half the progress and ended 1.8
    points below the fixed batch).
    Either way a growth needs ``confirmations`` consecutive decision points that agree,
    stops at the cap, and the batch never shrinks.

    The LR factor is ``scaling_factor(lr_rule, B / B0, phi, B0)`` (``linear`` by default;
    ``adascale``'s gain ``r`` trained less within a fixed epoch budget) times the step
    decay.
    The milestones count epochs of samples (``milestones_by="samples"``, the default),
    or, with ``milestones_by="progress"`` and ``adascale``, epochs of base-batch
    progress: each sample at batch ``B`` advances it by ``r / S`` (``S = B / B0``), as
    AdaScale counts it. Progress runs behind the samples once the batch has grown, so
    within a fixed number of epochs a decay counted in progress may never come (MNIST-1D,
    adascale: the milestone at epoch 8 of 12 never came; 64.4% test accuracy, against
    65.8% with the milestones counted in samples and 71.1% for the fixed batch);
    ``progress`` suits runs whose length is set in progress too.
    """

    name = "gns"
    measures = frozenset({"gns"})
    state_fields = (
        *BatchController.state_fields,
        ("batch_size", _SIZE),
        ("noise_scale", _optional(_noise_scale)),  # None until the first measurement
        ("agreeing", _COUNT),
        ("progress", partial(checks.number, low=0.0)),
        ("samples", _COUNT),
        ("growths", _COUNT),
        ("lost", partial(checks.number, low=0.0)),  # samples' worth of progress given up
    )

    def __init__(
        self,
        base_batch: int,
        max_batch: int,
        milestones: Sequence[int],
        decay: float,
        num_samples: int,
        every_fraction: float = 0.25,
        kappa: float = 1.0,
        confirmations: int = 2,
        lr_rule: str = "linear",
        milestones_by: str = "samples",
        rule: str = "budget",
        tolerance: float = 0.2,
        total_samples: int | None = None,
        **adversarial: Any,
    ) -> None:
        super().__init__(**adversarial)
        who = type(self).__name__
        self.milestones_by = checks.choice(
            milestones_by, who, "milestones_by", ("samples", "progress")
        )
        self.base_batch, self.max_batch = _batches(who, base_batch, max_batch)
        self.milestones, self.decay = _schedule(who, milestones, decay)
        self.num_samples = _SIZE(num_samples, who, "num_samples")
        every_fraction = checks.number(
            every_fraction, who, "every_fraction", low=0.0, high=1.0, low_open=True
        )
        self.decide_every = max(1, round(self.num_samples * every_fraction))
        self.kappa = _POSITIVE(kappa, who, "kappa")
        self.confirmations = _SIZE(confirmations, who, "confirmations")
        self.lr_rule = checks.choice(lr_rule, who, "lr_rule", SCALING_RULES)
        self.rule = checks.choice(rule, who, "rule", GROWTH_RULES)
        self.tolerance = checks.number(tolerance, who, "tolerance", low=0.0, high=1.0)
        if total_samples is None and self.rule == "budget":
            raise InvalidValueError(
                f"{who}: rule 'budget' needs total_samples (the run's length in samples);"
                " pass it, or rule='kappa'"
            )
        self.total_samples = (
            None if total_samples is None else _SIZE(total_samples, who, "total_samples")
        )
        # state
        self.batch_size = self.base_batch
        self.noise_scale: float | None = None
        self.agreeing = 0
        self.progress = 0.0  # epochs of base-batch progress (adascale) or of samples
        self.samples = 0  # samples seen at the last decision point
        self.growths = 0
        self.lost = 0.0

    @property
    def wants(self) -> frozenset[str]:
        # adascale needs the noise scale at the cap too; the other rules only to grow
        growing = self.batch_size < self.max_batch
        return self.measures if growing or self.lr_rule == "adascale" else frozenset()

    def _gain(self) -> float:
        return scaling_factor(
            self.lr_rule, self.batch_size / self.base_batch, self.noise_scale, self.base_batch
        )

    def decision(self) -> Decision:
        by_progress = self.milestones_by == "progress" and self.lr_rule == "adascale"
        epochs = self.progress if by_progress else self.samples / self.num_samples
        lr_factor = self._gain() * step_decay(epochs, self.milestones, self.decay)
        return Decision(self.batch_size, lr_factor, self.current_adv_ratio())

    def step(self, measurements: Mapping[str, Any] | None = None) -> Decision:
        measured = measurements or {}
        self.last_reason = ""
        samples = int(measured.get("samples", self.samples))
        scale = self.batch_size / self.base_batch
        advance = (samples - self.samples) / self.num_samples
        self.progress += advance * (self._gain() / scale if self.lr_rule == "adascale" else 1)
        if self.noise_scale is not None:
            # the interval since the last decision point ran at this batch
            kept = progress_efficiency(self.base_batch, self.batch_size, self.noise_scale)
            self.lost += max(samples - self.samples, 0) * (1.0 - kept)
        self.samples = samples
        phi = measured.get("gns")
        if phi is not None and not math.isnan(phi):
            # inf (|G|^2 measured at or below 0) and 0 (a trace at or below 0) are kept
            # for adascale's gain at its limits; only a finite positive reading grows
            self.noise_scale = max(float(phi), 0.0)
        if phi is not None and math.isfinite(phi) and phi > 0:
            grown = min(self.batch_size * 2, self.max_batch)
            worth, why = self._worth_growing(grown, phi)
            if self.batch_size < self.max_batch and worth:
                self.agreeing += 1
                if self.agreeing >= self.confirmations:
                    self.batch_size = grown
                    self.agreeing = 0
                    self.growths += 1
                    self.last_reason = why
            else:
                self.agreeing = 0
        return super().step(measurements)

    def projected_loss(self, batch: int, phi: float) -> float:
        """The fraction of the fixed batch's progress the run gives up if it runs at
        ``batch`` from the last decision point to its end (noise scale ``phi``)."""
        assert self.total_samples is not None
        remaining = max(self.total_samples - self.samples, 0)
        kept = progress_efficiency(self.base_batch, batch, phi)
        return (self.lost + remaining * (1.0 - kept)) / self.total_samples

    def _worth_growing(self, grown: int, phi: float) -> tuple[bool, str]:
        if self.rule == "kappa":
            return self.batch_size <= self.kappa * phi, f"noise scale {phi:.0f}"
        cost = self.projected_loss(grown, phi)
        assert self.total_samples is not None
        # near the end every growth is cheap and saves next to nothing: the grown batch
        # must have at least one decision interval to run
        lasts = self.total_samples - self.samples >= (self.decide_every or 1)
        return lasts and cost <= self.tolerance, (
            f"noise scale {phi:.0f}, progress given up {cost:.3f}"
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if isinstance(state, Mapping) and "lost" not in state:
            # saved before the budget rule: nothing counted as given up yet
            state = {**state, "lost": 0.0}
        super().load_state_dict(state)


class CurvatureGuard(BatchController):
    """Caps another controller's LR below the stability limit of the measured curvature.

    ``lr <= fraction * 2 (1 + momentum) / eigenvalue``: past ``2 (1 + momentum) / lr``
    heavy-ball SGD is unstable along the top eigenvector, and training drives the top
    eigenvalue up to that edge (Cohen et al. 2021). So the eigenvalue serves as a ceiling
    for the LR, not as a trigger for the batch. It asks for ``eigenvalue`` at every
    ``every_points``-th decision point (the first one too) and keeps the last value.
    Decision points are the inner controller's, or every ``every_samples`` samples when
    it has none inside epochs.
    """

    def __init__(
        self,
        inner: BatchController,
        base_lr: float,
        momentum: float,
        fraction: float = 0.5,
        every_points: int = 1,
        every_samples: int | None = None,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        if not isinstance(inner, BatchController):
            raise InvalidTypeError(
                f"{who}: inner must be a BatchController, got {type(inner).__name__}"
            )
        self.inner = inner
        self.name = inner.name
        self.base_lr = _POSITIVE(base_lr, who, "base_lr")
        self.momentum = checks.number(momentum, who, "momentum", low=0.0, high=1.0, high_open=True)
        self.fraction = checks.number(fraction, who, "fraction", low=0.0, high=1.0, low_open=True)
        self.every_points = _SIZE(every_points, who, "every_points")
        every_samples = _optional(_SIZE)(every_samples, who, "every_samples")
        self.measures = inner.measures | {"eigenvalue"}
        self.decide_every = inner.decide_every or every_samples
        self.eigenvalue: float | None = None
        self.points = 0  # decision points since the last estimate

    @property
    def wants(self) -> frozenset[str]:  # type: ignore[override]
        due = self.eigenvalue is None or self.points + 1 >= self.every_points
        return self.inner.wants | ({"eigenvalue"} if due else frozenset())

    def cap(self) -> float:
        """The largest LR factor allowed (infinite before any eigenvalue)."""
        if self.eigenvalue is None or self.eigenvalue <= 0:
            return math.inf
        return self.fraction * stability_limit(self.eigenvalue, self.momentum) / self.base_lr

    def decision(self) -> Decision:
        inner = self.inner.decision()
        return Decision(inner.batch_size, min(inner.lr_factor, self.cap()), inner.adv_ratio)

    def warmup_factor(self, progress: float) -> float:
        return self.inner.warmup_factor(progress)

    def step(self, measurements: Mapping[str, Any] | None = None) -> Decision:
        value = (measurements or {}).get("eigenvalue")
        self.points += 1
        if value is not None and math.isfinite(value):
            self.eigenvalue = float(value)
            self.points = 0
        self.inner.step(measurements)
        self.last_reason = self.inner.last_reason
        self.epoch = self.inner.epoch
        return self.decision()

    # the epoch is the inner controller's; its state goes under "inner"
    state_fields = (("eigenvalue", _optional(checks.number)), ("points", _COUNT))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        values = self._checked_state(state, more=("inner",))
        self.inner.load_state_dict(state["inner"])
        for name, value in values.items():
            setattr(self, name, value)
        self.epoch = self.inner.epoch
