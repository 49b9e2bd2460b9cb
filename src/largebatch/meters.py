"""Measurements taken during training, as meters with fixed hooks.

A controller declares the measurements it may ask for (``controller.measures``) and, at
each decision point, the ones it wants now (``controller.wants``). The loop builds one
meter per declared measurement and calls the hooks of those that are wanted:

- :meth:`Meter.after_backward` after each micro-batch's backward pass (its gradient is
  in ``.grad``, accumulated with the earlier micro-batches of the update);
- :meth:`Meter.at_update` once the update's gradient is complete, before the step;
- :meth:`Meter.at_decision` at a decision point; it returns the numbers for the
  controller and the metrics records.

A meter's state is plain data with ``state_dict()``/``load_state_dict()``, so it joins the
checkpoint and a run resumes exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from largebatch.hessian import EigenTracker, HessianOperatorError

__all__ = ["Meter", "Point", "CurvatureMeter", "EIGENVALUE", "time_of"]

#: the measurement the curvature meter provides
EIGENVALUE = "eigenvalue"


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

    def after_backward(self, model: nn.Module, samples: int, batch_samples: int) -> None:
        """A micro-batch of ``samples`` of the update's ``batch_samples`` is in ``.grad``."""

    def at_update(self, model: nn.Module, point: Point) -> None:
        """The update's gradient is complete (all ranks summed), before the optimizer step."""

    def at_decision(self, model: nn.Module, point: Point) -> dict[str, Any]:
        """Numbers for the controller (and the metrics record) at a decision point."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class CurvatureMeter(Meter):
    """The top Hessian eigenvalue, from an :class:`~largebatch.hessian.EigenTracker` on a
    fixed probe set, every ``every_epochs`` epochs (at epoch ends).

    ``eigenvalue`` in the returned numbers is what a controller may act on: None when the
    estimate failed, is not finite, or (``strict``) did not reach its tolerance within the
    budget, so a bad estimate keeps the batch where it is. ``raw_eigenvalue`` is whatever
    was computed, for the records. With ``strict=False`` (the reference code's 10 power
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

    def __init__(self, tracker: EigenTracker, every_epochs: int = 1, strict: bool = True) -> None:
        self.tracker = tracker
        self.every_epochs = every_epochs
        self.strict = strict

    @classmethod
    def empty(cls) -> dict[str, Any]:
        """The record of a decision point where nothing was estimated."""
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
        if not point.epoch_end or (point.epoch + 1) % self.every_epochs:
            return record
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

    def state_dict(self) -> dict[str, Any]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state)


def time_of(record: Mapping[str, Any]) -> float:
    """Seconds a meter's record says it spent (its ``*_s`` fields)."""
    return float(sum(v for k, v in record.items() if k.endswith("_s") and v))
