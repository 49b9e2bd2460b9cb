"""Models whose forward returns something other than one tensor (a dict, a tuple, a
Hugging Face ``ModelOutput``) train through ``fit`` as they are: the outputs reach
``loss_fn`` untouched, and accuracy is left out rather than guessed."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import largebatch
from largebatch.errors import UsageError
from largebatch.io import read_jsonl


class Output(OrderedDict):
    """Like transformers' ModelOutput: a dict whose entries are attributes too."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


class Returns(nn.Module):
    """The same network, its logits returned inside ``kind``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = _net(), kind

    def forward(self, x):
        logits = self.net(x)
        if self.kind == "dict":
            return {"logits": logits, "hidden": x.sum(1)}
        if self.kind == "tuple":
            return logits, x.sum(1)
        return Output(logits=logits)


PICK = {
    "dict": lambda out, y: F.cross_entropy(out["logits"], y),
    "tuple": lambda out, y: F.cross_entropy(out[0], y),
    "model-output": lambda out, y: F.cross_entropy(out.logits, y),
}


def _data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(96, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


SETTINGS = dict(batch_size=8, max_batch_size=32, epochs=3, lr=0.1, seed=1, device="cpu")


@pytest.mark.parametrize("method", ["bl", "gns", "abs"])
@pytest.mark.parametrize("kind", sorted(PICK))
def test_a_model_whose_output_is_not_one_tensor_trains_as_it_is(tmp_path, kind, method):
    x, y = _data()
    model = Returns(kind)
    settings = {**SETTINGS, "method": method, "hessian_samples": 32}
    largebatch.fit(model, (x, y), eval_data=(x[:32], y[:32]), loss_fn=PICK[kind],
                   out=tmp_path / "run", verbose=False, **settings)  # fmt: skip
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["train_acc"] is None and r["test_acc"] is None for r in records)
    if method == "abs":
        assert all(r["eigenvalue"] is not None for r in records)
    # the same training as the network whose forward returns the logits
    reference = _net()
    largebatch.fit(reference, (x, y), eval_data=(x[:32], y[:32]), out=tmp_path / "ref",
                   verbose=False, **settings)  # fmt: skip
    for key, value in reference.state_dict().items():
        assert torch.allclose(model.net.state_dict()[key], value, atol=1e-6), key
    losses = [r["test_loss"] for r in read_jsonl(tmp_path / "ref" / "metrics.jsonl")]
    assert [r["test_loss"] for r in records] == pytest.approx(losses, rel=1e-5)


def test_the_default_loss_on_outputs_that_are_not_logits_is_one_error():
    x, y = _data()
    with pytest.raises(UsageError, match="returns a dict, not one tensor, and the default loss"):
        largebatch.fit(Returns("dict"), (x, y), verbose=False, **SETTINGS)
