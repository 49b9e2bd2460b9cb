"""Whole-dataset curvature: a streamed Hessian-vector product of C1 at growing sample counts.

For each N in ``--sizes`` a fresh process loads Fashion-MNIST (all 60k training samples
are read in every process, so the data's own memory is the same for every N), builds C1
(from ``--checkpoint`` if given, else at initialization), and takes ``--products``
Hessian-vector products of the mean loss over the first N training samples, streamed in
batches of ``--batch-size`` (``HessianOperator(stream=True)``, what
``largebatch hessian --samples all`` uses). It reports the median seconds per product and
the process's peak resident memory before the products (model and data loaded) and after
them: a streamed product must not grow memory with N, and its time must grow linearly.

    python benchmarks/bench_hessian_stream.py --checkpoint CKPT \
        --json docs/results/hessian-suite/stream.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from largebatch.io import atomic_write_json


def child(args: argparse.Namespace) -> dict[str, Any]:
    from largebatch.data import load_dataset
    from largebatch.evaluate import load_trained
    from largebatch.hessian import HessianOperator
    from largebatch.models import build_model

    data = load_dataset("fashion-mnist")
    if args.checkpoint:
        model, _ = load_trained(args.checkpoint, torch.device("cpu"))
    else:
        torch.manual_seed(0)
        model = build_model("c1", data.input_shape, data.num_classes, mean=data.mean, std=data.std)
    x, y = data.train_x[: args.child], data.train_y[: args.child]
    batches = [
        (x[i : i + args.batch_size], y[i : i + args.batch_size])
        for i in range(0, len(y), args.batch_size)
    ]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = []
    with HessianOperator(model, F.cross_entropy, batches, stream=True) as op:
        vector = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
        for _ in range(args.products):
            started = time.perf_counter()
            vector = op.matvec(vector)
            vector /= vector.norm()
            seconds.append(time.perf_counter() - started)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "samples": len(y),
        "seconds_per_product": statistics.median(seconds),
        "product_seconds": seconds,
        "peak_rss_mib_before": before,
        "peak_rss_mib_after": after,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 8000, 16000, 60000])
    parser.add_argument("--products", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--child", str(size), "--products", str(args.products)]
        command += ["--batch-size", str(args.batch_size)]
        if args.checkpoint:
            command += ["--checkpoint", args.checkpoint]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        row = rows[-1]
        print(
            f"N={size}: {row['seconds_per_product']:.2f} s/product "
            f"({1e3 * row['seconds_per_product'] / size:.3f} ms/sample), peak RSS "
            f"{row['peak_rss_mib_before']:.0f} -> {row['peak_rss_mib_after']:.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    command = "python " + " ".join(sys.argv)
    report = {"command": command, "batch_size": args.batch_size, "rows": rows}
    if args.json:
        atomic_write_json(args.json, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
