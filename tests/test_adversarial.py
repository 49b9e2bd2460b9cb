import pytest
import torch
from torch import nn

from largebatch.adversarial import fgsm, pgd


def _linear_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 3))


def test_fgsm_matches_the_closed_form_for_a_linear_softmax_model():
    model = _linear_model()
    x = torch.rand(4, 6)
    y = torch.tensor([0, 1, 2, 1])
    eps = 0.1
    w, b = model[1].weight.detach(), model[1].bias.detach()
    # d(mean CE)/dx_i = W^T (softmax(W x_i + b) - onehot(y_i)) / batch
    probs = torch.softmax(x @ w.T + b, dim=1)
    grad = (probs - nn.functional.one_hot(y, 3).float()) @ w / len(y)
    expected = torch.clamp(x + eps * grad.sign(), 0, 1)
    assert torch.allclose(fgsm(model, x, y, eps), expected)


def test_fgsm_batch_clamp_reproduces_the_reference_behaviour():
    model = _linear_model()
    x = 0.25 + 0.5 * torch.rand(8, 6)
    y = torch.randint(0, 3, (8,))
    out = fgsm(model, x, y, 0.3, clamp="batch")
    assert out.min() >= x.min() - 1e-7 and out.max() <= x.max() + 1e-7
    unclamped = fgsm(model, x, y, 0.3, clamp=None)
    assert unclamped.max() > x.max() or unclamped.min() < x.min()


def _bn_model():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)
    )


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_attacks_leave_mode_buffers_and_grads_alone(attack):
    model = _bn_model()
    model.train()
    model[1].eval()  # a mixed-mode model must come back mixed
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    if attack == "fgsm":
        fgsm(model, x, y, 0.05)
    else:
        pgd(model, x, y, 0.05, 0.02, 5)
    assert model.training and not model[1].training and model[0].training
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))


def test_pgd_stays_in_the_ball_and_the_valid_range_and_hurts_more_than_fgsm():
    model = _bn_model().eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    eps = 0.1
    gen = torch.Generator().manual_seed(0)
    x_adv = pgd(model, x, y, eps, alpha=0.03, steps=10, generator=gen)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    loss = nn.functional.cross_entropy
    with torch.no_grad():
        clean = loss(model(x), y)
        one_step = loss(model(fgsm(model, x, y, eps)), y)
        many = loss(model(x_adv), y)
    assert one_step > clean
    assert many >= one_step - 1e-4


def test_pgd_random_start_is_seeded():
    model = _bn_model().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    a = pgd(model, x, y, 0.1, 0.03, 2, generator=torch.Generator().manual_seed(3))
    b = pgd(model, x, y, 0.1, 0.03, 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
