"""``largebatch cbs``: the critical batch measured by branching from a checkpoint."""

import json

import pytest

from largebatch.cbs import measure_critical_batch
from largebatch.cli import main
from largebatch.config import TrainConfig
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
