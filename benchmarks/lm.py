"""Benchmark: adaptive batches for a byte-level Transformer language model (issue 38, step 5).

The corpus is Vim's documentation (Debian's ``vim-runtime``: ``/usr/share/vim/vim90/doc``,
9.8 MB of English text, on this machine; ``--corpus`` for another folder), read as the
``text`` dataset (bytes, next-byte targets, a validation tail; ``--train-windows`` and
``--eval-windows`` of them spread evenly over each part). The model is largebatch's
``transformer``; the optimizer AdamW. For each seed, each method with a constant LR and
with a x0.2 decay at three quarters of the run:

- ``bl``: the fixed batch B0;
- ``gns``: the batch from the measured noise scale, with today's defaults;
- ``schedule``: a token-keyed warm-up, B0 doubled at a tenth and at three tenths of the
  tokens (``schedule_unit: tokens``);
- ``seesaw`` (with the decay only: it turns decays into growths).

Each finished run appends one JSON line to ``--out``: the final validation loss, the
updates, tokens and wall time, and the curve (tokens, updates, validation loss per
epoch). ``--summary`` then writes ``summary.json`` beside it (per method and LR rule: mean
and std of the final loss, updates, and updates to reach ``bl``'s final loss at the same
seed and LR rule, read from the curves at epoch ends) and ``curves.png`` (validation loss
against tokens and against updates).

    python benchmarks/lm.py --out docs/results/lm/runs.jsonl
    python benchmarks/lm.py --out docs/results/lm/runs.jsonl --summary

Not yet here: the schedule that ``largebatch cbs`` suggests from an early checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

import largebatch
from largebatch.data.text import load_text
from largebatch.models import build_model

CORPUS = "/usr/share/vim/vim90/doc"
METHODS = ("bl", "gns", "schedule", "seesaw")


def _runs(args: argparse.Namespace) -> list[dict]:
    return [
        {"method": method, "lr_rule": rule, "seed": seed}
        for seed in args.seeds
        for rule in ("constant", "decay")
        for method in METHODS
        if not (method == "seesaw" and rule == "constant")
    ]


def _spread(count: int, total: int) -> list[int]:
    """``count`` windows spread evenly over ``total`` (all of them when fewer), so that a
    short run still sees the whole corpus."""
    if count >= total:
        return list(range(total))
    return [i * total // count for i in range(count)]


def _one(args: argparse.Namespace, run: dict, data) -> dict:
    train = Subset(data.train_x.dataset, _spread(args.train_windows, len(data.train_y)))
    test = Subset(data.test_x.dataset, _spread(args.eval_windows, len(data.test_y)))
    tokens_per_epoch = len(train) * args.seq_len
    decay = {"lr_decay_epochs": [math.ceil(0.75 * args.epochs)], "lr_decay": 0.2}
    settings = dict(
        method=run["method"], epochs=args.epochs, batch_size=args.b0,
        max_batch_size=args.bmax, seed=run["seed"], device="cpu", workers=0,
        **(decay if run["lr_rule"] == "decay" else {"lr_decay_epochs": []}),
    )  # fmt: skip
    if run["method"] == "schedule":
        total, b0 = tokens_per_epoch * args.epochs, args.b0
        points = f"0:{b0} {total // 10}:{2 * b0} {3 * total // 10}:{4 * b0}"
        settings.update(batch_schedule=points, schedule_unit="tokens")
    torch.manual_seed(run["seed"])
    sizes = {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads}
    model = build_model("transformer", (args.seq_len,), 256, sizes=sizes)
    out = Path(tempfile.mkdtemp(prefix="bench-lm-")) / "run"
    started = time.perf_counter()
    summary = largebatch.fit(
        model, train, eval_data=test, out=out, verbose=False,
        optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1),
        **settings,
    )  # fmt: skip
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        **run,
        "final_val_loss": records[-1]["test_loss"],
        "final_bits_per_byte": records[-1]["test_loss"] / math.log(2),
        "updates": summary["updates"],
        "tokens": records[-1]["tokens"],
        "final_batch": summary["final_batch_size"],
        "wall_s": round(wall, 1),
        "curve": [(r["tokens"], r["updates"], r["test_loss"], r["batch_size"]) for r in records],
        "gns": [r.get("gns") for r in records],
        "gns_preconditioned": [r.get("gns_preconditioned") for r in records],
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "summary", "seeds")},
    }


def _summarize(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    target = {(r["seed"], r["lr_rule"]): r["final_val_loss"] for r in rows if r["method"] == "bl"}
    table = {}
    for key in sorted({(r["method"], r["lr_rule"]) for r in rows}):
        group = [r for r in rows if (r["method"], r["lr_rule"]) == key]
        reach = []
        for r in group:
            goal = target.get((r["seed"], r["lr_rule"]))
            hit = [u for _, u, loss, _ in r["curve"] if goal is not None and loss <= goal]
            reach.append(hit[0] if hit else None)
        losses = [r["final_val_loss"] for r in group]
        table[f"{key[0]}/{key[1]}"] = {
            "runs": len(group),
            "final_val_loss_mean": statistics.mean(losses),
            "final_val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "updates_mean": statistics.mean(r["updates"] for r in group),
            "updates_to_bl_final": reach,
            "wall_s_mean": statistics.mean(r["wall_s"] for r in group),
        }
    (path.parent / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["seed"] != rows[0]["seed"]:
            continue
        label = f"{r['method']} ({r['lr_rule']})"
        tokens, updates, losses = zip(*[(t, u, v) for t, u, v, _ in r["curve"]], strict=True)
        axes[0].plot(tokens, losses, label=label)
        axes[1].plot(updates, losses, label=label)
    axes[0].set_xlabel("tokens")
    axes[1].set_xlabel("updates")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation loss (nats per byte)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.parent / "curves.png", dpi=120)
    print(json.dumps(table, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lm_runs.jsonl"))
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--train-windows", type=int, default=10000)
    parser.add_argument("--eval-windows", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--b0", type=int, default=16)
    parser.add_argument("--bmax", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summary", action="store_true", help="summarize --out, run nothing")
    args = parser.parse_args()
    if args.summary:
        _summarize(args.out)
        return
    torch.set_num_threads(args.threads)
    data = load_text(args.corpus, args.seq_len)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.exists():  # a run cut short goes on where it stopped
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            done.add((row["method"], row["lr_rule"], row["seed"]))
    for run in _runs(args):
        if (run["method"], run["lr_rule"], run["seed"]) in done:
            continue
        row = _one(args, run, data)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            json.dumps({k: v for k, v in row.items() if k not in ("curve", "settings")}), flush=True
        )


if __name__ == "__main__":
    main()
