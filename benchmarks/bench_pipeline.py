"""Benchmark: is the input pipeline the bottleneck? Pipeline alone against the training step.

For each case, side by side in one process, at global batch 128 and 4096:

- pipeline samples/s: :class:`largebatch.feed.Feed` producing the training batches
  (indexing, augmentation, decoding, the split into micro-batches), nothing else;
- training samples/s: forward, backward and SGD step on batches already in memory
  (micro-batches of at most ``--micro`` samples, accumulated into the global batch).

Cases:
- ``c1/fashion-mnist``: the real Fashion-MNIST files, in memory, no augmentation.
- ``resnet20/cifar-shape``: 3x32x32 tensors in memory with random crop + flip, the exact
  CIFAR-10 path (CIFAR itself is not on this machine; the pipeline cost depends only on the
  shape).
- ``resnet18/tinyimagenet-folder``: a generated Tiny-ImageNet folder of real 64x64 JPEG
  files, decoded with random-resized-crop + flip by the worker pool. On a 2-core machine
  the workers and the training step share the same cores, so this ratio is a lower bound.

Medians over ``--repeats`` timed batches after one warm-up batch. Writes JSON (``--json``),
rewritten after every row so that a run cut short keeps what it measured.

``--device cuda``: the pipeline's rate counts batches delivered on the GPU (the copy from
pinned memory for the folder, the on-device augmentation for CIFAR, the copy the training
loop makes for in-memory data without augmentation), the step runs on the GPU under
``--precision`` (and ``--channels-last``), and every timed block ends with
``torch.cuda.synchronize()``. Without the Fashion-MNIST files, the first case uses random
inputs of its shape (the pipeline's cost depends only on the shape).

    python benchmarks/bench_pipeline.py --threads 1 --json docs/results/pipeline/bench_pipeline.json
    python benchmarks/bench_pipeline.py --device cuda --precision bf16 --channels-last \\
        --json pipeline-cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from largebatch.data import DataSource, load_dataset, random_crop_flip
from largebatch.errors import DataError
from largebatch.feed import Feed, default_workers
from largebatch.models import build_model
from largebatch.precision import autocast
from largebatch.sampler import EpochSampler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pipeline_rate(feed: Feed, batch: int, micro: int, repeats: int, augment: bool) -> float:
    """Median samples/s of the feed alone over ``repeats`` global batches (one warm-up)."""
    sampler = EpochSampler(len(feed.data.train_y), seed=0)
    needed = (repeats + 1) * batch
    if needed > sampler.num_samples:
        raise SystemExit(f"need {needed} samples for batch {batch}, have {sampler.num_samples}")
    batches = feed.train_batches(
        sampler.batches(0, batch),
        micro,
        augment=augment,
        augment_rng=torch.Generator().manual_seed(0),
        augment_seed=1,
    )
    times = []
    device = feed.device
    _sync(device)
    started = time.perf_counter()
    for i, (_indices, parts) in enumerate(batches):
        for x, _ in parts:
            # touch the data where the model would: on its device (a no-op copy for
            # batches the feed already put there)
            x.to(device, non_blocking=True).sum()
        _sync(device)
        now = time.perf_counter()
        if i > 0:
            times.append(now - started)
        started = now
        if i == repeats:
            break
    return batch / statistics.median(times)


def _train_rate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    micro: int,
    repeats: int,
    precision: str = "fp32",
) -> float:
    """Median samples/s of forward + backward + SGD step on the batch ``(x, y)``, already on
    the model's device. fp16 runs without loss scaling here (the speed is the same)."""
    device = x.device
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with autocast(device, precision):  # warm-up: kernels, allocator
        loss = F.cross_entropy(model(x[:micro]), y[:micro])
    loss.backward()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for b in range(0, len(y), micro):
            xb, yb = x[b : b + micro], y[b : b + micro]
            with autocast(device, precision):
                loss = F.cross_entropy(model(xb), yb) * (len(yb) / len(y))
            loss.backward()
        optimizer.step()
        _sync(device)
        times.append(time.perf_counter() - started)
    return len(y) / statistics.median(times)


def _cifar_shaped(n: int) -> DataSource:
    source = _random_source("cifar-shape", n, (3, 32, 32))
    source.augment = random_crop_flip
    return source


def _random_source(name: str, n: int, shape: tuple[int, ...]) -> DataSource:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n, *shape, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    channels = shape[0]
    return DataSource(
        name, x, y, x[:1000], y[:1000], shape, 10, (0.0, 1.0), (0.5,) * channels, (0.25,) * channels
    )


def _tiny_folder(root: Path, classes: int, per_class: int) -> Path:
    """A Tiny-ImageNet layout of real 64x64 JPEGs with textured content."""
    rng = np.random.default_rng(0)
    wnids = [f"n{c:08d}" for c in range(classes)]
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for c, wnid in enumerate(wnids):
        for i in range(per_class):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            path = root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, quality=90)
        name = f"val_{c}.JPEG"
        (root / "val" / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "val" / "images" / name, quality=90
        )
        lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def _case(
    name: str, data: DataSource, model_name: str, augment: bool, args, batches: list[int]
) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes, data.mean, data.std)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rows = []
    with Feed(data, device, workers=args.workers) as feed:
        for batch in batches:
            micro = min(batch, args.micro)
            pipe = _pipeline_rate(feed, batch, micro, args.repeats, augment)
            # the training step sees exactly what the pipeline produces
            sampler = EpochSampler(len(data.train_y), seed=0)
            _indices, parts = next(
                iter(
                    feed.train_batches(
                        sampler.batches(0, batch),
                        micro,
                        augment=augment,
                        augment_rng=torch.Generator().manual_seed(0),
                        augment_seed=1,
                    )
                )
            )
            x = torch.cat([p[0] for p in parts]).to(device)
            y = torch.cat([p[1] for p in parts]).to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            # a 4096 step takes minutes on CPU
            repeats = args.repeats if batch <= 512 or device.type == "cuda" else 1
            step = _train_rate(model, x, y, micro, repeats, args.precision)
            row = {
                "case": name,
                "model": model_name,
                "batch": batch,
                "micro_batch": micro,
                "pipeline_samples_per_s": round(pipe, 1),
                "train_samples_per_s": round(step, 1),
                "ratio": round(pipe / step, 2),
                "loader_workers": feed._loader.num_workers if feed.lazy else None,
                "device": device.type,
                "precision": args.precision,
                "channels_last": args.channels_last,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
            args.on_row(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--micro", type=int, default=1024, help="largest micro-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--folder-batches",
        type=int,
        nargs="*",
        default=[128, 512],
        help="batches for the folder case (none: skip it)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument(
        "--channels-last", action="store_true", help="model and batches in channels-last"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: cores, up to 8)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 keeps figures stable when other jobs "
        "share the cores",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    rows: list[dict] = []
    result = {
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": default_workers(),
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "rows": rows,
    }

    def write(row: dict | None = None) -> None:
        if row is not None:
            rows.append(row)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    args.on_row = write
    try:
        fashion = load_dataset("fashion-mnist")
        name = "c1/fashion-mnist"
    except DataError:  # not installed: the same shape, random
        fashion = _random_source(
            "fashion-shape", (args.repeats + 2) * max(args.batches), (1, 28, 28)
        )
        name = "c1/fashion-shape"
    _case(name, fashion, "c1", False, args, args.batches)
    cifar = _cifar_shaped((args.repeats + 2) * max(args.batches))
    _case("resnet20/cifar-shape", cifar, "resnet20", True, args, args.batches)
    if args.folder_batches:
        with tempfile.TemporaryDirectory() as tmp:
            per_class = -(-(args.repeats + 2) * max(args.folder_batches) // 50)
            folder = _tiny_folder(Path(tmp) / "tiny", 50, per_class)
            data = load_dataset("tinyimagenet", folder)
            name = "resnet18/tinyimagenet-folder"
            _case(name, data, "resnet18", True, args, args.folder_batches)
    write()


if __name__ == "__main__":
    main()
