"""Interruption: SIGINT/SIGTERM finish the update in progress, save, and resume exactly."""

import os
import signal
import subprocess
import time

import pytest

import largebatch.train as train_module
from helpers import cli_train, with_alarm, without_times, write_tiny
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


def _signal_at_forward(monkeypatch, count, signum):
    """Make the model raise ``signum`` at its ``count``-th forward pass in training."""
    monkeypatch.setattr(
        train_module, "build_model", with_alarm(train_module.build_model, count, signum)
    )


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
    assert without_times(full) == without_times(cut)


def _same_as_an_uninterrupted_run(tmp_path, out, flags):
    """Resume ``out``, run the same command uninterrupted, and compare the metrics."""
    resumed = subprocess.run(
        cli_train(out, *flags, "--resume", "--quiet"), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "reference"
    full = subprocess.run(
        cli_train(reference, *flags, "--quiet"), capture_output=True, text=True, timeout=300
    )
    assert full.returncode == 0, full.stderr
    assert without_times(read_jsonl(out / "metrics.jsonl")) == without_times(
        read_jsonl(reference / "metrics.jsonl")
    )


def test_ctrl_c_on_the_command_line_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    flags = [
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
    ]
    proc = subprocess.Popen(
        cli_train(out, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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
    _same_as_an_uninterrupted_run(tmp_path, out, flags)


def test_sigkill_at_a_random_moment_then_resume_gives_the_uninterrupted_result(tmp_path):
    import random

    out = tmp_path / "run"
    flags = [
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
    ]
    proc = subprocess.Popen(
        cli_train(out, *flags, "--quiet"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 3.0))  # anywhere: mid-epoch, mid-save, or after the end
    proc.kill()
    proc.wait(timeout=60)
    _same_as_an_uninterrupted_run(tmp_path, out, flags)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_ctrl_c_in_a_terminal_with_decoding_workers_saves_exits_130_and_resumes(tmp_path):
    # A terminal's Ctrl-C signals the whole foreground process group, so the image-folder
    # decoding workers get SIGINT too: the run must still finish its update, save, say so
    # in one line, leave no worker behind, and resume to the uninterrupted result.
    tiny = write_tiny(tmp_path / "tiny-imagenet-200", n_train=6, n_val=3)
    out = tmp_path / "run"
    flags = [
        *("--dataset", "tinyimagenet", "--data-dir", str(tiny), "--image-size", "16"),
        *("--model", "c1", "--epochs", "60", "--batch-size", "6", "--max-batch-size", "6"),
        *("--workers", "2", "--lr", "0.01"),
    ]
    proc = subprocess.Popen(
        cli_train(out, *flags, "--quiet"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal job has
    )
    metrics = out / "metrics.jsonl"  # created empty at the start; a line per epoch
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: SIGINT: saved"), err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    deadline = time.monotonic() + 15
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid), "a decoding worker outlived the run"
    epochs_done = len(read_jsonl(metrics))
    assert 1 <= epochs_done < 60
    _same_as_an_uninterrupted_run(tmp_path, out, flags)
