"""Benchmark: every batch controller on three datasets, with one set of controller defaults.

Methods: ``bl``, ``fb`` (warm-up), ``gg``, ``abs``, ``absa``, ``gns``, ``gns`` with the
curvature guard (``gns+guard``), ``gns`` with adversarial training (``gns+adv``), and
``gns`` and ``abs`` without the stability safeguard (``gns-nosafeguard``,
``abs-nosafeguard``), and ``gns``'s other growth rules and tolerances.
Datasets: Fashion-MNIST with C1 (a subset), MNIST-1D with an MLP, scikit-learn's digits
with an MLP. Per dataset only the training basics differ (base batch, LR, epochs, cap);
every controller setting is its default on all three.

Each run trains into ``OUT/runs/<dataset>/<method>-s<seed>`` (finished runs are skipped,
so an interrupted benchmark continues), then its final checkpoint is evaluated under
FGSM. ``OUT/results.json`` holds every figure, ``OUT/README.md`` the tables, and
``OUT/<dataset>.png`` the noise scale, batch and LR against samples seen (seed 0).

Per dataset: final test accuracy (mean +- std over seeds), updates and updates / BL,
updates to reach BL's mean final accuracy minus 0.5 points (at epoch ends; "-" when a
run never does), the meters' share of wall time, and FGSM accuracy.

    python benchmarks/controllers.py --out docs/results/controllers
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from largebatch.config import TrainConfig
from largebatch.controllers import BatchController, Decision
from largebatch.errors import DivergedError
from largebatch.evaluate import evaluate_checkpoint
from largebatch.io import atomic_write_json, atomic_write_text, read_jsonl
from largebatch.train import train

#: method label -> config changes (controller defaults otherwise)
METHODS: dict[str, dict[str, Any]] = {
    "bl": {"method": "bl"},
    "fb": {"method": "fb"},
    "gg": {"method": "gg"},
    "abs": {"method": "abs"},
    "absa": {"method": "absa"},
    "gns": {"method": "gns"},
    # gns's growth rule: the rule before the budget rule, and other tolerances
    "gns-kappa": {"method": "gns", "gns_rule": "kappa"},
    "gns-tol0.1": {"method": "gns", "gns_tolerance": 0.1},
    "gns-tol0.3": {"method": "gns", "gns_tolerance": 0.3},
    "gns-kappa0.5": {"method": "gns", "gns_rule": "kappa", "gns_kappa": 0.5},
    "gns+guard": {"method": "gns", "curvature_guard": True},
    "gns+adv": {"method": "gns", "adversarial": True},
    # without the stability safeguard (on by default for the growing methods)
    "gns-nosafeguard": {"method": "gns", "safeguard": False},
    "abs-nosafeguard": {"method": "abs", "safeguard": False},
}

#: the training basics of each dataset (no controller settings here)
DATASETS: dict[str, dict[str, Any]] = {
    "fashion-mnist": dict(
        dataset="fashion-mnist", model="c1", epochs=6, batch_size=128, max_batch_size=4096,
        lr=0.02, lr_decay_epochs=[4], limit_train=6000, limit_test=2000, abs_duration=2,
        warmup_epochs=2, fgsm_eps=0.05,
    ),
    # the whole training set (one seed of bl and gns fits in about 45 minutes on 2 cores)
    "fashion-mnist-full": dict(
        dataset="fashion-mnist", model="c1", epochs=10, batch_size=128, max_batch_size=4096,
        lr=0.02, lr_decay_epochs=[7], abs_duration=2, warmup_epochs=2, fgsm_eps=0.05,
        limit_test=10000,
    ),
    "mnist1d": dict(
        dataset="mnist1d", model="mlp", epochs=12, batch_size=32, max_batch_size=1024,
        lr=0.05, lr_decay_epochs=[8], abs_duration=2, warmup_epochs=2, adv_eps=0.05,
        fgsm_eps=0.05,
    ),
    "digits": dict(
        dataset="digits", model="mlp", epochs=20, batch_size=32, max_batch_size=512,
        lr=0.05, lr_decay_epochs=[12], abs_duration=3, warmup_epochs=3, adv_eps=0.05,
        fgsm_eps=0.05,
    ),
}  # fmt: skip


def _config(dataset: str, method: str, seed: int, out: Path, device: str) -> TrainConfig:
    basics = {k: v for k, v in DATASETS[dataset].items() if k != "fgsm_eps"}
    return TrainConfig(
        **basics, **METHODS[method], seed=seed, out=str(out), device=device, resume=True
    ).validate()


def _run(dataset: str, method: str, seed: int, root: Path, device: str) -> dict[str, Any]:
    out = root / "runs" / dataset / f"{method}-s{seed}"
    if not (out / "summary.json").exists():
        started = time.perf_counter()
        try:
            train(_config(dataset, method, seed, out, device), echo=None, show_progress=False)
        except DivergedError as exc:
            print(f"{dataset} {method} seed {seed}: diverged ({exc})", flush=True)
            return {"diverged": str(exc)}
        print(f"{dataset} {method} seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    summary = json.loads((out / "summary.json").read_text())
    records = read_jsonl(out / "metrics.jsonl")
    fgsm_file = out / "fgsm.json"
    if not fgsm_file.exists():
        evaluate_checkpoint(
            out / "checkpoint.pt",
            attack="fgsm",
            eps=DATASETS[dataset]["fgsm_eps"],
            device=device,
            out=fgsm_file,
        )
    fgsm = json.loads(fgsm_file.read_text())
    return {"summary": summary, "records": records, "fgsm": fgsm, "seed": seed}


class Replay(BatchController):
    """The batch and LR a finished run had at each of its decision points, with nothing
    measured: timed against that run, it gives the whole cost of measuring (the meters'
    hooks and the extra micro-batches they asked for)."""

    def __init__(
        self, name: str, records: list[dict[str, Any]], base: int, base_lr: float, every: int
    ) -> None:
        super().__init__()
        self.name = name
        self.decide_every = every
        self.base_lr = base_lr
        self.at = {p["samples"]: p for r in records for p in r["points"]}
        self.adv = [r["adv_ratio"] for r in records]  # per epoch
        self.batch, self.lr_factor = base, 1.0

    def decision(self) -> Decision:
        adv = self.adv[min(self.epoch, len(self.adv) - 1)]
        return Decision(self.batch, self.lr_factor, adv)

    def step(self, measurements: dict[str, Any] | None = None) -> Decision:
        point = self.at.get(int((measurements or {})["samples"]))
        if point is not None:
            self.batch, self.lr_factor = point["batch_size"], point["lr"] / self.base_lr
        return super().step(measurements)


def _train_timed(config: TrainConfig, controller: BatchController | None) -> float:
    """Wall seconds of one run of ``config`` (with ``controller`` in place of its method's)."""
    started = time.perf_counter()
    train(config, controller=controller, echo=None, show_progress=False)
    return time.perf_counter() - started


def _whole_cost(dataset: str, method: str, root: Path, device: str, repeats: int) -> dict[str, Any]:
    """Seed 0 of ``method`` against a replay of its own schedule without meters, run
    alternately ``repeats`` times each: the measurements' share of the wall time."""
    cached = root / "runs" / dataset / f"{method}-s0" / "whole-cost.json"
    if cached.exists():
        return json.loads(cached.read_text())
    records = read_jsonl(root / "runs" / dataset / f"{method}-s0" / "metrics.jsonl")
    ratios, measured, replayed = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for i in range(repeats):
            config = _config(dataset, method, 0, Path(scratch) / f"m{i}", device)
            config.resume = False
            measured.append(_train_timed(config, None))
            # its first epoch's record counts the training samples
            every = round(records[0]["samples"] * config.gns_every)
            replay = Replay(method, records, config.batch_size, config.lr, every)
            # the same run with nothing measured (adversarial training kept, the guard not)
            config = _config(dataset, "bl", 0, Path(scratch) / f"r{i}", device)
            config.resume, config.adversarial = False, METHODS[method].get("adversarial")
            replayed.append(_train_timed(config, replay))
            ratios.append(1 - replayed[-1] / measured[-1])
    result = {
        "share": statistics.median(ratios),
        "shares": ratios,
        "measured_s": measured,
        "replayed_s": replayed,
    }
    atomic_write_json(cached, result)
    return result


def _noise_bound(records: list[dict[str, Any]], base: int) -> dict[str, Any] | None:
    """What the measured noise scale allows (McCandlish et al.): the updates for a given
    progress at batch B are ``S_min (1 + phi / B)``, so over a stretch where the noise
    scale is ``phi`` no schedule needs fewer than ``1 / (1 + phi / B0)`` of the base
    batch's updates, even with an unlimited batch and unlimited samples. Averaged over
    the decision points (evenly spaced in samples), that is a floor on updates / BL."""
    phis = [p["gns"] for r in records for p in r["points"] if p.get("gns")]
    if not phis:
        return None
    # an infinite noise scale (the |G|^2 estimate at or below zero: noise alone) adds 0,
    # so the floor stays a floor
    floor = statistics.mean(1 / (1 + phi / base) for phi in phis)
    return {
        "points": len(phis),
        "infinite": sum(1 for phi in phis if not math.isfinite(phi)),
        "phi_first": phis[0],
        "phi_median": statistics.median(phis),
        "phi_last": phis[-1],
        "floor_updates_vs_bl": floor,
    }


def _updates_to(records: list[dict[str, Any]], target: float) -> int | None:
    for record in records:
        if record["test_acc"] is not None and record["test_acc"] >= target:
            return record["updates"]
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _table(
    dataset: str, runs: dict[str, list[dict[str, Any]]], costs: dict[str, dict[str, Any]]
) -> tuple[list[dict], str]:
    bl = [r for r in runs["bl"] if "summary" in r]
    bl_acc = statistics.mean(r["summary"]["final_test_acc"] for r in bl)
    bl_updates = statistics.mean(r["summary"]["updates"] for r in bl)
    target = bl_acc - 0.005
    rows = []
    for method, results in runs.items():
        done = [r for r in results if "summary" in r]
        if not done:
            rows.append({"method": method, "diverged": len(results)})
            continue
        accs = [r["summary"]["final_test_acc"] for r in done]
        updates = [r["summary"]["updates"] for r in done]
        reach = [_updates_to(r["records"], target) for r in done]
        share = [r["summary"]["measure_s"] / r["summary"]["wall_s"] for r in done]
        fgsm = [r["fgsm"]["adv_acc"] for r in done]
        acc_mean, acc_std = _mean_std(accs)
        rows.append(
            {
                "method": method,
                "runs": len(done),
                "diverged": len(results) - len(done),
                "test_acc_mean": acc_mean,
                "test_acc_std": acc_std,
                "updates_mean": statistics.mean(updates),
                "updates_vs_bl": statistics.mean(updates) / bl_updates,
                "updates_to_target": reach,
                "updates_to_target_vs_bl": (
                    statistics.mean(reach) / bl_updates
                    if all(v is not None for v in reach)
                    else None
                ),
                "measure_share": statistics.mean(share),
                "whole_cost": costs.get(method),
                "fgsm_acc_mean": statistics.mean(fgsm),
                "final_batch_mean": statistics.mean(r["summary"]["final_batch_size"] for r in done),
            }
        )
    lines = [
        f"### {dataset}",
        "",
        f"Target: BL's mean final accuracy minus 0.5 points = {100 * target:.2f}%.",
        "",
        "| method | test acc (%) | updates | updates / BL | updates to target / BL | "
        "meters' share | whole cost (replay) | FGSM acc (%) | final batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "test_acc_mean" not in row:
            lines.append(f"| {row['method']} | diverged ({row['diverged']} runs) | | | | | | | |")
            continue
        reach = row["updates_to_target_vs_bl"]
        missed = sum(v is None for v in row["updates_to_target"])
        reach_text = f"{reach:.3f}" if reach is not None else f"- ({missed} of {row['runs']} miss)"
        whole = row["whole_cost"]
        cost = f"{100 * whole['share']:.1f}%" if whole else "-"
        lines.append(
            f"| {row['method']} | {100 * row['test_acc_mean']:.2f} "
            f"± {100 * row['test_acc_std']:.2f} "
            f"| {row['updates_mean']:.0f} | {row['updates_vs_bl']:.3f} | {reach_text} "
            f"| {100 * row['measure_share']:.1f}% | {cost} | {100 * row['fgsm_acc_mean']:.2f} "
            f"| {row['final_batch_mean']:.0f} |"
        )
    gns = [r for r in runs.get("gns", []) if "records" in r]
    if gns:
        bounds = [_noise_bound(r["records"], DATASETS[dataset]["batch_size"]) for r in gns]
        known = [b for b in bounds if b]
        if known:
            floor = statistics.mean(b["floor_updates_vs_bl"] for b in known)
            first = statistics.median(b["phi_first"] for b in known)
            median = statistics.mean(b["phi_median"] for b in known)
            last = statistics.mean(b["phi_last"] for b in known)
            base = DATASETS[dataset]["batch_size"]
            infinite = sum(b["infinite"] for b in known)
            points = sum(b["points"] for b in known)
            lines += [
                "",
                f"Noise scale φ̂ measured by `gns` (over seeds: median of the first, means of "
                f"the rest): {first:.0f} at the first decision point, median {median:.0f}, "
                f"{last:.0f} at the last ({infinite} of {points} points infinite: the |G|² "
                f"estimate at or below zero); B0 = {base}. "
                f"The floor it implies on updates / BL, the mean of 1 / (1 + φ̂/B0) over the "
                f"decision points (unlimited batch and samples): **{floor:.3f}** "
                f"({1 / floor:.1f}x fewer at most).",
            ]
            rows.append({"method": "noise-bound", "bounds": bounds, "floor_mean": floor})
    return rows, "\n".join(lines)


def _figure(dataset: str, runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = DATASETS[dataset]["batch_size"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    colors = {method: f"C{i}" for i, method in enumerate(runs)}
    for method, results in runs.items():
        if not results or "records" not in results[0]:
            continue
        records = results[0]["records"]
        xs, batch, lr, gns = [0], [records[0]["batch_size"]], [records[0]["lr"]], []
        for record in records:
            for point in record.get("points") or []:
                xs.append(point["samples"])
                batch.append(point["batch_size"])
                lr.append(point["lr"])
                if point.get("gns") is not None:
                    gns.append((point["samples"], point["gns"]))
            if not record.get("points"):
                xs.append(record["samples"])
                batch.append(record["batch_size"])
                lr.append(record["lr"])
        color = colors[method]
        axes[1].step(xs, batch, where="post", label=method, color=color)
        axes[2].step(xs, lr, where="post", label=method, color=color)
        if gns:
            axes[0].plot(*zip(*gns, strict=True), marker=".", label=method, color=color)
            bound = [1 + phi / base for _, phi in gns]
            axes[3].plot([x for x, _ in gns], bound, label=method, color=color)
    axes[3].axhline(5, color="grey", linestyle="--", label="5x target")
    titles = ("gradient noise scale", "global batch", "learning rate", "bound 1 + φ̂/B0")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(f"{dataset}: {title}")
        ax.set_xlabel("samples seen")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/controllers"))
    parser.add_argument(
        "--datasets", nargs="+", default=[d for d in DATASETS if d != "fashion-mnist-full"]
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--cost-repeats", type=int, default=None,
        help="times seed 0 of each gns method and its replay are run to time the whole cost "
        "of measuring (0: skip; default 5, and 1 on Fashion-MNIST)",
    )  # fmt: skip
    args = parser.parse_args()
    for name in args.datasets + args.methods:
        if name not in DATASETS and name not in METHODS:
            sys.exit(f"error: unknown dataset or method {name!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = [
        "# Batch controllers on three datasets",
        "",
        f"Regenerate: `python benchmarks/controllers.py --out {args.out} "
        f"--datasets {' '.join(args.datasets)} --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))}`.",
        "",
    ]
    results: dict[str, Any] = {}
    for dataset in args.datasets:
        runs = {
            method: [_run(dataset, method, seed, args.out, args.device) for seed in args.seeds]
            for method in args.methods
        }
        # a Fashion-MNIST run takes minutes: one pair there, five for the small ones
        repeats = args.cost_repeats
        if repeats is None:
            repeats = 1 if dataset.startswith("fashion") else 5
        costs = {
            method: _whole_cost(dataset, method, args.out, args.device, repeats)
            for method in args.methods
            if method.startswith("gns")
            and repeats
            and any("summary" in r and r["seed"] == 0 for r in runs[method])
        }
        rows, table = _table(dataset, runs, costs)
        results[dataset] = {"setup": DATASETS[dataset], "rows": rows}
        _figure(dataset, runs, args.out / f"{dataset}.png")
        report += [table, "", f"![{dataset}]({dataset}.png)", ""]
        atomic_write_json(args.out / "results.json", results)
        atomic_write_text(args.out / "README.md", "\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
