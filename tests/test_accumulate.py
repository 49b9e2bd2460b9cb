"""Token-weighted accumulation: padded sequences of unequal length, float64."""

import pytest
import torch


def _padded_sequences():
    """Sequences of unequal length padded with IGNORE_INDEX, a per-token model, float64."""
    from largebatch.accumulate import IGNORE_INDEX

    torch.manual_seed(0)
    lengths = [9, 2, 7, 1, 8, 3, 5, 4]
    x = torch.randn(len(lengths), 6, 9, dtype=torch.float64)  # (batch, features, time)
    y = torch.randint(0, 5, (len(lengths), 9))
    for row, length in enumerate(lengths):
        y[row, length:] = IGNORE_INDEX
    y[5] = IGNORE_INDEX  # one sequence of padding only
    model = torch.nn.Conv1d(6, 5, kernel_size=1).double()  # logits (batch, classes, time)
    return model, x, y


def test_token_weighted_accumulation_of_padded_sequences_equals_one_large_batch():
    from largebatch.accumulate import accumulate, token_count

    model, x, y = _padded_sequences()
    loss_fn = torch.nn.functional.cross_entropy  # the mean over the tokens that count

    def gradient(micro, count):
        model.zero_grad()
        loss = accumulate(model, loss_fn, x, y, micro, count=count)
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), loss

    whole, whole_loss = gradient(len(y), None)  # one batch: the true per-token mean
    for micro in (1, 2, 3):
        tokens, loss = gradient(micro, token_count)
        torch.testing.assert_close(tokens, whole, rtol=0, atol=1e-10)
        assert loss == pytest.approx(whole_loss, abs=1e-10)
        samples, _ = gradient(micro, None)  # weighting by samples is not the same
        assert (samples - whole).abs().max() > 1e-3


def test_the_update_weights_micro_batches_by_tokens(tmp_path):
    from largebatch.accumulate import GlobalBatch, token_count
    from largebatch.distributed import World

    model, x, y = _padded_sequences()
    loss_fn = torch.nn.functional.cross_entropy
    grads = {}
    for name, pieces, count in (
        ("whole", [(x, y)], None),
        ("tokens", [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])], token_count),
    ):
        torch.manual_seed(1)
        copy = torch.nn.Conv1d(6, 5, kernel_size=1).double()
        copy.load_state_dict(model.state_dict())
        optimizer = torch.optim.SGD(copy.parameters(), lr=0.1)
        update = GlobalBatch(copy, optimizer, loss_fn, World(), torch.device("cpu"), count=count)
        update.step(pieces, len(y))
        grads[name] = torch.cat([p.detach().reshape(-1) for p in copy.parameters()])
    torch.testing.assert_close(grads["tokens"], grads["whole"], rtol=0, atol=1e-10)
