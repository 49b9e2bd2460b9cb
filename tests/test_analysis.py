import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian

from largebatch.analysis import analyze_checkpoint
from largebatch.cli import main
from largebatch.data import load_dataset
from largebatch.evaluate import load_trained
from largebatch.sampler import probe_batches


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert (
        main(
            [
                "train",
                "--dataset",
                "digits",
                "--model",
                "mlp",
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--max-batch-size",
                "64",
                "--lr",
                "0.05",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    return out / "checkpoint.pt"


def _dense_eigenvalues(checkpoint, samples, seed):
    """Ground truth: eigvalsh of the dense Hessian of the head layer's weights."""
    model, saved = load_trained(checkpoint, torch.device("cpu"))
    data = load_dataset("digits")
    ((x, y),) = probe_batches(data.train_x, data.train_y, samples, samples, seed)
    params = dict(model.named_parameters())
    name = [n for n in params if n.endswith("weight")][-1]

    def loss(w):
        return F.cross_entropy(functional_call(model, {**params, name: w}, (x,)), y)

    w = params[name].detach()
    dense = hessian(loss)(w).reshape(w.numel(), w.numel())
    return name, torch.linalg.eigvalsh(dense.double())


def test_hessian_command_writes_json_and_a_density_png(checkpoint, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert (
        main(
            [
                "hessian",
                "--checkpoint",
                str(checkpoint),
                "--samples",
                "100",
                "--top-k",
                "2",
                "--trace",
                "--trace-probes",
                "10",
                "--density",
                "--lanczos-steps",
                "20",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    values = result["eigenvalues"]["values"]
    assert len(values) == 2 and values[0] >= values[1]
    assert max(result["eigenvalues"]["residuals"]) <= 1e-3
    assert result["samples"] == 100 and result["trace"]["matvecs"] >= 10
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    grid, density = result["density"]["grid"], result["density"]["density"]
    assert abs(torch.trapezoid(torch.tensor(density), torch.tensor(grid)).item() - 1) < 1e-2
    sd = result["density"]
    assert sd["min_eigenvalue"] == min(sd["nodes"]) and 0 <= sd["negative_mass"] <= 1
    printed = capsys.readouterr().out
    assert "top eigenvalues" in printed and "most negative Ritz value" in printed


def test_full_model_top_eigenvalue_bounds_the_dense_head_block(checkpoint):
    # The top eigenvalue of a Hessian is at least that of any diagonal block (Cauchy
    # interlacing), and the head block's spectrum is exact ground truth we can compute.
    _, block = _dense_eigenvalues(checkpoint, 64, seed=3)
    result = analyze_checkpoint(
        checkpoint, samples=64, top_k=1, device="cpu", seed=3, say=lambda _: None
    )
    assert result["eigenvalues"]["values"][0] >= block[-1].item() * (1 - 1e-4)


def test_samples_all_streams_the_whole_training_set(checkpoint, capsys):
    train_size = len(load_dataset("digits").train_y)
    quiet = dict(top_k=2, device="cpu", seed=0, say=lambda _: None, batch_size=200)
    streamed = analyze_checkpoint(
        checkpoint, samples="all", trace=True, trace_probes=6, trace_tol=0,
        show_progress=True, **quiet,
    )  # fmt: skip
    # A probe set of every sample, in shuffled order and kept in memory: the same Hessian.
    kept = analyze_checkpoint(checkpoint, samples=10 * train_size, **quiet)
    assert streamed["samples"] == kept["samples"] == train_size
    torch.testing.assert_close(
        torch.tensor(streamed["eigenvalues"]["values"]),
        torch.tensor(kept["eigenvalues"]["values"]),
        rtol=1e-5,
        atol=0,
    )
    trace = streamed["trace"]
    assert trace["matvecs"] == 6 and trace["method"] == "hutch++"
    assert trace["relative_stderr"] == pytest.approx(trace["stderr"] / abs(trace["estimate"]))
    err = capsys.readouterr().err
    products = streamed["eigenvalues"]["matvecs"]
    final = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("top-2")][-1]
    assert f"{products} products" in final and f"{products * train_size / 1000:.1f}k" in final


def test_hessian_command_refuses_bad_sample_counts(checkpoint, capsys):
    for bad in ("some", "0", "-5"):
        try:
            code = main(["hessian", "--checkpoint", str(checkpoint), "--samples", bad])
        except SystemExit as exc:  # argparse's own refusal
            code = exc.code
        assert code == 2
        assert "samples" in capsys.readouterr().err
