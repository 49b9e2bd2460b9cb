"""A user's map-style Dataset read lazily by ``fit``: each training sample read once per
epoch whatever the workers, ranks, batch growth or interruption, and the run the same
as on the same data in memory.

This file is also the entry point of the torchrun test's workers (``__main__`` below).
"""

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from helpers import assert_runs_close, free_port, threads_like_a_rank
from largebatch import fit
from largebatch.checkpoint import load_checkpoint
from largebatch.errors import ConfigError, UsageError, UserCodeError
from largebatch.io import read_jsonl
from largebatch.sampler import EpochSampler
from largebatch.train import TrainingInterrupted

N, WIDTH, CLASSES = 96, 10, 3
#: Test-only: the folder where the torchrun workers' Dataset logs its reads.
READS = "LARGEBATCH_TEST_READS"


def _tensors(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, WIDTH, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


class Counted(Dataset):
    """``(x[i], y[i])``; every read appends ``i`` to a file of the reading process's own,
    so reads in worker processes and on other ranks are counted too."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, log: Path) -> None:
        self.x, self.y, self.log = x, y, Path(log)
        self.log.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        with open(self.log / f"{os.getpid()}.log", "a") as f:
            f.write(f"{i}\n")
        return self.x[i], int(self.y[i])


def _reads(log: Path) -> Counter:
    counts: Counter = Counter()
    for path in log.glob("*.log"):
        counts.update(int(line) for line in path.read_text().split())
    return counts


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, 16), nn.ReLU(), nn.Linear(16, CLASSES))


# The batch grows mid-epoch: 8 -> 16 at sample 40 (epoch 1), -> 32 at sample 120 (epoch 2).
SETTINGS = dict(
    method="schedule",
    batch_schedule="0:8 40:16 120:32",
    batch_size=8,
    max_batch_size=32,
    epochs=3,
    lr=0.05,
    safeguard=False,
    seed=3,
    device="cpu",
)


def _fit(data, **changes):
    model = _model()
    summary = fit(model, data, verbose=False, **{**SETTINGS, **changes})
    return model, summary


# Before training, item 0 is read once to learn the shapes and the model is checked on
# items 0 and 1 (scoring.check_fits): one process reads these beyond its epochs.
STARTUP = Counter({0: 2, 1: 1})


@pytest.mark.parametrize("workers", [0, 2])
def test_each_sample_is_read_once_per_epoch_while_the_batch_grows(tmp_path, workers):
    x, y = _tensors()
    _fit(Counted(x, y, tmp_path / "reads"), workers=workers, out=tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    changes = [c for r in records for c in r.get("batch_changes", [])]
    assert [c["batch_size"] for c in changes] == [16, 32]
    assert any(c["samples"] % N for c in changes)  # a growth inside an epoch
    assert _reads(tmp_path / "reads") == Counter(dict.fromkeys(range(N), 3)) + STARTUP


def test_the_run_is_the_same_with_0_1_2_workers_and_in_memory(tmp_path):
    x, y = _tensors()
    runs = [_fit(Counted(x, y, tmp_path / f"r{w}"), workers=w)[0] for w in (0, 1, 2)]
    in_memory, _ = _fit((x, y))
    for model in runs:
        for key, value in in_memory.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_an_interrupted_run_resumes_at_its_sample_and_reads_only_the_rest(tmp_path):
    x, y = _tensors()
    whole, _ = _fit((x, y))
    model = _model()
    calls = [0]

    def alarm(module, inputs, output):
        calls[0] += 1
        if module.training and calls[0] == 14:  # epoch 2, after the growth to 16
            signal.raise_signal(signal.SIGTERM)

    hook = model.register_forward_hook(alarm)
    with pytest.raises(TrainingInterrupted):
        fit(model, Counted(x, y, tmp_path / "first"), out=tmp_path / "run", workers=2,
            verbose=False, **SETTINGS)  # fmt: skip
    hook.remove()
    progress = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["run"]
    epoch, position = progress["epoch"], progress["position"]
    assert position % N  # stopped inside an epoch
    fit(model, Counted(x, y, tmp_path / "second"), out=tmp_path / "run", resume=True,
        workers=2, verbose=False, **SETTINGS)  # fmt: skip
    order = EpochSampler(N, SETTINGS["seed"])
    expected = Counter(order.order(epoch)[position:].tolist())
    for later in range(epoch + 1, SETTINGS["epochs"]):
        expected.update(order.order(later).tolist())
    assert _reads(tmp_path / "second") == expected + STARTUP
    for key, value in whole.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


KILLED = """
import os, signal, sys, torch
sys.path[:0] = [{tests!r}]
from test_lazy_data import Counted, SETTINGS, _model, _tensors
from largebatch import fit
model = _model()
calls = [0]
def die(module, inputs, output):
    calls[0] += 1
    if module.training and calls[0] == 20:  # in epoch 2, after its first checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
model.register_forward_hook(die)
x, y = _tensors()
fit(model, Counted(x, y, {log!r}), out={out!r}, workers=2, verbose=False, **SETTINGS)
"""


def test_a_run_killed_by_sigkill_resumes_as_if_uninterrupted(tmp_path):
    x, y = _tensors()
    out = tmp_path / "run"
    code = KILLED.format(tests=str(Path(__file__).parent), log=str(tmp_path / "a"), out=str(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.pt")["run"]["epoch"] == 1
    model = _model()
    fit(model, Counted(x, y, tmp_path / "b"), out=out, resume=True, workers=2, verbose=False,
        **SETTINGS)  # fmt: skip
    fit(whole := _model(), (x, y), out=tmp_path / "whole", verbose=False, **SETTINGS)
    for key, value in whole.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert _reads(tmp_path / "b") == Counter(dict.fromkeys(range(N), 2)) + STARTUP


def _rank_main(out: str) -> None:
    torch.set_num_threads(1)
    x, y = _tensors()
    fit(_model(), Counted(x, y, Path(os.environ[READS])), out=out, workers=1, verbose=False,
        micro_batch_size=4, **SETTINGS)  # fmt: skip


@pytest.mark.slow
def test_two_torchrun_ranks_read_each_sample_once_and_match_one_process(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        f"--master-port={free_port()}", __file__, str(tmp_path / "two"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", READS: str(tmp_path / "reads")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # every rank reads its own start-up items; the epochs' samples are split between them
    assert _reads(tmp_path / "reads") == Counter(dict.fromkeys(range(N), 3)) + STARTUP + STARTUP
    x, y = _tensors()
    with threads_like_a_rank():
        fit(_model(), (x, y), out=tmp_path / "one", verbose=False, micro_batch_size=4,
            **SETTINGS)  # fmt: skip
    assert_runs_close(tmp_path / "one", tmp_path / "two")


def test_a_dataset_whose_items_change_shape_names_the_item(tmp_path):
    x, y = _tensors()

    class Ragged(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return (x[i, :5] if i == 50 else x[i]), int(y[i])

    with pytest.raises(UsageError, match=r"train_data\[50\] input has shape \(5,\)"):
        _fit(Ragged(), workers=2)


def test_a_failing_getitem_in_a_worker_is_one_error_naming_the_item(tmp_path):
    x, y = _tensors()

    class Broken(Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            if i == 61:
                raise OSError("disk gone")
            return x[i], int(y[i])

    with pytest.raises(UserCodeError, match=r"reading train_data\[61\] failed: OSError: disk gone"):
        _fit(Broken(), workers=2)


def test_a_collate_fn_makes_the_batch(tmp_path):
    x, y = _tensors()
    calls = []

    def collate(items):
        calls.append(len(items))
        return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])

    model, _ = _fit(Counted(x, y, tmp_path / "reads"), workers=0, collate_fn=collate)
    in_memory, _ = _fit((x, y))
    for key, value in in_memory.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert calls and max(calls) <= 64

    def bad(items):
        return {"x": torch.stack([a for a, _ in items])}

    with pytest.raises(UsageError, match="collate_fn returned a dict; it must return"):
        _fit(Counted(x, y, tmp_path / "reads"), workers=0, collate_fn=bad)


def test_bad_workers_and_collate_arguments_are_refused_before_reading(tmp_path):
    x, y = _tensors()
    data = Counted(x, y, tmp_path / "reads")
    with pytest.raises(UsageError, match="workers"):
        _fit(data, workers=-1)
    with pytest.raises(UsageError, match="collate_fn is a str"):
        _fit(data, collate_fn="stack")
    with pytest.raises(ConfigError, match="workers="):
        _fit(data, loader_workers=2)
    with pytest.raises(UsageError, match="collate_fn applies to a Dataset"):
        _fit((x, y), collate_fn=lambda items: items)
    assert _reads(tmp_path / "reads") == Counter()


def test_evaluation_reads_the_eval_dataset_and_reports_accuracy(tmp_path):
    x, y = _tensors()
    xt, yt = _tensors(40, seed=1)
    _fit(
        Counted(x, y, tmp_path / "a"),
        eval_data=Counted(xt, yt, tmp_path / "b"),
        out=tmp_path / "lazy",
    )
    _fit((x, y), eval_data=(xt, yt), out=tmp_path / "memory")
    lazy, memory = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("lazy", "memory"))
    assert [r["test_acc"] for r in lazy] == [r["test_acc"] for r in memory]
    assert [r["test_loss"] for r in lazy] == [r["test_loss"] for r in memory]
    assert lazy[-1]["test_acc"] is not None
    # 3 evaluations of all 40; item 0 read for the shapes, item 1 by check_fits
    assert _reads(tmp_path / "b") == Counter(dict.fromkeys(range(40), 3)) + Counter({0: 1, 1: 1})


if __name__ == "__main__":  # a torchrun worker of the test above
    _rank_main(sys.argv[1])
    from largebatch.distributed import teardown

    teardown()
