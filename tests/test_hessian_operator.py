"""HessianOperator against the exact Hessian, and the model left as it was found."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.hessian import (
    EigenTracker,
    HessianOperator,
    HessianOperatorError,
    NondeterministicHessianError,
    NoSecondDerivativeError,
    dense_hessian,
    hessian_trace,
    spectral_density,
    top_eigenvalues,
)
from largebatch.hessian.operator import second_derivatives

# torch.func's first jvp scripts some decompositions with the deprecated torch.jit.script.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(23, 4, dtype=torch.float64), torch.randint(0, 3, (23,))
    # Unequal batches: the Hessian must be of the sample-weighted mean loss.
    return model, [(x[:5], y[:5]), (x[5:16], y[5:16]), (x[16:], y[16:])], (x, y)


def conv_bn_problem():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 3)
    ).double()
    with torch.no_grad():  # non-trivial running statistics, so eval mode matters
        model[2].running_mean.uniform_(-0.5, 0.5)
        model[2].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(10, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    return model, [(x[:4], y[:4]), (x[4:], y[4:])], (x, y)


PROBLEMS = {"mlp": mlp_problem, "conv_bn": conv_bn_problem}


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_products_match_dense_hessian(problem, method):
    model, batches, _ = PROBLEMS[problem]()
    truth = dense_hessian(model, F.cross_entropy, batches)
    vectors = torch.randn(truth.shape[0], 3, dtype=torch.float64)
    with HessianOperator(model, F.cross_entropy, batches, method=method) as op:
        assert op.dim == truth.shape[0] and op.dtype == torch.float64
        torch.testing.assert_close(op @ vectors, truth @ vectors, rtol=1e-10, atol=1e-12)
        assert op.matvecs == 3
        if problem == "mlp":  # small enough to build whole
            torch.testing.assert_close(op.dense(), truth, rtol=1e-10, atol=1e-12)


def test_split_batches_give_the_hessian_of_the_whole_mean():
    model, batches, whole = mlp_problem()
    split = dense_hessian(model, F.cross_entropy, batches)
    torch.testing.assert_close(split, dense_hessian(model, F.cross_entropy, whole))
    torch.testing.assert_close(split, split.T)


def test_restriction_to_one_layer_is_the_dense_sub_block():
    model, batches, _ = conv_bn_problem()
    truth = dense_hessian(model, F.cross_entropy, batches)
    conv = 2 * 9 + 2  # parameters in model order: conv, batch-norm, linear
    with HessianOperator(model, F.cross_entropy, batches, params="0") as op:
        assert op.param_names == ["0.weight", "0.bias"]
        torch.testing.assert_close(op.dense(), truth[:conv, :conv], rtol=1e-10, atol=1e-12)
    with HessianOperator(model, F.cross_entropy, batches, params=[model[4].bias]) as op:
        torch.testing.assert_close(op.dense(), truth[-3:, -3:], rtol=1e-10, atol=1e-12)


def test_flatten_and_unflatten_round_trip():
    model, batches, _ = mlp_problem()
    with HessianOperator(model, F.cross_entropy, batches) as op:
        vector = torch.arange(op.dim, dtype=torch.float64)
        pieces = op.unflatten(vector)
        assert [p.shape for p in pieces] == [p.shape for p in model.parameters()]
        torch.testing.assert_close(op.flatten(pieces), vector)
        torch.testing.assert_close(op @ vector, op @ vector[:, None].expand(-1, 2)[:, 0])


def capture(model):
    """Everything a Hessian call must leave alone."""
    return {
        "modes": [m.training for m in model.modules()],
        "buffers": [b.clone() for b in model.buffers()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def assert_unchanged(model, before):
    after = capture(model)
    assert after["modes"] == before["modes"]
    assert after["grad_ids"] == before["grad_ids"]
    saved = before["buffers"] + before["grads"]
    for now, then in zip(after["buffers"] + after["grads"], saved, strict=True):
        assert (now is None and then is None) or torch.equal(now, then)


def training_model():
    """The conv/BN model mid-training: train mode, one stale .grad, one None."""
    model, batches, _ = conv_bn_problem()
    model.train()
    model[4].eval()  # a sub-module in another mode must keep it
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    model[4].bias.grad = None
    return model, batches


CALLS = {
    "top_eigenvalues": lambda m, b: top_eigenvalues(m, F.cross_entropy, b, k=2),
    "power": lambda m, b: top_eigenvalues(m, F.cross_entropy, b, method="power", max_iter=5),
    "trace": lambda m, b: hessian_trace(m, F.cross_entropy, b, probes=3, method="hutch++"),
    "density": lambda m, b: spectral_density(m, F.cross_entropy, b, lanczos_steps=5),
    "tracker": lambda m, b: EigenTracker(F.cross_entropy, b).estimate(m),
    "train_mode_products": lambda m, b: top_eigenvalues(
        m, F.cross_entropy, b, max_iter=5, operator_options={"eval_mode": False}
    ),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_calls_leave_mode_buffers_and_grads_as_they_were(call):
    model, batches = training_model()
    before = capture(model)
    CALLS[call](model, batches)
    assert_unchanged(model, before)


def test_operator_restores_on_close_and_on_error():
    model, batches = training_model()
    before = capture(model)
    op = HessianOperator(model, F.cross_entropy, batches)
    ones = torch.ones(op.dim, dtype=torch.float64)
    with pytest.raises(HessianOperatorError, match="closed"):
        op.matvec(ones)
    with pytest.raises(KeyError), op:
        assert not model.training  # eval mode while open
        op.matvec(ones)
        raise KeyError("boom")
    assert_unchanged(model, before)
    with HessianOperator(model, F.cross_entropy, batches, eval_mode=False) as train_mode:
        train_mode.matvec(ones)
        # Batch-norm in train mode moved its running statistics; close() puts them back.
        assert not torch.equal(model[2].running_mean, before["buffers"][0])
    op.close()  # closing twice is harmless
    assert_unchanged(model, before)


def test_forward_over_reverse_refuses_batch_norm_in_train_mode():
    model, batches = training_model()
    before = capture(model)
    op = HessianOperator(
        model, F.cross_entropy, batches, eval_mode=False, method="forward_over_reverse"
    )
    with pytest.raises(ValueError, match="batch-norm in train mode"):
        op.open()
    assert_unchanged(model, before)


def test_parameters_changed_while_open_are_refused():
    model, batches, _ = mlp_problem()
    with HessianOperator(model, F.cross_entropy, batches) as op:
        vector = torch.ones(op.dim, dtype=torch.float64)
        op.matvec(vector)
        with torch.no_grad():
            model[0].weight.add_(0.1)
        with pytest.raises(HessianOperatorError, match="parameters changed"):
            op.matvec(vector)


def test_determinism_check_catches_changing_data():
    model, batches, _ = mlp_problem()
    with HessianOperator(model, F.cross_entropy, batches, check_determinism=True) as op:
        vector = torch.ones(op.dim, dtype=torch.float64)
        op.matvec(vector)
        op.matvec(vector)  # same data: fine
        op.batches[1][0].mul_(1.5)  # someone augments the probe inputs in place
        with pytest.raises(NondeterministicHessianError, match="batch 1"):
            op.matvec(vector)


def test_determinism_check_catches_dropout_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    data = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    options = {"eval_mode": False, "check_determinism": True, "method": "forward_over_reverse"}
    with pytest.raises(NondeterministicHessianError):
        top_eigenvalues(model, F.cross_entropy, data, operator_options=options)
    result = top_eigenvalues(
        model, F.cross_entropy, data, operator_options={"check_determinism": True}
    )
    assert result.converged and model.training


def rewritable_problem():
    """Layers the fast graph rewrites, in their less common settings."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm2d(4),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(4, 3, 3, padding=2, dilation=2),
        nn.BatchNorm2d(3, affine=False),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 5),
        nn.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                if module.affine:
                    module.weight.uniform_(-1.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(12, 2, 7, 7, dtype=torch.float64), torch.randint(0, 3, (12,))
    return model, [(x[:5], y[:5]), (x[5:], y[5:])]


def conv1d_problem():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(4 * 6, 2)
    ).double()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0)
    return model, (torch.randn(7, 3, 6, dtype=torch.float64), torch.randint(0, 2, (7,)))


@pytest.mark.parametrize("make", [rewritable_problem, conv1d_problem])
def test_fast_graph_products_are_the_same_hessian(make):
    from largebatch.hessian.fast_graph import rewritable_modules

    model, data = make()
    model.eval()
    rewritten = {type(module) for module, _ in rewritable_modules(model)}
    assert nn.BatchNorm2d in rewritten or nn.BatchNorm1d in rewritten
    assert nn.Conv2d in rewritten or nn.Conv1d in rewritten
    if make is rewritable_problem:
        assert {nn.ReLU, nn.MaxPool2d} <= rewritten
    truth = dense_hessian(model, F.cross_entropy, data)
    vectors = torch.randn(truth.shape[0], 3, dtype=torch.float64)
    before = capture(model)
    with HessianOperator(model, F.cross_entropy, data) as fast:
        assert fast.fast_graph
        torch.testing.assert_close(fast @ vectors, truth @ vectors, rtol=1e-10, atol=1e-12)
    with HessianOperator(model, F.cross_entropy, data, fast_graph=False) as plain:
        torch.testing.assert_close(plain @ vectors, truth @ vectors, rtol=1e-10, atol=1e-12)
    assert_unchanged(model, before)
    assert not any("forward" in module.__dict__ for module in model.modules())
    # The rewritten forward is the model's function, gradients included.
    inputs = data[0][0] if isinstance(data, list) else data[0]
    model.zero_grad()
    with HessianOperator(model, F.cross_entropy, data):
        pass
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model(inputs), model(inputs))


def test_fast_graph_leaves_train_mode_batch_norm_alone():
    from largebatch.hessian.fast_graph import fast_double_backward

    model, data = rewritable_problem()
    model.train()
    with fast_double_backward(model) as count:
        # Convolutions (the second falls back to the plain one at run time, as its input
        # needs a gradient), ReLUs and max-pools; batch-norm in train mode uses batch
        # statistics and is left alone.
        assert count == 6 and "forward" not in model[2].__dict__
    model.eval()
    with fast_double_backward(model) as count:
        assert count == 9 and "forward" in model[2].__dict__
    assert "forward" not in model[2].__dict__


# ------------------------------------------------------------------ streaming
def _c1_like_problem():
    """A small float32 convolution + batch-norm net with trained-looking statistics."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )  # fmt: skip
    x, y = torch.randn(150, 1, 8, 8), torch.randint(0, 5, (150,))
    model.train()
    with torch.no_grad():
        model(x)  # running statistics from the data
    return model, x, y


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_streaming_a_dataloader_gives_the_in_memory_hessian(method):
    from torch.utils.data import DataLoader, TensorDataset

    model, x, y = _c1_like_problem()
    # Shuffled, with a short last batch: the mean loss does not depend on either.
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    counted = []
    options = {"method": method, "on_batch": counted.append}
    streamed = top_eigenvalues(
        model, F.cross_entropy, loader, k=2, tol=1e-5, seed=0, operator_options=options
    )
    whole = top_eigenvalues(
        model, F.cross_entropy, (x, y), k=2, tol=1e-5, seed=0, operator_options={"method": method}
    )
    torch.testing.assert_close(streamed.values, whole.values, rtol=1e-5, atol=0)
    assert sum(counted) == 150 * streamed.matvecs and counted.count(150 % 32) == streamed.matvecs
    with HessianOperator(model, F.cross_entropy, loader) as op:
        assert op.stream and not op.batches  # nothing kept between products
        vector = torch.randn(op.dim)
        first, second = op.matvec(vector), op.matvec(vector)
    torch.testing.assert_close(first, second, rtol=1e-5, atol=1e-6)


def test_streaming_refuses_one_pass_data_and_catches_changing_data():
    model, x, y = _c1_like_problem()
    pairs = [(x[:75], y[:75]), (x[75:], y[75:])]
    with pytest.raises(ValueError, match="iterated over again"):
        HessianOperator(model, F.cross_entropy, iter(pairs), stream=True)

    class Augmented:
        """A re-iterable source whose inputs get fresh noise on every pass."""

        def __iter__(self):
            for xb, yb in pairs:
                yield xb + 0.1 * torch.randn_like(xb), yb

    with HessianOperator(model, F.cross_entropy, Augmented(), stream=True) as op:
        vector = torch.randn(op.dim)
        op.matvec(vector)
        with pytest.raises(NondeterministicHessianError, match="same samples on every pass"):
            op.matvec(vector)
    with pytest.raises(ValueError, match="element 0 is not an"):
        top_eigenvalues(model, F.cross_entropy, [x[:5]], operator_options={"stream": True})


class _Attention(nn.Module):
    """One causal self-attention layer and a head: ``scaled_dot_product_attention``, or
    the same attention written out (softmax of masked scores), which any kernel
    differentiates twice."""

    def __init__(self, written_out: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.head, self.written_out = nn.Linear(4, 12), nn.Linear(4, 3), written_out

    def forward(self, x):  # x: (batch, tokens, 4)
        q, k, v = self.qkv(x).unflatten(-1, (3, 1, 4)).permute(2, 0, 3, 1, 4)
        if self.written_out:
            scores = q @ k.transpose(-1, -2) / 2.0
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            mixed = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(mixed.squeeze(1).mean(1))


def test_curvature_goes_through_fused_attention_and_matches_a_dense_hessian():
    # The default attention kernels (flash on CPU) have no double backward; the operator
    # builds its graphs with the math kernel. Ground truth: the dense Hessian of the same
    # weights with the attention written out.
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    fused, written = _Attention(), _Attention(written_out=True)
    written.load_state_dict(fused.state_dict())
    names = [name for name, _ in written.named_parameters()]
    shapes = [p.shape for p in written.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in written.parameters()])

    def loss(vector):
        values = torch.split(vector, [s.numel() for s in shapes])
        params = {n: v.reshape(s) for n, v, s in zip(names, values, shapes, strict=True)}
        return F.cross_entropy(torch.func.functional_call(written, params, (x,)), y)

    dense = torch.autograd.functional.hessian(loss, flat)
    expected = torch.linalg.eigvalsh(dense.double()).flip(0)[:2]
    result = top_eigenvalues(fused, F.cross_entropy, (x, y), k=2, tol=1e-6, seed=0)
    assert torch.allclose(result.values, expected, rtol=1e-4)
    with HessianOperator(fused, F.cross_entropy, (x, y)) as op:
        assert torch.allclose(op.dense(), dense, atol=1e-5)
    # and without the math kernel, the raw error that users met
    q = torch.randn(1, 1, 3, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(
        F.scaled_dot_product_attention(q, q, q).sum(), q, create_graph=True
    )
    with pytest.raises(NoSecondDerivativeError, match=r"runs aten::\S+backward.* abs, absa"):
        with second_derivatives():
            torch.autograd.grad(grad.sum(), q)
