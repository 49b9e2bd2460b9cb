"""The stability gauge (the sharpness along the update direction) against ground truth:
closed forms on quadratics, the dense Hessian on a tiny network."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.errors import InvalidTypeError, InvalidValueError
from largebatch.hessian import dense_hessian
from largebatch.lr import critical_lr
from largebatch.meters import Point, SharpnessMeter, update_direction


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
    u = -(model.A @ (model.w - model.c)).detach()  # the step along the gradient
    exact = float((u @ model.A @ u) / (u @ u))  # the curvature along it
    assert record["sharpness"] == pytest.approx(exact, rel=1e-6)
    assert record["critical_lr"] == pytest.approx(2 * 1.9 / exact, rel=1e-6)  # 2 (1 + m) / s
    assert record["sharp_evals"] == 3 and record["sharp_s"] >= 0
    # on a quadratic the step it is read over does not matter
    sharpness, _ = gauge.measure(model, step=3.0)
    assert sharpness == pytest.approx(exact, rel=1e-6)


def test_on_a_quadratic_under_adam_the_gauge_reads_the_preconditioned_sharpness():
    model = Quadratic(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    for _ in range(3):  # a second moment in the state
        optimizer.zero_grad()
        model(torch.zeros(1)).sum().backward()
        optimizer.step()
    state = optimizer.state[model.w]
    p = (state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))).sqrt() + 1e-8
    g = (model.A @ (model.w - model.c)).detach()
    u = -g / p
    (found,) = update_direction(optimizer, [model.w], [g])
    torch.testing.assert_close(found, u)
    exact = float((u @ model.A @ u) / (u @ (p * u)))
    record = SharpnessMeter(_mean, PROBE, optimizer).at_decision(model, Point(0, 0, True))
    assert record["sharpness"] == pytest.approx(exact, rel=1e-6)
    assert record["critical_lr"] == pytest.approx(38 / exact, rel=1e-6)  # (2 + 2 b1) / (1 - b1)
    assert critical_lr(2.0, optimizer) == pytest.approx(19.0)
    with pytest.raises(ValueError, match="sharpness"):
        critical_lr(0.0, optimizer)


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
    # along a batch's gradient (as an update moves), over the step of the run's LR, the
    # probe's curvature u.H.u / u.u from its dense Hessian H
    model, optimizer, x, y = _network(seed)
    probe = [(x[:128], y[:128]), (x[128:], y[128:])]
    hessian = dense_hessian(model, F.cross_entropy, probe)
    gauge = SharpnessMeter(F.cross_entropy, probe, optimizer)
    for rows in (slice(0, 64), slice(64, 80), slice(0, 256)):
        u = -_flat_grad(model, x[rows], y[rows])
        exact = float((u @ hessian @ u) / (u @ u))
        sizes = [p.numel() for p in model.parameters()]
        pieces = [d.view_as(p) for d, p in zip(u.split(sizes), model.parameters(), strict=True)]
        sharpness, evaluations = gauge.measure(model, direction=pieces)
        assert sharpness == pytest.approx(exact, rel=0.10)
        assert evaluations == 3
    # by default the direction is the optimizer's for the first `batch` probe samples
    gauge.plan(64, 64, None)
    u = -_flat_grad(model, x[:64], y[:64])
    exact = float((u @ hessian @ u) / (u @ u))
    record = gauge.at_decision(model, Point(0, 0, True))
    assert record["sharpness"] == pytest.approx(exact, rel=0.10)
    assert record["critical_lr"] == pytest.approx(2 / record["sharpness"])  # SGD, m = 0


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


def test_bad_input_is_refused_in_one_line():
    model = Quadratic()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(InvalidTypeError, match="SharpnessMeter: loss_fn must be callable"):
        SharpnessMeter("mse", PROBE, optimizer)
    with pytest.raises(InvalidValueError, match="SharpnessMeter: the probe set holds no sample"):
        SharpnessMeter(_mean, [(torch.zeros(0, 1), torch.zeros(0))], optimizer)
    with pytest.raises(InvalidValueError, match="SharpnessMeter: step must be in"):
        SharpnessMeter(_mean, PROBE, optimizer).measure(model, step=-1.0)


def test_with_batch_norm_the_gauge_reads_the_loss_on_batch_statistics():
    # batch norm after a bias-free layer makes the loss invariant to that layer's scale:
    # along the radial step u = W, with batch statistics (as training sees it), the loss
    # does not change and the sharpness is 0. On running statistics (eval mode) the
    # step is not renormalised and reads sharp: the gauge used to temper growths there
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Linear(8, 3))  # fmt: skip
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model.train()
    for _ in range(3):  # running statistics away from their initial values
        model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gauge = SharpnessMeter(F.cross_entropy, [(x, y)], optimizer)
    radial = [p.detach().clone() if p is model[0].weight else torch.zeros_like(p)
              for p in model.parameters()]  # fmt: skip
    eta = 0.2
    sharpness, evals = gauge.measure(model, direction=radial, step=eta)
    # the same second difference by hand on running statistics
    model.eval()
    weight = model[0].weight
    with torch.no_grad():
        start = weight.clone()
        losses = []
        for t in (0.0, eta, -eta):
            weight.copy_(start * (1 + t))
            losses.append(float(F.cross_entropy(model(x), y)))
        weight.copy_(start)
    on_running = (losses[1] + losses[2] - 2 * losses[0]) / (eta**2 * float((start**2).sum()))
    assert evals == 3 and on_running > 0.01
    assert abs(sharpness) < 1e-3 * on_running
