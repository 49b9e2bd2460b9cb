"""Hostile input to the public API: every bad value is refused where it enters.

Each case is a call that must raise one of the project's own errors (a subclass of
:class:`largebatch.errors.UsageError`; the value and type errors are also ``ValueError``
and ``TypeError``), in one line that names the class (or function) and the field, so the
mistake is plain and nothing fails later as a ``ZeroDivisionError``, a NaN or an endless
loop. Cases are grouped in tables by the surface they hit; each table has its own test.

The ``fit`` table (``REFUSED``) also asserts that nothing was written in the work folder
and every file that was there is unchanged. The cases after it are those that must work
(a batch-norm model on a last batch of one sample) or appear mid-run (a controller's
decision), and what a run records.
"""

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import largebatch
from largebatch.accumulate import accumulate, micro_batches
from largebatch.adversarial import fgsm, pgd
from largebatch.checkpoint import load_checkpoint
from largebatch.controllers import (
    AdaptiveBatch,
    BatchController,
    CurvatureGuard,
    Decision,
    FixedBatch,
    IncreaseBatchInsteadOfDecay,
    LinearScalingWarmup,
    NoiseScaleBatch,
    checked_decision,
)
from largebatch.errors import (
    CheckpointError,
    ConfigError,
    InvalidTypeError,
    InvalidValueError,
    StateError,
    UsageError,
)
from largebatch.hessian import EigenTracker, hessian_trace, spectral_density, top_eigenvalues
from largebatch.io import read_jsonl
from largebatch.lr import LRScaler, scaling_factor, stability_limit
from largebatch.meters import CurvatureMeter, GradientNoiseMeter
from largebatch.sampler import EpochSampler, GrowingBatchSampler

NAN, INF = math.nan, math.inf


def _assert_refused(call, kind, who, field):
    """``call()`` raises ``kind`` (one of ours) in one line naming ``who`` and ``field``."""
    with pytest.raises(kind) as caught:
        call()
    error = caught.value
    assert isinstance(error, UsageError), type(error)
    message = str(error)
    assert "\n" not in message and message.strip() == message, message
    assert who in message and field in message, message


# --------------------------------------------------------------------------- own-loop pieces
# Controllers, GrowingBatchSampler / EpochSampler, LRScaler, the meters, EigenTracker and
# accumulation: constructors, setters and load_state_dict.


class Deciding(BatchController):
    """A user's controller that answers whatever it is told to."""

    def __init__(self, batch=8, lr_factor=1.0, adv_ratio=0.0):
        super().__init__()
        self.answer = Decision(batch, lr_factor, adv_ratio)

    def decision(self):
        return self.answer


class EveryZero(Deciding):
    decide_every = 0  # a class attribute escapes the setter; checked_decision catches it


class NotADecision(Deciding):
    def decision(self):
        return {"batch_size": 8}


def _set(target, name, value):
    return lambda: setattr(target, name, value)


def _load(make, state):
    return lambda: make().load_state_dict(state)


def _fixed():
    return FixedBatch(128, [6], 0.2)


def _abs():
    return AdaptiveBatch(128, 1024, [6], 0.2)


def _gns(**changes):
    values = {"num_samples": 1000, "total_samples": 8000, **changes}
    return NoiseScaleBatch(128, 1024, [6], 0.2, **values)


def _guard(**changes):
    return CurvatureGuard(_gns(), **{"base_lr": 0.1, "momentum": 0.9, **changes})


def _sampler():
    return GrowingBatchSampler(100, batch_size=8, seed=1)


def _optimizer(groups=1):
    params = [nn.Parameter(torch.zeros(1)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=0.1)


def _scaler():
    return LRScaler(_optimizer())


def _tracker(**options):
    data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    return EigenTracker(F.cross_entropy, data, **options)


def _state(make, **changes):
    """A state of ``make()`` with some values changed."""
    return {**make().state_dict(), **changes}


X, Y = torch.randn(10, 3), torch.randint(0, 2, (10,))
MODEL = nn.Linear(3, 2)


def _nan_x():
    x = X.clone()
    x[4, 1] = NAN
    return x


def _nan_linear():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.bias[1] = NAN
    return model


V, T, S = InvalidValueError, InvalidTypeError, StateError
OWN_LOOP_CASES = [
    # what a controller decides, through checked_decision
    ("decision batch 0", lambda: checked_decision(Deciding(0), Deciding(0).decision()), V,
     "Deciding.decision()", "batch_size"),
    ("decision batch -8", lambda: checked_decision(Deciding(-8), Deciding(-8).decision()), V,
     "Deciding.decision()", "batch_size"),
    ("decision batch 2.5", lambda: checked_decision(Deciding(2.5), Decision(2.5, 1.0)), T,
     "Deciding.decision()", "batch_size"),
    ("decision lr nan", lambda: checked_decision(Deciding(), Decision(8, NAN)), V,
     "Deciding.decision()", "lr_factor"),
    ("decision lr 0", lambda: checked_decision(Deciding(), Decision(8, 0.0)), V,
     "Deciding.decision()", "lr_factor"),
    ("decision adv 1.5", lambda: checked_decision(Deciding(), Decision(8, 1.0, 1.5)), V,
     "Deciding.decision()", "adv_ratio"),
    ("decision not a Decision", lambda: checked_decision(NotADecision(), {"batch_size": 8}), T,
     "NotADecision.decision()", "Decision"),
    ("decide_every class attribute 0", lambda: checked_decision(EveryZero(), Decision(8, 1.0)),
     V, "EveryZero", "decide_every"),
    # the decide_every setter
    ("decide_every=0", _set(_fixed(), "decide_every", 0), V, "FixedBatch", "decide_every"),
    ("decide_every=-5", _set(Deciding(), "decide_every", -5), V, "Deciding", "decide_every"),
    ("decide_every=2.5", _set(_fixed(), "decide_every", 2.5), T, "FixedBatch", "decide_every"),
    # controller constructors
    ("bl batch 0", lambda: FixedBatch(0, [], 0.2), V, "FixedBatch", "batch_size"),
    ("bl batch True", lambda: FixedBatch(True, [], 0.2), T, "FixedBatch", "batch_size"),
    ("bl decay 0", lambda: FixedBatch(8, [], 0.0), V, "FixedBatch", "decay"),
    ("bl decay nan", lambda: FixedBatch(8, [], NAN), V, "FixedBatch", "decay"),
    ("bl decay 1.5", lambda: FixedBatch(8, [], 1.5), V, "FixedBatch", "decay"),
    ("bl milestone -1", lambda: FixedBatch(8, [3, -1], 0.2), V, "FixedBatch", "milestones[1]"),
    ("bl milestones str", lambda: FixedBatch(8, "6", 0.2), T, "FixedBatch", "milestones"),
    ("bl adv_ratio 1.5", lambda: FixedBatch(8, [], 0.2, adv_ratio=1.5), V, "FixedBatch",
     "adv_ratio"),
    ("bl adv_ratio nan", lambda: FixedBatch(8, [], 0.2, adv_ratio=NAN), V, "FixedBatch",
     "adv_ratio"),
    ("bl adv_stop_epoch -1", lambda: FixedBatch(8, [], 0.2, adv_stop_epoch=-1), V,
     "FixedBatch", "adv_stop_epoch"),
    ("fb batch below base", lambda: LinearScalingWarmup(128, 64, [], 0.2, 5), V,
     "LinearScalingWarmup", "batch_size"),
    ("fb warmup -1", lambda: LinearScalingWarmup(128, 1024, [], 0.2, -1), V,
     "LinearScalingWarmup", "warmup_epochs"),
    ("gg base 0", lambda: IncreaseBatchInsteadOfDecay(0, 1024, [], 0.2), V,
     "IncreaseBatchInsteadOfDecay", "base_batch"),
    ("gg max below base", lambda: IncreaseBatchInsteadOfDecay(128, 64, [], 0.2), V,
     "IncreaseBatchInsteadOfDecay", "max_batch"),
    ("abs growth 1", lambda: AdaptiveBatch(128, 1024, [], 0.2, growth_factor=1), V,
     "AdaptiveBatch", "growth_factor"),
    ("abs growth 1.5", lambda: AdaptiveBatch(128, 1024, [], 0.2, growth_factor=1.5), T,
     "AdaptiveBatch", "growth_factor"),
    ("abs duration 0", lambda: AdaptiveBatch(128, 1024, [], 0.2, duration=0), V,
     "AdaptiveBatch", "duration"),
    ("abs ratio 0", lambda: AdaptiveBatch(128, 1024, [], 0.2, decrease_ratio=0), V,
     "AdaptiveBatch", "decrease_ratio"),
    ("abs ratio inf", lambda: AdaptiveBatch(128, 1024, [], 0.2, decrease_ratio=INF), V,
     "AdaptiveBatch", "decrease_ratio"),
    ("gns num_samples 0", lambda: _gns(num_samples=0), V, "NoiseScaleBatch", "num_samples"),
    ("gns every 0", lambda: _gns(every_fraction=0), V, "NoiseScaleBatch", "every_fraction"),
    ("gns every 2", lambda: _gns(every_fraction=2), V, "NoiseScaleBatch", "every_fraction"),
    ("gns kappa nan", lambda: _gns(kappa=NAN), V, "NoiseScaleBatch", "kappa"),
    ("gns kappa 0", lambda: _gns(kappa=0), V, "NoiseScaleBatch", "kappa"),
    ("gns confirmations 0", lambda: _gns(confirmations=0), V, "NoiseScaleBatch",
     "confirmations"),
    ("gns lr_rule", lambda: _gns(lr_rule="cubic"), V, "NoiseScaleBatch", "lr_rule"),
    ("gns milestones_by", lambda: _gns(milestones_by="steps"), V, "NoiseScaleBatch",
     "milestones_by"),
    ("guard inner", lambda: CurvatureGuard("abs", 0.1, 0.9), T, "CurvatureGuard", "inner"),
    ("guard base_lr 0", lambda: _guard(base_lr=0), V, "CurvatureGuard", "base_lr"),
    ("guard momentum 1", lambda: _guard(momentum=1.0), V, "CurvatureGuard", "momentum"),
    ("guard fraction 0", lambda: _guard(fraction=0), V, "CurvatureGuard", "fraction"),
    ("guard every_points 0", lambda: _guard(every_points=0), V, "CurvatureGuard",
     "every_points"),
    ("guard every_samples 0", lambda: _guard(every_samples=0), V, "CurvatureGuard",
     "every_samples"),
    # controller states
    ("bl loads an abs state", _load(_fixed, _abs().state_dict()), S, "FixedBatch",
     "AdaptiveBatch"),
    ("abs loads a bl state", _load(_abs, _fixed().state_dict()), S, "AdaptiveBatch",
     "FixedBatch"),
    ("bl loads an old abs state", _load(_fixed, {"epoch": 1, "batch_size": 8}), S,
     "FixedBatch", "batch_size"),
    ("abs state batch 0", _load(_abs, _state(_abs, batch_size=0)), V,
     "AdaptiveBatch.load_state_dict", "batch_size"),
    ("abs state epoch -1", _load(_abs, _state(_abs, epoch=-1)), V,
     "AdaptiveBatch.load_state_dict", "epoch"),
    ("abs state reference nan", _load(_abs, _state(_abs, reference=NAN)), V,
     "AdaptiveBatch.load_state_dict", "reference"),
    ("abs state adv 2", _load(_abs, _state(_abs, adv_ratio=2.0)), V,
     "AdaptiveBatch.load_state_dict", "adv_ratio"),
    ("abs state batch str", _load(_abs, _state(_abs, batch_size="8")), T,
     "AdaptiveBatch.load_state_dict", "batch_size"),
    ("abs state missing", _load(_abs, {"epoch": 1}), S, "AdaptiveBatch", "batch_size"),
    ("abs state a list", _load(_abs, [1, 2]), S, "AdaptiveBatch", "list"),
    ("abs state version 9", _load(_abs, _state(_abs, version=9)), S, "AdaptiveBatch",
     "version"),
    ("gns state noise nan", _load(_gns, _state(_gns, noise_scale=NAN)), V,
     "NoiseScaleBatch.load_state_dict", "noise_scale"),
    ("gns state samples -1", _load(_gns, _state(_gns, samples=-1)), V,
     "NoiseScaleBatch.load_state_dict", "samples"),
    ("guard state points -1", _load(_guard, _state(_guard, points=-1)), V,
     "CurvatureGuard.load_state_dict", "points"),
    ("guard state inner of abs", _load(_guard, _state(_guard, inner=_abs().state_dict())), S,
     "NoiseScaleBatch", "AdaptiveBatch"),
    ("guard state inner garbage", _load(_guard, _state(_guard, inner="x")), S,
     "NoiseScaleBatch", "str"),
    ("guard loads a gns state", _load(_guard, _gns().state_dict()), S, "CurvatureGuard",
     "NoiseScaleBatch"),
    # GrowingBatchSampler
    ("sampler batch_size=0", _set(_sampler(), "batch_size", 0), V, "GrowingBatchSampler",
     "batch_size"),
    ("sampler batch_size=-1", _set(_sampler(), "batch_size", -1), V, "GrowingBatchSampler",
     "batch_size"),
    ("sampler batch_size=2.5", _set(_sampler(), "batch_size", 2.5), T, "GrowingBatchSampler",
     "batch_size"),
    ("sampler batch_size=nan", _set(_sampler(), "batch_size", NAN), T, "GrowingBatchSampler",
     "batch_size"),
    ("sampler batch_size=True", _set(_sampler(), "batch_size", True), T,
     "GrowingBatchSampler", "batch_size"),
    ("sampler made with batch 0", lambda: GrowingBatchSampler(100, 0), V,
     "GrowingBatchSampler", "batch_size"),
    ("sampler num_samples 0", lambda: GrowingBatchSampler(0, 8), V, "GrowingBatchSampler",
     "num_samples"),
    ("sampler seed -1", lambda: GrowingBatchSampler(100, 8, seed=-1), V,
     "GrowingBatchSampler", "seed"),
    ("sampler rank 2 of 2", lambda: GrowingBatchSampler(100, 8, rank=2, world_size=2), V,
     "GrowingBatchSampler", "rank"),
    ("sampler rank -1", lambda: GrowingBatchSampler(100, 8, rank=-1, world_size=2), V,
     "GrowingBatchSampler", "rank"),
    ("sampler world 0", lambda: GrowingBatchSampler(100, 8, rank=0, world_size=0), V,
     "GrowingBatchSampler", "world_size"),
    ("sampler state batch 0", _load(_sampler, _state(_sampler, batch_size=0)), V,
     "GrowingBatchSampler.load_state_dict", "batch_size"),
    ("sampler state position -50", _load(_sampler, _state(_sampler, position=-50)), V,
     "GrowingBatchSampler.load_state_dict", "position"),
    ("sampler state position 101", _load(_sampler, _state(_sampler, position=101)), V,
     "GrowingBatchSampler.load_state_dict", "position"),
    ("sampler state epoch -1", _load(_sampler, _state(_sampler, epoch=-1)), V,
     "GrowingBatchSampler.load_state_dict", "epoch"),
    ("sampler state a list", _load(_sampler, [0, 0, 8]), S, "GrowingBatchSampler", "list"),
    ("sampler state a str", _load(_sampler, "epoch=0"), S, "GrowingBatchSampler", "str"),
    ("sampler loads an abs state", _load(_sampler, _abs().state_dict()), S,
     "GrowingBatchSampler", "AdaptiveBatch"),
    ("sampler loads an old abs state", _load(_sampler, {"epoch": 0, "batch_size": 8}), S,
     "GrowingBatchSampler", "position"),
    # EpochSampler
    ("epochs num_samples 0", lambda: EpochSampler(0, 0), V, "EpochSampler", "num_samples"),
    ("epochs seed 2.5", lambda: EpochSampler(10, 2.5), T, "EpochSampler", "seed"),
    ("epochs batches of 0", lambda: EpochSampler(10, 0).batches(0, 0), V,
     "EpochSampler.batches", "batch_size"),
    ("epochs batches start -1", lambda: EpochSampler(10, 0).batches(0, 4, start=-1), V,
     "EpochSampler.batches", "start"),
    ("epochs batches start 11", lambda: EpochSampler(10, 0).batches(0, 4, start=11), V,
     "EpochSampler.batches", "start"),
    ("epochs num_batches of -1", lambda: EpochSampler(10, 0).num_batches(-1), V,
     "EpochSampler.num_batches", "batch_size"),
    ("epochs order of -1", lambda: EpochSampler(10, 0).order(-1), V, "EpochSampler.order",
     "epoch"),
    # LRScaler and the LR rules
    ("scaler of a model", lambda: LRScaler(MODEL), T, "LRScaler", "optimizer"),
    ("scaler scheduler", lambda: LRScaler(_optimizer(), scheduler=0.5), T, "LRScaler",
     "scheduler"),
    ("apply nan", lambda: _scaler().apply(NAN), V, "LRScaler.apply", "factor"),
    ("apply inf", lambda: _scaler().apply(INF), V, "LRScaler.apply", "factor"),
    ("apply 0", lambda: _scaler().apply(0.0), V, "LRScaler.apply", "factor"),
    ("apply -1", lambda: _scaler().apply(-1), V, "LRScaler.apply", "factor"),
    ("apply None", lambda: _scaler().apply(None), T, "LRScaler.apply", "factor"),
    ("step_scheduler without one", lambda: _scaler().step_scheduler(), V,
     "LRScaler.step_scheduler", "scheduler"),
    ("scaler state factor nan", _load(_scaler, _state(_scaler, factor=NAN)), V,
     "LRScaler.load_state_dict", "factor"),
    ("scaler state bases short", _load(_scaler, _state(_scaler, bases=[])), S,
     "LRScaler.load_state_dict", "bases"),
    ("scaler state bases inf", _load(_scaler, _state(_scaler, bases=[INF])), V,
     "LRScaler.load_state_dict", "bases[0]"),
    ("scaler state bases -1", _load(_scaler, _state(_scaler, bases=[-1.0])), V,
     "LRScaler.load_state_dict", "bases[0]"),
    ("scaler state bases str", _load(_scaler, _state(_scaler, bases="0.1")), S,
     "LRScaler.load_state_dict", "bases"),
    ("scaler loads a sampler state", _load(_scaler, _sampler().state_dict()), S, "LRScaler",
     "GrowingBatchSampler"),
    ("scaling rule", lambda: scaling_factor("cubic", 2, None, 128), V, "scaling_factor",
     "rule"),
    ("scaling scale 0", lambda: scaling_factor("sqrt", 0, None, 128), V, "scaling_factor",
     "scale"),
    ("scaling scale -4", lambda: scaling_factor("sqrt", -4, None, 128), V, "scaling_factor",
     "scale"),
    ("scaling base 0", lambda: scaling_factor("adascale", 2, 10.0, 0), V, "scaling_factor",
     "base_batch"),
    ("stability eigenvalue 0", lambda: stability_limit(0.0, 0.9), V, "stability_limit",
     "eigenvalue"),
    ("stability eigenvalue nan", lambda: stability_limit(NAN, 0.9), V, "stability_limit",
     "eigenvalue"),
    ("stability momentum 1", lambda: stability_limit(10.0, 1.0), V, "stability_limit",
     "momentum"),
    # meters
    ("gns meter micro 0", lambda: GradientNoiseMeter(micro_batch=0), V, "GradientNoiseMeter",
     "micro_batch"),
    ("gns meter decay 1", lambda: GradientNoiseMeter(decay=1.0), V, "GradientNoiseMeter",
     "decay"),
    ("gns meter decay nan", lambda: GradientNoiseMeter(decay=NAN), V, "GradientNoiseMeter",
     "decay"),
    ("gns meter splits 1", lambda: GradientNoiseMeter(splits=1), V, "GradientNoiseMeter",
     "splits"),
    ("gns meter per_update 0", lambda: GradientNoiseMeter(per_update=0), V,
     "GradientNoiseMeter", "per_update"),
    ("gns meter per_window 0", lambda: GradientNoiseMeter(per_window=0), V,
     "GradientNoiseMeter", "per_window"),
    ("gns meter state weight -1", _load(GradientNoiseMeter, _state(GradientNoiseMeter,
     weight=-1.0)), V, "GradientNoiseMeter.load_state_dict", "weight"),
    ("gns meter state trace nan", _load(GradientNoiseMeter, _state(GradientNoiseMeter,
     trace=NAN)), V, "GradientNoiseMeter.load_state_dict", "trace"),
    ("gns meter state updates -1", _load(GradientNoiseMeter, _state(GradientNoiseMeter,
     updates=-1)), V, "GradientNoiseMeter.load_state_dict", "updates"),
    ("gns meter loads an abs state", _load(GradientNoiseMeter, _abs().state_dict()), S,
     "GradientNoiseMeter", "AdaptiveBatch"),
    ("curvature meter tracker", lambda: CurvatureMeter("lanczos"), T, "CurvatureMeter",
     "tracker"),
    ("curvature meter every 0", lambda: CurvatureMeter(_tracker(), every_epochs=0), V,
     "CurvatureMeter", "every_epochs"),
    ("curvature meter samples 0", lambda: CurvatureMeter(_tracker(), every_samples=0), V,
     "CurvatureMeter", "every_samples"),
    ("curvature meter state last -1", lambda: CurvatureMeter(_tracker()).load_state_dict(
        {**CurvatureMeter(_tracker()).state_dict(), "last_samples": -1}), V,
     "CurvatureMeter.load_state_dict", "last_samples"),
    ("curvature meter state a list", lambda: CurvatureMeter(_tracker()).load_state_dict([]),
     S, "CurvatureMeter", "list"),
    # EigenTracker
    ("tracker k 0", lambda: _tracker(k=0), V, "EigenTracker", "k"),
    ("tracker method", lambda: _tracker(method="qr"), V, "EigenTracker", "method"),
    ("tracker tol 0", lambda: _tracker(tol=0), V, "EigenTracker", "tol"),
    ("tracker tol nan", lambda: _tracker(tol=NAN), V, "EigenTracker", "tol"),
    ("tracker max_matvecs 0", lambda: _tracker(max_matvecs=0), V, "EigenTracker",
     "max_matvecs"),
    ("tracker seed -1", lambda: _tracker(seed=-1), V, "EigenTracker", "seed"),
    ("tracker min_steps 0", lambda: _tracker(min_steps=0), V, "EigenTracker", "min_steps"),
    ("tracker loss_fn", lambda: EigenTracker("mse", (X, Y)), T, "EigenTracker", "loss_fn"),
    ("tracker options", lambda: _tracker(operator_options=[1]), T, "EigenTracker",
     "operator_options"),
    ("tracker state k", lambda: _tracker(k=2).load_state_dict(_tracker().state_dict()), S,
     "EigenTracker.load_state_dict", "k=1"),
    ("tracker state vectors", _load(_tracker, _state(_tracker, vectors="v")), S,
     "EigenTracker.load_state_dict", "vectors"),
    ("tracker state generator", _load(_tracker, _state(_tracker, generator=torch.zeros(3))),
     S, "EigenTracker.load_state_dict", "generator"),
    ("tracker state a str", _load(_tracker, "state"), S, "EigenTracker", "str"),
    # curvature on non-finite data or weights: refused before any Hessian product
    ("tracker inputs nan", lambda: EigenTracker(F.cross_entropy, (_nan_x(), Y)), V,
     "EigenTracker", "data element 0: the inputs hold NaN"),
    ("tracker inputs inf", lambda: EigenTracker(F.cross_entropy, (X * INF, Y)), V,
     "EigenTracker", "data element 0: the inputs hold NaN or infinity"),
    ("tracker targets nan", lambda: EigenTracker(F.mse_loss, (X, X * NAN)), V,
     "EigenTracker", "data element 0: the targets hold NaN"),
    ("tracker 2nd pair nan", lambda: EigenTracker(F.cross_entropy, [(X, Y), (_nan_x(), Y)]),
     V, "EigenTracker", "data element 1: the inputs"),
    ("estimate on nan data", lambda: _tracker().estimate(nn.Linear(3, 2), (_nan_x(), Y)), V,
     "HessianOperator", "data element 0: the inputs hold NaN"),
    ("estimate streamed nan", lambda: _tracker(operator_options={"stream": True}).estimate(
        nn.Linear(3, 2), [(X, Y), (_nan_x(), Y)]), V, "HessianOperator", "data element 1"),
    ("estimate nan weights", lambda: _tracker().estimate(_nan_linear()), V,
     "HessianOperator", "parameter 'bias'"),
    ("top_eigenvalues nan data", lambda: top_eigenvalues(
        nn.Linear(3, 2), F.cross_entropy, (_nan_x(), Y)), V, "HessianOperator", "NaN"),
    # keywords of the public functions given as strings: refused before any arithmetic
    ("top_eigenvalues k str", lambda: top_eigenvalues(MODEL, F.cross_entropy, (X, Y), k="2"),
     T, "top_eigenvalues", "k must be an integer"),
    ("top_eigenvalues tol str", lambda: top_eigenvalues(MODEL, F.cross_entropy, (X, Y),
     tol="1e-3"), T, "top_eigenvalues", "tol must be a number"),
    ("hessian_trace probes str", lambda: hessian_trace(MODEL, F.cross_entropy, (X, Y),
     probes="10"), T, "hessian_trace", "probes"),
    ("spectral_density sigma str", lambda: spectral_density(MODEL, F.cross_entropy, (X, Y),
     sigma="0.1"), T, "spectral_density", "sigma"),
    ("fgsm eps str", lambda: fgsm(MODEL, X, Y, "0.1"), T, "fgsm", "eps"),
    ("fgsm clamp strs", lambda: fgsm(MODEL, X, Y, 0.1, clamp=("0", "1")), T, "clamp",
     "clamp[0]"),
    ("pgd steps str", lambda: pgd(MODEL, X, Y, 0.1, 0.01, "3"), T, "pgd", "steps"),
    ("pgd alpha nan", lambda: pgd(MODEL, X, Y, 0.1, NAN, 3), V, "pgd", "alpha"),
    # accumulation
    ("micro_batches of 0", lambda: micro_batches(X, Y, 0), V, "micro_batches", "size"),
    ("micro_batches of 2.5", lambda: micro_batches(X, Y, 2.5), T, "micro_batches", "size"),
    ("micro_batches x, y apart", lambda: micro_batches(X, Y[:3], 4), V, "micro_batches",
     "y has 3"),
    ("accumulate of -1", lambda: accumulate(MODEL, F.cross_entropy, X, Y, -1), V,
     "accumulate", "micro_batch_size"),
]  # fmt: skip


@pytest.mark.parametrize(
    "call, kind, who, field",
    [pytest.param(*case[1:], id=case[0]) for case in OWN_LOOP_CASES],
)
def test_own_loop_pieces_refuse_bad_input(call, kind, who, field):
    _assert_refused(call, kind, who, field)


def _untagged(state):
    if isinstance(state, dict):
        return {k: _untagged(v) for k, v in state.items() if k not in ("class", "version")}
    return state


def test_states_written_before_the_tag_still_load():
    sampler = _sampler()
    next(iter(sampler))
    again = GrowingBatchSampler(100, batch_size=1, seed=1)
    again.load_state_dict(_untagged(sampler.state_dict()))
    assert again.state_dict() == sampler.state_dict()
    controller = _abs()
    controller.step({"eigenvalue": 4.0})
    clone = _abs()
    clone.load_state_dict(_untagged(controller.state_dict()))
    assert clone.state_dict() == controller.state_dict()
    guard, guard_clone = _guard(), _guard()
    guard.step({"eigenvalue": 19.0, "gns": 500.0, "samples": 250, "epoch_end": False})
    guard_clone.load_state_dict(_untagged(guard.state_dict()))
    assert guard_clone.state_dict() == guard.state_dict()
    scaler = _scaler()
    scaler.apply(3.0)
    other = _scaler()
    other.load_state_dict(_untagged(scaler.state_dict()))
    assert other.factor == 3.0
    meter = GradientNoiseMeter()
    meter.load_state_dict({"grad_sq": 1.5, "trace": -0.5, "weight": 0.1, "updates": 3})
    assert meter.estimate() == (-0.5 / 1.5, 15.0, -5.0)
    tracker = _tracker(seed=3)
    tracker_clone = _tracker()
    tracker_clone.load_state_dict(_untagged(tracker.state_dict()))
    assert torch.equal(tracker_clone.state_dict()["generator"], tracker.state_dict()["generator"])
    curvature = CurvatureMeter(_tracker(seed=3))
    curvature.load_state_dict(_untagged(tracker.state_dict()))  # the tracker's state alone
    curvature.load_state_dict(_untagged(curvature.state_dict()))


def test_numpy_values_in_a_state_load_as_python_numbers():
    controller = _abs()
    state = {
        **controller.state_dict(),
        "epoch": np.int64(3),
        "batch_size": np.int64(256),
        "reference": np.float64(4.5),
        "adv_ratio": np.float32(0.25),
    }
    controller.load_state_dict(state)
    assert controller.decision() == Decision(256, 2.0, 0.25)  # before the milestone at 6
    assert type(controller.epoch) is int and type(controller.reference) is float
    sampler = _sampler()
    sampler.load_state_dict({"epoch": np.int64(1), "position": np.int32(40), "batch_size": 16})
    assert type(sampler.position) is int and len(next(iter(sampler))) == 16
    scaler = _scaler()
    scaler.load_state_dict({"factor": np.float64(2.0), "bases": [np.float64(0.5)]})
    assert scaler.optimizer.param_groups[0]["lr"] == 1.0
    meter = GradientNoiseMeter()
    meter.load_state_dict(
        {"grad_sq": np.float64(2.0), "trace": 1.0, "weight": 1.0, "updates": np.int64(2)}
    )
    assert meter.state_dict()["updates"] == 2 and type(meter.state_dict()["grad_sq"]) is float


def test_a_refused_state_changes_nothing():
    sampler = _sampler()
    next(iter(sampler))
    before = sampler.state_dict()
    for state in ({**before, "position": -50}, {**before, "batch_size": 0}):
        with pytest.raises(InvalidValueError):
            sampler.load_state_dict(state)
        assert sampler.state_dict() == before
    controller = _abs()
    before = controller.state_dict()
    with pytest.raises(InvalidValueError):
        controller.load_state_dict({**before, "batch_size": 512, "growths": -1})
    assert controller.state_dict() == before
    scaler = _scaler()
    with pytest.raises(InvalidValueError):
        scaler.load_state_dict({"factor": 2.0, "bases": [NAN]})
    assert scaler.factor == 1.0 and scaler.bases() == [0.1]


def test_checked_decision_passes_good_decisions_as_plain_numbers():
    decision = checked_decision(Deciding(), Decision(np.int64(64), np.float64(0.5), 0))
    assert decision == Decision(64, 0.5, 0.0) and type(decision.batch_size) is int
    assert checked_decision(_fixed(), _fixed().decision()) == _fixed().decision()


# ---- largebatch.fit: refused before any work, handled, recorded


def _blobs(n, seed=0, features=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, features, generator=torch.Generator().manual_seed(9))[y] * 2
    return x + torch.randn(n, features, generator=g), y


def _mlp(classes=3, features=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


class Pair(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body, self.kind = _mlp(), kind

    def forward(self, x):
        out = self.body(x)
        return (out, out) if self.kind == "tuple" else {"logits": out}


class NoParameters(nn.Module):
    def forward(self, x):
        return x[:, :3] * 2


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp().requires_grad_(False)

    def forward(self, x):
        return self.body(x)


class NaNOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x) * float("nan")


class GivesBatch(BatchController):
    """A user controller that decides what it is told to."""

    name = "mine"

    def __init__(self, batch=8, factor=1.0, at_step=None, every=None):
        super().__init__()
        self.batch, self.factor, self.at_step = batch, factor, at_step
        if every is not None:
            self.decide_every = every

    def decision(self):
        early = self.at_step is not None and self.epoch < self.at_step
        return Decision(8 if early else self.batch, self.factor)


class ZeroCadence(GivesBatch):
    decide_every = 0  # a class attribute: no setter sees it


class HoldsObject(FixedBatch):
    def state_dict(self):
        return {**super().state_dict(), "kept": {1, 2}}  # a set: not plain data


def _fit_kwargs(work: Path, **changes):
    """A tiny run writing into ``work/run``."""
    kwargs = dict(
        model=_mlp(),
        train_data=_blobs(32),
        eval_data=_blobs(16, seed=1),
        out=str(work / "run"),
        epochs=1,
        batch_size=8,
        device="cpu",
        verbose=False,
    )
    kwargs.update(changes)
    return kwargs


def _users_folder(work: Path, **kw):
    """``out`` is a folder of the user's own files, named like ours."""
    folder = work / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("lr: 0.5  # my own notes\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    return _fit_kwargs(work, out=str(folder), **kw)


def _notes_folder(work: Path):
    folder = work / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    return _fit_kwargs(work, out=str(folder))


def _meta_model():
    with torch.device("meta"):
        return _mlp()


def _lbfgs(params):
    return torch.optim.LBFGS(params, lr=0.1)


def _nan_lr(params):
    return torch.optim.SGD(params, lr=float("nan"))


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x).detach()


class KeyedByObject(FixedBatch):
    """A user controller whose state has a key that no checkpoint can load."""

    def state_dict(self):
        return {**super().state_dict(), "by_shape": {frozenset({1}): 1.0}}


class Items(torch.utils.data.Dataset):
    """A map-style Dataset of the given ``(input, target)`` items."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _objects(n=8, features=6):
    return np.array([[float(j) for j in range(features)]] * n, dtype=object)


def _labels(n=8):
    return np.arange(n) % 3


# id: (kwargs from the work folder, our exception type, fragment of the message)
REFUSED = {
    # fit's own keywords (not config keys) of the wrong type or value
    "stop-after-a-string": (
        lambda w: _fit_kwargs(w, stop_after="1"),
        InvalidTypeError,
        "fit(): stop_after must be an integer, got str '1'",
    ),
    "stop-after-zero": (lambda w: _fit_kwargs(w, stop_after=0), InvalidValueError, "stop_after"),
    "stop-after-a-float": (
        lambda w: _fit_kwargs(w, stop_after=1.5),
        InvalidTypeError,
        "stop_after must be an integer",
    ),
    "verbose-a-string": (
        lambda w: _fit_kwargs(w, verbose="no"),
        InvalidTypeError,
        "verbose must be True or False",
    ),
    "show-progress-a-string": (
        lambda w: _fit_kwargs(w, show_progress="yes", verbose=True, echo=lambda _line: None),
        InvalidTypeError,
        "show_progress must be True or False",
    ),
    "echo-not-callable": (
        lambda w: _fit_kwargs(w, echo="stdout", verbose=True),
        InvalidTypeError,
        "echo must be a function",
    ),
    "input-range-strings-of-digits": (
        lambda w: _fit_kwargs(w, input_range=("0", "1")),
        InvalidTypeError,
        "input_range must be two finite numbers",
    ),
    "input-range-nan": (
        lambda w: _fit_kwargs(w, input_range=(0.0, NAN)),
        InvalidTypeError,
        "input_range must be two finite numbers",
    ),
    "input-range-reversed": (
        lambda w: _fit_kwargs(w, input_range=(1.0, 0.0)),
        InvalidValueError,
        "low < high",
    ),
    "optimizer-a-string": (
        lambda w: _fit_kwargs(w, optimizer="adam"),
        InvalidTypeError,
        "optimizer is a str 'adam'",
    ),
    # a state that would save but never load: refused before the first write
    "controller-state-keyed-by-an-object": (
        lambda w: _fit_kwargs(w, controller=KeyedByObject(8, (), 0.1)),
        InvalidTypeError,
        "state of controller KeyedByObject['by_shape'] has a key frozenset",
    ),
    # a training set too small for a batch-norm model: no update could ever run
    "batch-norm-on-one-sample": (
        lambda w: _fit_kwargs(w, model=BatchNormNet(), train_data=_blobs(1)),
        UsageError,
        "the training data has 1 sample(s) for 1 process(es)",
    ),
    "batch-norm-on-one-sample-of-a-dataset": (
        lambda w: _fit_kwargs(
            w, model=BatchNormNet(), train_data=Items([(torch.zeros(6), 1)]), eval_data=None
        ),
        UsageError,
        "no update could run",
    ),
    "batch-norm-on-one-sample-gns-micro-batches": (
        lambda w: _fit_kwargs(
            w, model=BatchNormNet(), train_data=_blobs(1), method="gns", micro_batch_size=1
        ),
        UsageError,
        "no update could run",
    ),
    # data of a type that cannot become a tensor
    "inputs-an-object-array": (
        lambda w: _fit_kwargs(w, train_data=(_objects(), _labels())),
        InvalidTypeError,
        "train_data inputs is a NumPy array of dtype object",
    ),
    "targets-an-object-array": (
        lambda w: _fit_kwargs(
            w, train_data=(_objects().astype(np.float32), _labels().astype(object))
        ),
        InvalidTypeError,
        "train_data targets is a NumPy array of dtype object",
    ),
    "targets-strings": (
        lambda w: _fit_kwargs(w, train_data=(np.zeros((3, 6), np.float32), np.array(list("abc")))),
        InvalidTypeError,
        "dtype <U1, which cannot become a tensor",
    ),
    "eval-inputs-dates": (
        lambda w: _fit_kwargs(
            w, eval_data=(np.array(["2026-12-06"] * 4, dtype="datetime64[D]"), _labels(4))
        ),
        InvalidTypeError,
        "eval_data inputs is a NumPy array of dtype datetime64[D]",
    ),
    "dataset-item-an-object-array": (
        lambda w: _fit_kwargs(w, train_data=Items([(_objects(1)[0], 0), (_objects(1)[0], 1)])),
        InvalidTypeError,
        "train_data[0] input is a NumPy array of dtype object",
    ),
    "out-a-folder-of-the-users-files": (_users_folder, UsageError, "no largebatch run wrote"),
    "out-a-folder-with-notes": (_notes_folder, UsageError, "notes.txt"),
    "out-an-int": (lambda w: _fit_kwargs(w, out=5), InvalidTypeError, "out must be a folder"),
    "tensorboard-without-out": (
        lambda w: _fit_kwargs(w, out=None, tensorboard=True),
        ConfigError,
        "tensorboard needs out",
    ),
    "controller-a-string": (
        lambda w: _fit_kwargs(w, controller="gns"),
        InvalidTypeError,
        "method='gns'",
    ),
    "meters-of-numbers": (
        lambda w: _fit_kwargs(w, meters={"gns": 5}),
        InvalidTypeError,
        "meters['gns']",
    ),
    "decide-every-zero": (
        lambda w: _fit_kwargs(w, controller=ZeroCadence()),
        InvalidValueError,
        "decide_every",
    ),
    "first-decision-a-negative-batch": (
        lambda w: _fit_kwargs(w, controller=GivesBatch(batch=-8)),
        InvalidValueError,
        "GivesBatch",
    ),
    "first-decision-a-nan-factor": (
        lambda w: _fit_kwargs(w, controller=GivesBatch(factor=float("nan"))),
        InvalidValueError,
        "GivesBatch",
    ),
    "label-beyond-the-output-width": (
        lambda w: _fit_kwargs(w, model=_mlp(classes=2)),
        UsageError,
        "labels go up to 2",
    ),
    "eval-label-beyond-the-output-width": (
        lambda w: _fit_kwargs(
            w, train_data=(_blobs(32)[0], _blobs(32)[1] % 2), model=_mlp(classes=2)
        ),
        UsageError,
        "labels go up to 2",
    ),
    "model-returns-a-tuple": (
        lambda w: _fit_kwargs(w, model=Pair("tuple")),
        UsageError,
        "returns a tuple",
    ),
    "model-returns-a-dict": (
        lambda w: _fit_kwargs(w, model=Pair("dict")),
        UsageError,
        "returns a dict",
    ),
    "model-without-parameters": (
        lambda w: _fit_kwargs(w, model=NoParameters()),
        UsageError,
        "has no parameters",
    ),
    "model-all-frozen": (lambda w: _fit_kwargs(w, model=Frozen()), UsageError, "frozen"),
    "model-on-the-meta-device": (
        lambda w: _fit_kwargs(w, model=_meta_model()),
        UsageError,
        "meta device",
    ),
    "model-gives-nan": (lambda w: _fit_kwargs(w, model=NaNOut()), UsageError, "not finite"),
    "loss-detached": (
        lambda w: _fit_kwargs(w, model=_Detached()),
        UsageError,
        "does not depend on the model's parameters",
    ),
    "optimizer-lbfgs": (lambda w: _fit_kwargs(w, optimizer=_lbfgs), UsageError, "closure"),
    "optimizer-lr-nan": (
        lambda w: _fit_kwargs(w, optimizer=_nan_lr),
        InvalidValueError,
        "param_groups[0]['lr']",
    ),
    "controller-state-holds-an-object": (
        lambda w: _fit_kwargs(w, controller=HoldsObject(8, (), 0.1)),
        InvalidTypeError,
        "state of controller HoldsObject",
    ),
    "loss-fn-not-callable": (
        lambda w: _fit_kwargs(w, loss_fn="cross_entropy"),
        InvalidTypeError,
        "loss_fn",
    ),
}


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fit_refuses_hostile_input_before_any_work(case, tmp_path):
    build, kind, fragment = REFUSED[case]
    kwargs = build(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(UsageError) as caught:
        largebatch.fit(kwargs.pop("model"), kwargs.pop("train_data"), **kwargs)
    assert isinstance(caught.value, kind), repr(caught.value)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    assert _tree(tmp_path) == before  # nothing written, changed or deleted


def test_a_decision_that_goes_bad_mid_run_stops_there_naming_the_controller():
    controller = GivesBatch(batch=-8, at_step=1, every=16)  # bad from the 2nd epoch
    with pytest.raises(InvalidValueError, match="GivesBatch.*batch") as caught:
        largebatch.fit(_mlp(), _blobs(32), controller=controller, epochs=3, verbose=False)
    assert "\n" not in str(caught.value)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def test_batch_norm_on_a_last_batch_of_one_sample_drops_it_with_a_note(tmp_path):
    # 33 samples at batch 8: the epoch ends with one sample, which BatchNorm1d cannot take
    summary = largebatch.fit(
        BatchNormNet(), _blobs(33), out=tmp_path / "run", epochs=2, batch_size=8, verbose=False
    )
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["dropped_samples"] for r in records] == [1, 1]
    assert summary["updates"] == 2 * 4 and summary["samples"] == 2 * 32
    assert all(math.isfinite(r["train_loss"]) for r in records)


def test_batch_norm_on_a_micro_batch_of_one_sample_joins_the_one_before(tmp_path):
    # batch 9 in micro-batches of 4: 4, 4, 1 -> 4, 5; nothing dropped
    summary = largebatch.fit(
        BatchNormNet(),
        _blobs(36),
        epochs=1,
        batch_size=9,
        max_batch_size=9,
        micro_batch_size=4,
        verbose=False,
    )
    assert summary["updates"] == 4 and summary["samples"] == 36


def test_batch_norm_at_batch_one_is_refused():
    with pytest.raises(UsageError, match="at least 2 samples per process"):
        largebatch.fit(BatchNormNet(), _blobs(8), epochs=1, batch_size=1, verbose=False)


def test_the_record_names_the_users_optimizer_not_the_sgd_defaults(tmp_path):
    out = tmp_path / "run"
    summary = largebatch.fit(
        _mlp(),
        _blobs(32),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
        out=out,
        epochs=1,
        batch_size=8,
        verbose=False,
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert "lr" not in config and "momentum" not in config
    assert config["optimizer"]["class"] == "AdamW"
    assert config["optimizer"]["param_groups"][0]["lr"] == 3e-3
    assert config["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    assert summary["optimizer"] == config["optimizer"]


def test_a_reused_optimizer_starts_from_the_lr_its_groups_hold(tmp_path):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    largebatch.fit(model, _blobs(32), optimizer=optimizer, epochs=1, batch_size=8, verbose=False)
    for group in optimizer.param_groups:
        group["lr"] = 0.03  # the user lowers it for a second call
    largebatch.fit(
        model, _blobs(32), optimizer=optimizer, out=tmp_path / "run", epochs=1, verbose=False
    )
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["lr"] == pytest.approx(0.03)


def test_resuming_on_other_data_is_refused(tmp_path):
    out = tmp_path / "run"
    largebatch.fit(_mlp(), _blobs(32), out=out, epochs=1, batch_size=8, verbose=False)
    before = _tree(out)
    with pytest.raises(CheckpointError, match="sample digest"):
        largebatch.fit(
            _mlp(), _blobs(32, seed=5), out=out, epochs=2, batch_size=8, resume=True, verbose=False
        )
    assert _tree(out) == before


class KeepsNumpy(FixedBatch):
    """A user controller whose state holds NumPy numbers."""

    state_fields = (("epoch", int), ("score", float))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.score = np.float64(0.5)

    def step(self, measurements=None):
        self.score = np.float64(self.score * 2)
        return super().step(measurements)

    def state_dict(self):
        return {"epoch": np.int64(self.epoch), "score": self.score}


def test_a_controller_state_of_numpy_numbers_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    kwargs = dict(out=out, batch_size=8, verbose=False)
    largebatch.fit(_mlp(), _blobs(32), controller=KeepsNumpy(8, (), 0.1), epochs=1, **kwargs)
    resumed = KeepsNumpy(8, (), 0.1)
    largebatch.fit(_mlp(), _blobs(32), controller=resumed, epochs=2, resume=True, **kwargs)
    assert resumed.epoch == 2 and resumed.score == 2.0
    saved = load_checkpoint(out / "checkpoint.pt")["controller"]
    assert type(saved["score"]) is float


class KeyedByNumpy(FixedBatch):
    """A user controller whose state is keyed by NumPy integers (batch -> score)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {}

    def step(self, measurements=None):
        self.seen[np.int64(len(self.seen) * 8)] = np.float32(0.25)
        return super().step(measurements)

    def state_dict(self):
        return {"epoch": np.int64(self.epoch), "seen": dict(self.seen)}

    def load_state_dict(self, state):
        self.epoch, self.seen = state["epoch"], dict(state["seen"])


def _numpy_momentum(params):
    return torch.optim.SGD(params, lr=np.float64(0.05), momentum=np.float64(0.9))


@pytest.mark.parametrize(
    "users",
    [
        pytest.param(lambda: {"controller": KeyedByNumpy(8, (), 0.1)}, id="numpy-keys"),
        pytest.param(lambda: {"optimizer": _numpy_momentum}, id="numpy-hyper-parameters"),
        pytest.param(
            lambda: {"optimizer": lambda p: torch.optim.Adam(p, lr=np.float32(1e-3))},
            id="numpy-adam-lr",
        ),
    ],
)
def test_numpy_values_in_users_states_save_and_resume_end_to_end(users, tmp_path):
    out = tmp_path / "run"
    kwargs = dict(out=out, batch_size=8, verbose=False)
    first = largebatch.fit(_mlp(), _blobs(32), epochs=1, **users(), **kwargs)
    second = largebatch.fit(_mlp(), _blobs(32), epochs=2, resume=True, **users(), **kwargs)
    assert (first["epochs"], second["epochs"]) == (1, 2)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    saved = load_checkpoint(out / "checkpoint.pt")  # weights_only: plain data throughout
    if "seen" in saved["controller"]:
        assert saved["controller"]["seen"] == {0: 0.25, 8: 0.25}
        assert all(type(key) is int for key in saved["controller"]["seen"])
    group = saved["optimizer"]["param_groups"][0]
    assert all(type(v) in (int, float, bool, str, tuple, list, type(None)) for v in group.values())
    config = yaml.safe_load((out / "config.yaml").read_text())  # YAML took them too
    recorded = config["optimizer"]  # the built-in one by name, a user's as its record
    assert recorded == "sgd" or type(recorded["param_groups"][0]["lr"]) is float


def _decaying(**changes):
    return dict(epochs=2, batch_size=8, lr_decay_epochs=[1], lr_decay=0.1, verbose=False, **changes)


def test_a_second_run_with_an_optimizer_a_factory_closes_over_starts_from_the_users_lr(tmp_path):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    factory = lambda params: optimizer  # noqa: E731  (the user's closure)
    first = largebatch.fit(model, _blobs(32), optimizer=factory, out=tmp_path / "a", **_decaying())
    assert [r["lr"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == pytest.approx(
        [0.1, 0.01]
    )  # the first run decayed it ...
    assert optimizer.param_groups[0]["lr"] == 0.1  # ... and handed it back as it came
    assert "base_lr" not in optimizer.param_groups[0]
    largebatch.fit(model, _blobs(32), optimizer=factory, out=tmp_path / "b", **_decaying())
    second = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["lr"] for r in second] == pytest.approx([0.1, 0.01])
    assert first["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_a_reused_optimizer_gets_its_lrs_back_per_group_after_a_growing_run():
    model = _mlp()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.05}, {"params": model[2].parameters()}],
        lr=0.2,
    )
    largebatch.fit(
        model, _blobs(64), optimizer=optimizer, method="gg", max_batch_size=32, **_decaying()
    )  # gg turns the decay into a growth: the LR factor changes as the batch does
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.2]


def test_a_reused_optimizer_gets_its_lr_back_when_the_run_fails(tmp_path):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    controller = GivesBatch(batch=-8, factor=4.0, at_step=1, every=16)  # bad from epoch 2
    with pytest.raises(InvalidValueError, match="GivesBatch"):
        largebatch.fit(
            model, _blobs(32), optimizer=optimizer, controller=controller, epochs=3, verbose=False
        )
    assert optimizer.param_groups[0]["lr"] == 0.3 and "base_lr" not in optimizer.param_groups[0]


class SlowItems(Items):
    """A slow Dataset: Ctrl-C (a real SIGINT to this process) arrives while it reads
    item ``at`` (or its length, for ``at`` None)."""

    def __init__(self, n, at):
        x, y = _blobs(n)
        super().__init__(list(zip(x, y, strict=True)))
        self.at = at

    def _wait_for_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the handler raises KeyboardInterrupt at once
        raise AssertionError("no KeyboardInterrupt came")

    def __len__(self):
        if self.at is None:
            self._wait_for_ctrl_c()
        return super().__len__()

    def __getitem__(self, i):
        if i == self.at:
            self._wait_for_ctrl_c()
        return super().__getitem__(i)


@pytest.mark.parametrize(
    "data, where",
    [
        # a Dataset is read lazily: its first item is read before training, to learn
        # the shapes (a later one is read in training, where Ctrl-C stops and saves)
        (lambda: {"train_data": SlowItems(16, at=0)}, "reading train_data[0]"),
        (
            lambda: {"train_data": _blobs(16), "eval_data": SlowItems(8, at=0)},
            "reading eval_data[0]",
        ),
        (lambda: {"train_data": SlowItems(16, at=None)}, "reading len(train_data)"),
    ],
    ids=["train-item", "eval-item", "train-len"],
)
def test_ctrl_c_while_fit_reads_a_dataset_is_a_plain_keyboard_interrupt(data, where, tmp_path):
    (tmp_path / "mine.txt").write_text("the user's own file")
    before = _tree(tmp_path)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    kwargs = _fit_kwargs(tmp_path, **data())
    with pytest.raises(KeyboardInterrupt) as caught:
        largebatch.fit(kwargs.pop("model"), kwargs.pop("train_data"), **kwargs)
    assert type(caught.value) is KeyboardInterrupt  # not a class of ours: caught as usual
    assert str(caught.value) == f"{where} was interrupted"
    assert _tree(tmp_path) == before  # nothing written, the run folder not left behind
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fit_prints_the_table_unless_verbose_is_false(capsys):
    largebatch.fit(_mlp(), _blobs(32), epochs=1, batch_size=8, show_progress=False)
    shown = capsys.readouterr().out
    assert "train_loss" in shown and "training Sequential" in shown
    largebatch.fit(_mlp(), _blobs(32), epochs=1, batch_size=8, verbose=False)
    assert capsys.readouterr().out == ""


def test_the_curvature_guard_caps_the_lr_of_the_users_optimizer(tmp_path):
    """The cap comes from the optimizer that runs (lr 2.0, no momentum): lr <= 0.5 * 2 /
    eigenvalue, not from the config's default SGD settings (0.02, 0.9)."""
    largebatch.fit(
        _mlp(),
        _blobs(64),
        optimizer=lambda p: torch.optim.SGD(p, lr=2.0),
        method="bl",
        curvature_guard=True,
        guard_samples=64,
        epochs=2,
        batch_size=16,
        out=tmp_path / "run",
        verbose=False,
    )
    first, second = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    cap = 0.5 * 2.0 * (1 + 0.0) / first["eigenvalue"]
    assert cap < 2.0  # the cap binds here
    assert second["lr"] == pytest.approx(cap, rel=1e-6)


def test_a_later_decision_below_two_samples_for_batch_norm_is_refused_naming_it():
    controller = GivesBatch(batch=1, at_step=1)  # 8, then 1 from the second epoch
    with pytest.raises(UsageError, match="GivesBatch decided a batch of 1") as caught:
        largebatch.fit(BatchNormNet(), _blobs(32), controller=controller, epochs=3, verbose=False)
    assert "\n" not in str(caught.value)


def test_batch_norm_with_the_noise_meter_never_runs_a_single_sample_piece():
    # a noise-meter micro-batch of 1 would cut the measured updates into single samples
    summary = largebatch.fit(
        BatchNormNet(), _blobs(64), method="gns", gns_micro_batch=1, gns_every=0.25,
        epochs=2, batch_size=8, verbose=False,
    )  # fmt: skip
    assert summary["epochs"] == 2 and math.isfinite(summary["final_train_loss"])


def test_a_stop_asked_during_start_up_writes_nothing(tmp_path):
    from largebatch.build import build_parts, settings
    from largebatch.checkpoint import RunCheckpoint
    from largebatch.config import TrainConfig
    from largebatch.distributed import World
    from largebatch.engine import TrainingInterrupted, run
    from largebatch.source import as_source

    config = TrainConfig(dataset="blobs", model="mlp", epochs=1, batch_size=8, device="cpu")
    data = as_source(_blobs(32))
    parts = build_parts(config, _mlp(), data, World(), torch.device("cpu"))
    checkpoint = RunCheckpoint(tmp_path / "checkpoint.pt", World())
    started = []
    with pytest.raises(TrainingInterrupted, match="SIGINT: stopped before the run started"):
        run(
            parts, settings(config), world=World(), device=torch.device("cpu"),
            checkpoint=checkpoint, should_stop=lambda: "SIGINT", on_start=started.append,
        )  # fmt: skip
    assert started == [] and list(tmp_path.iterdir()) == []


def test_a_model_with_nan_weights_is_refused_before_any_work(tmp_path):
    model = _mlp()
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    with pytest.raises(UsageError, match="NaN or infinity before training"):
        largebatch.fit(model, _blobs(32), out=tmp_path / "run", verbose=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("share", "field"), [(dict(eps=float("nan")), "eps"), (dict(steps=0), "steps")]
)
def test_an_adversarial_share_refuses_bad_settings(share, field):
    from largebatch.adversarial import AdversarialShare

    _assert_refused(
        lambda: AdversarialShare("pgd", **share), InvalidValueError, "AdversarialShare", field
    )


def test_fit_refuses_an_input_range_of_strings():
    with pytest.raises(UsageError, match="input_range must be two finite numbers"):
        largebatch.fit(_mlp(), _blobs(32), input_range=("a", "b"), verbose=False)
