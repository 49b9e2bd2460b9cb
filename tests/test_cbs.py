"""``largebatch cbs``: the critical batch measured by branching from a checkpoint."""

import copy
import json

import pytest
import torch

from largebatch.cbs import critical_batch, measure_critical_batch
from largebatch.cli import main
from largebatch.config import TrainConfig
from largebatch.source import as_source
from largebatch.train import train

PNG = b"\x89PNG\r\n\x1a\n"

NOISY = """
import torch
from torch.utils.data import TensorDataset

def _make(flip, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(7)) * 0.6
    y = torch.randint(0, 4, (n,), generator=g)
    x = centres[y] + torch.randn(n, 16, generator=g)
    flipped = torch.rand(n, generator=g) < flip
    y = torch.where(flipped, torch.randint(0, 4, (n,), generator=g), y)
    return TensorDataset(x, y)

def clean():
    return _make(0.0), _make(0.0, 256, 1)

def noisy():  # 70% of the labels drawn at random: gradients mostly noise
    return _make(0.7), _make(0.0, 256, 1)
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One epoch of an MLP on four overlapping clusters, with clean and with noisy labels."""
    tmp = tmp_path_factory.mktemp("cbs")
    (tmp / "cbs_noisy_blobs.py").write_text(NOISY)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp))
        paths = {}
        for kind in ("clean", "noisy"):
            config = TrainConfig(
                dataset=f"cbs_noisy_blobs:{kind}", model="mlp", epochs=1, batch_size=64,
                lr=0.02, lr_decay_epochs=[], device="cpu", out=str(tmp / kind),
            )  # fmt: skip
            train(config, echo=None, show_progress=False)
            paths[kind] = tmp / kind / "checkpoint.pt"
        yield tmp, paths


def _measure(path, out):
    return measure_critical_batch(
        path, [8, 32, 128, 512], 2048, out, probe_samples=1024, noise_batches=4,
        say=lambda _: None, show_progress=False,
    )  # fmt: skip


def test_the_critical_batch_grows_with_the_noise_of_the_data(checkpoints, monkeypatch):
    tmp, paths = checkpoints
    monkeypatch.syspath_prepend(str(tmp))
    clean = _measure(paths["clean"], tmp / "cbs-clean")
    noisy = _measure(paths["noisy"], tmp / "cbs-noisy")
    # measured: clean 32 (batch 128 is 4.3% above the best), noisy 512 (all within 0.7%);
    # noise scales 224 and inf (the signal |G|^2 measured at or below 0: all noise)
    assert clean["critical_batch"] <= 32 < 128 <= noisy["critical_batch"]
    assert noisy["noise_scale"] > clean["noise_scale"] > 0
    # every branch saw the same samples: the batch times its updates
    assert {b["batch_size"] * b["updates"] for b in clean["branches"]} == {2048}
    # the LR follows the run's rule (linear for its SGD) from the checkpoint's batch 64
    assert [b["lr"] for b in clean["branches"]] == pytest.approx([0.0025, 0.01, 0.04, 0.16])
    written = json.loads((tmp / "cbs-clean" / "cbs.json").read_text())
    assert written["critical_batch"] == clean["critical_batch"]
    # a warm-up: the run's 64 until the checkpoint's 2048 samples, then the critical batch
    assert noisy["checkpoint_samples"] == 2048
    assert noisy["suggested_schedule"] == f"0:64 2048:{noisy['critical_batch']}"
    assert noisy["suggested_schedule"] in (tmp / "cbs-noisy" / "cbs.md").read_text()
    assert "**" + str(clean["critical_batch"]) + "**" in (tmp / "cbs-clean" / "cbs.md").read_text()
    assert (tmp / "cbs-clean" / "cbs.png").read_bytes()[:8] == PNG


def test_the_command_line_and_its_errors(checkpoints, monkeypatch, tmp_path, capsys):
    tmp, paths = checkpoints
    monkeypatch.syspath_prepend(str(tmp))
    out = tmp_path / "cbs"
    args = ["cbs", "--checkpoint", str(paths["clean"]), "--samples", "512", "--out", str(out)]
    assert main([*args, "--batch-sizes", "16", "64", "--lr-scaling", "sqrt"]) == 0
    assert "critical batch" in capsys.readouterr().out
    assert json.loads((out / "cbs.json").read_text())["lr_scaling"] == "sqrt"
    for extra, message in (
        (["--batch-sizes", "16", "64"], "exists; give a new folder"),  # nothing overwritten
        (["--batch-sizes", "16"], "at least two batch sizes"),
        (["--batch-sizes", "16", "1024"], "samples must be"),
        (["--batch-sizes", "16", "64", "--tolerance", "nan"], "tolerance"),
    ):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_adamw_run_branches_with_adamw_and_the_square_root_rule(checkpoints, monkeypatch):
    tmp, _ = checkpoints
    monkeypatch.syspath_prepend(str(tmp))
    config = TrainConfig(
        dataset="cbs_noisy_blobs:clean", model="mlp", epochs=1, batch_size=64, lr=3e-3,
        optimizer="adamw", lr_decay_epochs=[], device="cpu", out=str(tmp / "adamw"),
    )  # fmt: skip
    train(config, echo=None, show_progress=False)
    result = measure_critical_batch(
        tmp / "adamw" / "checkpoint.pt", [16, 64, 256], 1024, tmp / "cbs-adamw",
        probe_samples=512, noise_batches=2, say=lambda _: None, show_progress=False,
    )  # fmt: skip
    assert result["optimizer"] == "AdamW" and result["lr_scaling"] == "sqrt"
    assert [b["lr"] for b in result["branches"]] == pytest.approx([1.5e-3, 3e-3, 6e-3])
    assert result["noise_scale_preconditioned"] > 0 and result["noise_scale"] > 0
    assert "as AdamW scales them" in (tmp / "cbs-adamw" / "cbs.md").read_text()


def test_critical_batch_on_a_fit_runs_own_objects_puts_them_back(tmp_path):
    from largebatch import fit

    g = torch.Generator().manual_seed(0)
    data = (torch.randn(256, 8, generator=g), torch.randint(0, 3, (256,), generator=g))

    def mlp():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    fit(mlp(), data, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), epochs=1,
        batch_size=32, out=tmp_path / "adam", verbose=False, device="cpu")  # fmt: skip
    # fit's model is the user's: the checkpoint cannot rebuild it; critical_batch takes objects
    model = mlp()
    saved = torch.load(tmp_path / "adam" / "checkpoint.pt", weights_only=True)
    model.load_state_dict(saved["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(saved["optimizer"])
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(optimizer.state_dict())
    result = critical_batch(
        model, optimizer, data, [8, 32], 256, batch_at=32, probe_samples=64, noise_batches=2,
        say=lambda _: None, show_progress=False,
    )  # fmt: skip
    assert result["lr_scaling"] == "sqrt" and result["noise_scale_preconditioned"] is not None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    after = optimizer.state_dict()
    assert after["param_groups"] == state_before["param_groups"]
    assert all(
        torch.equal(after["state"][k]["exp_avg_sq"], v["exp_avg_sq"])
        for k, v in state_before["state"].items()
    )


def test_the_suggested_schedule_warms_the_batch_up_to_the_critical_one():
    from largebatch.cbs import suggested_schedule
    from largebatch.controllers import parse_schedule

    assert suggested_schedule(16, 10_000, 64) == "0:16 10000:64"
    assert suggested_schedule(16, 10_000, 8) == "0:16"  # never below the run's batch
    assert suggested_schedule(16, 10_000, 512, cap=128) == "0:16 10000:128"
    assert suggested_schedule(48, 5_000, 100) == "0:48 5000:96"  # a multiple of the base
    assert parse_schedule(suggested_schedule(16, 10_000, 64)) == [(0, 16), (10_000, 64)]


def test_the_preconditioned_noise_scale_equals_the_plain_one_under_a_uniform_scale():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(512, 6, generator=g), torch.randint(0, 3, (512,), generator=g)
    model = torch.nn.Linear(6, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=0.0)
    for p in model.parameters():  # sqrt(v_hat) = 3 everywhere: the preconditioner is 3 I
        step = torch.tensor(5.0)
        optimizer.state[p] = {"step": step, "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.full_like(p, 9.0 * (1 - 0.99**5))}  # fmt: skip
    from largebatch.cbs import _noise_scale

    plain, _, _, pre = _noise_scale(
        model, optimizer, as_source((x, y)), [16, 128], 4, torch.Generator().manual_seed(2),
        torch.device("cpu"),
    )  # fmt: skip
    assert pre == pytest.approx(plain, rel=1e-9)
    for p in model.parameters():  # an uneven preconditioner reads differently
        optimizer.state[p]["exp_avg_sq"] = torch.rand(p.shape, generator=g) + 0.01
    _, _, _, other = _noise_scale(
        model, optimizer, as_source((x, y)), [16, 128], 4, torch.Generator().manual_seed(2),
        torch.device("cpu"),
    )  # fmt: skip
    assert other != pytest.approx(plain, rel=1e-3)
