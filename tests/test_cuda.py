"""The CUDA code paths: training in every precision and memory format, ``--device auto``,
resume, the Hessian engine, the attacks and the image-folder pipeline, on the GPU.

Skipped when CUDA is absent. ``LARGEBATCH_TEST_DEVICE`` chooses the device instead:

- ``cuda``: run on the GPU, and fail (not skip) when there is none;
- ``cpu``: run the device-independent checks on the CPU, to exercise this file's logic on
  a machine without a GPU. The CPU-against-device comparisons then compare the CPU with
  itself, and the ``--device auto`` test stays skipped.

``scripts/gpu-check.sh`` runs this file on a GPU machine with ``LARGEBATCH_TEST_DEVICE=cuda``
and ``LARGEBATCH_TEST_DEADLINE`` (Unix time): tests not started by then are skipped, so
that pytest ends in time to write its report.
Every run is small (a few hundred samples, a few epochs): on a GPU machine the whole file
takes one to two minutes, most of it the CPU halves of the comparisons (about 20 minutes
on the CPU of a 2-core machine with LARGEBATCH_TEST_DEVICE=cpu).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import largebatch.train as train_module
from helpers import with_alarm, without_times, write_tiny
from largebatch.adversarial import fgsm, pgd
from largebatch.analysis import analyze_checkpoint
from largebatch.checkpoint import load_checkpoint
from largebatch.config import TrainConfig
from largebatch.data import load_dataset
from largebatch.evaluate import evaluate_checkpoint
from largebatch.feed import Feed
from largebatch.hessian import top_eigenvalues
from largebatch.io import read_jsonl
from largebatch.models import build_model
from largebatch.precision import tf32
from largebatch.sampler import EpochSampler
from largebatch.train import TrainingInterrupted, resolve_device, train

_REQUESTED = os.environ.get("LARGEBATCH_TEST_DEVICE", "").strip().lower()
if _REQUESTED not in ("", "cpu", "cuda"):
    raise ValueError(f"LARGEBATCH_TEST_DEVICE must be cpu or cuda, not {_REQUESTED!r}")
if _REQUESTED == "cpu":
    DEVICE: torch.device | None = torch.device("cpu")
elif _REQUESTED == "cuda" or torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    DEVICE = None

pytestmark = pytest.mark.skipif(
    DEVICE is None, reason="no CUDA device (LARGEBATCH_TEST_DEVICE=cpu runs these on the CPU)"
)
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
CPU = torch.device("cpu")

# The CIFAR-shaped data set: 5 training pickles of 128 samples, a test pickle of 256.
TRAIN_PER_FILE = 128
TRAIN_SAMPLES = 5 * TRAIN_PER_FILE
TEST_SAMPLES = 256


_DEADLINE = float(os.environ.get("LARGEBATCH_TEST_DEADLINE") or "inf")


def _before_the_deadline() -> None:
    if time.time() > _DEADLINE:
        pytest.skip("LARGEBATCH_TEST_DEADLINE has passed: the time budget is spent")


@pytest.fixture(autouse=True)
def _cuda_was_asked_for():
    _before_the_deadline()
    if _REQUESTED == "cuda" and not torch.cuda.is_available():
        pytest.fail("LARGEBATCH_TEST_DEVICE=cuda, but torch.cuda.is_available() is False")


def exact_float32():
    """TF32 off for cuBLAS and cuDNN while the block runs (a no-op without CUDA): CPU and
    CUDA results then differ by summation order only (about 1e-6 relative in float32),
    where TF32 alone would keep them from agreeing to 1e-4."""
    return tf32(False)


def _write_cifar_like(folder: Path, seed: int = 0) -> Path:
    """CIFAR-10 pickles of learnable synthetic images: one random colour per class plus
    per-pixel noise (the real loader, the real augmentation, no download)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, size=(10, 3))
    folder.mkdir(parents=True, exist_ok=True)

    def write(name: str, n: int) -> None:
        labels = rng.integers(0, 10, size=n)
        pixels = colours[labels][:, :, None, None] + rng.normal(0, 30, size=(n, 3, 32, 32))
        data = np.clip(pixels, 0, 255).astype(np.uint8).reshape(n, 3072)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [int(v) for v in labels]}, f, protocol=2)

    for i in range(1, 6):
        write(f"data_batch_{i}", TRAIN_PER_FILE)
    write("test_batch", TEST_SAMPLES)
    return folder


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    return _write_cifar_like(tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py")


def _config(cifar_dir: Path, out: Path, **changes) -> TrainConfig:
    values = dict(
        dataset="cifar10",
        data_dir=str(cifar_dir),
        augment=True,  # random crop + flip on the training device
        model="c1",
        epochs=3,
        batch_size=64,
        max_batch_size=64,
        lr=0.02,
        eval_batch_size=256,
        device=DEVICE.type,
        out=str(out),
    )
    values.update(changes)
    return TrainConfig(**values)


def _capture_model(monkeypatch) -> list[torch.nn.Module]:
    """Make ``train`` hand over the models it builds."""
    built: list[torch.nn.Module] = []

    def build_and_keep(*args, **kwargs):
        model = build_model(*args, **kwargs)
        built.append(model)
        return model

    monkeypatch.setattr(train_module, "build_model", build_and_keep)
    return built


def _relative_distance(a: dict, b: dict) -> float:
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in keys)
    den = sum(float(a[k].double().norm() ** 2) for k in keys)
    return (num / den) ** 0.5


# ------------------------------------------------------------------- training runs


@pytest.mark.parametrize(
    "precision, channels_last",
    [("fp32", False), ("bf16", False), ("fp16", False), ("fp32", True), ("bf16", True)],
    ids=["fp32", "bf16", "fp16", "fp32-channels-last", "bf16-channels-last"],
)
def test_a_short_run_learns(tmp_path, monkeypatch, cifar_dir, precision, channels_last):
    built = _capture_model(monkeypatch)
    out = tmp_path / "run"
    config = _config(cifar_dir, out, precision=precision, channels_last=channels_last)
    summary = train(config, echo=None, show_progress=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["updates"] for r in records] == [10, 20, 30]
    assert all(np.isfinite([r["train_loss"], r["test_loss"]]).all() for r in records)
    # It learns: 10 classes, chance is 0.1 and ln(10) = 2.3. The classes differ by colour,
    # so three short epochs take any working set-up far below the first epoch's loss.
    assert records[-1]["train_loss"] < 0.7 * records[0]["train_loss"], records
    assert records[-1]["test_acc"] > 0.5, records
    assert summary["final_test_acc"] == records[-1]["test_acc"]
    # it ran where and how it was asked to
    (model,) = built
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.device.type == DEVICE.type
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    saved = load_checkpoint(out / "checkpoint.pt")
    # weights stay float32 (and finite) whatever the compute precision
    assert all(
        v.dtype == torch.float32 and bool(torch.isfinite(v).all())
        for v in saved["model"].values()
        if v.is_floating_point()
    )
    if precision == "fp16":
        assert saved["scaler"]["scale"] > 0
    else:
        assert saved["scaler"] is None


def test_device_auto_picks_the_gpu(tmp_path, cifar_dir):
    if not ON_CUDA:
        pytest.skip("--device auto picks the GPU only where there is one")
    assert resolve_device("auto") == torch.device("cuda")
    out = tmp_path / "auto"
    command = [
        *(sys.executable, "-m", "largebatch", "train", "--device", "auto"),
        *("--dataset", "cifar10", "--data-dir", str(cifar_dir), "--model", "c1"),
        *("--epochs", "1", "--batch-size", "128", "--max-batch-size", "128"),
        *("--out", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert "device cuda" in done.stdout, done.stdout
    assert (out / "summary.json").exists()


# ------------------------------------------------------------------------- resume


def _same_schedule(full: list[dict], resumed: list[dict]) -> None:
    """Equal batch sizes, LRs, adversarial shares and counters; losses, accuracies and
    eigenvalues equal on the CPU, close on CUDA."""
    if not ON_CUDA:
        assert without_times(full) == without_times(resumed)
        return
    exact = ("epoch", "batch_size", "lr", "adv_ratio", "updates", "samples")
    assert [{k: r[k] for k in exact} for r in full] == [{k: r[k] for k in exact} for r in resumed]
    for a, b in zip(full, resumed, strict=True):
        # CUDA kernels are not bit-deterministic (atomic adds in cuDNN's backward passes,
        # reduction order), so two runs from the same checkpoint drift apart by rounding
        # (about 1e-6 relative per update), which a few dozen updates amplify to 1e-3 at
        # most. A resume that lost state (the data order, the LR, the optimizer's momentum,
        # the augmentation generator) moves these numbers by far more than 5%.
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05, abs=0.01)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=0.05, abs=0.01)
        assert abs(b["test_acc"] - a["test_acc"]) <= 0.05
        if a["eigenvalue"] is None:
            assert b["eigenvalue"] is None
        else:
            assert b["eigenvalue"] == pytest.approx(a["eigenvalue"], rel=0.05)


def test_a_resumed_run_continues_with_the_same_schedule(tmp_path, monkeypatch, cifar_dir):
    # absa with abs_duration=1: the first eigenvalue becomes the reference, and after the
    # second epoch the batch doubles whatever the eigenvalue says (64, 64, 128), so the
    # schedule is fixed even though CUDA eigenvalues carry rounding noise (40 products
    # make sure the first, cold estimate converges: a failed one would grow the batch an
    # epoch early). The tracker, its warm start, FGSM examples in training and the
    # augmentation generator all have state that the resume must restore.
    def config(name, **changes):
        return _config(
            cifar_dir,
            tmp_path / name,
            method="absa",
            abs_duration=1,
            max_batch_size=256,
            hessian_samples=64,
            hessian_max_matvecs=40,
            adv_eps=0.01,
            **changes,
        )

    train(config("full"), echo=None, show_progress=False)
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["batch_size"] for r in full] == [64, 64, 128]
    assert [r["updates"] for r in full] == [10, 20, 25]
    assert full[0]["adv_ratio"] > 0 and full[0]["eig_converged"]
    # interrupted at an epoch boundary
    train(config("split"), echo=None, show_progress=False, stop_after=1)
    train(config("split", resume=True), echo=None, show_progress=False)
    _same_schedule(full, read_jsonl(tmp_path / "split" / "metrics.jsonl"))
    # interrupted mid-epoch (SIGTERM at the 13th training forward: the 3rd update of epoch 2)
    with monkeypatch.context() as patch:
        patch.setattr(
            train_module, "build_model", with_alarm(train_module.build_model, 13, signal.SIGTERM)
        )
        with pytest.raises(TrainingInterrupted, match=f"sample 192 of {TRAIN_SAMPLES}"):
            train(config("cut"), echo=None, show_progress=False)
    train(config("cut", resume=True), echo=None, show_progress=False)
    _same_schedule(full, read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("full", "cut"))
    # the same rounding argument: weights within 1% (exactly equal on the CPU)
    assert _relative_distance(a, b) < (1e-2 if ON_CUDA else 1e-12)


# ---------------------------------------------------------------- Hessian engine


def _c1_and_probe(cifar_dir: Path, samples: int = 32):
    data = load_dataset("cifar10", cifar_dir)
    torch.manual_seed(0)
    model = build_model("c1", data.input_shape, data.num_classes, data.mean, data.std)
    return model, (data.train_x[:samples], data.train_y[:samples])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_the_top_eigenvalue_agrees_on_cpu_and_device(cifar_dir, dtype):
    model, (x, y) = _c1_and_probe(cifar_dir)
    model, x = model.to(dtype), x.to(dtype)
    # A Ritz value with relative residual r is within r of an eigenvalue (relative), so
    # these put each device's value well inside the 1e-4 asked of the pair.
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    results = {}
    # float64, or float32 with TF32 off (see exact_float32): the products of the two
    # devices then differ by rounding only (~1e-6 relative in float32), and the same seed
    # gives the same start vector (drawn on the CPU), so 1e-4 relative is reachable.
    with exact_float32():
        for name, device in (("cpu", CPU), ("device", DEVICE)):
            on = copy.deepcopy(model).to(device)
            results[name] = top_eigenvalues(
                on, F.cross_entropy, (x.to(device), y.to(device)), tol=tol, max_iter=200, seed=0,
                stop="residual",  # the assertion below is on the residual
            )  # fmt: skip
    cpu, dev = float(results["cpu"].values[0]), float(results["device"].values[0])
    assert results["device"].vectors.device.type == DEVICE.type
    assert cpu > 0 and float(results["device"].residuals[0]) < 1e-4
    assert dev == pytest.approx(cpu, rel=1e-4)


@pytest.fixture(scope="module")
def device_checkpoint(tmp_path_factory, cifar_dir) -> Path:
    """C1 trained for one epoch on the device (shared by the evaluation tests)."""
    _before_the_deadline()  # module fixtures come before the autouse check
    out = tmp_path_factory.mktemp("c1") / "run"
    train(_config(cifar_dir, out, model="c1", epochs=1, lr=0.02), echo=None, show_progress=False)
    return out / "checkpoint.pt"


def test_the_hessian_command_on_the_device_matches_the_cpu(device_checkpoint):
    # What `largebatch hessian --device cuda` gives, with torch's default settings and
    # again with TF32 off. Every run stops at an error bound of 1e-3, so each eigenvalue is
    # within about 1e-3 of the truth, and 1e-2 leaves room for two of them. With its
    # default settings cuDNN runs float32 convolutions in TF32 on this GPU generation
    # (about 1e-3 relative error per product), which may keep the bound from reaching
    # 1e-3: the TF32-off run tells that apart from any other fault (both are printed).
    def analyze(device):
        return analyze_checkpoint(
            device_checkpoint, samples=64, trace=True, trace_probes=8, device=device, say=print
        )

    runs = {"cpu": analyze("cpu"), "device": analyze(DEVICE.type)}
    with exact_float32():
        runs["device_tf32_off"] = analyze(DEVICE.type) if ON_CUDA else runs["device"]
    summary = {
        name: {"eigenvalues": run["eigenvalues"], "trace": run["trace"]["estimate"]}
        for name, run in runs.items()
    }
    print(json.dumps(summary, indent=1))
    cpu = runs["cpu"]["eigenvalues"]
    # The trace is the mean of v^T H v over the same Rademacher probes (drawn on the CPU):
    # IEEE float32 on both devices agrees to rounding; TF32 products can move each term
    # by about 1e-3 of |v| |Hv|, which may be much more than 1e-3 of the mean.
    for name, trace_rel in (("device_tf32_off", 1e-3), ("device", 5e-2)):
        dev = runs[name]["eigenvalues"]
        assert dev["converged"], f"{name}: no convergence to 1e-3: {summary}"
        assert dev["values"][0] == pytest.approx(cpu["values"][0], rel=1e-2), summary
        assert runs[name]["trace"]["estimate"] == pytest.approx(
            runs["cpu"]["trace"]["estimate"], rel=trace_rel
        ), summary


# ---------------------------------------------------------------------- attacks


def _flipped_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() > 1e-5).double().mean())


def test_fgsm_and_pgd_on_the_device_match_the_cpu(cifar_dir):
    model, (x, y) = _c1_and_probe(cifar_dir, samples=128)
    model.eval()
    eps = 0.03
    outputs = {}
    with exact_float32():
        for name, device in (("cpu", CPU), ("device", DEVICE)):
            on = copy.deepcopy(model).to(device)
            xd, yd = x.to(device), y.to(device)
            adv_f = fgsm(on, xd, yd, eps)
            adv_p = pgd(
                on, xd, yd, eps, 2.5 * eps / 5, 5, generator=torch.Generator().manual_seed(0)
            )
            with torch.no_grad():
                losses = [float(F.cross_entropy(on(a), yd)) for a in (xd, adv_f, adv_p)]
            assert adv_f.device.type == adv_p.device.type == device.type
            outputs[name] = (adv_f.cpu(), adv_p.cpu(), losses)
    (f_cpu, p_cpu, loss_cpu), (f_dev, p_dev, loss_dev) = outputs["cpu"], outputs["device"]
    for adv in (f_dev, p_dev):
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # FGSM is x + eps * sign(gradient): the devices can disagree only where a gradient
    # entry is within rounding (~1e-6 relative) of zero, and such entries are rare.
    assert _flipped_fraction(f_cpu, f_dev) <= 1e-3
    # PGD: a sign that differs in one step moves that pixel by 2 * alpha and changes later
    # gradients a little, so a few more entries may differ; the attacks stay equally strong.
    assert _flipped_fraction(p_cpu, p_dev) <= 1e-2
    assert loss_dev == pytest.approx(loss_cpu, rel=1e-3)
    assert loss_dev[2] >= loss_dev[1] - 1e-3 and loss_dev[1] > loss_dev[0]


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_the_evaluate_command_on_the_device_matches_the_cpu(device_checkpoint, attack):
    with exact_float32():
        cpu, dev = (
            evaluate_checkpoint(device_checkpoint, attack=attack, eps=0.03, steps=5, device=d)
            for d in ("cpu", DEVICE.type)
        )
    assert dev["samples"] == cpu["samples"] == TEST_SAMPLES
    # an accuracy may differ by a sample sitting on a decision boundary
    assert abs(dev["clean_acc"] - cpu["clean_acc"]) <= 2 / TEST_SAMPLES
    assert abs(dev["adv_acc"] - cpu["adv_acc"]) <= 3 / TEST_SAMPLES
    assert dev["adv_acc"] <= dev["clean_acc"]


# --------------------------------------------------------------- image folders


def test_an_image_folder_run_with_decoding_workers_and_pinned_memory(tmp_path):
    # 72 training images: a batch of 72 is two loader chunks (64 + 8), joined on the device
    tiny = write_tiny(tmp_path / "tiny-imagenet-200", n_train=24, n_val=8)
    data = load_dataset("tinyimagenet", tiny, image_size=32)
    requests = [("train", (0, 1, 2, 3), None), ("test", (5, 6), None), ("train", (7,), 3)]
    with Feed(data, DEVICE, workers=2) as feed, Feed(data, CPU, workers=0) as inline:
        assert feed._loader.num_workers == 2 and feed._loader.pin_memory == ON_CUDA
        chunks = list(feed._run(requests))
        assert all(c.device.type == "cpu" and c.is_pinned() == ON_CUDA for c in chunks)

        def epoch(f):
            batches = f.train_batches(
                EpochSampler(len(data.train_y), 0).batches(0, 72),
                72,
                augment=True,
                augment_rng=torch.Generator().manual_seed(0),
                augment_seed=5,
            )
            return [(i, [(x.clone(), y.clone()) for x, y in parts]) for i, parts in batches]

        ((indices, [(x, y)]),) = epoch(feed)
        ((same_indices, [(x_cpu, y_cpu)]),) = epoch(inline)
        assert x.device.type == DEVICE.type and x.shape == (72, 3, 32, 32)
        assert torch.equal(indices, same_indices) and torch.equal(y, y_cpu)
        assert torch.equal(x.cpu(), x_cpu)  # decoding is exact, the copies too
        evaluated = list(feed.eval_batches("test", 10))
        assert [len(yb) for _, yb in evaluated] == [10, 10, 4]
        assert torch.equal(torch.cat([xb.cpu() for xb, _ in evaluated]), data.test_x.load())
    # and a whole training run through the pool, on the device
    out = tmp_path / "run"
    config = TrainConfig(
        dataset="tinyimagenet",
        data_dir=str(tiny),
        image_size=32,
        augment=True,
        model="resnet20",
        epochs=2,
        batch_size=36,
        max_batch_size=36,
        lr=0.01,
        eval_batch_size=12,
        loader_workers=2,
        device=DEVICE.type,
        out=str(out),
    )
    summary = train(config, echo=None, show_progress=False)
    records = read_jsonl(out / "metrics.jsonl")
    assert [(r["samples"], r["updates"]) for r in records] == [(72, 2), (144, 4)]
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["test_acc"] <= 1 for r in records)
    assert summary["final_test_acc"] == records[-1]["test_acc"]
