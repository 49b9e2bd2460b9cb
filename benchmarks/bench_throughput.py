"""Benchmark: training throughput and peak memory per model, input shape and batch size.

Synthetic inputs of CIFAR shape (3x32x32, 10 classes) and ImageNet shape (3x224x224, 1000
classes); one training step is forward, backward and an SGD step on one batch, under the
precision asked for (autocast as ``largebatch train --precision`` does it). Each
configuration runs in a fresh process, so its peak memory is its own:

- CPU: peak resident set size of the process (``ru_maxrss``), and its growth over the
  process after the model was built (activations, gradients, optimizer state);
- CUDA: ``torch.cuda.max_memory_allocated``.

Reports the median samples/s over ``--repeats`` steps after one warm-up step.

    python benchmarks/bench_throughput.py --json docs/results/throughput/cpu.json
    python benchmarks/bench_throughput.py --device cuda --precisions fp32 bf16 fp16 \\
        --json docs/results/throughput/cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from largebatch.models import build_model
from largebatch.precision import autocast, make_scaler

SHAPES = {"cifar": ((3, 32, 32), 10), "imagenet": ((3, 224, 224), 1000)}

# (shape, model, batch sizes) for CPU and for CUDA
GRIDS = {
    "cpu": [
        ("cifar", "resnet20", [128, 512]),
        ("cifar", "resnet18", [128]),
        ("cifar", "squeezenext", [128, 512]),
        ("imagenet", "resnet18", [16, 64]),
        ("imagenet", "resnet50", [16]),
        ("imagenet", "squeezenext", [16, 64]),
    ],
    "cuda": [
        ("cifar", "resnet20", [128, 1024, 4096]),
        ("cifar", "resnet18", [128, 1024]),
        ("cifar", "squeezenext", [128, 1024, 4096]),
        ("imagenet", "resnet18", [64, 256]),
        ("imagenet", "resnet50", [64, 256]),
        ("imagenet", "squeezenext", [64, 256]),
    ],
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(threads: int | None = None, **spec) -> dict:
    """One configuration, in this process, with ``threads`` torch threads."""
    if threads:
        torch.set_num_threads(threads)
    return {**_measure(**spec), "threads": torch.get_num_threads()}


def _measure(
    shape: str,
    model_name: str,
    batch: int,
    precision: str,
    device: str,
    channels_last: bool,
    repeats: int,
) -> dict:
    """One configuration, in this process."""
    dev = torch.device(device)
    input_shape, classes = SHAPES[shape]
    torch.manual_seed(0)
    model = build_model(model_name, input_shape, classes, [0.5] * 3, [0.25] * 3).to(dev)
    x = torch.rand(batch, *input_shape, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = make_scaler(dev, precision)
    base_rss = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast(dev, precision):
            loss = F.cross_entropy(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i > 0:
            times.append(time.perf_counter() - started)
    row = {
        "shape": shape,
        "model": model_name,
        "batch": batch,
        "precision": precision,
        "channels_last": channels_last,
        "device": device,
        "samples_per_s": round(batch / statistics.median(times), 1),
        "step_s": round(statistics.median(times), 4),
    }
    if dev.type == "cuda":
        row["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    else:
        row["peak_rss_mib"] = round(_rss_mib(), 1)
        row["step_rss_growth_mib"] = round(_rss_mib() - base_rss, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precisions", nargs="+", default=["fp32"])
    parser.add_argument("--channels-last", action="store_true", help="also channels-last runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per configuration (default: torch's); 1 keeps figures stable "
        "when other jobs share the cores",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(**json.loads(args.one))), flush=True)
        return
    rows = []
    formats = [False, True] if args.channels_last else [False]
    for shape, model_name, batches in GRIDS[args.device]:
        for batch in batches:
            for precision in args.precisions:
                for channels_last in formats:
                    spec = dict(
                        threads=args.threads,
                        shape=shape,
                        model_name=model_name,
                        batch=batch,
                        precision=precision,
                        device=args.device,
                        channels_last=channels_last,
                        repeats=args.repeats,
                    )
                    done = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(spec)],
                        capture_output=True,
                        text=True,
                    )
                    if done.returncode != 0:
                        error = (done.stderr.strip().splitlines() or ["?"])[-1]
                        row = {**spec, "error": error}
                    else:
                        row = json.loads(done.stdout.strip().splitlines()[-1])
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    result = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "device": (
            torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or platform.machine()
        ),
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
