import json
import shutil
import subprocess
import sys
import threading

import pytest
import yaml

from largebatch.cli import main


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "largebatch", *args], capture_output=True, text=True, timeout=120
    )


def _assert_clean_error(proc, fragment):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and fragment in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["train", "--batch-size", "0"], "batch_size must be >= 1"),
        (["train", "--model", "vgg"], "unknown model 'vgg'"),
        (["train", "--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent"),
        (["train", "--epochs", "ten"], "invalid int value"),
        (["train", "--set", "learning_rate=3"], "unknown config key"),
        (["train", "--config", "/nonexistent.yaml"], "not found"),
        (["evaluate", "--checkpoint", "/nonexistent.pt"], "not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_status_2(args, fragment):
    _assert_clean_error(_run(*args), fragment)


def test_train_then_evaluate_under_attack(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "synthetic",
                "--model",
                "mlp",
                "--epochs",
                "2",
                "--batch-size",
                "32",
                "--lr",
                "0.05",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--set",
                "max_batch_size=64",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "test_acc" in table and str(out) in table
    result_path = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(out / "checkpoint.pt"),
                "--attack",
                "pgd",
                "--eps",
                "0.1",
                "--steps",
                "3",
                "--out",
                str(result_path),
            ]
        )
        == 0
    )
    result = json.loads(result_path.read_text())
    assert result["samples"] == 256 and result["attack"] == "pgd"
    assert 0 <= result["adv_acc"] <= result["clean_acc"] <= 1
    summary = json.loads((out / "summary.json").read_text())
    assert result["clean_acc"] == pytest.approx(summary["final_test_acc"])


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"\x00garbage")
    _assert_clean_error(_run("evaluate", "--checkpoint", str(bogus)), "model.pt")


def test_demo_runs_the_five_method_comparison_config():
    from largebatch.demo import CONFIGS, demo_arguments

    args = demo_arguments("runs/x", fashion_mnist_available=True)
    assert args[:2] == ["compare", "--config"] and args[-2:] == ["--out", "runs/x"]
    assert args[2].endswith("demo.yaml") and (CONFIGS / "demo.yaml").exists()
    assert demo_arguments("o", fashion_mnist_available=False)[2].endswith("demo-mnist1d.yaml")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "hessian", "compare", "report"):
        assert command in out


def test_the_tensorboard_flag_reaches_the_config(tmp_path):
    out = tmp_path / "run"
    flags = ["--dataset", "synthetic", "--model", "mlp", "--device", "cpu", "--quiet"]
    flags += ["--epochs", "1", "--set", "limit_train=64", "--set", "limit_test=32"]
    assert main(["train", *flags, "--tensorboard", "--out", str(out)]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["tensorboard"] is True
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_tensorboard_write_that_fails_later_is_one_error_and_no_thread_traceback(
    tmp_path, monkeypatch
):
    from largebatch.errors import UsageError
    from largebatch.scalars import ScalarLog

    printed = []
    monkeypatch.setattr(threading, "excepthook", printed.append)
    folder = tmp_path / "tensorboard"
    log = ScalarLog(folder)
    log.epoch({"samples": 64, "train_loss": 1.0})
    shutil.rmtree(folder)
    folder.write_text("in the way")  # the writer's thread cannot open its file any more
    with pytest.raises(UsageError, match="tensorboard folder .*: Not a directory"):
        for samples in range(128, 64 * 100, 64):  # the thread's error surfaces at a flush
            log.epoch({"samples": samples, "train_loss": 1.0})
    log.__exit__(UsageError, None, None)  # leaving on that error raises nothing more
    assert printed == []
