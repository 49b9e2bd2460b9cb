"""The ``text`` dataset: UTF-8 files under a folder as one stream of byte tokens, cut into
next-token windows with a validation tail, read through a memory map."""

import math

import pytest
import torch
from torch import nn

from helpers import assert_runs_equal
from largebatch.config import TrainConfig
from largebatch.data import load_dataset
from largebatch.errors import DataError, UsageError
from largebatch.feed import loaded
from largebatch.io import read_jsonl
from largebatch.train import train

CORPUS = {
    "b/second.txt": "the quick brown fox jumps over the lazy dog. " * 30,
    "a/first.txt": "Ünïcödé text is bytes: naïve café. " * 20,
}


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    for name, text in CORPUS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _stream() -> bytes:  # the files sorted by path, each followed by a newline
    return b"".join(CORPUS[name].encode() + b"\n" for name in sorted(CORPUS))


def test_windows_are_next_token_pairs_with_a_disjoint_validation_tail(corpus):
    data = load_dataset("text", corpus, seq_len=16)
    tokens = torch.tensor(list(_stream()))
    x, y = loaded(data.train_x, data.train_y)
    assert x.shape == (len(data.train_y), 16) and x.dtype == torch.int64
    windows = (len(tokens) - 1) // 16
    assert len(data.train_y) == windows - windows // 20
    assert torch.equal(x.flatten(), tokens[: x.numel()])  # consecutive, not overlapping
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y.flatten(), tokens[1 : x.numel() + 1])
    xt, yt = loaded(data.test_x, data.test_y)
    start = x.numel() + 1  # one token past the last training target
    assert torch.equal(xt.flatten(), tokens[start : start + xt.numel()])
    assert torch.equal(yt.flatten(), tokens[start + 1 : start + xt.numel() + 1])
    assert len(xt) >= 1 and data.num_classes == 256


def test_the_joined_stream_is_cached_and_reused(corpus, tmp_path):
    load_dataset("text", corpus, seq_len=8)
    cached = list((tmp_path / "cache" / "text").iterdir())
    assert len(cached) == 1 and cached[0].read_bytes() == _stream()
    stamp = cached[0].stat().st_mtime_ns
    load_dataset("text", corpus, seq_len=32)
    assert cached[0].stat().st_mtime_ns == stamp


def test_bad_corpora_are_one_error_naming_the_file(corpus, tmp_path):
    (corpus / "a" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        load_dataset("text", corpus, seq_len=8)
    assert not list((tmp_path / "cache").rglob("*.bin"))  # nothing half-written is left
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "a.txt").write_text("tiny")
    with pytest.raises(DataError, match="holds 5 bytes, too few for windows of seq_len 8"):
        load_dataset("text", tmp_path / "small", seq_len=8)
    with pytest.raises(UsageError, match="needs --data-dir"):
        load_dataset("text", None)
    with pytest.raises(DataError, match="is not a folder"):
        load_dataset("text", tmp_path / "nothing")


class TinyLM(nn.Module):
    """Byte embedding, one causal convolution, logits laid out (batch, vocab, tokens) so
    that cross-entropy takes them with (batch, tokens) targets."""

    def __init__(self, num_classes: int, input_shape) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_classes, 16)
        self.mix = nn.Conv1d(16, 16, 3, padding=2)
        self.out = nn.Conv1d(16, num_classes, 1)

    def forward(self, tokens):
        h = self.embed(tokens).transpose(1, 2)
        return self.out(torch.relu(self.mix(h)[..., : tokens.shape[1]]))


def test_a_model_of_the_users_trains_on_text_from_the_command_line_config(corpus, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(
        dataset="text", data_dir=str(corpus), seq_len=16, model="test_text:TinyLM",
        method="gns", epochs=3, batch_size=4, max_batch_size=32, lr=0.5, device="cpu",
        out=str(out), loader_workers=0,
    )  # fmt: skip
    train(config, echo=None, show_progress=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert records[-1]["train_loss"] < records[0]["train_loss"] < 6.0  # below log(256)
    # the default loss is cross-entropy per token; accuracy is left out
    assert all(r["test_acc"] is None and r["test_loss"] is not None for r in records)


def _transformer():
    from largebatch.models import build_model

    torch.manual_seed(0)
    return build_model(
        "transformer", (12,), 256, sizes={"d_model": 16, "n_layers": 2, "n_heads": 2}
    )


def test_the_transformer_is_causal_and_its_head_is_the_embedding():
    model = _transformer().eval()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(2))
    out = model(ids)
    assert out.shape == (3, 256, 12)  # (batch, vocab, tokens): what cross-entropy takes
    for later in (5, 11):
        changed = ids.clone()
        changed[:, later] = (changed[:, later] + 1) % 256
        moved = (model(changed) - out).abs().amax(dim=(0, 1))
        assert torch.all(moved[:later] == 0) and moved[later] > 0
    body = model[1]
    assert body.head.weight.data_ptr() == body.tokens.weight.data_ptr()
    shorter = model(ids[:, :7])  # fewer tokens than seq_len: the same first positions
    assert torch.allclose(shorter, out[..., :7], atol=1e-6)


def test_the_transformer_recipe_trains_with_curvature_and_rebuilds_from_its_checkpoint(
    corpus, tmp_path
):
    from largebatch.analysis import analyze_checkpoint
    from largebatch.evaluate import load_trained

    out = tmp_path / "run"
    config = TrainConfig(
        dataset="text", data_dir=str(corpus), seq_len=12, model="transformer", d_model=16,
        n_layers=2, n_heads=2, method="abs", epochs=2, batch_size=8, max_batch_size=32,
        lr=0.3, hessian_samples=16, device="cpu", out=str(out), loader_workers=0,
    )  # fmt: skip
    train(config, echo=None, show_progress=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert all(r["eigenvalue"] is not None and r["eigenvalue"] > 0 for r in records)
    assert records[-1]["test_loss"] < 5.545  # below log(256): it learned the bytes
    model, saved = load_trained(out / "checkpoint.pt", torch.device("cpu"))
    assert saved["model_spec"]["sizes"] == {"d_model": 16, "n_layers": 2, "n_heads": 2}
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in _transformer().parameters()
    )
    result = analyze_checkpoint(out / "checkpoint.pt", samples=16, batch_size=8)
    assert result["eigenvalues"]["values"][0] > 0


def test_a_token_keyed_schedule_changes_the_batch_past_each_token_point_and_resumes(
    corpus, tmp_path
):
    values = dict(
        dataset="text", data_dir=str(corpus), seq_len=16, model="test_text:TinyLM",
        method="schedule", batch_schedule="0:4 1k:8 2k:16", schedule_unit="tokens",
        batch_size=4, max_batch_size=16, epochs=3, lr=0.3, device="cpu", loader_workers=0,
    )  # fmt: skip
    train(TrainConfig(**values, out=str(tmp_path / "whole")), echo=None, show_progress=False)
    records = read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    changes = [c for r in records for c in r["batch_changes"] if c["reason"].startswith("schedule")]
    # 1k tokens = 62.5 samples of 16: the change comes at the first update past 63 samples
    assert [(c["batch_size"], c["samples"]) for c in changes] == [(8, 64), (16, 128)]
    assert all(r["tokens"] == 16 * r["samples"] for r in records)
    # stopped after epoch 1 and resumed: the same schedule and numbers
    cut = TrainConfig(**values, out=str(tmp_path / "cut"))
    train(cut, echo=None, show_progress=False, stop_after=1)
    train(TrainConfig(**{**values, "resume": True}, out=str(tmp_path / "cut")), echo=None,
          show_progress=False)  # fmt: skip
    assert_runs_equal(tmp_path / "whole", tmp_path / "cut")


def test_the_recipe_trains_the_transformer_with_adamw_from_its_config(corpus, tmp_path):
    from largebatch.config import ConfigError

    out = tmp_path / "run"
    config = TrainConfig(
        dataset="text", data_dir=str(corpus), seq_len=12, model="transformer", d_model=16,
        n_layers=1, n_heads=2, method="gns", epochs=2, batch_size=8, max_batch_size=32,
        optimizer="adamw", lr=3e-3, betas=[0.8, 0.9], weight_decay=0.05, device="cpu",
        out=str(out), loader_workers=0,
    )  # fmt: skip
    lines = []
    train(config, echo=lines.append, show_progress=False)
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    (group,) = saved["optimizer"]["param_groups"]
    assert tuple(group["betas"]) == (0.8, 0.9) and group["weight_decay"] == 0.05
    assert all("exp_avg_sq" in s for s in saved["optimizer"]["state"].values())
    records = read_jsonl(out / "metrics.jsonl")
    assert any(r["gns_preconditioned"] is not None for r in records)  # an Adam-type run
    # the table shows bits per byte where a classifier's accuracy stands
    (header,) = [line for line in lines if line.lstrip().startswith("epoch")]
    assert "test_bits" in header and "test_acc" not in header
    last = records[-1]
    assert last["test_bits"] == pytest.approx(last["test_loss"] / math.log(2))
    assert f"{last['test_bits']:.4f}" in lines[lines.index(header) + 2]
    assert saved["config"]["optimizer"] == "adamw"
    from largebatch.errors import CheckpointError

    other = TrainConfig(**{**config.__dict__, "optimizer": "sgd", "epochs": 3, "resume": True})
    with pytest.raises(CheckpointError, match="optimizer class='adamw', not 'sgd'"):
        train(other, echo=None, show_progress=False)
    for bad, message in (({"optimizer": "adam"}, "optimizer"), ({"betas": [0.9]}, "betas")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig(**{**config.__dict__, **bad}).validate()
