"""Benchmark: BL, FB, GG, ABS and ABSA on Fashion-MNIST with C1, in one harness.

Every method gets the same seed, epochs, base batch, LR and milestones; they differ only in
the controller. Each run trains into ``--runs DIR/<method>`` (finished runs are skipped,
interrupted ones resumed), then is evaluated clean and under FGSM. The table goes to
``--report DIR/README.md`` and ``results.json``, with each run's metrics and summary.

    python benchmarks/methods_fashion_mnist.py                       # all five, defaults
    python benchmarks/methods_fashion_mnist.py --methods bl fb gg    # a subset
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from largebatch.config import TrainConfig
from largebatch.errors import DivergedError
from largebatch.evaluate import evaluate_checkpoint
from largebatch.io import atomic_write_json, atomic_write_text, read_jsonl
from largebatch.train import train

METHODS = ("bl", "fb", "gg", "abs", "absa")


def _config(args: argparse.Namespace, method: str) -> TrainConfig:
    return TrainConfig(
        dataset="fashion-mnist",
        model="c1",
        method=method,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_batch_size=args.max_batch_size,
        lr=args.lr,
        lr_decay=0.2,
        lr_decay_epochs=args.milestones,
        abs_duration=args.duration,
        warmup_epochs=args.warmup_epochs,
        seed=args.seed,
        on_divergence=args.on_divergence,
        device="cpu",
        out=str(Path(args.runs) / method),
        resume=True,
    ).validate()


def _row(method: str, summary: dict[str, Any], robust: dict[str, Any], bl_updates: int | None):
    share = summary["hessian_s"] / summary["wall_s"] if summary["wall_s"] else 0.0
    return {
        "method": method,
        "final_test_acc": summary["final_test_acc"],
        "best_test_acc": summary["best_test_acc"],
        "updates": summary["updates"],
        "updates_vs_bl": summary["updates"] / bl_updates if bl_updates else None,
        "final_batch_size": summary["final_batch_size"],
        "wall_s": summary["wall_s"],
        "hessian_share": share,
        "fgsm_acc": robust["adv_acc"],
        "fgsm_eps": robust["eps"],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test acc | best acc | updates | updates / BL | final batch | wall s "
        "| Hessian share | FGSM acc |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['updates_vs_bl']:.3f}" if r["updates_vs_bl"] is not None else "-"
        lines.append(
            f"| {r['method']} | {r['final_test_acc']:.4f} | {r['best_test_acc']:.4f} "
            f"| {r['updates']} | {ratio} | {r['final_batch_size']} | {r['wall_s']:.0f} "
            f"| {100 * r['hessian_share']:.1f}% | {r['fgsm_acc']:.4f} |"
        )
    return "\n".join(lines)


def _schedule(method: str, records: list[dict[str, Any]]) -> str:
    parts = []
    for r in records:
        eig = f", eig {r['eigenvalue']:.3g}" if r.get("eigenvalue") is not None else ""
        parts.append(f"{r['epoch']}: B={r['batch_size']} lr={r['lr']:.3g}{eig}")
    return f"- {method}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--milestones", type=int, nargs="*", default=[3, 6])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--duration", type=int, default=2)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fgsm-eps", type=float, default=0.02)
    parser.add_argument(
        "--on-divergence",
        default="stop",
        choices=("stop", "rollback"),
        help="rollback: a diverging run restarts from its last checkpoint at half the LR",
    )
    parser.add_argument("--runs", default="runs/bench/methods-fashion-mnist")
    parser.add_argument("--report", default="docs/results/methods-fashion-mnist")
    args = parser.parse_args(argv)

    report = Path(args.report)
    for method in args.methods:
        config = _config(args, method)
        print(f"== {method}", flush=True)
        try:
            train(config, show_progress=False)
        except DivergedError as exc:
            print(f"{method} diverged: {exc}", flush=True)
            atomic_write_text(Path(config.out) / "diverged.txt", str(exc) + "\n")
    rows, schedules = [], []
    finished = [m for m in METHODS if (Path(args.runs) / m / "summary.json").exists()]
    bl_updates = None
    if "bl" in finished:
        bl_updates = json.loads((Path(args.runs) / "bl" / "summary.json").read_text())["updates"]
    for method in finished:
        run = Path(args.runs) / method
        summary = json.loads((run / "summary.json").read_text())
        robust = evaluate_checkpoint(run / "checkpoint.pt", attack="fgsm", eps=args.fgsm_eps)
        rows.append(_row(method, summary, robust, bl_updates))
        schedules.append(_schedule(method, read_jsonl(run / "metrics.jsonl")))
        (report / "runs" / method).mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "summary.json", "config.yaml"):
            shutil.copyfile(run / name, report / "runs" / method / name)
    diverged = [
        f"- {m}: diverged ({(Path(args.runs) / m / 'diverged.txt').read_text().strip()})"
        for m in METHODS
        if (Path(args.runs) / m / "diverged.txt").exists()
    ]
    command = "python benchmarks/methods_fashion_mnist.py " + " ".join(sys.argv[1:])
    atomic_write_json(report / "results.json", {"command": command, "rows": rows})
    text = (
        "# BL, FB, GG, ABS, ABSA on Fashion-MNIST with C1\n\n"
        f"Regenerate with `{command.strip()}` (after `make setup`).\n\n"
        f"Settings: {args.epochs} epochs, base batch {args.batch_size}, max batch "
        f"{args.max_batch_size}, lr {args.lr}, decay 0.2 at epochs {args.milestones}, "
        f"ABS duration {args.duration}, FB warm-up {args.warmup_epochs} epochs, seed "
        f"{args.seed}, FGSM eps {args.fgsm_eps} (pixels in [0, 1]), on divergence "
        f"{args.on_divergence}, 2 CPU cores.\n\n"
        + _table(rows)
        + ("\n\n" + "\n".join(diverged) if diverged else "")
        + "\n\nSchedules (epoch: batch, LR, top eigenvalue):\n\n"
        + "\n".join(schedules)
        + "\n"
    )
    atomic_write_text(report / "README.md", text)
    print(_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
