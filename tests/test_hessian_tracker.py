"""EigenTracker: accurate, cheap when warm, resumable, and the reference mode."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.errors import StateError
from largebatch.hessian import EigenTracker, dense_hessian

# torch.func's first jvp scripts some decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@pytest.fixture()
def problem():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    x, y = torch.randn(64, 6, dtype=torch.float64), torch.randint(0, 4, (64,))
    return model, (x, y)


def top_eigenvalue(model, data):
    return torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, data))[-1].item()


def train_a_little(model, data, steps=3, lr=0.05):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(data[0]), data[1]).backward()
        optimizer.step()


def test_estimate_matches_the_dense_top_eigenvalue(problem):
    model, data = problem
    result = EigenTracker(F.cross_entropy, data, tol=1e-6).estimate(model)
    assert result.converged and not result.warm_started
    assert result.residuals[0] <= 1e-6 and result.seconds > 0
    assert result.eigenvalue == pytest.approx(top_eigenvalue(model, data), rel=1e-6)


def test_warm_start_after_training_is_much_cheaper(problem):
    model, data = problem
    tracker = EigenTracker(F.cross_entropy, data)
    tracker.estimate(model)
    train_a_little(model, data, steps=1, lr=0.01)
    warm = tracker.estimate(model)
    cold = EigenTracker(F.cross_entropy, data).estimate(model)
    cold_power = EigenTracker(F.cross_entropy, data, method="power").estimate(model)
    assert warm.warm_started and warm.converged and cold.converged
    assert warm.eigenvalue == pytest.approx(cold.eigenvalue, rel=1e-4)
    assert warm.matvecs * 3 <= cold.matvecs
    # Cold power iteration may even run out of its 100 products before converging.
    assert warm.matvecs * 10 <= cold_power.matvecs


def test_budget_is_respected(problem):
    model, data = problem
    result = EigenTracker(F.cross_entropy, data, tol=1e-12, max_matvecs=4).estimate(model)
    assert result.matvecs <= 4 and not result.converged


def test_state_dict_resumes_exactly(problem):
    model, data = problem
    first = EigenTracker(F.cross_entropy, data, seed=7)
    first.estimate(model)
    saved = first.state_dict()
    train_a_little(model, data)
    resumed = EigenTracker(F.cross_entropy, data, seed=123)
    resumed.load_state_dict(saved)
    expected, got = first.estimate(model), resumed.estimate(model)
    assert torch.equal(expected.values, got.values) and expected.matvecs == got.matvecs
    with pytest.raises(StateError, match="k=1"):
        EigenTracker(F.cross_entropy, data, k=2).load_state_dict(saved)
    assert saved["class"] == "EigenTracker"
    # a state from before the tag loads too, and resumes the same way
    old = EigenTracker(F.cross_entropy, data)
    old.load_state_dict({k: v for k, v in saved.items() if k not in ("class", "version")})
    assert torch.equal(old.estimate(model).values, expected.values)
    with pytest.raises(StateError, match="EigenTracker.load_state_dict: vectors"):
        resumed.load_state_dict({**saved, "vectors": torch.zeros(3)})


def test_reference_mode_is_cold_short_and_loose(problem):
    model, data = problem
    tracker = EigenTracker(F.cross_entropy, data, method="reference")
    results = [tracker.estimate(model) for _ in range(2)]
    for result in results:
        assert not result.warm_started and result.matvecs <= 10
        assert result.eigenvalue == pytest.approx(top_eigenvalue(model, data), rel=0.1)
    assert results[0].eigenvalue != results[1].eigenvalue  # a fresh random start each time


def test_tracks_several_eigenvalues_and_a_new_probe_set(problem):
    model, data = problem
    tracker = EigenTracker(F.cross_entropy, data, k=2, tol=1e-6, max_matvecs=300)
    first = tracker.estimate(model)
    assert first.values.shape == (2,) and tracker.vectors.shape[0] == 2
    other = (data[0][:32], data[1][:32])
    second = tracker.estimate(model, data=other)
    expected = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, other))[-2:].flip(0)
    torch.testing.assert_close(second.values, expected, rtol=1e-6, atol=0)


def test_verify_spends_one_product_for_the_same_answer(problem):
    model, data = problem
    plain = EigenTracker(F.cross_entropy, data, tol=1e-6, seed=3).estimate(model)
    checked = EigenTracker(F.cross_entropy, data, tol=1e-6, seed=3, verify=True).estimate(model)
    assert plain.converged and checked.converged
    assert checked.matvecs == plain.matvecs + 1
    assert plain.eigenvalue == pytest.approx(checked.eigenvalue, rel=1e-10)
    assert plain.residuals[0].item() == pytest.approx(checked.residuals[0].item(), rel=1e-3)
    with pytest.raises(ValueError, match="max_matvecs >= 2"):
        EigenTracker(F.cross_entropy, data, max_matvecs=1, verify=True)
