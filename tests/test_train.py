import json

import pytest
import torch
import yaml

from helpers import without_times
from largebatch.checkpoint import load_checkpoint
from largebatch.config import TrainConfig
from largebatch.errors import DivergedError, UsageError
from largebatch.io import read_jsonl
from largebatch.train import train

METRIC_KEYS = {
    "epoch",
    "batch_size",
    "lr",
    "eigenvalue",
    "adv_ratio",
    "updates",
    "samples",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "wall_s",
    "hessian_s",
}
SUMMARY_KEYS = {
    "method",
    "dataset",
    "model",
    "epochs",
    "final_test_acc",
    "best_test_acc",
    "updates",
    "samples",
    "wall_s",
    "hessian_s",
    "final_batch_size",
}


def _config(tmp_path, name="run", **changes):
    values = dict(
        dataset="synthetic",
        model="mlp",
        epochs=3,
        batch_size=32,
        max_batch_size=32 * 64,
        lr=0.05,
        lr_decay_epochs=[2],
        out=str(tmp_path / name),
        device="cpu",
    )
    values.update(changes)
    return TrainConfig(**values)


def test_a_run_learns_and_writes_the_four_files(tmp_path):
    summary = train(_config(tmp_path), echo=None, show_progress=False)
    out = tmp_path / "run"
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all(METRIC_KEYS <= set(r) for r in records)
    assert all(0 <= r["test_acc"] <= 1 and 0 <= r["train_acc"] <= 1 for r in records)
    # 512 synthetic samples at batch 32 is 16 updates per epoch.
    assert [r["updates"] for r in records] == [16, 32, 48]
    assert [r["samples"] for r in records] == [512, 1024, 1536]
    assert records[0]["lr"] == pytest.approx(0.05) and records[2]["lr"] == pytest.approx(0.01)
    assert records[-1]["test_acc"] > 0.5  # 10 classes: chance is 0.1
    assert SUMMARY_KEYS <= set(json.loads((out / "summary.json").read_text()))
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    assert yaml.safe_load((out / "config.yaml").read_text())["lr_decay_epochs"] == [2]
    assert load_checkpoint(out / "checkpoint.pt")["run"]["epoch"] == 3


def test_same_seed_same_metrics_on_cpu(tmp_path):
    a = train(_config(tmp_path, "a", epochs=2), echo=None, show_progress=False)
    b = train(_config(tmp_path, "b", epochs=2), echo=None, show_progress=False)
    ra = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    rb = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert without_times(ra) == without_times(rb)
    assert a["final_test_acc"] == b["final_test_acc"]


def test_resume_after_an_epoch_boundary_equals_the_uninterrupted_run(tmp_path):
    train(_config(tmp_path, "full"), echo=None, show_progress=False)
    train(_config(tmp_path, "split"), echo=None, show_progress=False, stop_after=1)
    assert not (tmp_path / "split" / "summary.json").exists()
    train(_config(tmp_path, "split", resume=True), echo=None, show_progress=False)
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert without_times(full) == without_times(split)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_accumulate_to_the_whole_batch_update(tmp_path):
    # The MLP has no batch-norm, so accumulation must match one big batch to rounding.
    whole = _config(tmp_path, "whole", epochs=1, batch_size=64, max_batch_size=64)
    split = _config(
        tmp_path, "split", epochs=1, batch_size=64, max_batch_size=64, micro_batch_size=16
    )
    train(whole, echo=None, show_progress=False)
    train(split, echo=None, show_progress=False)
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_short_last_batch_is_used(tmp_path):
    records = []
    train(
        _config(tmp_path, epochs=1, batch_size=100, max_batch_size=100),
        echo=records.append,
        show_progress=False,
    )
    (record,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert record["samples"] == 512 and record["updates"] == 6
    assert any("test_acc" in line for line in records)  # the table header was echoed


def test_a_diverging_lr_stops_with_a_clear_error_and_keeps_the_good_checkpoint(tmp_path):
    with pytest.raises(DivergedError, match="lower --lr"):
        train(_config(tmp_path, lr=1e12, momentum=0.0), echo=None, show_progress=False)
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["run"]["epoch"] == 0 and saved["run"]["updates"] == 0
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_rollback_restores_the_checkpoint_and_lowers_the_lr(tmp_path):
    lines = []
    config = _config(
        tmp_path,
        lr=1e9,
        momentum=0.0,
        lr_decay_epochs=[],
        on_divergence="rollback",
        divergence_lr_factor=1e-10,
        max_rollbacks=2,
    )
    summary = train(config, echo=lines.append, show_progress=False)
    assert summary["rollbacks"] == 1
    assert any("rolled back to epoch 0" in line for line in lines)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["lr"] for r in records] == pytest.approx([0.1] * 3)
    assert records[-1]["test_acc"] > 0.5


def test_rollback_gives_up_after_max_rollbacks(tmp_path):
    config = _config(
        tmp_path,
        lr=1e12,
        momentum=0.0,
        on_divergence="rollback",
        divergence_lr_factor=0.5,
        max_rollbacks=2,
    )
    with pytest.raises(DivergedError):
        train(config, echo=None, show_progress=False)


def test_an_existing_run_is_not_overwritten_without_resume(tmp_path):
    train(_config(tmp_path, epochs=1), echo=None, show_progress=False)
    with pytest.raises(UsageError, match="--resume"):
        train(_config(tmp_path, epochs=1), echo=None, show_progress=False)


def test_resume_refuses_a_different_model(tmp_path):
    train(_config(tmp_path, epochs=1), echo=None, show_progress=False)
    with pytest.raises(UsageError, match="model='mlp'"):
        train(_config(tmp_path, model="c1", resume=True), echo=None, show_progress=False)


def test_abs_measures_the_eigenvalue_and_grows_the_batch(tmp_path):
    config = _config(
        tmp_path,
        method="abs",
        epochs=4,
        abs_duration=2,
        max_batch_size=128,
        hessian_samples=64,
        lr_decay_epochs=[],
    )
    summary = train(config, echo=None, show_progress=False)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    measured = [r for r in records if r["eigenvalue"] is not None]
    assert measured and all(r["eigenvalue"] > 0 and r["eig_matvecs"] > 0 for r in measured)
    assert all(r["eig_residual"] <= config.hessian_tol for r in measured if r["eig_converged"])
    batches = [r["batch_size"] for r in records]
    assert batches == sorted(batches) and batches[-1] > 32  # the duration rule guarantees it
    assert all(r["lr"] == pytest.approx(0.05 * r["batch_size"] / 32) for r in records)
    assert summary["hessian_s"] > 0 and summary["final_batch_size"] == batches[-1]
    # updates follow the batch: ceil(512 / B) per epoch
    assert summary["updates"] == sum(-(-512 // b) for b in batches)


def test_absa_replaces_a_share_of_the_batch_and_resumes_exactly(tmp_path):
    changes = dict(
        method="absa",
        abs_duration=1,
        max_batch_size=128,
        hessian_samples=64,
        lr_decay_epochs=[],
        adv_eps=0.05,
        adv_ratio=0.25,
    )
    train(_config(tmp_path, "full", epochs=4, **changes), echo=None, show_progress=False)
    train(
        _config(tmp_path, "split", epochs=4, **changes),
        echo=None,
        show_progress=False,
        stop_after=2,
    )
    train(
        _config(tmp_path, "split", epochs=4, resume=True, **changes), echo=None, show_progress=False
    )
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    split = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert without_times(full) == without_times(split)
    # epoch 1 sets the reference; adversarial training ends at epochs // 2
    assert [r["adv_ratio"] for r in full] == [0.25, 0.25, 0.0, 0.0]


def test_adversarial_share_changes_training(tmp_path):
    # two epochs, so that the first comes before adversarial training stops (epochs // 2)
    plain = dict(
        method="absa",
        epochs=2,
        max_batch_size=64,
        hessian_samples=32,
        lr_decay_epochs=[],
        adv_eps=0.0,
    )
    train(_config(tmp_path, "plain", **plain), echo=None, show_progress=False, stop_after=1)
    adv = _config(tmp_path, "adv", **{**plain, "adv_eps": 0.1})
    train(adv, echo=None, show_progress=False, stop_after=1)
    a = read_jsonl(tmp_path / "plain" / "metrics.jsonl")[0]
    b = read_jsonl(tmp_path / "adv" / "metrics.jsonl")[0]
    assert a["train_loss"] != b["train_loss"]
    assert b["train_loss"] > a["train_loss"]  # attacked samples are harder


@pytest.mark.parametrize("method", ["fb", "gg"])
def test_baselines_run_in_the_same_loop(tmp_path, method):
    config = _config(
        tmp_path, method=method, epochs=3, max_batch_size=128, warmup_epochs=1, lr_decay_epochs=[1]
    )
    train(config, echo=None, show_progress=False)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    if method == "fb":
        assert [r["batch_size"] for r in records] == [128] * 3
        assert records[1]["lr"] == pytest.approx(0.05 * 4 * 0.2)
    else:
        assert [r["batch_size"] for r in records] == [32, 128, 128]
        # 32 -> 160 does not fit under 128: the batch grows 4x, the LR takes 0.2 * 4
        assert records[2]["lr"] == pytest.approx(0.05 * 0.2 * 4)


def _losses(tmp_path, name, **changes):
    train(_config(tmp_path, name, **changes), echo=None)
    return read_jsonl(tmp_path / name / "metrics.jsonl")


def test_a_run_stops_at_the_first_epoch_whose_training_loss_reaches_the_target(tmp_path):
    reference = _losses(tmp_path, "all", epochs=4, lr_decay_epochs=[])
    losses = [r["train_loss"] for r in reference]
    target = losses[1]  # reached at epoch 2 at the latest
    expected = next(i for i, loss in enumerate(losses) if loss <= target) + 1
    config = _config(
        tmp_path, "target", epochs=4, lr_decay_epochs=[], target_train_loss=target, max_epochs=4
    )
    summary = train(config, echo=None)
    records = read_jsonl(tmp_path / "target" / "metrics.jsonl")
    assert len(records) == expected < 4
    assert without_times(records) == without_times(reference[:expected])
    assert summary["reached_target"] and summary["target_epoch"] == expected
    assert summary["target_updates"] == records[-1]["updates"]
    assert (tmp_path / "target" / "summary.json").exists()  # the run is finished
    # resumed part-way, it stops at the same epoch with the same records
    config = _config(
        tmp_path, "resumed", epochs=4, lr_decay_epochs=[], target_train_loss=target, max_epochs=4
    )
    train(config, echo=None, stop_after=1)
    config.resume = True
    assert train(config, echo=None)["target_epoch"] == expected
    resumed = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    assert without_times(resumed) == without_times(records)
    # and a finished run resumed does not go on
    assert train(config, echo=None)["epochs"] == expected


def test_a_target_not_reached_within_max_epochs_is_reported_as_such(tmp_path):
    from largebatch.report import collect_runs, markdown_table, summarize

    config = _config(tmp_path, "miss", target_train_loss=1e-9, max_epochs=2)
    summary = train(config, echo=None)
    assert summary["epochs"] == 2 and summary["reached_target"] is False
    assert summary["target_epoch"] is None
    (row,) = summarize(collect_runs(tmp_path))
    assert row["reached_target"] == "0/1" and row["seeds"] == 0
    assert row["final_test_acc"] is None  # not averaged with runs that reached it
    assert markdown_table([row]).splitlines()[0].endswith("target reached |")


def test_max_epochs_needs_a_target(tmp_path):
    with pytest.raises(UsageError, match="max_epochs bounds a run to target_train_loss"):
        train(_config(tmp_path, max_epochs=3), echo=None)


def test_a_run_that_named_its_rule_resumes_under_auto(tmp_path):
    # a run of an older version recorded lr_scaling: linear; auto picks linear for SGD
    train(_config(tmp_path, epochs=2, lr_scaling="linear"), echo=None, show_progress=False,
          stop_after=1)  # fmt: skip
    summary = train(_config(tmp_path, epochs=2, resume=True), echo=None, show_progress=False)
    assert summary["epochs"] == 2 and summary["lr_scaling"] is None  # bl has no rule
    train(_config(tmp_path / "b", epochs=2, lr_scaling="sqrt"), echo=None, show_progress=False,
          stop_after=1)  # fmt: skip
    with pytest.raises(UsageError, match="lr_scaling='sqrt', not 'auto'"):
        train(_config(tmp_path / "b", epochs=2, resume=True), echo=None, show_progress=False)
