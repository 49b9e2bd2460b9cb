"""Hessian analysis side by side with PyHessian: top-1, top-5, trace and density.

Part of the Hessian benchmark (``bench_hessian.py`` holds the product-cost and tracker
figures and the PyHessian recorder used here). Five cases, each a model and a fixed probe
batch (batch-norm in eval mode):

- ``mlp``: a 64-32-10 tanh MLP (2,410 parameters) after 200 SGD steps on scikit-learn's
  digits, the 1,437 training samples as the probe; the dense Hessian is the truth.
- ``c1-early``: the papers' C1 after 60 SGD steps (lr 0.02, momentum 0.9, batch 128) on
  2,048 Fashion-MNIST samples: a close top pair.
- ``c1-trained``: C1 after ``--train-steps`` SGD steps on the whole training set: a
  well-separated top.
- ``resnet20``: ResNet-20 at initialization on CIFAR-shaped random inputs and labels.
- ``resnet20-trained``: ResNet-20 (for 1x28x28 inputs) after ``--train-steps`` SGD steps
  (lr 0.05, momentum 0.9, batch 128) on the whole Fashion-MNIST training set, the first
  ``--resnet-samples`` training samples as the probe.

For all but the MLP the truth is a tight Lanczos run (top 5, relative residual 1e-5,
40-vector basis, ``stop="residual"``). Every measurement is repeated ``--repeats`` times
with seeds 0, 1, ..., ours and PyHessian's interleaved within each repeat so that both
share the machine's load; medians are reported.

- **top-1 / top-5**: seconds (and products) until the eigenvalue(s) are within 1e-3
  relative of the truth. Ours: ``top_eigenvalues(k, tol=1e-3)``, a cold start that stops
  by itself on the eigenvalue's error bound (the default ``stop="error"``); for reference
  also the residual rule of earlier versions (``stop="residual"``, "today") and, top-1
  only, both rules without the cold-start safety against a hidden larger eigenvalue
  (``min_steps=1``; not safe on a close pair, shown to price the safety and to compare
  the two rules alone).
  PyHessian 0.1, top-1: its power iteration is recorded product by product, which gives
  both where its own rule stops and the first product from which it stays within 1e-3
  (an oracle stop, generous to it). Top-5: its own rule (``eigenvalues(top_n=5)``, the
  defaults ``tol=1e-3``, ``maxIter=--pyhessian-iters``), its products counted; "not
  reached" when a value is still off by more than 1e-3 there. Also at ``tol=1e-4`` and
  ``1e-5`` (tighter settings of its rule, which may get all five within 1e-3); the
  stopping-rule table's speed-up is against the quickest of the three that does.
- **trace**: seconds until the relative standard error is at most 1%. Ours:
  ``hessian_trace(method="hutch++", tol=0.01)`` (the CLI's default). PyHessian: its
  Hutchinson probes are recorded (its rule switched off) and the same standard error is
  computed on them from 10 probes on. Each tool spends at most ``--trace-budget``
  products; where one does not get there, its time is extrapolated (stochastic probes
  needed = n (rse / 0.01)^2 at its cost per product) and marked so. Also each tool's answer
  at its default setting (PyHessian: ``trace()``, stop when the running mean changes by
  less than 1e-3; ours: the CLI default) and, for the MLP, its error.
- **density**: PyHessian's defaults (``density(iter=100, n_v=1)``) against ours at the
  same settings (``spectral_density(num_probes=1, lanczos_steps=100)``): seconds, and for
  the MLP the Wasserstein-1 distance of each quadrature measure to the dense spectrum
  (eigenvalue units; the mean of the Ritz values is the trivial baseline). PyHessian's
  ``density`` calls ``torch.eig``, removed from torch 2; the benchmark supplies it from
  ``torch.linalg.eigh`` (the tridiagonal matrix is symmetric), nothing else is changed.

Run (after ``.venv/bin/pip install --no-deps pyhessian==0.1``):

    python benchmarks/bench_hessian_suite.py --out docs/results/hessian-suite

writes ``suite.json`` (every run) and ``README.md`` (the tables) there, case by case.
``--quick`` runs tiny budgets to check that it works. The stopping-rule study of
``docs/results/hessian-stop`` runs the top-1/top-5 measures only (its README has the
commands).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hessian import pyhessian_run, pyhessian_summary  # noqa: E402
from largebatch.data import load_dataset  # noqa: E402
from largebatch.hessian import (  # noqa: E402
    dense_hessian,
    hessian_trace,
    preserved_model_state,
    spectral_density,
    top_eigenvalues,
)
from largebatch.io import atomic_write_json, atomic_write_text  # noqa: E402
from largebatch.models import build_model  # noqa: E402

ACCURACY = 1e-3
TRACE_RSE = 0.01
MIN_TRACE_PROBES = 10


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["mlp", "c1-early", "c1-trained", "resnet20", "resnet20-trained"],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--c1-samples", type=int, default=64, help="C1 probe samples")
    parser.add_argument("--resnet-samples", type=int, default=32, help="ResNet-20 probe samples")
    parser.add_argument(
        "--train-steps", type=int, default=300, help="SGD steps of c1-trained, resnet20-trained"
    )
    parser.add_argument("--pyhessian-iters", type=int, default=100, help="its maxIter")
    parser.add_argument(
        "--trace-budget", type=int, default=100, help="trace products of each tool, at most"
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="measures (top1, trace, top5/ours-residual...) to leave out",
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--keep", action="store_true", help="keep OUT/suite.json's other cases (run in parts)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite README.md from OUT/suite.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.c1_samples, args.resnet_samples, args.train_steps = 1, 8, 4, 5
        args.pyhessian_iters, args.trace_budget = 15, 12
    return args


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- cases
def _sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(y), (128,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()


def make_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    if name == "mlp":
        data = load_dataset("digits")
        x, y = data.train_x.reshape(len(data.train_y), -1).float(), data.train_y
        model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.Tanh(), nn.Linear(32, 10))
        _sgd(model, x, y, 200, 0.05)
        return {"model": model, "probe": (x, y)}
    if name.startswith("c1"):
        data = load_dataset("fashion-mnist")
        model = build_model("c1", data.input_shape, data.num_classes, mean=data.mean, std=data.std)
        probe = (data.train_x[: args.c1_samples], data.train_y[: args.c1_samples])
        if name == "c1-early":
            subset = slice(args.c1_samples, args.c1_samples + 2048)
            _sgd(model, data.train_x[subset], data.train_y[subset], 60, 0.02)
        else:
            _sgd(model, data.train_x, data.train_y, args.train_steps, 0.02)
        return {"model": model, "probe": probe}
    if name == "resnet20-trained":
        data = load_dataset("fashion-mnist")
        model = build_model(
            "resnet20", data.input_shape, data.num_classes, mean=data.mean, std=data.std
        )
        _sgd(model, data.train_x, data.train_y, args.train_steps, 0.05)
        probe = (data.train_x[: args.resnet_samples], data.train_y[: args.resnet_samples])
        return {"model": model, "probe": probe}
    if name == "resnet20":
        model = build_model("resnet20", (3, 32, 32), 10).eval()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.resnet_samples, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (args.resnet_samples,), generator=generator)
        return {"model": model, "probe": (x, y)}
    raise SystemExit(f"error: unknown case {name!r}")


def truth_of(case: dict[str, Any], name: str) -> dict[str, Any]:
    model, probe = case["model"], case["probe"]
    loss = F.cross_entropy
    if name == "mlp":
        dense = dense_hessian(_float64(model), loss, (probe[0].double(), probe[1]))
        eigenvalues = torch.linalg.eigvalsh(dense)
        return {
            "source": "dense Hessian (float64)",
            "top5": eigenvalues.flip(0)[:5].tolist(),
            "trace": dense.trace().item(),
            "spectrum": eigenvalues,
        }
    tight = top_eigenvalues(
        model, loss, probe, k=5, tol=1e-5, krylov_dim=40, max_iter=600, seed=123, stop="residual"
    )
    return {
        "source": f"Lanczos top 5 to residual {tight.residuals.max().item():.1e} "
        f"({tight.matvecs} products)",
        "top5": tight.values.tolist(),
        "trace": None,
        "spectrum": None,
    }


def _float64(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


# ---------------------------------------------------------------------------- measures
def _pyhessian() -> Any:
    return importlib.import_module("pyhessian.hessian")


def _fresh(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _run_pyhessian(
    case: dict[str, Any], seed: int, call: Callable[[Any], Any]
) -> tuple[Any, float, float]:
    """``call(engine)`` on a fresh PyHessian engine (seeded, the model's state kept);
    returns its result, the start time and the seconds from building the engine."""
    model = case["model"]
    with preserved_model_state(model):  # PyHessian leaves eval mode and .grad behind
        _fresh(model)
        torch.manual_seed(seed)  # it draws its random vectors from torch's RNG
        started = time.perf_counter()
        engine = _pyhessian().hessian(model, nn.CrossEntropyLoss(), data=case["probe"], cuda=False)
        result = call(engine)
        seconds = time.perf_counter() - started
        _fresh(model)  # its graph hangs on .grad
        del engine
    return result, started, seconds


def _errors(values: list[float], truth: list[float]) -> list[float]:
    return [abs(v - t) / abs(t) for v, t in zip(values, truth, strict=False)]


def ours_top(
    case: dict[str, Any], k: int, seed: int, truth: list[float], **options: Any
) -> dict[str, Any]:
    """``top_eigenvalues(k, tol=1e-3, **options)`` from a cold start (``options``:
    ``stop``, ``min_steps``)."""
    started = time.perf_counter()
    result = top_eigenvalues(
        case["model"], F.cross_entropy, case["probe"], k=k, tol=ACCURACY, seed=seed, **options
    )
    seconds = time.perf_counter() - started
    errors = _errors(result.values.tolist(), truth[:k])
    reached = max(errors) <= ACCURACY
    return {
        "seconds": seconds,
        "matvecs": result.matvecs,
        "max_error": max(errors),
        "max_error_bound": float(result.error_bounds.max()),
        "max_residual": float(result.residuals.max()),
        "converged": result.converged,
        "to_accuracy_seconds": seconds if reached else None,
        "to_accuracy_matvecs": result.matvecs if reached else None,
    }


def theirs_top1(case: dict[str, Any], seed: int, truth: list[float], iters: int) -> dict[str, Any]:
    run = pyhessian_run(case["model"], case["probe"], iters, seed, truth[0])
    summary = pyhessian_summary(run, truth[0])
    return {
        "seconds": summary["own_rule_seconds"],
        "matvecs": summary["own_rule_matvecs"],
        "max_error": summary["own_rule_relative_error"],
        "to_accuracy_seconds": summary["to_accuracy_seconds"],
        "to_accuracy_matvecs": summary["to_accuracy_matvecs"],
        "recorded_matvecs": summary["matvecs"],
    }


def theirs_top5(
    case: dict[str, Any], seed: int, truth: list[float], iters: int, tol: float = ACCURACY
) -> dict[str, Any]:
    """``eigenvalues(top_n=5, tol=tol)``: its own rule (relative change below ``tol``)."""
    module = _pyhessian()
    original = module.hessian_vector_product
    count = [0]

    def counting(grads: Any, params: Any, vector: Any) -> Any:
        count[0] += 1
        return original(grads, params, vector)

    module.hessian_vector_product = counting
    try:
        (values, _), _, seconds = _run_pyhessian(
            case, seed, lambda engine: engine.eigenvalues(maxIter=iters, tol=tol, top_n=5)
        )
    finally:
        module.hessian_vector_product = original
    errors = _errors(sorted(values, reverse=True), truth[:5])
    reached = max(errors) <= ACCURACY
    return {
        "seconds": seconds,
        "matvecs": count[0],
        "max_error": max(errors),
        "to_accuracy_seconds": seconds if reached else None,
        "to_accuracy_matvecs": count[0] if reached else None,
    }


def ours_trace(case: dict[str, Any], seed: int, truth: float | None, budget: int) -> dict[str, Any]:
    """Hutch++ to 1% relative standard error, at most ``budget`` products; past that the
    time is extrapolated as for PyHessian (stochastic probes needed = n (rse / 0.01)^2)."""
    started = time.perf_counter()
    result = hessian_trace(
        case["model"], F.cross_entropy, case["probe"], probes=min(30, budget), tol=TRACE_RSE,
        max_probes=budget, method="hutch++", seed=seed,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    reached = result.relative_stderr <= TRACE_RSE
    to_rse = seconds
    if not reached:
        needed = result.probes * (result.relative_stderr / TRACE_RSE) ** 2
        to_rse = seconds + seconds / result.matvecs * (needed - result.probes)
    return {
        "seconds": seconds,
        "to_rse_seconds": to_rse,
        "to_rse_extrapolated": not reached,
        "matvecs": result.matvecs,
        "estimate": result.estimate,
        "relative_stderr": result.relative_stderr,
        "error": None if truth is None else abs(result.estimate - truth) / abs(truth),
    }


def theirs_trace(
    case: dict[str, Any], seed: int, truth: float | None, budget: int
) -> dict[str, Any]:
    """PyHessian's Hutchinson, every probe recorded (``budget`` probes)."""
    module = _pyhessian()
    original = module.hessian_vector_product
    record: list[tuple[float, float]] = []

    def recording(grads: Any, params: Any, vector: Any) -> Any:
        product = original(grads, params, vector)
        record.append((time.perf_counter(), float(module.group_product(product, vector))))
        return product

    module.hessian_vector_product = recording
    try:  # its rule never fires with tol -inf: it runs ``budget`` probes
        _, started, _ = _run_pyhessian(
            case, seed, lambda engine: engine.trace(maxIter=budget, tol=-math.inf)
        )
    finally:
        module.hessian_vector_product = original
    seconds = [t - started for t, _ in record]
    values = [v for _, v in record]
    default = _pyhessian_trace_stop(values)
    reached, rse = None, math.inf
    for n in range(MIN_TRACE_PROBES, len(values) + 1):
        rse = _rse(values[:n])
        if rse <= TRACE_RSE:
            reached = n
            break
    if reached is not None:
        to_rse, extrapolated = seconds[reached - 1], False
    else:
        needed = len(values) * (rse / TRACE_RSE) ** 2
        per_probe = (seconds[-1] - seconds[0]) / max(1, len(values) - 1)
        to_rse, extrapolated = seconds[0] + per_probe * (needed - 1), True
    default_estimate = statistics.fmean(values[: default + 1])
    return {
        "to_rse_seconds": to_rse,
        "to_rse_extrapolated": extrapolated,
        "to_rse_matvecs": reached,
        "recorded_matvecs": len(values),
        "rse_at_budget": _rse(values),
        "default_matvecs": default + 1,
        "default_seconds": seconds[default],
        "default_estimate": default_estimate,
        "default_error": None if truth is None else abs(default_estimate - truth) / abs(truth),
    }


def _rse(values: list[float]) -> float:
    mean = statistics.fmean(values)
    return statistics.stdev(values) / math.sqrt(len(values)) / abs(mean) if mean else math.inf


def _pyhessian_trace_stop(values: list[float]) -> int:
    """Where ``trace(tol=1e-3)`` returns: the running mean moved by less than 1e-3."""
    previous = 0.0
    for i in range(len(values)):
        mean = statistics.fmean(values[: i + 1])
        if abs(mean - previous) / (previous + 1e-6) < ACCURACY:
            return i
        previous = mean
    return len(values) - 1


def ours_density(case: dict[str, Any], seed: int, spectrum: Any) -> dict[str, Any]:
    started = time.perf_counter()
    result = spectral_density(
        case["model"], F.cross_entropy, case["probe"], num_probes=1, lanczos_steps=100, seed=seed
    )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "matvecs": result.matvecs,
        "w1": _w1_to(result.nodes, result.weights, spectrum),
    }


def theirs_density(case: dict[str, Any], seed: int, spectrum: Any) -> dict[str, Any]:
    removed = getattr(torch, "eig", None)  # torch 2 keeps a stub that raises
    torch.eig = _eig_for_pyhessian  # type: ignore[attr-defined]
    try:
        (nodes, weights), _, seconds = _run_pyhessian(
            case, seed, lambda engine: engine.density(iter=100, n_v=1)
        )
    finally:
        torch.eig = removed  # type: ignore[attr-defined]
    node_tensor = torch.tensor(nodes[0], dtype=torch.float64)
    weight_tensor = torch.tensor(weights[0], dtype=torch.float64)
    return {"seconds": seconds, "w1": _w1_to(node_tensor, weight_tensor, spectrum)}


def _eig_for_pyhessian(matrix: torch.Tensor, eigenvectors: bool = True) -> Any:
    """torch 1's ``torch.eig`` for a symmetric matrix: (values as (n, 2) real/imag, vectors)."""
    values, vectors = torch.linalg.eigh(matrix)
    return torch.stack([values, torch.zeros_like(values)], dim=1), vectors


def _w1_to(nodes: torch.Tensor, weights: torch.Tensor, spectrum: Any) -> float | None:
    if spectrum is None:
        return None
    uniform = torch.full_like(spectrum, 1 / len(spectrum))
    return wasserstein_1(nodes.double(), weights.double() / weights.sum(), spectrum, uniform)


def wasserstein_1(
    nodes_a: torch.Tensor, weights_a: torch.Tensor, nodes_b: torch.Tensor, weights_b: torch.Tensor
) -> float:
    """W1 distance of two discrete measures on the line: the integral of |F_a - F_b|."""
    points = torch.cat([nodes_a, nodes_b])
    mass = torch.cat([weights_a, -weights_b])
    order = torch.argsort(points)
    points, difference = points[order], torch.cumsum(mass[order], 0)
    return (difference[:-1].abs() * points.diff()).sum().item()


# ---------------------------------------------------------------------------- the suite
def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs]
    if any(v is None for v in values):
        return None
    return statistics.median(values)


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    say(f"{name}: building")
    case = make_case(name, args)
    truth = truth_of(case, name)
    say(f"{name}: truth {truth['top5']} ({truth['source']})")
    spectrum = truth.pop("spectrum")
    top5 = truth["top5"]
    measures: dict[str, Callable[[int], dict[str, Any]]] = {
        "top1/ours": lambda s: ours_top(case, 1, s, top5),
        "top1/ours-residual": lambda s: ours_top(case, 1, s, top5, stop="residual"),
        "top1/ours-unsafe": lambda s: ours_top(case, 1, s, top5, min_steps=1),
        "top1/ours-residual-unsafe": lambda s: ours_top(
            case, 1, s, top5, min_steps=1, stop="residual"
        ),
        "top1/pyhessian": lambda s: theirs_top1(case, s, top5, args.pyhessian_iters),
        "top5/ours": lambda s: ours_top(case, 5, s, top5),
        "top5/ours-residual": lambda s: ours_top(case, 5, s, top5, stop="residual"),
        "top5/pyhessian": lambda s: theirs_top5(case, s, top5, args.pyhessian_iters),
        "top5/pyhessian-1e-4": lambda s: theirs_top5(case, s, top5, args.pyhessian_iters, 1e-4),
        "top5/pyhessian-1e-5": lambda s: theirs_top5(case, s, top5, args.pyhessian_iters, 1e-5),
        "trace/ours": lambda s: ours_trace(case, s, truth["trace"], args.trace_budget),
        "trace/pyhessian": lambda s: theirs_trace(case, s, truth["trace"], args.trace_budget),
        "density/ours": lambda s: ours_density(case, s, spectrum),
        "density/pyhessian": lambda s: theirs_density(case, s, spectrum),
    }
    measures = {
        k: v for k, v in measures.items() if k.split("/")[0] not in args.skip and k not in args.skip
    }
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in measures}
    for seed in range(args.repeats):
        for key, measure in measures.items():
            runs[key].append(measure(seed))
            say(f"{name} {key} seed {seed}: {json.dumps(runs[key][-1])}")
    if spectrum is not None:
        mean = torch.tensor([float(spectrum.mean())], dtype=torch.float64)
        truth["w1_of_the_mean"] = _w1_to(mean, torch.ones(1, dtype=torch.float64), spectrum)
    return {"truth": truth, "probe_samples": len(case["probe"][1]), "runs": runs}


def speedups(result: dict[str, Any]) -> dict[str, Any]:
    runs = result["runs"]
    table: dict[str, Any] = {}
    for measure, key in (("top1", "to_accuracy_seconds"), ("top5", "to_accuracy_seconds"),
                         ("trace", "to_rse_seconds"), ("density", "seconds")):  # fmt: skip
        if f"{measure}/ours" not in runs:
            continue
        ours = _median(runs[f"{measure}/ours"], key)
        theirs = _median(runs[f"{measure}/pyhessian"], key)
        table[measure] = {
            "ours_s": ours,
            "pyhessian_s": theirs,
            "speedup": theirs / ours if ours and theirs else None,
        }
    return table


def render(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Hessian analysis side by side with PyHessian 0.1",
        "",
        f"Regenerate: `{report['command']}`. torch {report['torch']}, {report['threads']} "
        f"threads. Medians of {args.repeats} runs, ours and PyHessian's interleaved. See the "
        "script's docstring for what each figure measures.",
        "",
        *_stop_tables(report),
        "## Seconds to the target and speed-up (PyHessian / ours)",
        "",
        "| case | probe | top-1 to 1e-3 | top-5 to 1e-3 | trace to 1% rse | density (100 steps) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in report["results"].items():
        cells = []
        for measure in ("top1", "top5", "trace", "density"):
            entry = result["speedups"].get(measure)
            cells.append(_speed_cell(entry, result, measure))
        lines.append(f"| {name} | {result['probe_samples']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: ours s / PyHessian s (speed-up). PyHessian's top-1 time is its oracle stop; "
        "'not reached' means a run ended (own rule or budget) with a value off by more than "
        "1e-3; trace times marked ~ are extrapolated from its spread at the budget.",
        "",
        "## Accuracy at each tool's default tolerance (median relative error)",
        "",
        "| case | truth | top-1 ours | top-1 PyHessian | top-5 ours | top-5 PyHessian "
        "| trace ours | trace PyHessian | density W1 ours | density W1 PyHessian |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in report["results"].items():
        runs = result["runs"]

        def med(key: str, field: str, runs: dict = runs) -> str:
            if key not in runs:
                return "-"
            value = _median(runs[key], field)
            return "-" if value is None else f"{value:.1e}"

        lines.append(
            f"| {name} | {result['truth']['source']} | {med('top1/ours', 'max_error')} "
            f"| {med('top1/pyhessian', 'max_error')} | {med('top5/ours', 'max_error')} "
            f"| {med('top5/pyhessian', 'max_error')} | {med('trace/ours', 'error')} "
            f"| {med('trace/pyhessian', 'default_error')} | {med('density/ours', 'w1')} "
            f"| {med('density/pyhessian', 'w1')} |"
        )
    return "\n".join(lines) + "\n"


def _stop_tables(report: dict[str, Any]) -> list[str]:
    """Top-1 and top-5 to 1e-3: products and seconds of each stopping rule and of
    PyHessian (medians), when the runs have the stopping-rule variants."""
    results = report["results"]
    variants = ("top1/ours-residual", "top5/ours-residual")
    if not any(v in r["runs"] for r in results.values() for v in variants):
        return []

    def cell(runs: list[dict[str, Any]] | None, products: str, seconds: str, error: str) -> str:
        if not runs:
            return "-"
        missed = sum(r[seconds] is None for r in runs)
        if missed:  # a run that did not get within 1e-3: its own stop, marked
            products, seconds = "matvecs", "seconds"
        text = (
            f"{statistics.median(r[products] for r in runs):g} / "
            f"{statistics.median(r[seconds] for r in runs):.2f} s"
        )
        if error:
            text += f" ({statistics.median(r[error] for r in runs):.0e})"
        return text + (f", off in {missed}/{len(runs)}" if missed else "")

    def speedup(ours: list[dict[str, Any]] | None, theirs: list[dict[str, Any]] | None) -> str:
        if not ours or not theirs:
            return "-"
        cells = []
        for key in ("to_accuracy_seconds", "to_accuracy_matvecs"):
            a, b = _median(ours, key), _median(theirs, key)
            cells.append("not reached" if a is None or b is None else f"{b / a:.1f}x")
        return " / ".join(cells)

    acc = ("to_accuracy_matvecs", "to_accuracy_seconds", "max_error")
    own = ("matvecs", "seconds", "max_error")
    lines = [
        "## Top-1 and top-5 to 1e-3: stopping rules and PyHessian",
        "",
        "Cells: median products / median seconds (median relative error) of runs that "
        "got within 1e-3 of the truth; where some did not, their own stop and 'off in n/3'. "
        "Speed-up: PyHessian's median seconds to 1e-3 over ours / the same for products.",
        "",
        "### Top-1",
        "",
        "| case | probe | ours (error rule) | today (residual rule) | error rule, no "
        "cold-start safety | residual rule, no cold-start safety | PyHessian to 1e-3 "
        "(oracle) | PyHessian own rule | speed-up (s / products) | today's speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        runs = result["runs"]
        if "top1/ours" not in runs:
            continue
        theirs = runs.get("top1/pyhessian")
        lines.append(
            f"| {name} | {result['probe_samples']} | {cell(runs['top1/ours'], *acc)} "
            f"| {cell(runs.get('top1/ours-residual'), *acc)} "
            f"| {cell(runs.get('top1/ours-unsafe'), *acc)} "
            f"| {cell(runs.get('top1/ours-residual-unsafe'), *acc)} "
            f"| {cell(theirs, 'to_accuracy_matvecs', 'to_accuracy_seconds', '')} "
            f"| {cell(theirs, *own)} | {speedup(runs['top1/ours'], theirs)} "
            f"| {speedup(runs.get('top1/ours-residual'), theirs)} |"
        )
    lines += [
        "",
        "### Top-5",
        "",
        "| case | probe | ours (error rule) | today (residual rule) | PyHessian, tol 1e-3 "
        "(default) | PyHessian, tol 1e-4 | PyHessian, tol 1e-5 | speed-up (s / products) "
        "| today's speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, result in results.items():
        runs = result["runs"]
        if "top5/ours" not in runs:
            continue
        theirs = [runs.get(f"top5/pyhessian{tail}") for tail in ("", "-1e-4", "-1e-5")]
        # against the quickest of its settings whose runs all got within 1e-3
        reached = [r for r in theirs if r and _median(r, "to_accuracy_seconds") is not None]
        best = min(reached, key=lambda r: _median(r, "to_accuracy_seconds")) if reached else None
        lines.append(
            f"| {name} | {result['probe_samples']} | {cell(runs['top5/ours'], *acc)} "
            f"| {cell(runs.get('top5/ours-residual'), *acc)} "
            + "".join(f"| {cell(r, *acc)} " for r in theirs)
            + f"| {speedup(runs['top5/ours'], best or theirs[0])} "
            f"| {speedup(runs.get('top5/ours-residual'), best or theirs[0])} |"
        )
    return [*lines, ""]


def _speed_cell(entry: dict[str, Any] | None, result: dict[str, Any], measure: str) -> str:
    if entry is None:
        return "-"
    ours, theirs = entry["ours_s"], entry["pyhessian_s"]
    if ours is None:
        return "ours not reached"
    mark = {"ours": "", "pyhessian": ""}
    if measure == "trace":
        for tool in mark:
            if any(r.get("to_rse_extrapolated") for r in result["runs"][f"trace/{tool}"]):
                mark[tool] = "~"
    if theirs is None:
        return f"{mark['ours']}{ours:.1f} / not reached"
    either = "~" if any(mark.values()) else ""
    return (
        f"{mark['ours']}{ours:.1f} / {mark['pyhessian']}{theirs:.1f} ({either}{theirs / ours:.1f}x)"
    )


def main() -> int:
    args = parse_args()
    if args.render:
        report = json.loads((args.out / "suite.json").read_text())
        report.setdefault(
            "command",
            "python benchmarks/bench_hessian_suite.py "
            + " ".join(
                f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in report["args"].items()
                if k in ("out", "cases", "repeats", "c1_samples", "resnet_samples")
            ),
        )
        report.setdefault("torch", torch.__version__)
        report.setdefault("threads", torch.get_num_threads())
        for key in ("repeats",):
            setattr(args, key, report["args"][key])
        atomic_write_text(args.out / "README.md", render(report, args))
        return 0
    try:
        _pyhessian()
    except ImportError:
        sys.exit("error: PyHessian is missing: .venv/bin/pip install --no-deps pyhessian==0.1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "cases": args.cases,
        "results": {},
        "args": vars(args) | {"out": str(args.out)},
        "command": "python " + " ".join(sys.argv),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    previous = args.out / "suite.json"
    if args.keep and previous.exists():  # cases measured by an earlier command stay
        kept = json.loads(previous.read_text())
        earlier = [c for c in kept["results"] if c not in args.cases]
        report["results"] = {c: kept["results"][c] for c in earlier}
        report["cases"] = earlier + args.cases
        report["command"] = f"{kept.get('command', '(earlier cases)')}; then {report['command']}"
    for name in args.cases:
        result = run_case(name, args)
        result["speedups"] = speedups(result)
        report["results"][name] = result
        atomic_write_json(args.out / "suite.json", report)
        atomic_write_text(args.out / "README.md", render(report, args))
        say(f"{name}: {json.dumps(result['speedups'])}")
    print(render(report, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
