"""Benchmark: training throughput and peak memory per model, input shape and batch size.

Synthetic inputs of CIFAR shape (3x32x32, 10 classes) and ImageNet shape (3x224x224, 1000
classes); one training step is forward, backward and an SGD step on one batch, under the
precision asked for (autocast as ``largebatch train --precision`` does it). Each
configuration runs in a fresh process, so its peak memory is its own:

- CPU: peak resident set size of the process (``ru_maxrss``), and its growth over the
  process after the model was built (activations, gradients, optimizer state);
- CUDA: ``torch.cuda.max_memory_allocated``.

Reports the median samples/s over ``--repeats`` steps after ``--warmup`` warm-up steps.
On CUDA every timed step is bracketed by ``torch.cuda.synchronize()``.

``--cases`` replaces the built-in grid (``SHAPE:MODEL:BATCH,BATCH,...``), ``--same-process``
runs every configuration in this process (on CUDA the peak-memory counter is reset per
configuration, so each peak is still its own, and the per-process start-up is saved),
``--time-budget`` stops starting new configurations after that many seconds (they are
listed as skipped), and ``--json`` is rewritten after every configuration, so a run cut
short still leaves what it measured.

    python benchmarks/bench_throughput.py --json docs/results/throughput/cpu.json
    python benchmarks/bench_throughput.py --device cuda --precisions fp32 bf16 fp16 \\
        --channels-last --same-process --json docs/results/throughput/cuda.json
"""

from __future__ import annotations

import argparse
import gc
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
        ("cifar", "c1", [128, 1024, 4096]),
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
    warmup: int = 1,
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
    for i in range(repeats + warmup):
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
        if i >= warmup:
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
        row["loss"] = round(float(loss), 4)
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
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="SHAPE:MODEL:BATCHES",
        help="configurations instead of the built-in grid, e.g. cifar:resnet20:128,1024",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every configuration in this process instead of one process each",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; configurations not started by then are listed as skipped",
    )
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
    grid = _parse_cases(args.cases) if args.cases else GRIDS[args.device]
    started = time.perf_counter()
    rows = []
    formats = [False, True] if args.channels_last else [False]
    result = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "device": (
            torch.cuda.get_device_name()
            if args.device == "cuda"
            else platform.processor() or platform.machine()
        ),
        "threads": torch.get_num_threads(),
        "same_process": args.same_process,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "settings": _backend_settings(args.device),
        "rows": rows,
    }
    for shape, model_name, batches in grid:
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
                        warmup=args.warmup,
                    )
                    elapsed = time.perf_counter() - started
                    if args.time_budget is not None and elapsed > args.time_budget:
                        row = {**spec, "skipped": f"time budget of {args.time_budget:g} s spent"}
                    elif args.same_process:
                        row = _in_this_process(spec)
                    else:
                        row = _in_a_child(spec)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    result["total_s"] = round(time.perf_counter() - started, 1)
                    if args.json:  # after every row: a run cut short keeps what it measured
                        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _parse_cases(cases: list[str]) -> list[tuple[str, str, list[int]]]:
    grid = []
    for case in cases:
        try:
            shape, model_name, batches = case.split(":")
            sizes = [int(b) for b in batches.split(",")]
        except ValueError:
            raise SystemExit(f"--cases: {case!r} is not SHAPE:MODEL:BATCH[,BATCH...]") from None
        if shape not in SHAPES:
            raise SystemExit(f"--cases: unknown shape {shape!r}; choose from {list(SHAPES)}")
        grid.append((shape, model_name, sizes))
    return grid


def _in_a_child(spec: dict) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_this_process(spec: dict) -> dict:
    """One configuration here; an error (out of memory, say) is recorded, not raised."""
    try:
        row = measure(**spec)
    except Exception as exc:  # one failed configuration must not end the run
        row = {**spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    gc.collect()
    if spec["device"] == "cuda":
        torch.cuda.empty_cache()
    return row


def _backend_settings(device: str) -> dict:
    """What decides the kernels: TF32 and cuDNN autotuning (CUDA), threads (CPU)."""
    if device != "cuda":
        return {"threads": torch.get_num_threads()}
    return {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "capability": list(torch.cuda.get_device_capability()),
        "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
    }


if __name__ == "__main__":
    main()
