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
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from helpers import assert_runs_close, free_port, threads_like_a_rank
from largebatch import fit
from largebatch.checkpoint import load_checkpoint
from largebatch.errors import ConfigError, DataError, UsageError, UserCodeError
from largebatch.feed import CHUNK
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


# Before training, items 0 and N-1 are read once (the shapes; a __len__ beyond the items)
# and the model is checked on items 0 and 1 (scoring.check_fits): one process reads
# these beyond its epochs.
STARTUP = Counter({0: 2, 1: 1, N - 1: 1})


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
    # 3 evaluations of all 40; items 0 and 39 read at the start, item 1 by check_fits
    expected = Counter(dict.fromkeys(range(40), 3)) + Counter({0: 1, 1: 1, 39: 1})
    assert _reads(tmp_path / "b") == expected


class Records(Dataset):
    """Items as dicts, as Hugging Face datasets give them: inputs under two keys, the
    label under ``"label"``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"left": self.x[i, :4], "right": self.x[i, 4:].numpy(), "label": int(self.y[i])}


class TwoInputs(nn.Module):
    """Takes its inputs as keywords: ``model(left=..., right=...)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, left, right):
        return self.net(torch.cat([left, right], dim=1))


def test_dict_items_with_a_target_key_train_as_the_same_data_in_memory(tmp_path):
    x, y = _tensors()
    torch.manual_seed(0)
    model = TwoInputs()
    fit(model, Records(x, y), target_key="label", workers=2, verbose=False,
        **{**SETTINGS, "method": "gns", "batch_schedule": None})  # fmt: skip
    reference = _model()
    fit(reference, (x, y), verbose=False, **{**SETTINGS, "method": "gns", "batch_schedule": None})
    for key, value in reference.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


class Sentences(Dataset):
    """Token sequences of lengths 3 to 12; the label is whether token 7 occurs."""

    def __init__(self, n: int = N) -> None:
        g = torch.Generator().manual_seed(5)
        self.items = [
            torch.randint(0, 10, (int(torch.randint(3, 13, (), generator=g)),), generator=g)
            for _ in range(n)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        tokens = self.items[i]
        return tokens, int((tokens == 7).any())


def pad(items):
    """Pads each micro-batch to its longest sequence; the mask marks the real tokens."""
    longest = max(len(tokens) for tokens, _ in items)
    ids = torch.zeros(len(items), longest, dtype=torch.long)
    mask = torch.zeros(len(items), longest)
    for row, (tokens, _) in enumerate(items):
        ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    return {"ids": ids, "mask": mask}, torch.tensor([label for _, label in items])


class Bag(nn.Module):
    """Mean of the real tokens' embeddings, then a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = nn.Embedding(10, 8), nn.Linear(8, 2)

    def forward(self, ids, mask):
        summed = (self.embed(ids) * mask.unsqueeze(-1)).sum(1)
        return self.out(summed / mask.sum(1, keepdim=True))


@pytest.mark.parametrize("method", ["gns", "abs"])
def test_variable_length_sequences_padded_per_micro_batch_train(tmp_path, method):
    # gns reads micro-batches smaller than the padded ones (cut one by one), abs takes
    # Hessian products through the dict inputs
    data = Sentences()
    model = Bag()
    changes = {"method": method, "batch_schedule": None, "micro_batch_size": 8}
    fit(model, data, collate_fn=pad, workers=2, out=tmp_path / "run", verbose=False,
        **{**SETTINGS, **changes, "epochs": 4, "lr": 0.5})  # fmt: skip
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    if method == "abs":
        assert all(r["eigenvalue"] is not None for r in records)
    model_lazy, model_none = Bag(), Bag()
    for model_here, workers in ((model_lazy, 0), (model_none, 2)):
        fit(model_here, data, collate_fn=pad, workers=workers, verbose=False,
            **{**SETTINGS, **changes})  # fmt: skip
    for key, value in model_lazy.state_dict().items():
        assert torch.equal(model_none.state_dict()[key], value), key


def test_dict_inputs_refuse_adversarial_examples_before_training(tmp_path):
    x, y = _tensors()
    with pytest.raises(UsageError, match="perturb inputs that are one tensor"):
        fit(TwoInputs(), Records(x, y), target_key="label", workers=0, verbose=False,
            **{**SETTINGS, "method": "absa", "batch_schedule": None})  # fmt: skip


@pytest.mark.parametrize(
    "collate, message",
    [
        (lambda items: {"ids": torch.zeros(len(items), 3)}, "without the target_key 'label'"),
        (lambda items: ({"ids": [1, 2]}, torch.zeros(len(items))), "dict of tensors"),
        (
            lambda items: (torch.zeros(len(items) + 1, 2), torch.zeros(len(items))),
            "one entry per item",
        ),
    ],
    ids=["no-target", "not-tensors", "wrong-length"],
)
def test_a_collate_fn_that_returns_the_wrong_thing_is_one_error(collate, message):
    with pytest.raises(UsageError, match=message):
        fit(Bag(), Sentences(), collate_fn=collate, target_key="label", workers=0,
            verbose=False, **SETTINGS)  # fmt: skip


def test_dict_items_without_the_target_key_are_refused_naming_it():
    x, y = _tensors()
    with pytest.raises(UsageError, match=r"train_data\[0\] is a dict with keys .*target_key='y'"):
        fit(TwoInputs(), Records(x, y), target_key="y", workers=0, verbose=False, **SETTINGS)


class Short(Dataset):
    """Claims more items than it has."""

    def __init__(self, claimed: int) -> None:
        self.x, self.y = _tensors()
        self.claimed = claimed

    def __len__(self) -> int:
        return self.claimed

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])  # IndexError past N


def test_a_len_beyond_the_items_is_refused_before_training(tmp_path):
    with pytest.raises(
        UsageError, match=r"train_data\[99\] failed: IndexError: .*len\(train_data\) is 100"
    ):
        _fit(Short(100), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


class Crashing(Dataset):
    """Item 70 kills the worker process reading it (as native code that crashes would)."""

    def __init__(self) -> None:
        self.x, self.y = _tensors()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i):
        if i == 70 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.x[i], int(self.y[i])


def test_a_worker_that_dies_is_one_error_naming_the_item_it_read():
    with pytest.raises(DataError, match=r"worker \(pid \d+\) died while reading train_data\[70\]"):
        _fit(Crashing(), workers=2)


class Stream(IterableDataset):
    """``(x[i], y[i])`` in order, each read logged (as :class:`Counted`). It yields rank
    ``r`` of ``W`` the items ``i % W == r``, split again between the loader's workers in
    blocks of ``CHUNK`` taken in turn, so that the loader gives each rank its share in
    order."""

    def __init__(self, x, y, log):
        self.x, self.y, self.log, self.epochs = x, y, Path(log), []
        self.log.mkdir(parents=True, exist_ok=True)

    def __len__(self):
        return len(self.y)

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def _share(self):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        mine = list(range(rank, len(self.y), world))
        info = torch.utils.data.get_worker_info()
        if info is None:
            return mine
        # the loader takes its workers' items in turns of CHUNK: blocks of CHUNK in turn
        blocks = [mine[i : i + CHUNK] for i in range(0, len(mine), CHUNK)]
        return [i for block in blocks[info.id :: info.num_workers] for i in block]

    def __iter__(self):
        for i in self._share():
            with open(self.log / f"{os.getpid()}.log", "a") as f:
                f.write(f"{i}\n")
            yield self.x[i], int(self.y[i])


class Resumable(Stream):
    """A stream that keeps its place: ``state_dict`` says how many items of this
    process's share it gave, and a pass after ``load_state_dict`` goes on from there."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given, self.start = 0, 0

    def state_dict(self):
        return {"given": self.given}

    def load_state_dict(self, state):
        self.start = self.given = state["given"]

    def __iter__(self):
        share, self.given, self.start = self._share(), self.start, 0
        for i in share[self.given :]:
            with open(self.log / f"{os.getpid()}.log", "a") as f:
                f.write(f"{i}\n")
            self.given += 1
            yield self.x[i], int(self.y[i])


STREAM = {**SETTINGS, "method": "gns", "batch_schedule": None, "safeguard": True}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_trains_under_gns_reading_each_item_once_per_epoch(tmp_path, workers):
    x, y = _tensors()
    model = _model()
    fit(model, Stream(x, y, tmp_path / "reads"), workers=workers, out=tmp_path / "run",
        verbose=False, **STREAM)  # fmt: skip
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["batch_size"] > 8  # the batch grew
    # the head: item 0 (shapes), then the first safeguard_samples (all N here) for the
    # gauge's probe, which the checks of the model read too
    head = Counter({0: 1}) + Counter(range(N))
    assert _reads(tmp_path / "reads") == Counter(dict.fromkeys(range(N), 3)) + head
    other = _model()
    fit(other, Stream(x, y, tmp_path / "other"), workers=2 - workers, verbose=False, **STREAM)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_a_stream_trains_under_abs(tmp_path):
    x, y = _tensors()
    fit(_model(), Stream(x, y, tmp_path / "reads"), out=tmp_path / "run", verbose=False,
        **{**STREAM, "method": "abs", "hessian_samples": 32})  # fmt: skip
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert all(r["eigenvalue"] is not None for r in records)


@pytest.mark.parametrize("kind", ["stateful", "fast-forward"])
def test_an_interrupted_stream_resumes_as_if_uninterrupted(tmp_path, kind):
    x, y = _tensors()
    build = Resumable if kind == "stateful" else Stream
    whole = _model()
    fit(whole, build(x, y, tmp_path / "whole"), verbose=False, **STREAM)
    model = _model()
    calls = [0]

    def alarm(module, inputs, output):
        calls[0] += 1
        if module.training and calls[0] == 14:
            signal.raise_signal(signal.SIGTERM)

    hook = model.register_forward_hook(alarm)
    data = build(x, y, tmp_path / "first")
    with pytest.raises(TrainingInterrupted):
        fit(model, data, out=tmp_path / "run", verbose=False, **STREAM)
    hook.remove()
    stopped = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["run"]
    epoch, position = stopped["epoch"], stopped["position"]
    assert 0 < position < N
    second = build(x, y, tmp_path / "second")
    fit(model, second, out=tmp_path / "run", resume=True, verbose=False, **STREAM)
    for key, value in whole.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    reads = _reads(tmp_path / "second")
    if kind == "stateful":  # went on from its state: the rest of the epoch, then 2 more
        assert "skipped_samples" not in records[epoch]
        rest = Counter(range(position, N)) + Counter(dict.fromkeys(range(N), 2))
        assert reads - Counter(range(N)) - Counter({0: 1}) == rest
    else:  # read again up to the position, and said so
        assert records[epoch]["skipped_samples"] == position


def test_a_stream_that_ends_before_its_epoch_is_one_error(tmp_path):
    x, y = _tensors()
    # found before training by the gauge's probe (the first 120 items), else in training
    for safeguard in (True, False):
        with pytest.raises(DataError, match=r"train_data ended after 96 items .*samples_per"):
            fit(_model(), Stream(x, y, tmp_path / "r"), samples_per_epoch=120, verbose=False,
                **{**STREAM, "safeguard": safeguard})  # fmt: skip


def test_a_stream_without_len_needs_samples_per_epoch(tmp_path):
    x, y = _tensors()

    class Endless(IterableDataset):
        def __iter__(self):
            while True:
                yield x[0], 0

    with pytest.raises(UsageError, match="pass samples_per_epoch="):
        fit(_model(), Endless(), verbose=False, **STREAM)
    fit(_model(), Endless(), samples_per_epoch=40, verbose=False, **{**STREAM, "epochs": 1})
    with pytest.raises(UsageError, match="samples_per_epoch applies to a stream"):
        fit(_model(), Counted(x, y, tmp_path / "r"), samples_per_epoch=40, verbose=False)


# A rank trains on the positions p % W == r of each batch, so its micro-batches are not
# those one process cuts (0-3, 4-7 against 0, 2, 4, 6): the same samples per update, but
# gns's micro-batch noise reads differently. A batch schedule is compared exactly.
STREAM_RANKS = {**SETTINGS, "safeguard": True, "micro_batch_size": 4}


def _stream_rank_main(out: str) -> None:
    torch.set_num_threads(1)
    x, y = _tensors()
    fit(_model(), Stream(x, y, Path(os.environ[READS])), out=out, workers=2, verbose=False,
        **STREAM_RANKS)  # fmt: skip


@pytest.mark.slow
def test_a_stream_on_two_torchrun_ranks_matches_one_process(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        f"--master-port={free_port()}", __file__, str(tmp_path / "two"), "stream",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", READS: str(tmp_path / "reads")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    x, y = _tensors()
    with threads_like_a_rank():
        fit(_model(), Stream(x, y, tmp_path / "one-reads"), out=tmp_path / "one",
            verbose=False, **STREAM_RANKS)  # fmt: skip
    # each rank reads its own share of the epochs and of the head (the first items,
    # for the checks and the gauge's probe): together, what one process reads
    assert _reads(tmp_path / "reads") == _reads(tmp_path / "one-reads")
    assert_runs_close(tmp_path / "one", tmp_path / "two")


if __name__ == "__main__":  # a torchrun worker of the tests above
    (_stream_rank_main if sys.argv[2:] == ["stream"] else _rank_main)(sys.argv[1])
    from largebatch.distributed import teardown

    teardown()
