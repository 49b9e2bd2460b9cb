"""Hostile input to ``largebatch.fit``, as a new user would try it.

Each row of ``REFUSED`` must raise one exception of our types (a subclass of
``UsageError``) with a one-line message, before any work: nothing is written in the work
folder and every file that was there is unchanged. The cases after the table are those
that must work (a batch-norm model on a last batch of one sample) or that appear
mid-run (a controller's decision), and what a run records.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import largebatch
from largebatch.checkpoint import load_checkpoint
from largebatch.controllers import BatchController, Decision, FixedBatch
from largebatch.errors import (
    CheckpointError,
    ConfigError,
    InvalidTypeError,
    InvalidValueError,
    UsageError,
)
from largebatch.io import read_jsonl


def _blobs(n, seed=0, features=6, classes=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, features, generator=torch.Generator().manual_seed(9))[y] * 2
    return x + torch.randn(n, features, generator=g), y


def _mlp(classes=3, features=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


class Pair(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.body, self.kind = _mlp(), kind

    def forward(self, x):
        out = self.body(x)
        return (out, out) if self.kind == "tuple" else {"logits": out}


class NoParameters(nn.Module):
    def forward(self, x):
        return x[:, :3] * 2


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp().requires_grad_(False)

    def forward(self, x):
        return self.body(x)


class NaNOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x) * float("nan")


class GivesBatch(BatchController):
    """A user controller that decides what it is told to."""

    name = "mine"

    def __init__(self, batch=8, factor=1.0, at_step=None, every=None):
        super().__init__()
        self.batch, self.factor, self.at_step = batch, factor, at_step
        if every is not None:
            self.decide_every = every

    def decision(self):
        early = self.at_step is not None and self.epoch < self.at_step
        return Decision(8 if early else self.batch, self.factor)


class EveryZero(GivesBatch):
    decide_every = 0  # a class attribute: no setter sees it


class HoldsObject(FixedBatch):
    def state_dict(self):
        return {**super().state_dict(), "kept": {1, 2}}  # a set: not plain data


def _fit_kwargs(work: Path, **changes):
    """A tiny run writing into ``work/run``."""
    kwargs = dict(
        model=_mlp(),
        train_data=_blobs(32),
        eval_data=_blobs(16, seed=1),
        out=str(work / "run"),
        epochs=1,
        batch_size=8,
        device="cpu",
        verbose=False,
    )
    kwargs.update(changes)
    return kwargs


def _users_folder(work: Path, **kw):
    """``out`` is a folder of the user's own files, named like ours."""
    folder = work / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("lr: 0.5  # my own notes\n")
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    return _fit_kwargs(work, out=str(folder), **kw)


def _notes_folder(work: Path):
    folder = work / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    return _fit_kwargs(work, out=str(folder))


def _meta_model():
    with torch.device("meta"):
        return _mlp()


def _lbfgs(params):
    return torch.optim.LBFGS(params, lr=0.1)


def _nan_lr(params):
    return torch.optim.SGD(params, lr=float("nan"))


class _Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, x):
        return self.body(x).detach()


# id: (kwargs from the work folder, our exception type, fragment of the message)
REFUSED = {
    "out-a-folder-of-the-users-files": (_users_folder, UsageError, "no largebatch run wrote"),
    "out-a-folder-with-notes": (_notes_folder, UsageError, "notes.txt"),
    "out-an-int": (lambda w: _fit_kwargs(w, out=5), InvalidTypeError, "out must be a folder"),
    "tensorboard-without-out": (
        lambda w: _fit_kwargs(w, out=None, tensorboard=True),
        ConfigError,
        "tensorboard needs out",
    ),
    "controller-a-string": (
        lambda w: _fit_kwargs(w, controller="gns"),
        InvalidTypeError,
        "method='gns'",
    ),
    "meters-of-numbers": (
        lambda w: _fit_kwargs(w, meters={"gns": 5}),
        InvalidTypeError,
        "meters['gns']",
    ),
    "decide-every-zero": (
        lambda w: _fit_kwargs(w, controller=EveryZero()),
        InvalidValueError,
        "decide_every",
    ),
    "first-decision-a-negative-batch": (
        lambda w: _fit_kwargs(w, controller=GivesBatch(batch=-8)),
        InvalidValueError,
        "GivesBatch",
    ),
    "first-decision-a-nan-factor": (
        lambda w: _fit_kwargs(w, controller=GivesBatch(factor=float("nan"))),
        InvalidValueError,
        "GivesBatch",
    ),
    "label-beyond-the-output-width": (
        lambda w: _fit_kwargs(w, model=_mlp(classes=2)),
        UsageError,
        "labels go up to 2",
    ),
    "eval-label-beyond-the-output-width": (
        lambda w: _fit_kwargs(
            w, train_data=(_blobs(32)[0], _blobs(32)[1] % 2), model=_mlp(classes=2)
        ),
        UsageError,
        "labels go up to 2",
    ),
    "model-returns-a-tuple": (
        lambda w: _fit_kwargs(w, model=Pair("tuple")),
        UsageError,
        "returns a tuple",
    ),
    "model-returns-a-dict": (
        lambda w: _fit_kwargs(w, model=Pair("dict")),
        UsageError,
        "returns a dict",
    ),
    "model-without-parameters": (
        lambda w: _fit_kwargs(w, model=NoParameters()),
        UsageError,
        "has no parameters",
    ),
    "model-all-frozen": (lambda w: _fit_kwargs(w, model=Frozen()), UsageError, "frozen"),
    "model-on-the-meta-device": (
        lambda w: _fit_kwargs(w, model=_meta_model()),
        UsageError,
        "meta device",
    ),
    "model-gives-nan": (lambda w: _fit_kwargs(w, model=NaNOut()), UsageError, "not finite"),
    "loss-detached": (
        lambda w: _fit_kwargs(w, model=_Detached()),
        UsageError,
        "does not depend on the model's parameters",
    ),
    "optimizer-lbfgs": (lambda w: _fit_kwargs(w, optimizer=_lbfgs), UsageError, "closure"),
    "optimizer-lr-nan": (
        lambda w: _fit_kwargs(w, optimizer=_nan_lr),
        InvalidValueError,
        "param_groups[0]['lr']",
    ),
    "controller-state-holds-an-object": (
        lambda w: _fit_kwargs(w, controller=HoldsObject(8, (), 0.1)),
        InvalidTypeError,
        "state of controller HoldsObject",
    ),
    "loss-fn-not-callable": (
        lambda w: _fit_kwargs(w, loss_fn="cross_entropy"),
        InvalidTypeError,
        "loss_fn",
    ),
}


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_fit_refuses_hostile_input_before_any_work(case, tmp_path):
    build, kind, fragment = REFUSED[case]
    kwargs = build(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(UsageError) as caught:
        largebatch.fit(kwargs.pop("model"), kwargs.pop("train_data"), **kwargs)
    assert isinstance(caught.value, kind), repr(caught.value)
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    assert _tree(tmp_path) == before  # nothing written, changed or deleted


def test_a_decision_that_goes_bad_mid_run_stops_there_naming_the_controller():
    controller = GivesBatch(batch=-8, at_step=1, every=16)  # bad from the 2nd epoch
    with pytest.raises(InvalidValueError, match="GivesBatch.*batch") as caught:
        largebatch.fit(_mlp(), _blobs(32), controller=controller, epochs=3, verbose=False)
    assert "\n" not in str(caught.value)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)


def test_batch_norm_on_a_last_batch_of_one_sample_drops_it_with_a_note(tmp_path):
    # 33 samples at batch 8: the epoch ends with one sample, which BatchNorm1d cannot take
    summary = largebatch.fit(
        BatchNormNet(), _blobs(33), out=tmp_path / "run", epochs=2, batch_size=8, verbose=False
    )
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["dropped_samples"] for r in records] == [1, 1]
    assert summary["updates"] == 2 * 4 and summary["samples"] == 2 * 32
    assert all(math.isfinite(r["train_loss"]) for r in records)


def test_batch_norm_on_a_micro_batch_of_one_sample_joins_the_one_before(tmp_path):
    # batch 9 in micro-batches of 4: 4, 4, 1 -> 4, 5; nothing dropped
    summary = largebatch.fit(
        BatchNormNet(),
        _blobs(36),
        epochs=1,
        batch_size=9,
        max_batch_size=9,
        micro_batch_size=4,
        verbose=False,
    )
    assert summary["updates"] == 4 and summary["samples"] == 36


def test_batch_norm_at_batch_one_is_refused():
    with pytest.raises(UsageError, match="at least 2 samples per process"):
        largebatch.fit(BatchNormNet(), _blobs(8), epochs=1, batch_size=1, verbose=False)


def test_the_record_names_the_users_optimizer_not_the_sgd_defaults(tmp_path):
    out = tmp_path / "run"
    summary = largebatch.fit(
        _mlp(),
        _blobs(32),
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.05),
        out=out,
        epochs=1,
        batch_size=8,
        verbose=False,
    )
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert "lr" not in config and "momentum" not in config
    assert config["optimizer"]["class"] == "AdamW"
    assert config["optimizer"]["param_groups"][0]["lr"] == 3e-3
    assert config["optimizer"]["param_groups"][0]["weight_decay"] == 0.05
    assert summary["optimizer"] == config["optimizer"]


def test_a_reused_optimizer_starts_from_the_lr_its_groups_hold(tmp_path):
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    largebatch.fit(model, _blobs(32), optimizer=optimizer, epochs=1, batch_size=8, verbose=False)
    for group in optimizer.param_groups:
        group["lr"] = 0.03  # the user lowers it for a second call
    largebatch.fit(
        model, _blobs(32), optimizer=optimizer, out=tmp_path / "run", epochs=1, verbose=False
    )
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["lr"] == pytest.approx(0.03)


def test_resuming_on_other_data_is_refused(tmp_path):
    out = tmp_path / "run"
    largebatch.fit(_mlp(), _blobs(32), out=out, epochs=1, batch_size=8, verbose=False)
    before = _tree(out)
    with pytest.raises(CheckpointError, match="sample digest"):
        largebatch.fit(
            _mlp(), _blobs(32, seed=5), out=out, epochs=2, batch_size=8, resume=True, verbose=False
        )
    assert _tree(out) == before


class KeepsNumpy(FixedBatch):
    """A user controller whose state holds NumPy numbers."""

    state_fields = (("epoch", int), ("score", float))

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.score = np.float64(0.5)

    def step(self, measurements=None):
        self.score = np.float64(self.score * 2)
        return super().step(measurements)

    def state_dict(self):
        return {"epoch": np.int64(self.epoch), "score": self.score}


def test_a_controller_state_of_numpy_numbers_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    kwargs = dict(out=out, batch_size=8, verbose=False)
    largebatch.fit(_mlp(), _blobs(32), controller=KeepsNumpy(8, (), 0.1), epochs=1, **kwargs)
    resumed = KeepsNumpy(8, (), 0.1)
    largebatch.fit(_mlp(), _blobs(32), controller=resumed, epochs=2, resume=True, **kwargs)
    assert resumed.epoch == 2 and resumed.score == 2.0
    saved = load_checkpoint(out / "checkpoint.pt")["controller"]
    assert type(saved["score"]) is float


def test_fit_prints_the_table_unless_verbose_is_false(capsys):
    largebatch.fit(_mlp(), _blobs(32), epochs=1, batch_size=8, show_progress=False)
    shown = capsys.readouterr().out
    assert "train_loss" in shown and "training Sequential" in shown
    largebatch.fit(_mlp(), _blobs(32), epochs=1, batch_size=8, verbose=False)
    assert capsys.readouterr().out == ""


def test_the_curvature_guard_caps_the_lr_of_the_users_optimizer(tmp_path):
    """The cap comes from the optimizer that runs (lr 2.0, no momentum): lr <= 0.5 * 2 /
    eigenvalue, not from the config's default SGD settings (0.02, 0.9)."""
    largebatch.fit(
        _mlp(),
        _blobs(64),
        optimizer=lambda p: torch.optim.SGD(p, lr=2.0),
        method="bl",
        curvature_guard=True,
        guard_samples=64,
        epochs=2,
        batch_size=16,
        out=tmp_path / "run",
        verbose=False,
    )
    first, second = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    cap = 0.5 * 2.0 * (1 + 0.0) / first["eigenvalue"]
    assert cap < 2.0  # the cap binds here
    assert second["lr"] == pytest.approx(cap, rel=1e-6)
