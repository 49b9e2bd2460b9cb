"""Benchmark of the Hessian engine on the paper's C1 network and 256 Fashion-MNIST samples.

Prints one JSON object with, all measured side by side in this run (medians of repeats):

- ``products``: seconds of one gradient and of one Hessian-vector product by double
  backward (graph built once, then reused) and by forward-over-reverse, and their ratios;
- ``tracker``: after ``--burn-in`` SGD steps the tracker takes a first (cold) estimate;
  after ``--train-steps`` more, its warm-started estimate is compared with a cold Lanczos
  start (``top_eigenvalues`` with tol 1e-3, median of repeats), cold power iteration
  (tol 1e-3 on the residual, ``--power-iters`` budget) and the reference code's power
  iteration, each with its relative error against a tight eigenvalue (residual 1e-6);
- ``pyhessian`` (when importable): seconds to the top eigenvalue with PyHessian's
  ``hessian(...).eigenvalues(tol=1e-3)`` on the same model and batch, against the cold
  Lanczos time above, and how far each lands from the tight eigenvalue.

The model and data come from ``largebatch.models`` / ``largebatch.data`` when they are
available, else from a local C1 on random data (reported in ``data``).

Usage: python benchmarks/bench_hessian.py [--quick] [--repeats N] [--samples N] ...
``--quick`` (64 probe samples, one repeat, short budgets) only checks that it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largebatch.hessian import (
    EigenTracker,
    HessianOperator,
    TrackerResult,
    preserved_model_state,
    top_eigenvalues,
)

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
TRAIN_BATCH = 128
TRAIN_LR = 0.02  # the papers' C1 settings: SGD, lr 0.02, momentum 0.9
TRAIN_MOMENTUM = 0.9
TRAIN_SAMPLES = 2048
TIGHT_TOL = 1e-6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run that checks it works")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (median)")
    parser.add_argument("--samples", type=int, default=256, help="probe samples")
    parser.add_argument("--burn-in", type=int, default=50, help="SGD steps before tracking")
    parser.add_argument("--train-steps", type=int, default=10, help="SGD steps between estimates")
    parser.add_argument("--power-iters", type=int, default=100, help="power / PyHessian budget")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.samples, args.burn_in, args.power_iters = 1, 64, 10, 20
    return args


def local_c1() -> nn.Module:
    """C1 as in the papers' code: (conv 5x5, 64 -> ReLU -> BN -> max-pool 3/2) x 2, then
    fully connected 384 -> 192 -> classes."""

    def stage(channels_in: int) -> list[nn.Module]:
        return [
            nn.Conv2d(channels_in, 64, 5, padding=2),
            nn.ReLU(),
            nn.BatchNorm2d(64),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]

    return nn.Sequential(
        *stage(INPUT_SHAPE[0]),
        *stage(64),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 384),
        nn.ReLU(),
        nn.Linear(384, 192),
        nn.ReLU(),
        nn.Linear(192, NUM_CLASSES),
    )


def load_problem(samples: int, train_samples: int, seed: int) -> dict[str, Any]:
    """C1 with probe and training samples; Fashion-MNIST if the package can load it."""
    torch.manual_seed(seed)
    total = samples + train_samples
    try:
        from largebatch.data import load_dataset
        from largebatch.models import build_model

        source = load_dataset("fashion-mnist", limit_train=total)
        model = build_model(
            "c1", source.input_shape, source.num_classes, mean=source.mean, std=source.std
        )
        x, y, data = source.train_x[:total], source.train_y[:total], "fashion-mnist"
    except Exception as exc:  # the package's loaders may not exist yet: still run
        model = local_c1()
        x = torch.rand(total, *INPUT_SHAPE)
        y = torch.randint(0, NUM_CLASSES, (total,))
        data = f"random (largebatch data/models unavailable: {type(exc).__name__}: {exc})"
    return {
        "model": model,
        "probe": (x[:samples], y[:samples]),
        "train": (x[samples:], y[samples:]),
        "data": data,
    }


def seconds(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def bench_products(model: nn.Module, probe: tuple, repeats: int) -> dict[str, float]:
    """Gradient vs Hessian-vector product, interleaved so they share machine load."""
    params = [p for p in model.parameters() if p.requires_grad]
    times: dict[str, list[float]] = {"gradient": [], "double_backward": [], "fwd_over_rev": []}
    build: list[float] = []

    def gradient() -> None:
        torch.autograd.grad(F.cross_entropy(model(probe[0]), probe[1]), params)

    with (
        preserved_model_state(model),
        HessianOperator(model, F.cross_entropy, probe) as double,
        HessianOperator(model, F.cross_entropy, probe, method="forward_over_reverse") as fwd,
    ):
        vector = torch.randn(double.dim)
        build.append(seconds(lambda: double.matvec(vector)))  # graph built here
        fwd.matvec(vector)  # warm-up of torch.func
        for _ in range(repeats):
            times["gradient"].append(seconds(gradient))
            times["double_backward"].append(seconds(lambda: double.matvec(vector)))
            times["fwd_over_rev"].append(seconds(lambda: fwd.matvec(vector)))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "gradient_s": median["gradient"],
        "hvp_double_backward_s": median["double_backward"],
        "hvp_forward_over_reverse_s": median["fwd_over_rev"],
        "first_hvp_double_backward_s": build[0],
        "hvp_double_backward_over_gradient": median["double_backward"] / median["gradient"],
        "hvp_forward_over_reverse_over_gradient": median["fwd_over_rev"] / median["gradient"],
        "first_hvp_double_backward_over_gradient": build[0] / median["gradient"],
    }


def train_steps(model: nn.Module, train: tuple, steps: int, seed: int) -> None:
    """A short stretch of SGD (the perturbation between two tracker calls)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=TRAIN_MOMENTUM)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(train[1]), (TRAIN_BATCH,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(train[0][index]), train[1][index]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def describe(result: TrackerResult, tight: float) -> dict[str, Any]:
    return {
        "eigenvalue": result.eigenvalue,
        "matvecs": result.matvecs,
        "seconds": result.seconds,
        "residual": float(result.residuals[0]),
        "converged": result.converged,
        "relative_error": abs(result.eigenvalue - tight) / abs(tight),
    }


def bench_tracker(problem: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    model, probe = problem["model"], problem["probe"]
    train_steps(model, problem["train"], args.burn_in, args.seed)
    tracker = EigenTracker(F.cross_entropy, probe, seed=args.seed)
    first = tracker.estimate(model)
    train_steps(model, problem["train"], args.train_steps, args.seed + 1)
    warm = tracker.estimate(model)
    colds = [
        EigenTracker(F.cross_entropy, probe, seed=args.seed + 1 + repeat).estimate(model)
        for repeat in range(args.repeats)
    ]
    estimates = {
        "warm_lanczos": warm,
        "cold_lanczos": sorted(colds, key=lambda result: result.seconds)[len(colds) // 2],
        "cold_power": EigenTracker(
            F.cross_entropy, probe, method="power", max_matvecs=args.power_iters
        ).estimate(model),
        "reference": EigenTracker(F.cross_entropy, probe, method="reference").estimate(model),
    }
    tight = top_eigenvalues(
        model, F.cross_entropy, probe, tol=TIGHT_TOL, max_iter=300, init=tracker.vectors
    )
    report = {name: describe(result, float(tight.values[0])) for name, result in estimates.items()}
    report["first_estimate"] = {"eigenvalue": first.eigenvalue, "matvecs": first.matvecs}
    report["tight"] = {"eigenvalue": float(tight.values[0]), "residual": float(tight.residuals[0])}
    report["burn_in_steps"], report["train_steps"] = args.burn_in, args.train_steps
    for name in ("cold_lanczos", "cold_power"):
        report[f"{name}_over_warm_matvecs"] = estimates[name].matvecs / warm.matvecs
    return report


def bench_pyhessian(
    problem: dict[str, Any], tracker: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """PyHessian's top eigenvalue on the same model and batch as the cold Lanczos run."""
    try:
        from pyhessian import hessian as pyhessian_hessian
    except ImportError:
        return {"skipped": "pyhessian is not installed (pip install --no-deps pyhessian)"}
    model, probe = problem["model"], problem["probe"]
    runs: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        with preserved_model_state(model):  # PyHessian leaves eval mode and .grad behind
            started = time.perf_counter()
            values, _ = pyhessian_hessian(
                model, nn.CrossEntropyLoss(), data=probe, cuda=False
            ).eigenvalues(maxIter=args.power_iters, tol=1e-3, top_n=1)
            runs.append((time.perf_counter() - started, float(values[0])))
    their_s = statistics.median(t for t, _ in runs)
    their_value = statistics.median(v for _, v in runs)
    ours, tight = tracker["cold_lanczos"], tracker["tight"]["eigenvalue"]
    return {
        "pyhessian_s": their_s,
        "largebatch_s": ours["seconds"],
        "speedup": their_s / ours["seconds"],
        "pyhessian_eigenvalue": their_value,
        "largebatch_eigenvalue": ours["eigenvalue"],
        "agreement_relative": abs(their_value - ours["eigenvalue"]) / abs(ours["eigenvalue"]),
        "pyhessian_relative_error": abs(their_value - tight) / abs(tight),
        "largebatch_relative_error": ours["relative_error"],
        "pyhessian_runs": [v for _, v in runs],
        "pyhessian_max_iter": args.power_iters,
        "note": "PyHessian's tol is the relative change of the eigenvalue; ours the residual",
    }


def main() -> int:
    args = parse_args()
    problem = load_problem(args.samples, TRAIN_SAMPLES, args.seed)
    model = problem["model"]
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": "c1",
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": problem["data"],
        "samples": args.samples,
        "repeats": args.repeats,
        "quick": args.quick,
    }
    report["products"] = bench_products(model, problem["probe"], args.repeats)
    report["tracker"] = bench_tracker(problem, args)
    report["pyhessian"] = bench_pyhessian(problem, report["tracker"], args)
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
