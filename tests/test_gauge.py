"""The stability gauge (critical sharpness along the update direction) against ground
truth: closed forms on quadratics, the dense Hessian on a tiny network."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.errors import InvalidValueError
from largebatch.hessian import dense_hessian
from largebatch.lr import critical_lr
from largebatch.meters import Point, SharpnessMeter, critical_step, update_direction


@pytest.mark.parametrize("start", [1e-3, 1.0, 300.0])
def test_the_critical_step_of_a_parabola_is_found_from_any_start(start):
    # rise(t) = t^2 - t: the loss falls until t = 1
    step, evaluations = critical_step(lambda t: t * t - t, start)
    assert step == pytest.approx(1.0, rel=2**-7)
    assert evaluations <= 20


def test_the_critical_step_says_when_the_loss_never_rises_or_never_falls():
    assert critical_step(lambda t: -t, 1.0, limit=10) == (math.inf, 10)
    step, _ = critical_step(lambda t: t, 1.0, limit=10)  # no descent direction
    assert step == 2.0**-9
    assert critical_step(lambda t: math.nan if t > 3 else -t, 1.0)[0] == pytest.approx(3, rel=0.02)
    with pytest.raises(InvalidValueError, match="start"):
        critical_step(lambda t: t, 0.0)


class Quadratic(nn.Module):
    """loss = (w - c)^T A (w - c) / 2 for every sample (the inputs are ignored)."""

    def __init__(self, dim=6, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.register_buffer(
            "A", q @ torch.diag(torch.logspace(-1, 1, dim, dtype=torch.float64)) @ q.T
        )
        self.register_buffer("c", torch.randn(dim, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.randn(dim, generator=g, dtype=torch.float64))

    def forward(self, x):
        r = self.w - self.c
        return (0.5 * r @ self.A @ r).expand(len(x))


def _mean(out, y):
    return out.mean()


PROBE = [(torch.zeros(8, 1), torch.zeros(8))]


def test_on_a_quadratic_under_sgd_the_gauge_gives_the_closed_form():
    model = Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gauge = SharpnessMeter(_mean, PROBE, optimizer)
    record = gauge.at_decision(model, Point(0, 0, True))
    g = (model.A @ (model.w - model.c)).detach()
    exact = 2 * (g @ g) / (g @ model.A @ g)  # the smallest step along -g that raises the loss
    assert 2 / record["sharpness"] == pytest.approx(float(exact), rel=2**-6)
    assert record["critical_lr"] == pytest.approx(1.9 * float(exact), rel=2**-6)  # (1 + m) t
    assert record["sharp_evals"] <= 25 and record["sharp_s"] >= 0


def test_on_a_quadratic_under_adam_the_gauge_follows_the_preconditioned_direction():
    model = Quadratic(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    for _ in range(3):  # a second moment in the state
        optimizer.zero_grad()
        model(torch.zeros(1)).sum().backward()
        optimizer.step()
    state = optimizer.state[model.w]
    v = state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))
    g = (model.A @ (model.w - model.c)).detach()
    u = -g / (v.sqrt() + 1e-8)
    (found,) = update_direction(optimizer, [model.w], [g])
    torch.testing.assert_close(found, u)
    exact = 2 * -(g @ u) / (u @ model.A @ u)
    record = SharpnessMeter(_mean, PROBE, optimizer).at_decision(model, Point(0, 0, True))
    assert 2 / record["sharpness"] == pytest.approx(float(exact), rel=2**-6)
    assert record["critical_lr"] == pytest.approx(19 * float(exact), rel=2**-6)  # 1.9 / 0.1
    assert critical_lr(1.0, optimizer) == pytest.approx(19.0)


def _network(seed):
    """A tanh MLP trained a while by SGD on noisy labels (not separable), and its data."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 5, generator=g, dtype=torch.float64)
    noisy = x[:, 0] + 0.8 * torch.randn(256, generator=g, dtype=torch.float64)
    y = (noisy > 0).long() + (x[:, 1] > 0.5).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(300):
        pick = torch.randint(0, 256, (64,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x[pick]), y[pick]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer, x, y


def _flat_grad(model, x, y):
    loss = F.cross_entropy(model(x), y)
    return torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_on_a_tiny_network_the_gauge_is_within_ten_percent_of_the_dense_hessian(seed):
    # along a batch's gradient (as an update moves), the probe loss stops falling at
    # -2 G.u / u.H.u for the probe's gradient G and Hessian H (measured: within 5%)
    model, optimizer, x, y = _network(seed)
    probe = [(x[:128], y[:128]), (x[128:], y[128:])]
    hessian = dense_hessian(model, F.cross_entropy, probe)
    full = _flat_grad(model, x, y)
    compared = 0
    for rows in (slice(0, 64), slice(64, 80), slice(80, 96)):
        u = -_flat_grad(model, x[rows], y[rows])
        exact = float(-2 * (full @ u) / (u @ hessian @ u))
        if exact <= 0:  # this batch's step does not lower the probe loss at all
            continue
        pieces = [
            d.view_as(p)
            for d, p in zip(
                u.split([p.numel() for p in model.parameters()]), model.parameters(), strict=True
            )
        ]
        gauge = SharpnessMeter(F.cross_entropy, probe, optimizer)
        step, evaluations = gauge.measure(model, direction=pieces)
        assert step == pytest.approx(exact, rel=0.10)
        assert evaluations <= 25
        compared += 1
    assert compared >= 2
    # by default the direction is the optimizer's for the first `batch` probe samples
    gauge = SharpnessMeter(F.cross_entropy, probe, optimizer)
    gauge.plan(64, 64, None)
    u = -_flat_grad(model, x[:64], y[:64])
    exact = float(-2 * (full @ u) / (u @ hessian @ u))
    record = gauge.at_decision(model, Point(0, 0, True))
    assert record["critical_step"] == pytest.approx(exact, rel=0.10)
    assert record["sharpness"] == pytest.approx(2 / record["critical_step"])
    assert record["critical_lr"] == pytest.approx(record["critical_step"])  # SGD, m = 0


def test_the_gauge_leaves_the_model_as_it_found_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    F.cross_entropy(model(x), y).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    copies = [g.clone() for g in grads]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    record = SharpnessMeter(F.cross_entropy, [(x, y)], optimizer).at_decision(
        model, Point(0, 0, True)
    )
    assert record["sharpness"] > 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.training
    for param, grad, copy in zip(model.parameters(), grads, copies, strict=True):
        assert param.grad is grad and torch.equal(grad, copy)
