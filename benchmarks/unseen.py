"""Benchmark: ``gns`` with its defaults against the fixed batch on models the project
never trained or tuned on (issue 36, step 5).

Three model families, each defined here and trained through ``largebatch.fit`` as a
user would: a GRU reading MNIST-1D as a sequence (SGD), a depthwise-separable convnet
with batch norm on scikit-learn's digits (SGD), and a small transformer encoder on
MNIST-1D cut into patches (AdamW). For each family the fixed batch's LR is tuned first:
every LR of the family's grid trains once with BL on seed 100, and the one with the best
final test accuracy is kept (this favours BL, if anything). Then every method trains on
seeds 0, 1 and 2 at that LR, for the same epochs as BL.

Methods: ``bl``; ``gns`` with every default; ``gns-nosafeguard`` (without the stability
safeguard); ``gns-kappa`` (the growth rule before the budget rule: double when the
batch is at most the noise scale) and ``gns-norecovery`` (without the recovery after a
growth), both without the safeguard as well.
Each finished run appends one JSON line to ``OUT/runs.jsonl`` (a run already there is
skipped, so an interrupted benchmark continues); ``OUT/README.md`` gets the tables.

    python benchmarks/unseen.py --out docs/results/unseen
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

import torch
from torch import nn

import largebatch
from largebatch.data.small import load_digits, load_mnist1d
from largebatch.errors import DivergedError
from largebatch.io import atomic_write_text, read_jsonl

#: method label -> fit() keys (controller defaults otherwise)
METHODS: dict[str, dict[str, Any]] = {
    "bl": {"method": "bl"},
    "gns": {"method": "gns"},
    "gns-nosafeguard": {"method": "gns", "safeguard": False},
    "gns-kappa": {"method": "gns", "gns_rule": "kappa", "safeguard": False},
    "gns-norecovery": {"method": "gns", "recovery_tolerance": None, "safeguard": False},
}


class GRUNet(nn.Module):
    """MNIST-1D as a sequence of 20 steps of 2 values, read by a GRU; the mean of its
    outputs classifies (read one value at a time, with the last state only, it stayed at
    chance under SGD)."""

    def __init__(self, hidden: int = 64, step: int = 2) -> None:
        super().__init__()
        self.step = step
        self.gru = nn.GRU(step, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.gru(x.reshape(len(x), -1, self.step))
        return self.head(outputs.mean(1))


def _separable(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class SeparableNet(nn.Module):
    """A depthwise-separable convnet with batch norm for 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            _separable(16, 32),
            nn.MaxPool2d(2),
            _separable(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class PatchTransformer(nn.Module):
    """MNIST-1D cut into 10 patches of 4, a 2-layer pre-norm transformer encoder, mean
    pooling."""

    def __init__(self, width: int = 32, patch: int = 4) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, width)
        self.position = nn.Parameter(torch.zeros(40 // patch, width))
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(len(x), -1, self.patch)) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def _adamw(lr: float):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


#: family -> data, model, optimizer, training basics and the BL LR grid
FAMILIES: dict[str, dict[str, Any]] = {
    "gru-mnist1d": dict(
        data="mnist1d", model=GRUNet, adam=False, lrs=[0.05, 0.1, 0.2],
        basics=dict(epochs=12, batch_size=32, max_batch_size=1024, lr_decay_epochs=[8],
                    momentum=0.9),
    ),
    "sepconv-bn-digits": dict(
        data="digits", model=SeparableNet, adam=False, lrs=[0.02, 0.05, 0.1],
        basics=dict(epochs=20, batch_size=32, max_batch_size=512, lr_decay_epochs=[12],
                    momentum=0.9),
    ),
    "transformer-mnist1d": dict(
        data="mnist1d", model=PatchTransformer, adam=True, lrs=[1e-3, 3e-3, 1e-2],
        basics=dict(epochs=12, batch_size=32, max_batch_size=1024, lr_decay_epochs=[8]),
    ),
}  # fmt: skip


def _data(name: str) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    source = load_mnist1d(None, 0) if name == "mnist1d" else load_digits(None, 0)
    mean, std = source.mean[0], source.std[0]  # the models see standardised inputs
    train = ((source.train_x - mean) / std, source.train_y)
    test = ((source.test_x - mean) / std, source.test_y)
    return train, test


def _train(family: str, method: str, lr: float, seed: int) -> dict[str, Any]:
    spec = FAMILIES[family]
    train, test = _data(spec["data"])
    torch.manual_seed(seed)
    model = spec["model"]()
    keys = {**spec["basics"], **METHODS[method], "seed": seed, "device": "cpu"}
    if spec["adam"]:
        keys["optimizer"] = _adamw(lr)
    else:
        keys["lr"] = lr
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        try:
            summary = largebatch.fit(
                model, train, eval_data=test, out=Path(folder) / "run", verbose=False, **keys
            )
        except DivergedError as exc:
            return {"diverged": str(exc), "wall_s": time.perf_counter() - started}
        records = read_jsonl(Path(folder) / "run" / "metrics.jsonl")
    changes = [c for r in records for c in r["batch_changes"]]
    return {
        "test_acc": summary["final_test_acc"],
        "test_loss": records[-1]["test_loss"],
        "updates": summary["updates"],
        "final_batch": summary["final_batch_size"],
        "rollbacks": summary.get("rollbacks", 0),
        "tempered": sum(c["reason"] == "stability" for c in changes),
        "recovered": sum(c["reason"] == "recovery" for c in changes),
        "growths": [[c["samples"], c["batch_size"], c["reason"]] for c in changes],
        "measure_s": summary["measure_s"],
        "wall_s": summary["wall_s"],
    }


def _done(path: Path) -> dict[tuple[str, str, float, int], dict[str, Any]]:
    if not path.exists():
        return {}
    return {(r["family"], r["method"], r["lr"], r["seed"]): r for r in read_jsonl(path)}


def _run(path: Path, family: str, method: str, lr: float, seed: int) -> dict[str, Any]:
    key = (family, method, lr, seed)
    done = _done(path)
    if key in done:
        return done[key]
    result = {"family": family, "method": method, "lr": lr, "seed": seed}
    result.update(_train(family, method, lr, seed))
    with path.open("a") as stream:  # one line per finished run
        stream.write(json.dumps(result) + "\n")
    acc = result.get("test_acc")
    shown = "diverged" if acc is None else f"{100 * acc:.2f}%"
    print(f"{family} {method} lr {lr:g} seed {seed}: {shown}, {result['wall_s']:.0f} s", flush=True)
    return result


def _table(family: str, lr: float, rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    accs = [100 * r["test_acc"] for r in rows["bl"] if r.get("test_acc") is not None]
    bl_mean = statistics.mean(accs)
    bl_updates = statistics.mean(r["updates"] for r in rows["bl"])
    lines = [
        f"### {family} (BL's LR {lr:g})",
        "",
        "| method | test acc (%) | below BL's mean (points) | worst seed below | updates / BL "
        "| final batch | diverged | rollbacks | tempered | recovered | meters' share |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, runs in rows.items():
        finished = [r for r in runs if r.get("test_acc") is not None]
        acc = [100 * r["test_acc"] for r in finished]
        mean = statistics.mean(acc) if acc else math.nan
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        updates = statistics.mean(r["updates"] for r in finished) / bl_updates
        share = statistics.median(r["measure_s"] / r["wall_s"] for r in finished)
        lines.append(
            f"| {method} | {mean:.2f} ± {std:.2f} | {bl_mean - mean:+.2f} | "
            f"{bl_mean - min(acc):+.2f} | {updates:.3f} | "
            f"{'/'.join(str(r['final_batch']) for r in finished)} | "
            f"{len(runs) - len(finished)} | {sum(r['rollbacks'] for r in finished)} | "
            f"{sum(r['tempered'] for r in finished)} | {sum(r['recovered'] for r in finished)} "
            f"| {100 * share:.1f}% |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/unseen"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    for name in args.families + args.methods:
        if name not in FAMILIES and name not in METHODS:
            sys.exit(f"error: unknown family or method {name!r}")
    if "bl" not in args.methods:
        sys.exit("error: the methods must include bl (the reference)")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "runs.jsonl"
    report = [
        "# gns on models it has never seen",
        "",
        "One thread per run (CPU only); the reading of these tables is in `ANALYSIS.md`. "
        "\"below BL's mean\": BL's mean minus the method's, in points (positive: below); "
        '"worst seed below": BL\'s mean minus the worst seed. "tempered": growths the '
        'stability safeguard capped; "recovered": growths whose LR step the recovery '
        "undid; \"meters' share\": the noise meter's and the gauge's seconds over the "
        "run's wall time (median of the seeds).",
        "",
        f"Regenerate: `python benchmarks/unseen.py --out {args.out} --families "
        f"{' '.join(args.families)} --methods {' '.join(args.methods)} --seeds "
        f"{' '.join(map(str, args.seeds))}`.",
        "",
    ]
    for family in args.families:
        tuning = {lr: _run(path, family, "bl", lr, 100) for lr in FAMILIES[family]["lrs"]}
        lr = max(tuning, key=lambda v: tuning[v].get("test_acc") or -1.0)
        report.append(
            f"{family}: BL's LR grid on seed 100: "
            + ", ".join(
                f"{v:g} -> {100 * (r.get('test_acc') or math.nan):.2f}%" for v, r in tuning.items()
            )
            + f"; kept {lr:g}."
        )
        report.append("")
        rows = {m: [_run(path, family, m, lr, s) for s in args.seeds] for m in args.methods}
        report += _table(family, lr, rows)
        atomic_write_text(args.out / "README.md", "\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
