"""Interruption: SIGINT/SIGTERM finish the update in progress, save, and resume exactly."""

import signal
import subprocess
import sys
import time

import pytest

import largebatch.train as train_module
from largebatch.config import TrainConfig
from largebatch.io import read_jsonl
from largebatch.train import TrainingInterrupted, train


def _config(tmp_path, name, **changes):
    values = dict(
        dataset="synthetic",
        model="mlp",
        epochs=3,
        batch_size=32,
        max_batch_size=128,
        lr=0.05,
        lr_decay_epochs=[2],
        out=str(tmp_path / name),
        device="cpu",
        method="absa",
        abs_duration=1,
        hessian_samples=32,
        adv_eps=0.05,
    )
    values.update(changes)
    return TrainConfig(**values)


def _without_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def _signal_at_forward(monkeypatch, count, signum):
    """Make the model raise ``signum`` at its ``count``-th forward pass in training."""
    build = train_module.build_model

    def build_with_alarm(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == count:
                    signal.raise_signal(signum)

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_module, "build_model", build_with_alarm)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_epoch_saves_and_resume_matches_the_uninterrupted_run(
    tmp_path, monkeypatch, signum
):
    train(_config(tmp_path, "full"), echo=None, show_progress=False)
    # 512 samples / 32 = 16 updates per epoch at first: forward 21 is mid-epoch 2
    _signal_at_forward(monkeypatch, 21, signum)
    with pytest.raises(TrainingInterrupted, match="sample 160 of 512"):
        train(_config(tmp_path, "cut"), echo=None, show_progress=False)
    assert signal.getsignal(signum) is not None  # handlers restored
    assert len(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == 1
    monkeypatch.undo()
    train(_config(tmp_path, "cut", resume=True), echo=None, show_progress=False)
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    cut = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert _without_times(full) == _without_times(cut)


def test_ctrl_c_on_the_command_line_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "largebatch",
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "c1",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--max-batch-size",
        "8",
        "--lr",
        "0.01",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGINT: saved")
    assert "Traceback" not in err
    resumed = subprocess.run(
        args + ["--resume", "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    full = subprocess.run(
        args[:-1] + [str(reference), "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 0, full.stderr
    assert _without_times(read_jsonl(out / "metrics.jsonl")) == _without_times(
        read_jsonl(reference / "metrics.jsonl")
    )


def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_result(tmp_path):
    import random

    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "largebatch",
        "train",
        "--dataset",
        "synthetic",
        "--model",
        "c1",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--max-batch-size",
        "64",
        "--lr",
        "0.01",
        "--method",
        "abs",
        "--set",
        "abs_duration=1",
        "--set",
        "hessian_samples=32",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 3.0))  # anywhere: mid-epoch, mid-save, or after the end
    proc.kill()
    proc.wait(timeout=60)
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    full = subprocess.run(args[:-1] + [str(reference)], capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    assert _without_times(read_jsonl(out / "metrics.jsonl")) == _without_times(
        read_jsonl(reference / "metrics.jsonl")
    )
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
