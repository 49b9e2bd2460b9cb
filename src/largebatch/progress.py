"""Where a run is, and the records it emits: the epoch record, decision points, changes.

:class:`Progress` holds the counters that carry over across epochs and restarts (the
checkpoint's ``run`` entry; the field names are those of the former ``RunState``, so
older checkpoints load). :meth:`Progress.end_epoch` makes the epoch's record, the line of
``metrics.jsonl``: its columns are fixed (the built-in meters' keys are there, null,
when they did not measure, so records of every method line up), and a meter of the
user's adds its own keys after them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from largebatch.controllers import Decision
from largebatch.meters import EIGENVALUE, NOISE_SCALE, CurvatureMeter, GradientNoiseMeter, Meter

__all__ = ["Progress", "RECORD_DEFAULTS", "meter_defaults"]

#: the record keys every epoch record has, whether or not these meters ran
RECORD_DEFAULTS: dict[str, Any] = {**CurvatureMeter.empty(), **GradientNoiseMeter.empty()}


def meter_defaults(meters: Mapping[str, Meter]) -> dict[str, Any]:
    """A decision point's numbers before any meter measured: the fixed columns, and each
    meter's own keys (None)."""
    defaults = dict(RECORD_DEFAULTS)
    for meter in meters.values():
        defaults.update(meter.empty())
    return defaults


@dataclass
class Progress:
    """Counters that carry over across epochs and restarts (cumulative)."""

    epoch: int = 0  # epochs finished
    updates: int = 0  # optimizer steps
    samples: int = 0  # training samples processed
    wall_s: float = 0.0  # training + evaluation time, eigenvalue time included
    hessian_s: float = 0.0  # time spent on curvature estimates
    measure_s: float = 0.0  # time spent by all meters (curvature included)
    history: list[dict[str, Any]] = field(default_factory=list)
    # An epoch interrupted part-way: samples done, their loss and accuracy sums, and the
    # augmentation generator's state, so that resuming finishes it exactly.
    position: int = 0
    partial_loss: float = 0.0
    partial_correct: int = 0
    augment_rng: torch.Tensor | None = None
    # Samples of the epoch in progress left out: a last batch that would give a rank a
    # single sample, with a batch norm that cannot train on one (see engine.run).
    dropped: int = 0
    # A stream (IterableDataset): every rank's state where the epoch was stopped (when it
    # keeps one), and the samples a resumed pass without one read again and dropped.
    stream: list[Any] | None = None
    skipped: int = 0
    # Divergence guard: LR multiplier after rollbacks, and what happened.
    lr_scale: float = 1.0
    # Stability safeguard: the largest LR factor allowed since a tempered growth (None:
    # the controller's factor as it is), until the next growth that raises the LR.
    lr_cap: float | None = None
    # Recovery after a growth: the epoch's training loss sum and samples at its last
    # decision point (the window since then is compared), and the growth on watch: the
    # window loss before it, the LR factors in force before and after it, and the
    # decision points of watch left.
    mark_loss: float = 0.0
    mark_seen: int = 0
    watch: dict[str, Any] | None = None
    first_loss: float | None = None  # the run's first window loss (the loss scale)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    # Batch changes of the epoch in progress: sample count, new batch, LR factor, reason.
    changes: list[dict[str, Any]] = field(default_factory=list)
    # The epoch's decision points: samples, batch, LR, noise scale and eigenvalue there.
    points: list[dict[str, Any]] = field(default_factory=list)

    def note_point(
        self,
        samples: int,
        decision: Decision,
        lr: float,
        measured: Mapping[str, Any],
        stability: float | None,
    ) -> None:
        """A decision point: the batch and LR decided there, and what was measured."""
        self.points.append(
            {
                "samples": samples,
                "batch_size": decision.batch_size,
                "lr": lr,
                "gns": measured.get(NOISE_SCALE),
                "eigenvalue": measured[EIGENVALUE],
                "stability": stability,
            }
        )

    def note_change(self, samples: int, decision: Decision, reason: str, **more: Any) -> None:
        """A batch change: its sample count, batch, LR factor and reason (and ``more``:
        the safeguard's reading of a tempered growth)."""
        self.changes.append(
            {
                "samples": samples,
                "batch_size": decision.batch_size,
                "lr_factor": decision.lr_factor,
                "reason": reason or "schedule",
                **more,
            }
        )

    def window_loss(self, loss_sum: float, seen: int) -> float | None:
        """The mean training loss of the samples since the last decision point, from the
        epoch's running ``loss_sum`` over ``seen`` samples; marks this point. None when
        no sample was seen since."""
        window = seen - self.mark_seen
        mean = (loss_sum - self.mark_loss) / window if window > 0 else None
        self.mark_loss, self.mark_seen = loss_sum, seen
        return mean

    def factor(self, decision: Decision) -> float:
        """The LR factor in force under ``decision``: the controller's, capped by the
        stability safeguard's ``lr_cap`` when one is set."""
        if self.lr_cap is None:
            return decision.lr_factor
        return min(decision.lr_factor, self.lr_cap)

    def end_epoch(
        self,
        train: Mapping[str, Any],
        test: tuple[float | None, float | None],
        measured: Mapping[str, Any],
        *,
        batch_size: int,
        lr: float,
        adv_ratio: float,
        stability: float | None,
        own_keys: Sequence[str] = (),
        tokens_per_sample: int = 1,
    ) -> dict[str, Any]:
        """Close the epoch (its evaluation and decision point are done) and return its
        record. ``train``: the epoch's training numbers; ``test``: test loss and
        accuracy; ``measured``: the decision point's numbers; ``own_keys``: record keys
        of meters other than the built-in ones."""
        self.epoch += 1
        self.hessian_s += measured["eig_s"]
        record = {
            "epoch": self.epoch,
            "batch_size": batch_size,
            "lr": lr,
            **{k: measured[k] for k in CurvatureMeter.record_keys},
            "adv_ratio": adv_ratio,
            "updates": self.updates,
            "samples": self.samples,
            # sequence targets (a language model's): the target tokens seen, cumulative
            **({"tokens": self.samples * tokens_per_sample} if tokens_per_sample > 1 else {}),
            **train,
            "test_loss": test[0],
            # a language model's: the test loss in bits per target token (per byte for text)
            **(
                {"test_bits": None if test[0] is None else test[0] / math.log(2)}
                if tokens_per_sample > 1
                else {}
            ),
            "test_acc": test[1],
            "wall_s": self.wall_s,
            "hessian_s": self.hessian_s,
            "measure_s": self.measure_s,
            **{k: measured[k] for k in GradientNoiseMeter.record_keys if k != "gns_s"},
            **{k: measured.get(k) for k in own_keys if not k.endswith("_s")},
            "stability": stability,
            "batch_changes": self.changes,
            "points": self.points,
        }
        self.changes, self.points = [], []
        self.history.append(record)
        return record
