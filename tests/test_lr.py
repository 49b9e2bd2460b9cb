"""The LR rules lr.py owns: milestones, linear scaling, heavy-ball stability."""

import math
import random

import pytest
import torch
from torch import nn

from largebatch import controllers
from largebatch.lr import (
    milestones_reached,
    momentum_of,
    scaling_factor,
    stability,
    stability_limit,
    step_decay,
)


def test_milestones_are_counted_from_their_epoch_index_on():
    milestones = (3, 6, 6, 10)
    assert [milestones_reached(e, milestones) for e in range(12)] == [
        0, 0, 0, 1, 1, 1, 3, 3, 3, 3, 4, 4,
    ]  # fmt: skip
    assert milestones_reached(5.999, milestones) == 1  # fractional epochs (gns)
    assert milestones_reached(6.0, milestones) == 3
    assert milestones_reached(100, ()) == 0


def test_step_decay_is_decay_to_the_milestones_reached_and_lives_in_lr():
    assert controllers.step_decay is step_decay  # still importable where it used to be
    rng = random.Random(0)
    for _ in range(200):
        milestones = sorted(rng.randrange(0, 30) for _ in range(rng.randrange(0, 4)))
        decay, epoch = rng.uniform(0.01, 1.0), rng.uniform(0, 30)
        assert step_decay(epoch, milestones, decay) == decay ** sum(
            1 for m in milestones if epoch >= m
        )


def test_linear_scaling_is_the_batch_ratio_to_the_last_bit():
    for base in (1, 3, 7, 100, 128, 250):
        for batch in range(base, base * 40, max(1, base // 3)):
            assert scaling_factor("linear", batch / base, None, base) == batch / base


def _engine_stability(eigenvalue, lr, momentum):
    """The formula the engine wrote before lr.py owned it."""
    if eigenvalue is None:
        return None
    return eigenvalue * lr / (2.0 * (1.0 + momentum))


def test_stability_is_the_engine_formula_to_the_last_bit():
    rng = random.Random(1)
    assert stability(None, 0.1, 0.9) is None
    for _ in range(2000):
        eigenvalue = rng.choice([rng.uniform(-5, 5), rng.lognormvariate(0, 4), 0.0])
        lr, momentum = rng.lognormvariate(-3, 2), rng.choice([0.0, 0.9, rng.random()])
        assert stability(eigenvalue, lr, momentum) == _engine_stability(eigenvalue, lr, momentum)


def test_stability_is_one_at_the_stability_limit():
    for eigenvalue, momentum in [(1.0, 0.0), (37.5, 0.9), (1e4, 0.5)]:
        limit = stability_limit(eigenvalue, momentum)
        assert limit == 2.0 * (1.0 + momentum) / eigenvalue
        assert stability(eigenvalue, limit, momentum) == pytest.approx(1.0, rel=1e-15)
        assert math.isclose(stability(eigenvalue, limit / 2, momentum), 0.5)


def test_momentum_of_reads_the_first_group_and_is_zero_without_one():
    params = [nn.Parameter(torch.zeros(2))]
    assert momentum_of(torch.optim.SGD(params, lr=0.1, momentum=0.9)) == 0.9
    assert momentum_of(torch.optim.SGD(params, lr=0.1)) == 0.0
    assert momentum_of(torch.optim.Adam(params, lr=0.1)) == 0.0


class _Lion(torch.optim.Optimizer):
    """An optimizer of a user's, with Adam's betas in its defaults."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99)):
        super().__init__(params, {"lr": lr, "betas": betas})

    def step(self, closure=None):
        return None


class _MyAdamW(torch.optim.AdamW):
    pass


def test_auto_picks_the_rule_of_the_optimizers_family():
    from largebatch.lr import rule_for

    params = [torch.nn.Parameter(torch.zeros(2))]
    assert rule_for("auto", torch.optim.SGD(params, lr=0.1)) == "linear"
    assert rule_for("auto", None) == "linear"  # the default SGD
    for adaptive in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, _MyAdamW, _Lion):
        assert rule_for("auto", adaptive(params, lr=1e-3)) == "sqrt", adaptive.__name__
    assert rule_for("adascale", torch.optim.Adam(params)) == "adascale"  # as asked
    with pytest.raises(ValueError, match="rule"):
        rule_for("cubic", None)
