"""Batch-size controllers: schedulers for the global batch, the LR factor and the
adversarial fraction.

A controller is told what was measured at the end of an epoch (:meth:`step`) and answers
with a :class:`Decision` for the next one. Its state is plain numbers, with
``state_dict()`` and ``load_state_dict()``, so a run resumes exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from largebatch.config import TrainConfig
from largebatch.errors import ConfigError

__all__ = ["Decision", "BatchController", "FixedBatch", "step_decay", "make_controller"]


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


def step_decay(epoch: int, milestones: Sequence[int], decay: float) -> float:
    """LR factor at 0-based ``epoch``: ``decay`` to the number of milestones reached.

    A milestone ``m`` takes effect from epoch index ``m`` on (the (m+1)-th epoch).
    """
    return decay ** sum(1 for m in milestones if epoch >= m)


class BatchController:
    """Interface. ``epoch`` is the 0-based index of the next epoch to run."""

    name = "base"
    #: whether :meth:`step` wants the top Hessian eigenvalue in its measurements
    wants_eigenvalue = False

    def __init__(self) -> None:
        self.epoch = 0

    def decision(self) -> Decision:
        """The decision for epoch ``self.epoch``."""
        raise NotImplementedError

    def warmup_factor(self, progress: float) -> float:
        """Extra LR factor at fractional epoch ``self.epoch + progress`` (1 without warm-up)."""
        return 1.0

    def step(self, measurements: Mapping[str, Any] | None = None) -> Decision:
        """Record the end of epoch ``self.epoch``; return the decision for the next one."""
        self.epoch += 1
        return self.decision()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])


class FixedBatch(BatchController):
    """``bl``: the base batch throughout, LR decayed at the milestones."""

    name = "bl"

    def __init__(self, batch_size: int, milestones: Sequence[int], decay: float) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.milestones = tuple(milestones)
        self.decay = decay

    def decision(self) -> Decision:
        return Decision(self.batch_size, step_decay(self.epoch, self.milestones, self.decay))


def make_controller(config: TrainConfig) -> BatchController:
    """The controller for ``config.method``."""
    if config.method == "bl":
        return FixedBatch(config.batch_size, config.lr_decay_epochs, config.lr_decay)
    raise ConfigError(
        f"method {config.method!r} is not available yet in this version; use --method bl"
    )
