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

``--cbs`` measures instead which noise scale predicts the critical batch: for each seed a
``bl`` run (constant LR) stops after each of ``--cbs-epochs``, and from its checkpoint
``largebatch.cbs.critical_batch`` branches at ``--cbs-batches`` for ``--cbs-windows``
windows each; one JSON line per checkpoint (the critical batch; the plain and the
Adam-preconditioned noise scale, as cbs measures them at the checkpoint and as the
training meter last read them; each branch's final loss).

    python benchmarks/lm.py --cbs --out docs/results/lm/cbs.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch.utils.data import Subset

import largebatch
from largebatch.cbs import critical_batch, suggested_schedule
from largebatch.data.text import load_text
from largebatch.models import build_model

CORPUS = "/usr/share/vim/vim90/doc"
METHODS = ("bl", "gns", "schedule", "seesaw", "cbs")


def _runs(args: argparse.Namespace) -> list[dict]:
    return [
        {"method": method, "lr_rule": rule, "seed": seed}
        for seed in args.seeds
        for rule in args.lr_rules
        for method in args.methods
        if not (method == "seesaw" and rule == "constant")
    ]


def _variant(text: str) -> tuple[str, dict]:
    """``NAME=key:value,key:value``: a method of its own name with fit's config keys."""
    name, _, body = text.partition("=")
    pairs = (item.split(":", 1) for item in body.split(",") if item)
    return name, {key: yaml.safe_load(value) for key, value in pairs}


def _cbs_schedule(args: argparse.Namespace, seed: int) -> str:
    """The warm-up ``largebatch cbs`` suggests from ``bl``'s checkpoint after epoch
    ``--cbs-from`` of this seed (read from ``--cbs-file``, written by ``--cbs``)."""
    rows = [json.loads(line) for line in args.cbs_file.read_text().splitlines() if line]
    (row,) = [r for r in rows if r["seed"] == seed and r["epoch"] == args.cbs_from]
    at = row["tokens"] // args.seq_len
    return suggested_schedule(args.b0, at, row["critical_batch"], args.bmax)


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
    settings.update(args.variants.get(run["method"], {}))
    if run["method"] == "cbs":
        settings.update(method="schedule", batch_schedule=_cbs_schedule(args, run["seed"]))
    elif run["method"] == "schedule":
        total, b0 = tokens_per_epoch * args.epochs, args.b0
        points = f"0:{b0} {total // 10}:{2 * b0} {3 * total // 10}:{4 * b0}"
        settings.update(batch_schedule=points, schedule_unit="tokens")
    torch.manual_seed(run["seed"])
    model = _model(args)
    out = Path(tempfile.mkdtemp(prefix="bench-lm-")) / "run"
    started = time.perf_counter()
    summary = largebatch.fit(
        model, train, eval_data=test, out=out, verbose=False,
        optimizer=_adamw(args),
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
        "fit": {k: v for k, v in settings.items() if k not in ("device", "workers")},
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("out", "summary", "seeds")
        },
    }


def _model(args: argparse.Namespace) -> torch.nn.Module:
    sizes = {"d_model": args.d_model, "n_layers": args.n_layers, "n_heads": args.n_heads}
    return build_model("transformer", (args.seq_len,), 256, sizes=sizes)


def _adamw(args: argparse.Namespace):
    return lambda p: torch.optim.AdamW(p, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)


def _cbs(args: argparse.Namespace, seed: int, data, done: set) -> Iterator[dict]:
    """``bl`` with a constant LR, stopped after each of ``--cbs-epochs``; the critical
    batch and both noise scales from each checkpoint."""
    train = Subset(data.train_x.dataset, _spread(args.train_windows, len(data.train_y)))
    out = Path(tempfile.mkdtemp(prefix="bench-lm-cbs-")) / "run"
    torch.manual_seed(seed)
    model = _model(args)
    settings = dict(
        method="bl", epochs=args.epochs, batch_size=args.b0, max_batch_size=args.bmax,
        seed=seed, device="cpu", workers=0, lr_decay_epochs=[], verbose=False,
        optimizer=_adamw(args), out=out,
    )  # fmt: skip
    stopped = 0
    for epoch in args.cbs_epochs:
        largebatch.fit(model, train, stop_after=epoch - stopped, resume=stopped > 0, **settings)
        stopped = epoch
        if (seed, epoch) in done:
            continue
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        saved = torch.load(out / "checkpoint.pt", weights_only=True)
        probe = _model(args)
        probe.load_state_dict(saved["model"])
        optimizer = _adamw(args)(probe.parameters())
        optimizer.load_state_dict(saved["optimizer"])
        started = time.perf_counter()
        result = critical_batch(
            probe, optimizer, train, args.cbs_batches, args.cbs_windows, batch_at=args.b0,
            probe_samples=1024, noise_batches=4, seed=seed, show_progress=False,
            say=lambda _: None,
        )  # fmt: skip
        yield {
            "seed": seed, "epoch": epoch, "tokens": records[-1]["tokens"],
            "critical_batch": result["critical_batch"],
            "cbs_noise_scale": result["noise_scale"],
            "cbs_noise_scale_preconditioned": result["noise_scale_preconditioned"],
            "meter_gns": records[-1].get("gns"),
            "meter_gns_preconditioned": records[-1].get("gns_preconditioned"),
            "start_loss": result["start_loss"],
            "branches": {b["batch_size"]: b["final_loss"] for b in result["branches"]},
            "seconds": round(time.perf_counter() - started, 1),
            "settings": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if k not in ("out", "seeds", "cbs_file")
            },
        }  # fmt: skip


def _cbs_summary(path: Path) -> dict:
    """Which noise scale predicts the critical batch: per checkpoint, the critical batch
    and both noise scales; over all, the mean |log2(noise scale / critical batch)| and
    how often each moved the way the critical batch moved between a seed's checkpoints."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = {"plain": "cbs_noise_scale", "preconditioned": "cbs_noise_scale_preconditioned"}
    out = {"checkpoints": [
        {"seed": r["seed"], "epoch": r["epoch"], "critical_batch": r["critical_batch"],
         **{name: r[key] for name, key in keys.items()}}
        for r in rows
    ]}  # fmt: skip
    for name, key in keys.items():
        errors = [abs(math.log2(r[key] / r["critical_batch"])) for r in rows]
        steps = [
            (b["critical_batch"] - a["critical_batch"]) * (b[key] - a[key]) > 0
            for a, b in zip(rows, rows[1:], strict=False)
            if a["seed"] == b["seed"] and a["critical_batch"] != b["critical_batch"]
        ]
        out[name] = {
            "mean_abs_log2_error": statistics.mean(errors),
            "moved_with_the_critical_batch": f"{sum(steps)} of {len(steps)}",
        }
    return out


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
    cbs = path.parent / "cbs.jsonl"
    if cbs.exists():
        table["noise_scale_against_cbs"] = _cbs_summary(cbs)
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


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lm_runs.jsonl"))
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--seeds", type=_ints, default=[0, 1, 2])
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
    parser.add_argument("--cbs", action="store_true", help="critical batch against noise scales")
    parser.add_argument("--cbs-epochs", type=_ints, default=[1, 2, 4])
    parser.add_argument("--cbs-batches", type=_ints, default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--cbs-windows", type=int, default=16384, help="samples per branch")
    parser.add_argument(
        "--cbs-file", type=Path, help="--cbs's output (default: cbs.jsonl by --out)"
    )
    parser.add_argument("--cbs-from", type=int, default=1, help="the cbs method's checkpoint epoch")
    parser.add_argument("--methods", type=lambda t: t.split(","), default=list(METHODS))
    parser.add_argument("--lr-rules", type=lambda t: t.split(","), default=["constant", "decay"])
    parser.add_argument(
        "--variant", action="append", default=[], type=_variant, metavar="NAME=KEY:VALUE,...",
        help="a method of its own with fit config keys: gns-t4=method:gns,gns_tolerance:0.4",
    )  # fmt: skip
    args = parser.parse_args()
    args.variants = dict(args.variant)
    args.methods += [name for name in args.variants if name not in args.methods]
    args.cbs_file = args.cbs_file or args.out.parent / "cbs.jsonl"
    if args.summary:
        _summarize(args.out)
        return
    torch.set_num_threads(args.threads)
    data = load_text(args.corpus, args.seq_len)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.cbs:
        done = set()
        if args.out.exists():
            lines = args.out.read_text().splitlines()
            done = {(r["seed"], r["epoch"]) for r in map(json.loads, filter(None, lines))}
        for seed in args.seeds:
            for row in _cbs(args, seed, data, done):
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "settings"}), flush=True)
        return
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
