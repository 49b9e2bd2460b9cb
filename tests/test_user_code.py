"""User code from the command line (--model/--dataset module:callable), the own-loop
example, and the pieces a loop of your own is built from."""

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.accumulate import accumulate
from largebatch.io import read_jsonl
from largebatch.lr import LRScaler
from largebatch.sampler import GrowingBatchSampler

ROOT = Path(__file__).resolve().parents[1]

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    def data(seed=0):
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(9)) * 2
        def split(n):
            y = torch.randint(0, 3, (n,), generator=g)
            return TensorDataset(centres[y] + torch.randn(n, 2, 4, generator=g), y)
        return split(192), split(64)

    def net(num_classes, input_shape):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1], 16),
                             nn.GELU(), nn.Linear(16, num_classes))

    def one_split():
        return data()[0]

    def not_a_model(num_classes):
        return 42

    def broken():
        raise RuntimeError("disk on fire")

    def quits(num_classes):
        import sys
        sys.exit(0)

    def interrupts():
        raise KeyboardInterrupt

    def a_dict():
        x, y = torch.zeros(8, 2, 4), torch.zeros(8, dtype=torch.long)
        return {"x": x, "y": y}, None

    class Unmeasurable(torch.utils.data.Dataset):
        def __len__(self):
            raise OSError("no size today")

    def unmeasurable():
        return Unmeasurable(), None

    def train_only(seed=0):
        return data(seed)[0], None

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter([])

    def stream():
        return Stream(), None
    """
)

# Modules that misbehave as they are imported (or their attributes read).
OTHER_MODULES = {
    "quitter.py": "import sys\nsys.exit(0)\n",
    "lazy.py": "def __getattr__(name):\n    raise RuntimeError('lazy ' + name)\n",
    "hangs.py": (
        "import pathlib, time\npathlib.Path('importing').write_text('')\ntime.sleep(60)\n"
    ),
}


def _write_user_code(folder):
    (folder / "mycode.py").write_text(USER_MODULE)
    for name, text in OTHER_MODULES.items():
        (folder / name).write_text(text)


def _largebatch(cwd, *args):
    return subprocess.run(
        [sys.executable, "-m", "largebatch", *args], cwd=cwd, capture_output=True, text=True
    )


def test_model_and_dataset_by_import_path_from_the_command_line(tmp_path):
    _write_user_code(tmp_path)
    done = _largebatch(
        tmp_path, "train", "--dataset", "mycode:data", "--model", "mycode:net", "--method",
        "abs", "--set", "abs_duration=1", "--set", "hessian_samples=64", "--epochs", "3",
        "--batch-size", "32", "--max-batch-size", "128", "--lr", "0.05", "--device", "cpu",
        "--out", "run", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["batch_size"] > 32 and records[-1]["test_acc"] > 0.8
    # evaluate rebuilds the model and the data from the same paths
    done = _largebatch(tmp_path, "evaluate", "--checkpoint", "run/checkpoint.pt", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout.lower()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "nosuchmodule:net"], "cannot import 'nosuchmodule'"),
        (["--model", "mycode:missing"], "has no attribute 'missing'"),
        (["--model", "mycode:not_a_model"], "returned a int, not an nn.Module"),
        (["--model", "mycode"], "unknown model 'mycode'"),
        (["--dataset", "mycode:one_split"], "must return (train, test) datasets"),
        (["--dataset", "mycode:broken"], "failed: RuntimeError: disk on fire"),
        (["--dataset", ":data"], "must look like package.module:callable"),
        (["--model", "mycode:quits"], "failed: it called sys.exit(0)"),
        (["--model", "quitter:net"], "importing 'quitter' failed: it called sys.exit(0)"),
        (["--model", "lazy:net"], "reading 'net' failed: RuntimeError: lazy net"),
        (["--dataset", "mycode:a_dict"], "reading train_data[0] failed: KeyError: 0"),
        (["--dataset", "mycode:unmeasurable"], "len(train_data) failed: OSError: no size"),
        (["--dataset", "mycode:stream"], "train a stream with largebatch.fit(samples_per_epoch"),
    ],
)
def test_bad_import_paths_are_one_error_line(tmp_path, flags, message):
    _write_user_code(tmp_path)
    base = {"--dataset": "mycode:data", "--model": "mycode:net"}
    base.update(dict(zip(flags[::2], flags[1::2], strict=True)))
    args = [item for pair in base.items() for item in pair]
    done = _largebatch(tmp_path, "train", *args, "--epochs", "1", "--device", "cpu", "--out", "r")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    assert not (tmp_path / "r").exists()  # the run folder it created is removed again


@pytest.mark.parametrize("model", ["hangs:net", "mycode:interrupts"])
def test_ctrl_c_in_user_code_is_an_interruption(tmp_path, model):
    """Ctrl-C stops an import that hangs (it is not held back as during the rest of
    start-up); a KeyboardInterrupt of the user's own is an interruption too."""
    _write_user_code(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "largebatch", "train", "--dataset", "mycode:data", "--model",
         model, "--epochs", "1", "--device", "cpu", "--out", "r"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    hangs = model.startswith("hangs")
    try:
        started = time.monotonic()
        while hangs and not (tmp_path / "importing").exists():
            assert proc.poll() is None and time.monotonic() < started + 120
            time.sleep(0.05)
        if hangs:
            proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if hangs:
        assert time.monotonic() - sent < 10  # stopped at once, not after the sleep
    assert proc.returncode == 130, err
    (line,) = err.strip().splitlines()  # one line, naming the code it landed in
    assert line.startswith("interrupted: --model") and model in line, err
    assert not (tmp_path / "r").exists()


def test_a_run_without_a_test_split_is_refused_by_evaluate_and_reported(tmp_path):
    _write_user_code(tmp_path)
    done = _largebatch(
        tmp_path, "train", "--dataset", "mycode:train_only", "--model", "mycode:net",
        "--epochs", "1", "--device", "cpu", "--out", "study/run", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    done = _largebatch(tmp_path, "evaluate", "--checkpoint", "study/run/checkpoint.pt")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: the run's dataset has no test split;"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = _largebatch(tmp_path, "report", "study")  # accuracy shown as "-"
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "| mycode:train_only | mycode:net | bl |" in done.stdout


def _example(name: str) -> subprocess.CompletedProcess:
    """Run ``examples/NAME`` as a user would; it must succeed."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def test_the_own_loop_example_runs_and_its_batch_grows():
    done = _example("own_loop.py")
    batches = [
        int(line.split()[3]) for line in done.stdout.splitlines() if line.startswith("epoch")
    ]
    assert len(batches) == 8 and batches[0] == 32 and batches[-1] >= 128
    accuracy = float(done.stdout.splitlines()[-1].split()[-1])
    assert accuracy > 0.9


def test_the_gns_own_loop_example_runs_and_its_batch_follows_the_noise_scale():
    done = _example("own_loop_gns.py")
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("epoch")]
    batches = [int(row[3]) for row in rows]
    assert len(rows) == 6 and batches[0] >= 32 and batches[-1] > 32  # it grew
    assert all(float(row[6]) > 0 for row in rows)  # a measured noise scale each epoch
    assert float(rows[-1][-1]) > 0.85


def test_accumulation_weights_a_short_last_micro_batch_by_its_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(23, 5, dtype=torch.float64), torch.randint(0, 3, (23,))
    F.cross_entropy(model(x), y).backward()  # the whole batch at once: the truth
    truth = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = accumulate(model, F.cross_entropy, x, y, micro_batch_size=10)  # 10, 10, 3
    for p, g in zip(model.parameters(), truth, strict=True):
        assert torch.allclose(p.grad, g, rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        assert loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)


def test_the_sampler_resumes_mid_epoch_and_changes_batch_at_any_point():
    whole = GrowingBatchSampler(100, batch_size=8, seed=4)
    seen = []
    for i, batch in enumerate(whole):
        seen.append(batch)
        if i == 2:
            whole.batch_size = 32  # takes effect at the next batch
            saved = whole.state_dict()
    assert [len(b) for b in seen] == [8, 8, 8, 32, 32, 12]
    assert sorted(i for b in seen for i in b) == list(range(100))
    again = GrowingBatchSampler(100, batch_size=1, seed=4)
    again.load_state_dict(saved)
    assert list(again) == seen[3:]
    assert again.epoch == 1 and list(again)[0] != seen[0]  # the next epoch: a new order
    # two ranks: contiguous halves of every global batch
    ranks = [GrowingBatchSampler(100, batch_size=8, seed=4, rank=r, world_size=2) for r in (0, 1)]
    halves = [list(s) for s in ranks]
    for a, b, full in zip(halves[0], halves[1], GrowingBatchSampler(100, 8, seed=4), strict=True):
        assert a + b == full


def test_the_lr_scaler_keeps_group_ratios_and_resumes():
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(
        [{"params": [params[0]], "lr": 0.1}, {"params": [params[1]]}], lr=0.3
    )
    scaler = LRScaler(optimizer)
    scaler.apply(4.0)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.4, 1.2])
    state, opt_state = scaler.state_dict(), optimizer.state_dict()
    fresh = torch.optim.SGD([{"params": [params[0]], "lr": 9.0}, {"params": [params[1]]}], lr=9.0)
    fresh.load_state_dict(opt_state)
    again = LRScaler(fresh)
    again.load_state_dict(state)
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([0.4, 1.2])
    # with a scheduler: it steps on the unscaled LRs, and the factor multiplies its result
    optimizer = torch.optim.SGD(
        [{"params": [params[0]], "lr": 0.1}, {"params": [params[1]]}], lr=0.3
    )
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with_schedule = LRScaler(optimizer, schedule)
    with_schedule.apply(4.0)
    for _ in range(2):
        optimizer.step()
        with_schedule.step_scheduler()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.3])  # /4 * 4
