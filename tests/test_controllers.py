import math

import pytest

from largebatch.config import TrainConfig
from largebatch.controllers import (
    AdaptiveBatch,
    IncreaseBatchInsteadOfDecay,
    LinearScalingWarmup,
    make_controller,
)


def _config(method, **changes):
    values = dict(
        method=method,
        epochs=20,
        batch_size=128,
        max_batch_size=128 * 16,
        lr_decay_epochs=[6, 12],
        lr_decay=0.2,
    )
    values.update(changes)
    return TrainConfig(**values).validate()


def _drive(controller, eigenvalues):
    """Decisions for epoch 0, then after each step with the given eigenvalue."""
    decisions = [controller.decision()]
    for value in eigenvalues:
        decisions.append(controller.step({"eigenvalue": value}))
    return decisions


@pytest.mark.parametrize("method", ["bl", "fb", "gg", "abs", "absa"])
def test_every_controller_conforms(method):
    """The shared contract: valid decisions, and a state_dict that resumes exactly."""
    config = _config(method)
    controller = make_controller(config)
    assert controller.name == method
    eigenvalues = [10.0, 9.0, 4.0, 4.5, 1.0, math.nan, None, 0.2, 0.1, 0.05]
    decisions = _drive(controller, eigenvalues[:5])
    clone = make_controller(config)
    clone.load_state_dict(controller.state_dict())
    assert clone.decision() == controller.decision()
    rest_a = _drive(controller, eigenvalues[5:])[1:]
    rest_b = _drive(clone, eigenvalues[5:])[1:]
    assert rest_a == rest_b
    for d in decisions + rest_a:
        assert config.batch_size <= d.batch_size <= config.max_batch_size
        assert d.lr_factor > 0 and 0 <= d.adv_ratio <= 1
        assert 0.0 < controller.warmup_factor(0.5) <= 1.0
    assert isinstance(controller.wants_eigenvalue, bool)


def test_abs_doubles_when_the_eigenvalue_halves_and_scales_lr_linearly():
    c = AdaptiveBatch(128, 128 * 8, milestones=[], decay=0.2, adv_ratio=0.2, duration=10)
    d = _drive(c, [10.0, 6.0, 5.0, 2.4, 2.0, 1.2])
    # epoch 1 sets the reference 10; 6 > 5 no; 5 <= 5 grows (ref 5); 2.4 <= 2.5 grows (ref 2.4);
    # 2.0 no; 1.2 <= 1.2 grows to the cap of 1024.
    assert [x.batch_size for x in d] == [128, 128, 128, 256, 512, 512, 1024]
    assert [x.lr_factor for x in d] == [1, 1, 1, 2, 4, 4, 8]
    assert [x.adv_ratio for x in d] == [0.2, 0.2, 0.2, 0.1, 0.05, 0.05, 0.0]
    assert c.reference == 1.2 and not c.wants_eigenvalue
    # at the cap the eigenvalue is no longer read
    assert c.step({"eigenvalue": 1e-9}).batch_size == 1024


def test_abs_duration_rule_grows_without_moving_the_reference():
    c = AdaptiveBatch(128, 128 * 64, milestones=[], decay=0.2, duration=3)
    d = _drive(c, [10.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])
    # the reference epoch counts towards the duration, as in the reference code
    assert [x.batch_size for x in d] == [128, 128, 128, 256, 256, 256, 512, 512]
    assert c.reference == 10.0 and c.last_reason == ""


def test_abs_ignores_failed_estimates():
    c = AdaptiveBatch(128, 1024, milestones=[], decay=0.2, duration=10)
    d = _drive(c, [None, math.inf, 8.0, math.nan, 3.9])
    assert [x.batch_size for x in d] == [128, 128, 128, 128, 128, 256]
    assert c.reference == 3.9


def test_abs_milestone_decay_multiplies_the_batch_scaling():
    c = AdaptiveBatch(100, 400, milestones=[2], decay=0.1, duration=10)
    d = _drive(c, [4.0, 2.0, 2.0])
    assert [x.batch_size for x in d] == [100, 100, 200, 200]
    assert [x.lr_factor for x in d] == pytest.approx([1, 1, 0.2, 0.2])


def test_absa_stops_adversarial_training_at_half_the_epochs():
    c = make_controller(_config("absa", epochs=4, max_batch_size=128 * 1024))
    d = _drive(c, [10.0, 10.0, 10.0])
    assert [x.adv_ratio for x in d] == [0.2, 0.2, 0.0, 0.0]
    assert make_controller(_config("abs")).decision().adv_ratio == 0.0


def test_fb_scales_lr_with_the_batch_after_a_linear_warmup():
    c = LinearScalingWarmup(128, 1024, milestones=[6], decay=0.2, warmup_epochs=2)
    d = c.decision()
    assert d.batch_size == 1024 and d.lr_factor == 8
    # lr = 8 * warmup: starts at the base LR and reaches 8x after 2 epochs, linearly
    assert d.lr_factor * c.warmup_factor(0.0) == pytest.approx(1.0)
    assert d.lr_factor * c.warmup_factor(0.5) == pytest.approx(1 + 0.25 * 7)
    c.step()
    assert d.lr_factor * c.warmup_factor(0.5) == pytest.approx(1 + 0.75 * 7)
    c.step()
    assert c.warmup_factor(0.0) == 1.0
    for _ in range(4):
        c.step()
    assert c.decision().lr_factor == pytest.approx(8 * 0.2)


def test_gg_grows_the_batch_at_milestones_then_decays_the_lr():
    c = IncreaseBatchInsteadOfDecay(128, 128 * 16, milestones=[1, 2, 3], decay=0.2)
    d = _drive(c, [None] * 3)
    assert [x.batch_size for x in d] == [128, 640, 2048, 2048]
    # 640 -> 3200 does not fit under 2048: the batch takes 3.2x and the LR 0.2 * 3.2, so
    # that lr / batch still falls 5x; after that the LR alone decays.
    assert [x.lr_factor for x in d] == pytest.approx([1, 1, 0.64, 0.128])
    for a, b in zip(d, d[1:], strict=False):
        assert (b.lr_factor / b.batch_size) == pytest.approx(0.2 * a.lr_factor / a.batch_size)


@pytest.mark.parametrize("method", ["bl", "fb", "gg"])
def test_baselines_train_adversarially_at_a_constant_fraction_when_asked(method):
    c = make_controller(_config(method, adversarial=True, adv_ratio=0.3, epochs=4))
    d = _drive(c, [5.0, 1.0, 0.1])
    assert [x.adv_ratio for x in d] == [0.3, 0.3, 0.0, 0.0]
    assert make_controller(_config(method)).decision().adv_ratio == 0.0


def test_absa_without_adversarial_training_is_abs():
    c = make_controller(_config("absa", adversarial=False))
    assert c.decision().adv_ratio == 0.0
