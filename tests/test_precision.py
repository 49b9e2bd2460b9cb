import pytest
import torch
import torch.nn.functional as F

import largebatch.accumulate as accumulate_module
from helpers import without_times
from largebatch.build import make_tracker
from largebatch.checkpoint import load_checkpoint
from largebatch.config import TrainConfig
from largebatch.errors import ConfigError
from largebatch.io import read_jsonl
from largebatch.precision import autocast, make_scaler
from largebatch.train import train


def _config(tmp_path, name="run", **changes):
    values = dict(
        dataset="synthetic",
        model="c1",
        epochs=2,
        batch_size=32,
        max_batch_size=64,
        lr=0.05,
        out=str(tmp_path / name),
        device="cpu",
    )
    values.update(changes)
    return TrainConfig(**values)


def _params(tmp_path, name):
    return load_checkpoint(tmp_path / name / "checkpoint.pt")["model"]


def _relative_distance(a, b):
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in keys)
    den = sum(float(a[k].norm() ** 2) for k in keys)
    return (num / den) ** 0.5


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_layers_in_the_low_precision(precision, dtype):
    layer = torch.nn.Linear(4, 3)
    with autocast(torch.device("cpu"), precision):
        out = layer(torch.randn(2, 4))
    assert out.dtype == dtype
    with autocast(torch.device("cpu"), "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32


def test_only_fp16_gets_a_loss_scaler():
    cpu = torch.device("cpu")
    assert make_scaler(cpu, "fp32") is None and make_scaler(cpu, "bf16") is None
    assert isinstance(make_scaler(cpu, "fp16"), torch.amp.GradScaler)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns_like_fp32_but_is_not_fp32(tmp_path, precision):
    # The MLP: without batch-norm, rounding differences stay small over a short run.
    small = dict(model="mlp", lr=0.02, epochs=3)
    train(_config(tmp_path, "fp32", **small), echo=None, show_progress=False)
    train(
        _config(tmp_path, precision, precision=precision, **small), echo=None, show_progress=False
    )
    full = read_jsonl(tmp_path / "fp32" / "metrics.jsonl")
    low = read_jsonl(tmp_path / precision / "metrics.jsonl")
    # the low precision really ran: the losses differ from fp32's ...
    assert low[-1]["train_loss"] != full[-1]["train_loss"]
    # ... but the run learns as well: same accuracy to a few points, weights near each other
    assert low[-1]["test_acc"] > 0.9
    assert abs(low[-1]["test_acc"] - full[-1]["test_acc"]) < 0.02
    distance = _relative_distance(_params(tmp_path, "fp32"), _params(tmp_path, precision))
    assert 0 < distance < 0.02
    # weights stay float32 whatever the compute precision
    assert all(
        v.dtype == torch.float32
        for v in _params(tmp_path, precision).values()
        if v.is_floating_point()
    )


def test_fp16_resume_restores_the_loss_scale_and_matches_the_uninterrupted_run(tmp_path):
    # a quarter of the data (fp16 autocast on CPU is slow): 4 updates an epoch
    small = dict(precision="fp16", limit_train=128, limit_test=64)
    train(_config(tmp_path, "full", **small), echo=None, show_progress=False)
    split = _config(tmp_path, "split", **small)
    train(split, echo=None, show_progress=False, stop_after=1)
    saved = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert saved["scaler"]["scale"] > 0
    train(_config(tmp_path, "split", resume=True, **small), echo=None, show_progress=False)
    assert without_times(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == without_times(
        read_jsonl(tmp_path / "split" / "metrics.jsonl")
    )
    a, b = _params(tmp_path, "full"), _params(tmp_path, "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_overflow_skips_updates_instead_of_calling_it_divergence(tmp_path, monkeypatch):
    # A loss scale of 2**40 overflows fp16 gradients; the scaler must halve it, skipping
    # those updates, and the run must go on and learn.
    monkeypatch.setattr(
        accumulate_module,
        "make_scaler",
        lambda device, precision: torch.amp.GradScaler(device.type, init_scale=2.0**40),
    )
    train(_config(tmp_path, precision="fp16", epochs=3), echo=None, show_progress=False)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["scaler"]["scale"] < 2.0**20
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["test_acc"] > 0.5


def test_channels_last_gives_the_same_training_as_contiguous(tmp_path):
    # Two updates: C1 on this data amplifies rounding differences over a longer run.
    short = dict(lr=0.01, epochs=1, limit_train=64)
    train(_config(tmp_path, "plain", channels_last=False, **short), echo=None, show_progress=False)
    train(_config(tmp_path, "cl", channels_last=True, **short), echo=None, show_progress=False)
    distance = _relative_distance(_params(tmp_path, "plain"), _params(tmp_path, "cl"))
    assert distance < 1e-4


def test_an_unknown_precision_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        _config(tmp_path, precision="fp8").validate()


def test_the_eigenvalue_of_a_bf16_run_is_the_fp32_eigenvalue(tmp_path):
    # The tracker runs outside autocast: its estimate must match a tight fp32 Lanczos on
    # the same probe set and the same weights (the checkpoint written right after it).
    from largebatch.data import load_dataset
    from largebatch.distributed import World
    from largebatch.hessian import top_eigenvalues
    from largebatch.models import build_model

    config = _config(
        tmp_path,
        method="abs",
        model="mlp",
        epochs=1,
        precision="bf16",
        hessian_samples=64,
        hessian_tol=1e-3,
    )
    train(config, echo=None, show_progress=False)
    (record,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["eig_converged"]
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    model = build_model(**saved["model_spec"])
    model.load_state_dict(saved["model"])
    data = load_dataset("synthetic", seed=config.seed)
    probe = make_tracker(config, data, torch.device("cpu"), World(), F.cross_entropy).data
    exact = top_eigenvalues(model, torch.nn.functional.cross_entropy, probe, tol=1e-6, max_iter=200)
    assert record["eigenvalue"] == pytest.approx(float(exact.values[0]), rel=2e-3)
