"""Benchmark: the overhead of ``largebatch.fit`` against a plain PyTorch loop.

Both train C1 on the first ``--train`` Fashion-MNIST samples for ``--epochs`` epochs at a
fixed batch (SGD, momentum 0.9), in the same data order and from the same initial
weights, so they do the same updates, and both evaluate on the first ``--test`` test
samples after each epoch. Three variants run interleaved, ``--repeats`` times each, in
this process with the same thread count:

- ``plain``: a hand-written loop (index the tensors, forward, backward, step; evaluate);
- ``fit``: ``largebatch.fit(model, train, eval_data=test, method="bl", ...)``, no files;
- ``fit_files``: the same with ``out=`` (config, metrics, summary, a checkpoint per epoch).

Reports the median wall time of each and the ratios to ``plain``; also checks that
``fit`` ended with the same weights as ``plain`` (the same updates).

    python benchmarks/bench_fit.py --json docs/results/fit-overhead/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import largebatch
from largebatch.data import load_dataset
from largebatch.models import build_model
from largebatch.sampler import EpochSampler


def _model(data, seed):
    torch.manual_seed(seed)
    return build_model("c1", data.input_shape, data.num_classes, data.mean, data.std)


def plain(data, args) -> tuple[float, torch.nn.Module]:
    model = _model(data, args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    x, y = data.train_x, data.train_y
    order = EpochSampler(len(y), args.seed)  # the order fit uses, drawn the same way
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for indices in order.batches(epoch, args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[indices]), y[indices])
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = 0
            for b in range(0, len(data.test_y), 1000):
                out = model(data.test_x[b : b + 1000])
                correct += int((out.argmax(1) == data.test_y[b : b + 1000]).sum())
    return time.perf_counter() - started, model


def with_fit(data, args, out=None) -> tuple[float, torch.nn.Module]:
    model = _model(data, args.seed)
    started = time.perf_counter()
    largebatch.fit(
        model,
        (data.train_x, data.train_y),
        eval_data=(data.test_x, data.test_y),
        method="bl",
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_batch_size=args.batch_size,
        lr=args.lr,
        momentum=0.9,
        seed=args.seed,
        device="cpu",
        out=out,
        show_progress=False,
    )
    return time.perf_counter() - started, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4096)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", limit_train=args.train, limit_test=args.test)
    times: dict[str, list[float]] = {"plain": [], "fit": [], "fit_files": []}
    max_diff = 0.0
    for repeat in range(args.repeats):
        seconds, reference = plain(data, args)
        times["plain"].append(seconds)
        seconds, model = with_fit(data, args)
        times["fit"].append(seconds)
        with tempfile.TemporaryDirectory() as folder:
            seconds, _ = with_fit(data, args, out=Path(folder) / "run")
        times["fit_files"].append(seconds)
        for a, b in zip(reference.state_dict().values(), model.state_dict().values(), strict=True):
            if a.is_floating_point():
                max_diff = max(max_diff, float((a - b).abs().max()))
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python benchmarks/bench_fit.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k != "json" and v is not None
        ),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "setup": {
            "model": "c1",
            "train_samples": args.train,
            "test_samples": args.test,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "updates": args.epochs * -(-args.train // args.batch_size),
        },
        "seconds": times,
        "median_s": medians,
        "ratio_to_plain": {k: medians[k] / medians["plain"] for k in ("fit", "fit_files")},
        "max_weight_difference_fit_vs_plain": max_diff,
    }
    print(json.dumps(result["ratio_to_plain"], indent=1), "max weight diff", max_diff)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
