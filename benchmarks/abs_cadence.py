"""Benchmark: what ABS's and ABSA's eigenvalue estimates cost on short epochs, against
their sample-based cadence (``hessian_every_samples``).

The run is MNIST-1D with the MLP, B0 32, Bmax 1024, 30 epochs, every other setting at
its default (the paper's ABS rule: estimate at every epoch's end, 128 probe samples). An
MNIST-1D epoch is 4000 samples, so one estimate per epoch takes a large share of a run.
``hessian_every_samples: N`` keeps at least N samples between estimates. Per cadence and
method: Hessian share of wall time, estimates, growths by the eigenvalue rule and by the
duration rule, updates, final test accuracy (mean over seeds).

    python benchmarks/abs_cadence.py --out docs/results/abs-cadence
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from largebatch.config import TrainConfig
from largebatch.io import atomic_write_json, atomic_write_text, read_jsonl
from largebatch.train import train

SETUP = dict(dataset="mnist1d", model="mlp", epochs=30, batch_size=32, max_batch_size=1024)


def _one(method: str, every: int | None, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            **SETUP, method=method, hessian_every_samples=every, seed=seed, out=out,
            device="cpu",
        ).validate()  # fmt: skip
        summary = train(config, echo=None, show_progress=False)
        records = read_jsonl(Path(out) / "metrics.jsonl")
    reasons = [c["reason"] for r in records for c in r["batch_changes"]]
    return {
        "share": summary["hessian_s"] / summary["wall_s"],
        "estimates": sum(1 for r in records if r["eig_matvecs"]),
        "by_eigenvalue": reasons.count("eigenvalue"),
        "by_duration": reasons.count("duration"),
        "updates": summary["updates"],
        "test_acc": summary["final_test_acc"],
        "wall_s": summary["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results/abs-cadence"))
    parser.add_argument("--methods", nargs="+", default=["abs", "absa"])
    parser.add_argument(
        "--every", nargs="+", default=["none", "20000", "40000", "80000"],
        help="hessian_every_samples values ('none': every epoch, the default)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods:
        for text in args.every:
            every = None if text == "none" else int(text)
            runs = [_one(method, every, seed) for seed in args.seeds]
            row = {"method": method, "hessian_every_samples": every, "runs": runs}
            for key in ("share", "estimates", "by_eigenvalue", "by_duration", "updates"):
                row[key] = statistics.mean(r[key] for r in runs)
            accs = [r["test_acc"] for r in runs]
            row["test_acc"] = statistics.mean(accs)
            row["test_acc_std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
    atomic_write_json(args.out / "results.json", {"setup": SETUP, "rows": rows})
    lines = [
        "# ABS and ABSA: the Hessian's share of wall time against the estimate cadence",
        "",
        f"Regenerate: `python benchmarks/abs_cadence.py --out {args.out} --methods "
        f"{' '.join(args.methods)} --every {' '.join(args.every)} --seeds "
        f"{' '.join(map(str, args.seeds))}`.",
        "",
        "MNIST-1D, MLP, B0 32, Bmax 1024, 30 epochs of 4000 samples; defaults otherwise. "
        f"Means over seeds {', '.join(map(str, args.seeds))}.",
        "",
        "| method | hessian_every_samples | Hessian share | estimates | growths by eigenvalue "
        "| growths by duration | updates | test acc (%) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        every = row["hessian_every_samples"]
        lines.append(
            f"| {row['method']} | {every if every else 'none (every epoch)'} "
            f"| {100 * row['share']:.1f}% | {row['estimates']:.1f} | {row['by_eigenvalue']:.1f} "
            f"| {row['by_duration']:.1f} | {row['updates']:.0f} "
            f"| {100 * row['test_acc']:.2f} ± {100 * row['test_acc_std']:.2f} |"
        )
    atomic_write_text(args.out / "README.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
