"""Benchmark: what the stability gauge costs against a training update and a Lanczos
estimate of the top Hessian eigenvalue (what the curvature guard runs), on CPU.

A model (C1 by default) is trained for ``--warm`` updates of ``--batch`` samples on
Fashion-MNIST (MNIST-1D when the package is missing) so that the landscape is past its
start; then, in ``--repeats`` rounds one after the other: ``--updates`` timed updates
(``GlobalBatch``, the loop's own), one gauge reading (``SharpnessMeter.at_decision`` on a
probe of ``--probe`` training samples, direction from a batch of ``--batch``) and one
top-eigenvalue estimate on the same probe (``EigenTracker``, Lanczos, tolerance 1e-3).
One JSON line per round goes to ``--out``; the summary gives medians and each cost in
updates. One thread.

    python benchmarks/bench_gauge.py --model c1 --batch 128 --probe 1024 --repeats 5 \\
        --out docs/results/gauge/bench_gauge.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from largebatch.accumulate import GlobalBatch, micro_batches
from largebatch.data import load_dataset
from largebatch.distributed import World
from largebatch.hessian import EigenTracker
from largebatch.meters import Point, SharpnessMeter
from largebatch.models import build_model


def _data(name: str):
    try:
        data = load_dataset(name)
    except Exception:  # the Debian package is not installed: the generated set
        name, data = "mnist1d", load_dataset("mnist1d")
    return name, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="c1")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--probe", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warm", type=int, default=100, help="updates before timing")
    parser.add_argument("--updates", type=int, default=10, help="timed updates per round")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON lines, appended")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    name, data = _data(args.dataset)
    x, y = data.train_x.float(), data.train_y
    model = build_model(args.model, tuple(x.shape[1:]), int(y.max()) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    world, device = World(), torch.device("cpu")
    update = GlobalBatch(model, optimizer, F.cross_entropy, world, device)
    generator = torch.Generator().manual_seed(1)

    def one_update() -> None:
        rows = torch.randint(0, len(y), (args.batch,), generator=generator)
        update.step(list(micro_batches(x[rows], y[rows], args.batch)), args.batch)

    for _ in range(args.warm):
        one_update()
    probe_rows = torch.randperm(len(y), generator=generator)[: args.probe]
    probe = [(x[probe_rows], y[probe_rows])]
    gauge = SharpnessMeter(F.cross_entropy, probe, optimizer)
    gauge.plan(args.batch, args.batch, None)
    tracker = EigenTracker(F.cross_entropy, probe, tol=1e-3, max_matvecs=100, seed=0)
    rows = []
    for repeat in range(args.repeats):
        times = []
        for _ in range(args.updates):
            started = time.perf_counter()
            one_update()
            times.append(time.perf_counter() - started)
        reading = gauge.at_decision(model, Point(0, 0, True))
        started = time.perf_counter()
        eigen = tracker.estimate(model)
        eigen_s = time.perf_counter() - started
        row = {
            "repeat": repeat,
            "model": args.model,
            "dataset": name,
            "batch": args.batch,
            "probe": args.probe,
            "update_s": statistics.median(times),
            "gauge_s": reading["sharp_s"],
            "gauge_forwards": reading["sharp_evals"],
            "critical_lr": reading["critical_lr"],
            "sharpness": reading["sharpness"],
            "eigen_s": eigen_s,
            "eigenvalue": eigen.eigenvalue,
            "eigen_matvecs": eigen.matvecs,
            "lr": args.lr,
        }
        rows.append(row)
        if args.out is not None:
            with args.out.open("a") as out:
                out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    update_s = statistics.median(r["update_s"] for r in rows)
    gauge_s = statistics.median(r["gauge_s"] for r in rows)
    eigen_s = statistics.median(r["eigen_s"] for r in rows)
    summary = {
        "update_s": update_s,
        "gauge_s": gauge_s,
        "eigen_s": eigen_s,
        "gauge_in_updates": gauge_s / update_s,
        "eigen_in_updates": eigen_s / update_s,
        "gauge_vs_eigen": gauge_s / eigen_s,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
