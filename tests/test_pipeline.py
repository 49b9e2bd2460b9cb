"""The input pipeline: in-memory tensors indexed directly, image folders through a
persistent pool of decoding workers; training and evaluation on tiny real JPEG trees."""

import subprocess
from pathlib import Path

import pytest
import torch

from helpers import cli_train, without_times, write_imagenet, write_tiny
from largebatch.config import TrainConfig
from largebatch.data import load_dataset
from largebatch.distributed import World
from largebatch.errors import DataError
from largebatch.evaluate import evaluate_checkpoint
from largebatch.feed import Feed
from largebatch.io import read_jsonl
from largebatch.sampler import EpochSampler
from largebatch.train import train

CPU = torch.device("cpu")


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path / "tiny-imagenet-200", n_train=6, n_val=3)


@pytest.fixture
def imagenet(tmp_path):
    return write_imagenet(tmp_path / "imagenet", n_train=6, n_val=3)


def _epoch(feed, batch_size, micro, epoch=0, seed=0):
    sampler = EpochSampler(len(feed.data.train_y), seed)
    batches = feed.train_batches(
        sampler.batches(epoch, batch_size),
        micro,
        augment=True,
        augment_rng=torch.Generator().manual_seed(0),
        augment_seed=1000 + epoch,
    )
    return [(indices, [(x.clone(), y.clone()) for x, y in parts]) for indices, parts in batches]


def test_in_memory_data_is_indexed_directly_without_a_loader():
    data = load_dataset("synthetic", limit_train=100)
    feed = Feed(data, CPU)
    assert not feed.lazy and feed._loader is None
    ((indices, [(x, y)]), *_) = _epoch(feed, 32, 32)
    assert torch.equal(x, data.train_x[indices]) and torch.equal(y, data.train_y[indices])


def test_workers_give_the_batches_the_main_process_decodes(tiny):
    data = load_dataset("tinyimagenet", tiny)
    with Feed(data, CPU, workers=0) as inline, Feed(data, CPU, workers=2) as pooled:
        a, b = _epoch(inline, 8, 4), _epoch(pooled, 8, 4)
    assert [i.tolist() for i, _ in a] == [i.tolist() for i, _ in b]
    for (indices, parts_a), (_, parts_b) in zip(a, b, strict=True):
        assert [len(y) for _, y in parts_a] == [4, 4][: len(parts_a)] or len(indices) < 8
        for (xa, ya), (xb, yb) in zip(parts_a, parts_b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        # and they are the augmented samples the dataset itself decodes, labels aligned
        x = torch.cat([x for x, _ in parts_a])
        assert torch.equal(x, data.train_x[indices].load(augment_seed=1000))
        assert torch.equal(torch.cat([y for _, y in parts_a]), data.train_y[indices])


def test_two_ranks_split_each_batch_into_the_single_process_batch(tiny):
    data = load_dataset("tinyimagenet", tiny)
    with Feed(data, CPU, workers=0) as one:
        whole = _epoch(one, 8, 8)
    ranks = [_epoch(Feed(data, CPU, World(rank=r, size=2), workers=0), 8, 8) for r in (0, 1)]
    for step, (_, [(x, y)]) in enumerate(whole):
        parts = [ranks[r][step][1][0] for r in (0, 1)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_the_worker_pool_survives_batch_size_changes_and_evaluation(tiny):
    data = load_dataset("tinyimagenet", tiny)
    with Feed(data, CPU, workers=2) as feed:
        _epoch(feed, 4, 4, epoch=0)
        pids = sorted(w.pid for w in feed._loader._iterator._workers)
        _epoch(feed, 16, 8, epoch=1)
        list(feed.eval_batches("test", 5))
        assert sorted(w.pid for w in feed._loader._iterator._workers) == pids


def test_eval_batches_cover_the_split_in_order_with_the_eval_transform(tiny):
    data = load_dataset("tinyimagenet", tiny)
    with Feed(data, CPU, workers=2) as feed:
        batches = list(feed.eval_batches("test", 4))
    assert [len(y) for _, y in batches] == [4, 4, 1]
    assert torch.equal(torch.cat([x for x, _ in batches]), data.test_x.load())
    assert torch.equal(torch.cat([y for _, y in batches]), data.test_y)
    halves = [
        list(Feed(data, CPU, World(rank=r, size=2), workers=0).eval_batches("test", 4))
        for r in (0, 1)
    ]
    assert torch.equal(torch.cat([y for half in halves for _, y in half]), data.test_y)


def test_a_corrupt_image_in_a_worker_is_one_line_naming_the_file(tiny):
    bad = next((tiny / "train").glob("*/images/*.JPEG"))
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    data = load_dataset("tinyimagenet", tiny)
    with Feed(data, CPU, workers=2) as feed, pytest.raises(DataError) as caught:
        _epoch(feed, 8, 8)
    message = str(caught.value)
    assert str(bad) in message and "\n" not in message


@pytest.mark.slow
def test_train_one_epoch_on_tinyimagenet_and_imagenet_then_evaluate(tmp_path, tiny, imagenet):
    for name, folder, model, size in (
        ("tinyimagenet", tiny, "squeezenext", 32),
        ("imagenet", imagenet, "resnet18", 32),
    ):
        out = tmp_path / f"run-{name}"  # not inside the data folder: that holds files of its own
        config = TrainConfig(
            dataset=name,
            data_dir=str(folder),
            image_size=size,
            augment=True,
            model=model,
            epochs=1,
            batch_size=6,
            max_batch_size=6,
            lr=0.01,
            eval_batch_size=4,
            loader_workers=2,
            device="cpu",
            out=str(out),
        )
        summary = train(config, echo=None, show_progress=False)
        (record,) = read_jsonl(out / "metrics.jsonl")
        assert record["samples"] == 18 and record["updates"] == 3
        assert 0 <= record["test_acc"] <= 1 and summary["final_test_acc"] == record["test_acc"]
        result = evaluate_checkpoint(out / "checkpoint.pt", attack="fgsm", eps=0.01, device="cpu")
        assert result["samples"] == 9 and result["clean_acc"] == pytest.approx(record["test_acc"])


def test_an_augmented_image_folder_run_resumes_exactly(tmp_path, tiny):
    def config(name, **changes):
        values = dict(
            dataset="tinyimagenet",
            data_dir=str(tiny),
            image_size=16,
            augment=True,
            model="c1",
            epochs=2,
            batch_size=6,
            max_batch_size=6,
            loader_workers=1,
            device="cpu",
            out=str(tmp_path / name),
        )
        return TrainConfig(**{**values, **changes})

    train(config("full"), echo=None, show_progress=False)
    train(config("split"), echo=None, show_progress=False, stop_after=1)
    train(config("split", resume=True, loader_workers=0), echo=None, show_progress=False)
    full, split = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("full", "split"))
    assert without_times(full) == without_times(split)


def test_the_cli_names_a_corrupt_image_and_exits_2(tmp_path, tiny):
    bad = sorted((tiny / "val" / "images").glob("*.JPEG"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    command = cli_train(
        tmp_path / "out",
        "--dataset",
        "tinyimagenet",
        "--data-dir",
        str(tiny),
        "--image-size",
        "16",
        "--model",
        "c1",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--max-batch-size",
        "6",
        "--workers",
        "1",
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and str(bad) in lines[-1]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Fashion-MNIST package not installed",
)
def test_squeezenext_learns_fashion_mnist(tmp_path):
    # Few updates on a small subset: the training loss must fall clearly. (Test accuracy
    # is not asserted: after so few updates the batch-norm running statistics lag.)
    # Three epochs, not two: on an AMD EPYC machine two epochs (32 updates) lowered the
    # loss by only 4.5% (2.313 to 2.210); three lower it by 15% (to 1.961), a margin that
    # does not hang on which kernels the CPU picks.
    config = TrainConfig(
        dataset="fashion-mnist",
        model="squeezenext",
        epochs=3,
        batch_size=64,
        max_batch_size=64,
        lr=0.05,
        limit_train=1024,
        limit_test=100,
        device="cpu",
        out=str(tmp_path / "sqnxt"),
    )
    train(config, echo=None, show_progress=False)
    first, *_, last = read_jsonl(tmp_path / "sqnxt" / "metrics.jsonl")
    assert last["train_loss"] < 0.95 * first["train_loss"]
    assert last["train_acc"] > first["train_acc"] + 0.05
