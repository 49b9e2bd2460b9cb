"""The stability safeguard: a growth whose LR would cross the limit that the gauge reads
is tempered to it, and the record says so (a quadratic whose curvature is known)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import largebatch
from largebatch.checkpoint import load_checkpoint
from largebatch.io import read_jsonl
from largebatch.lr import tempered_factor


def test_the_rule_caps_a_rise_at_the_limit_and_never_cuts_below_the_factor_in_force():
    assert tempered_factor(1.0, 4.0, 2.5) == 2.5  # capped at the limit
    assert tempered_factor(1.0, 4.0, 9.0) == 4.0  # below the limit: as proposed
    assert tempered_factor(2.0, 4.0, 0.5) == 2.0  # the limit below what runs now: kept
    assert tempered_factor(1.0, 4.0, None) == 4.0  # no reading
    assert tempered_factor(2.0, 1.0, 0.5) == 1.0  # not a rise: not the safeguard's


def _isotropic(n=256, d=8, seed=0):
    """Regression whose mean squared error has the Hessian 2 I (X^T X / n = I exactly),
    so the curvature along every direction is 2 and plain SGD is stable below LR 1."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    x = q * math.sqrt(n)
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def _run(tmp_path, name, safeguard, epochs=3, resume=False, recovery=0.5, grow_at=256):
    x, y = _isotropic()
    torch.manual_seed(0)
    model = nn.Linear(8, 1, bias=False)
    return largebatch.fit(
        model, (x, y), out=tmp_path / name, loss_fn=F.mse_loss, method="schedule",
        batch_schedule=f"0:16 {grow_at}:64", lr_scaling="linear", lr=0.4, momentum=0.0,
        epochs=epochs, batch_size=16, safeguard=safeguard, safeguard_samples=256,
        device="cpu", verbose=False, resume=resume, recovery_tolerance=recovery,
    )  # fmt: skip


def test_a_growth_past_the_limit_is_tempered_to_it_and_recorded(tmp_path):
    # the schedule grows 16 -> 64 after the first epoch, and linear scaling would take
    # the LR from 0.4 to 1.6: past the limit 1 (curvature 2 along every direction)
    _run(tmp_path, "guarded", safeguard=True)
    records = read_jsonl(tmp_path / "guarded" / "metrics.jsonl")
    (change,) = records[0]["batch_changes"]
    assert change["reason"] == "stability" and change["batch_size"] == 64
    assert change["proposed_lr_factor"] == pytest.approx(4.0)
    assert change["gauge_lr"] == pytest.approx(1.0, rel=1e-3)  # 2 (1 + 0) / 2
    assert change["lr_cap"] == pytest.approx(2.5, rel=1e-3) == change["lr_factor"]
    assert change["gauge_sharpness"] == pytest.approx(2.0, rel=1e-3) and change["gauge_s"] >= 0
    assert [r["lr"] for r in records[1:]] == pytest.approx([change["gauge_lr"]] * 2)
    assert all(math.isfinite(r["train_loss"]) and r["train_loss"] < 10 for r in records)
    # the cap is part of the run's state: a resumed run keeps it
    assert (
        load_checkpoint(tmp_path / "guarded" / "checkpoint.pt")["run"]["lr_cap"]
        == (change["lr_cap"])
    )
    _run(tmp_path, "guarded", safeguard=True, epochs=4, resume=True)
    resumed = read_jsonl(tmp_path / "guarded" / "metrics.jsonl")
    assert len(resumed) == 4 and resumed[3]["lr"] == pytest.approx(change["gauge_lr"])
    # without the safeguard (and the recovery) the LR goes to 1.6 and the loss grows by
    # orders of magnitude
    _run(tmp_path, "free", safeguard=False, recovery=None)
    free = read_jsonl(tmp_path / "free" / "metrics.jsonl")
    assert free[0]["batch_changes"][0]["reason"].startswith("schedule")
    assert [r["lr"] for r in free[1:]] == pytest.approx([1.6, 1.6])
    assert free[-1]["train_loss"] > 100 * records[-1]["train_loss"]


def test_a_growth_within_the_limit_passes_whole(tmp_path):
    x, y = _isotropic()
    values = dict(
        loss_fn=F.mse_loss, method="schedule", batch_schedule="0:16 256:32",
        lr_scaling="linear", lr=0.3, momentum=0.0, epochs=2, batch_size=16, safeguard=True,
        device="cpu", verbose=False,
    )  # fmt: skip
    torch.manual_seed(0)
    largebatch.fit(nn.Linear(8, 1, bias=False), (x, y), out=tmp_path / "run", **values)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    (change,) = records[0]["batch_changes"]
    # LR 0.6 after the growth: within the limit 1, the growth passes as the schedule said
    assert change["reason"].startswith("schedule") and change["lr_factor"] == pytest.approx(2.0)
    assert records[1]["lr"] == pytest.approx(0.6)
    # the reading is recorded all the same: the growth's margin to the limit
    assert change["lr_cap"] is None and change["gauge_lr"] == pytest.approx(1.0, rel=1e-3)


def test_the_recovery_undoes_the_lr_step_of_a_growth_after_which_the_loss_rose(tmp_path):
    # two epochs at 16 and LR 0.4 bring the loss near its floor; without the safeguard
    # the growth to 64 takes the LR to 1.6, past the limit 1, so the loss of the epoch
    # after it rises above the epoch before, and the recovery (on by default) scales the
    # LR back by the growth's factor 4, to 0.4, where it converges again
    _run(tmp_path, "recovered", safeguard=False, epochs=5, grow_at=512)
    records = read_jsonl(tmp_path / "recovered" / "metrics.jsonl")
    assert records[1]["batch_changes"][0]["reason"].startswith("schedule")
    assert records[2]["lr"] == pytest.approx(1.6)
    (change,) = records[2]["batch_changes"]
    assert change["reason"] == "recovery" and change["batch_size"] == 64
    assert change["lr_scale"] == pytest.approx(0.25)
    # the windows compared are the epochs' training losses (one decision point each)
    assert change["loss_before"] == pytest.approx(records[1]["train_loss"], rel=1e-5)
    assert change["loss_after"] == pytest.approx(records[2]["train_loss"], rel=1e-5)
    assert change["loss_after"] > 1.5 * change["loss_before"]
    assert [r["lr"] for r in records[3:]] == pytest.approx([0.4, 0.4])
    assert records[-1]["train_loss"] < 2 * records[1]["train_loss"]
    assert len([c for r in records for c in r["batch_changes"]]) == 2
    # the scale is run state: a resumed run keeps it
    _run(tmp_path, "recovered", safeguard=False, epochs=6, grow_at=512, resume=True)
    resumed = read_jsonl(tmp_path / "recovered" / "metrics.jsonl")
    assert len(resumed) == 6 and resumed[5]["lr"] == pytest.approx(0.4)
    # without the recovery the loss keeps climbing
    _run(tmp_path, "free", safeguard=False, epochs=5, grow_at=512, recovery=None)
    free = read_jsonl(tmp_path / "free" / "metrics.jsonl")
    assert [r["lr"] for r in free[2:]] == pytest.approx([1.6] * 3)
    assert free[-1]["train_loss"] > 1000 * records[-1]["train_loss"]
