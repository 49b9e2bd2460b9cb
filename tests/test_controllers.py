import math
import random

import pytest

from largebatch.build import make_controller
from largebatch.config import TrainConfig
from largebatch.controllers import (
    AdaptiveBatch,
    CurvatureGuard,
    FixedBatch,
    IncreaseBatchInsteadOfDecay,
    LinearScalingWarmup,
    NoiseScaleBatch,
    ScheduledBatch,
    Seesaw,
    checked_decision,
    parse_schedule,
)
from largebatch.errors import ConfigError, InvalidValueError, StateError
from largebatch.lr import scaling_factor


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


def _untagged(state):
    """``state`` as the code wrote it before states carried their class and version."""
    if isinstance(state, dict):
        return {k: _untagged(v) for k, v in state.items() if k not in ("class", "version")}
    return state


def _plain(value):
    """Whether ``value`` holds only plain Python values (what a checkpoint should)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return value is None or type(value) in (bool, int, float, str)


def _drive(controller, eigenvalues):
    """Decisions for epoch 0, then after each step with the given eigenvalue (and a noise
    scale 300 times it)."""
    decisions = [controller.decision()]
    for i, value in enumerate(eigenvalues):
        noise = None if value is None else value * 300
        measured = {"eigenvalue": value, "gns": noise, "samples": (i + 1) * 60_000}
        decisions.append(controller.step(measured))
    return decisions


@pytest.mark.parametrize(
    "method, changes",
    [(m, {}) for m in ("bl", "fb", "gg", "abs", "absa", "gns", "seesaw")]
    + [("gns", {"curvature_guard": True}), ("bl", {"curvature_guard": True})]
    + [("schedule", {"batch_schedule": "0:128 100k:256 250k:1024"})]
    + [("schedule", {"batch_schedule": "0:128 100k:256", "lr_scaling": "sqrt"})],
)
def test_every_controller_conforms(method, changes):
    """The shared contract: valid decisions, and a state_dict that resumes exactly."""
    config = _config(method, **changes)
    controller = make_controller(config, num_samples=60_000)
    assert controller.name == method
    eigenvalues = [10.0, 9.0, 4.0, 4.5, 1.0, math.nan, None, 0.2, 0.1, 0.05]
    decisions = _drive(controller, eigenvalues[:5])
    state = controller.state_dict()
    assert state["class"] == type(controller).__name__ and _plain(state)
    clone = make_controller(config, num_samples=60_000)
    clone.load_state_dict(state)
    assert clone.decision() == controller.decision() and clone.state_dict() == state
    old = make_controller(config, num_samples=60_000)  # a checkpoint from before the tag
    old.load_state_dict(_untagged(state))
    assert old.state_dict() == state
    rest_a = _drive(controller, eigenvalues[5:])[1:]
    rest_b = _drive(clone, eigenvalues[5:])[1:]
    assert rest_a == rest_b
    for d in decisions + rest_a:
        assert config.batch_size <= d.batch_size <= config.max_batch_size
        assert d.lr_factor > 0 and 0 <= d.adv_ratio <= 1
        assert checked_decision(controller, d) == d
        assert 0.0 < controller.warmup_factor(0.5) <= 1.0
    assert isinstance(controller.wants_eigenvalue, bool)
    # another class's state is refused, by name, and leaves the controller as it was
    other = "bl" if method in ("abs", "absa") else "abs"
    foreign = make_controller(_config(other), num_samples=60_000)
    before = controller.state_dict()
    with pytest.raises(StateError, match=type(foreign).__name__) as caught:
        controller.load_state_dict(foreign.state_dict())
    assert type(controller).__name__ in str(caught.value)
    assert controller.state_dict() == before


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


def test_lr_scaling_rules_have_their_closed_forms():
    assert scaling_factor("linear", 8, None, 128) == 8
    assert scaling_factor("sqrt", 16, None, 128) == pytest.approx(4)
    # adascale: r = S (phi + B0) / (phi + S B0); S without noise-free limits, 1 without noise
    assert scaling_factor("adascale", 4, 1000.0, 100) == pytest.approx(4 * 1100 / 1400)
    assert scaling_factor("adascale", 4, 1e12, 100) == pytest.approx(4, rel=1e-6)
    assert scaling_factor("adascale", 4, 0.0, 100) == pytest.approx(1)
    assert scaling_factor("adascale", 4, None, 100) == 1.0


def _adascale_gain(scale, grad_sq, trace, base_batch):
    """AdaScale's definition: (sigma^2 + mu^2) / (sigma^2 / S + mu^2), with the base
    batch's gradient variance sigma^2 = tr(Sigma) / B0 and mu^2 = |G|^2 each clamped at 0
    (Johnson et al. 2020); 1 when both vanish."""
    sigma_sq, mu_sq = max(trace, 0.0) / base_batch, max(grad_sq, 0.0)
    if sigma_sq + mu_sq == 0:
        return 1.0
    return (sigma_sq + mu_sq) / (sigma_sq / scale + mu_sq)


@pytest.mark.parametrize(
    "grad_sq, trace",
    [(2.0, 300.0), (1e-3, 50.0), (5.0, 0.5), (0.0, 300.0), (-0.7, 300.0), (2.0, -40.0)],
)
@pytest.mark.parametrize("scale", [1, 2, 16])
def test_the_adascale_gain_follows_its_definition_at_the_limits(grad_sq, trace, scale):
    # the meter's noise scale from the same estimates: tr / |G|^2, inf when |G|^2 <= 0
    phi = trace / grad_sq if grad_sq > 0 else math.inf
    expected = _adascale_gain(scale, grad_sq, trace, 64)
    assert scaling_factor("adascale", scale, phi, 64) == pytest.approx(expected, rel=1e-12)
    if grad_sq <= 0:  # pure noise: the gain is the scale itself
        assert scaling_factor("adascale", scale, phi, 64) == scale


def test_gns_keeps_a_pure_noise_reading_for_the_adascale_gain_but_does_not_grow_on_it():
    controller = NoiseScaleBatch(
        64, 1024, [], 1.0, num_samples=1000, rule="kappa", every_fraction=0.25, lr_rule="adascale",
        confirmations=1,
    )  # fmt: skip
    controller.batch_size = 256  # scale 4
    controller.step({"gns": math.inf, "samples": 250})
    assert controller.batch_size == 256 and controller.decision().lr_factor == 4.0
    state = controller.state_dict()
    again = NoiseScaleBatch(64, 1024, [], 1.0, num_samples=1000, rule="kappa", lr_rule="adascale")
    again.load_state_dict(state)
    assert again.noise_scale == math.inf and again.decision().lr_factor == 4.0
    controller.step({"gns": -5.0, "samples": 500})  # a trace measured below 0: no noise
    assert controller.decision().lr_factor == 1.0


def test_gns_doubles_after_two_agreeing_points_and_only_grows():
    controller = NoiseScaleBatch(
        128, 1024, [], 1.0, num_samples=1000, rule="kappa", every_fraction=0.25, lr_rule="adascale"
    )
    assert controller.decide_every == 250 and controller.wants == {"gns"}
    seen = []
    for i, phi in enumerate([200, 50, 200, 300, 300, 300, 900, 4000, 4000, 4000, 4000, 100]):
        decision = controller.step({"gns": phi, "epoch_end": False, "samples": 250 * (i + 1)})
        seen.append(decision.batch_size)
    # 128 <= 200 once, then 50 breaks the run; 200, 300 grow to 256; 300, 300 to 512
    # (256 <= 300); 900 alone is one point at 512; 4000 x4: 1024 after two, capped after
    assert seen == [128, 128, 128, 256, 256, 512, 512, 1024, 1024, 1024, 1024, 1024]
    assert controller.growths == 3 and controller.last_reason == ""
    # at the cap, adascale still wants the noise scale for its gain
    assert controller.wants == {"gns"}
    assert controller.decision().lr_factor == pytest.approx(8 * (100 + 128) / (100 + 1024))


def test_gns_counts_milestones_in_samples_or_in_base_batch_progress():
    controller = NoiseScaleBatch(
        100,
        400,
        [1],
        0.1,
        num_samples=1000,
        rule="kappa",
        milestones_by="progress",
        lr_rule="adascale",
    )
    controller.batch_size, controller.noise_scale = 400, 100.0  # r = 4 * 200 / 500 = 1.6
    for i in range(4):  # one epoch of samples at batch 400: progress 1.6 / 4 = 0.4 epochs
        controller.step({"gns": 100.0, "epoch_end": False, "samples": 250 * (i + 1)})
    assert controller.progress == pytest.approx(0.4)
    assert controller.decision().lr_factor == pytest.approx(1.6)  # milestone 1 not reached
    # by default the milestones count samples: one epoch of them reaches milestone 1
    by_samples = NoiseScaleBatch(
        100, 400, [1], 0.1, num_samples=1000, rule="kappa", lr_rule="adascale"
    )
    by_samples.batch_size, by_samples.noise_scale = 400, 100.0
    by_samples.step({"gns": 100.0, "epoch_end": False, "samples": 999})
    assert by_samples.decision().lr_factor == pytest.approx(1.6)
    by_samples.step({"gns": 100.0, "samples": 1000})
    assert by_samples.decision().lr_factor == pytest.approx(0.16)
    linear = NoiseScaleBatch(100, 400, [1], 0.1, num_samples=1000, rule="kappa", lr_rule="linear")
    linear.step({"gns": 10.0, "samples": 1000})
    assert linear.decision().lr_factor == pytest.approx(0.1)


def test_the_curvature_guard_caps_the_lr_at_the_stability_limit():
    inner = FixedBatch(128, [], 1.0)
    guard = CurvatureGuard(inner, base_lr=0.1, momentum=0.9, fraction=0.5, every_points=2)
    assert guard.wants == {"eigenvalue"}  # no estimate yet
    assert guard.decision().lr_factor == 1.0
    guard.step({"eigenvalue": 19.0, "epoch_end": False})
    # lr <= 0.5 * 2 * 1.9 / 19 = 0.1: the factor may stay 1
    assert guard.decision().lr_factor == pytest.approx(1.0)
    assert guard.wants == frozenset()  # every second point: not the next one
    guard.step({"epoch_end": False})
    assert guard.wants == {"eigenvalue"}
    guard.step({"eigenvalue": 76.0, "epoch_end": False})
    assert guard.decision().lr_factor == pytest.approx(0.25)  # 0.025 / 0.1
    guard.step({"epoch_end": True})
    assert guard.epoch == 1 and guard.decision().lr_factor == pytest.approx(0.25)


def test_linear_scaling_controllers_keep_their_lr_factors_to_the_last_bit():
    # the factors as the controllers computed them inline before lr.scaling_factor did
    for base, top in [(128, 2048), (100, 1000), (3, 97)]:
        fb = LinearScalingWarmup(base, top, [2, 4], 0.3, warmup_epochs=1)
        absc = AdaptiveBatch(base, top, [2, 4], 0.3, growth_factor=3, duration=1)
        for epoch in range(8):
            decay = 0.3 ** sum(1 for m in (2, 4) if epoch >= m)
            assert fb.decision().lr_factor == top / base * decay
            assert absc.decision().lr_factor == absc.batch_size / base * decay
            fb.step()
            absc.step()


def test_gg_and_gns_count_the_milestones_through_lr():
    gg = IncreaseBatchInsteadOfDecay(128, 512, [1, 2, 3], 0.5)
    batches = []
    for _ in range(5):
        batches.append(gg.decision().batch_size)
        gg.step()
    assert batches == [128, 256, 512, 512, 512]
    gns = NoiseScaleBatch(128, 128, [1, 2], 0.1, num_samples=1000, rule="kappa", every_fraction=0.5)
    factors = []
    for samples in (0, 999, 1000, 2500):
        gns.step({"samples": samples, "epoch_end": False})
        factors.append(gns.decision().lr_factor)
    assert factors == [1.0, 1.0, 0.1, 0.1**2]


def _at_epochs(controller, epochs):
    """Decisions at the start of epochs 0..epochs-1 (epoch-end steps in between)."""
    decisions = [controller.decision()]
    for _ in range(epochs - 1):
        decisions.append(controller.step({"epoch_end": True}))
    return decisions


def test_seesaw_trades_each_decay_for_a_growth_and_sqrt_of_it():
    c = Seesaw(64, 64 * 16, milestones=[2, 4, 6], decay=0.5)
    d = _at_epochs(c, 8)
    assert [x.batch_size for x in d] == [64, 64, 128, 128, 256, 256, 512, 512]
    half = 0.5**0.5
    assert [x.lr_factor for x in d] == pytest.approx([1, 1, half, half, 0.5, 0.5, half**3, half**3])
    # lr / sqrt(batch), Adam's noise temperature, follows the step schedule's path
    for x, decays in zip(d, [0, 0, 1, 1, 2, 2, 3, 3], strict=True):
        assert x.lr_factor / (x.batch_size / 64) ** 0.5 == pytest.approx(0.5**decays)


def test_seesaw_at_the_cap_decays_the_lr():
    c = Seesaw(100, 300, milestones=[1, 2, 3], decay=0.5)
    d = _at_epochs(c, 4)
    assert [x.batch_size for x in d] == [100, 200, 300, 300]
    # a growth by 1.5 of the 2 it wanted: LR x 0.5 sqrt(1.5); then a plain decay
    assert d[2].lr_factor == pytest.approx(0.5**0.5 * 0.5 * 1.5**0.5)
    assert d[3].lr_factor == pytest.approx(d[2].lr_factor * 0.5)
    assert d[3].lr_factor / (300 / 100) ** 0.5 == pytest.approx(0.5**3)
    assert [x.batch_size for x in _at_epochs(Seesaw(100, 300, [1], decay=1.0), 3)] == [100] * 3


def test_a_schedule_keyed_on_samples_changes_the_batch_at_its_points():
    c = ScheduledBatch("0:32 1k:64 3k:128", 32, 256, [], 1.0, num_samples=2000)
    assert c.decide_every == 1000  # the gcd of the points
    seen = [0, 999, 1000, 2000, 2999, 3016, 10_000]
    batches = [c.step({"samples": n, "epoch_end": False}).batch_size for n in seen]
    assert batches == [32, 32, 64, 64, 64, 128, 128]
    assert c.decision().lr_factor == 4.0  # linear: 128 / 32
    assert c.last_reason == ""
    again = ScheduledBatch("0:32 1k:64 3k:128", 32, 256, [], 1.0, num_samples=2000)
    again.load_state_dict(c.state_dict())
    assert again.decision() == c.decision()
    sqrt = ScheduledBatch("0:32 1k:128", 32, 256, [1], 0.5, num_samples=500, lr_rule="sqrt")
    assert sqrt.decide_every == 500  # at most an epoch
    assert sqrt.step({"samples": 1000}).lr_factor == pytest.approx(2.0 * 0.5)  # epoch 1
    assert sqrt.last_reason == "schedule at 1000 samples"


def test_bad_schedules_are_refused_in_one_line():
    assert parse_schedule("0:32 200k:64 1.5M:128") == [(0, 32), (200_000, 64), (1_500_000, 128)]
    for text, match in (
        ("32:8", "first entry must be at 0"),
        ("0:8 5k:16 5k:32", "increasing order"),
        ("0:8 ten:16", "is not AT:BATCH"),
        ("0:8 1.5:9", "whole AT"),
        ("0:0", "batch must be >= 1"),
        ("", "empty"),
    ):
        with pytest.raises(InvalidValueError, match=match):
            parse_schedule(text)
    with pytest.raises(InvalidValueError, match="above the cap"):
        ScheduledBatch("0:32 1k:512", 32, 256, [], 1.0, num_samples=100)
    with pytest.raises(ConfigError, match="set both, or neither"):
        _config("schedule")
    with pytest.raises(ConfigError, match="set both, or neither"):
        _config("bl", batch_schedule="0:128")
    with pytest.raises(ConfigError, match="above max_batch_size"):
        _config("schedule", batch_schedule="0:128 1k:4096")
    with pytest.raises(ConfigError, match="not AT:BATCH"):
        _config("schedule", batch_schedule="0:128 1k")


def _budget_run(tolerance, phi=320.0, total=100_000, every=250):
    """A gns controller fed a constant noise scale; (batch in force per interval, the
    points where it grew)."""
    controller = NoiseScaleBatch(
        32, 1024, [], 1.0, num_samples=1000, every_fraction=every / 1000, confirmations=1,
        tolerance=tolerance, total_samples=total,
    )  # fmt: skip
    batches, grew = [], []
    for samples in range(every, total + 1, every):
        batches.append(controller.batch_size)  # in force from samples - every to samples
        controller.step({"gns": phi, "samples": samples, "epoch_end": False})
        if controller.last_reason:
            grew.append((samples, controller.batch_size))
    return controller, batches, grew


def test_gns_budget_rule_grows_while_the_progress_given_up_stays_within_its_tolerance():
    # McCandlish et al.: a sample at batch B makes (B0 + phi) / (B + phi) of the progress
    # it makes at B0 = 32; phi = 300 throughout
    tolerance, total, phi = 0.2, 100_000, 300.0

    def gives_up(batch):
        return 1 - (32 + phi) / (batch + phi)

    controller, batches, grew = _budget_run(tolerance, phi=phi, total=total)
    # the first point: all the rest of the run at 64 gives up less than the tolerance
    assert gives_up(64) * (total - 250) / total < tolerance
    assert grew[0] == (250, 64)
    # 128 from the start would give up more; it waits until what 64 gave up so far,
    # (s - 250) gives_up(64), plus gives_up(128) of the rest fits: s >= s_star
    assert gives_up(128) > tolerance
    s_star = (tolerance * total + 250 * gives_up(64) - gives_up(128) * total) / (
        gives_up(64) - gives_up(128)
    )
    assert grew[1] == (250 * math.ceil(s_star / 250), 128)
    # the whole run gives up at most the tolerance, and spends nearly all of it
    given_up = sum(250 * gives_up(b) for b in batches) / total
    assert tolerance - 0.01 < given_up <= tolerance + 1e-12
    assert controller.lost / total == pytest.approx(given_up, rel=1e-9)
    # a stricter tolerance stops lower, a looser one grows on to a larger batch
    assert _budget_run(0.05, phi=phi, total=total)[0].batch_size < controller.batch_size
    loose = _budget_run(0.6, phi=phi, total=total)[0]
    assert loose.batch_size > controller.batch_size


def test_gns_budget_rule_never_gives_up_more_than_its_tolerance_when_phi_rises():
    # phi tends to rise during training; the projection then errs on the cautious side
    rng = random.Random(0)
    for trial in range(20):
        tolerance = rng.uniform(0.02, 0.5)
        controller = NoiseScaleBatch(
            32, 4096, [], 1.0, num_samples=1000, confirmations=1, tolerance=tolerance,
            total_samples=20_000,
        )  # fmt: skip
        phis = sorted(rng.uniform(10, 5000) for _ in range(80))
        for i, phi in enumerate(phis):
            controller.step({"gns": phi, "samples": 250 * (i + 1), "epoch_end": False})
        assert controller.growths > 0, trial
        assert controller.lost / 20_000 <= tolerance + 1e-12, trial


def test_gns_budget_state_round_trips_and_an_older_state_loads():
    controller, _, _ = _budget_run(0.2, total=10_000)
    state = controller.state_dict()
    again = NoiseScaleBatch(32, 1024, [], 1.0, num_samples=1000, total_samples=10_000)
    again.load_state_dict(state)
    assert again.lost == controller.lost > 0 and again.batch_size == controller.batch_size
    older = {k: v for k, v in state.items() if k != "lost"}  # saved before the budget rule
    again.load_state_dict(older)
    assert again.lost == 0.0 and again.batch_size == controller.batch_size
    with pytest.raises(InvalidValueError, match="total_samples"):
        NoiseScaleBatch(32, 1024, [], 1.0, num_samples=1000)
    with pytest.raises(InvalidValueError, match="rule"):
        NoiseScaleBatch(32, 1024, [], 1.0, num_samples=1000, rule="greedy")


def test_gns_budget_rule_takes_no_growth_within_the_last_decision_interval():
    def at(samples):
        controller = NoiseScaleBatch(
            32, 1024, [], 1.0, num_samples=1000, every_fraction=0.25, confirmations=1,
            total_samples=10_000,
        )  # fmt: skip
        controller.step({"gns": 1e6, "samples": samples, "epoch_end": False})
        return controller.batch_size

    # a noise scale of 1e6 makes any growth nearly free: one interval (250) before the
    # end it is taken, within the last interval it would save next to nothing
    assert at(9_750) == 64 and at(9_751) == 32 and at(10_000) == 32
