"""Tables and figures from finished runs: ``largebatch report DIR``.

Everything here is a pure function of the files the runs wrote (``config.yaml``,
``metrics.jsonl``, ``summary.json``, and from ``compare`` also ``robust.json`` and
``hessian.json``): :func:`collect_runs` reads them, :func:`summarize` groups runs that
differ only in their seed into rows with mean and spread, and the ``plot_*`` functions
draw figures from the same data.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from largebatch.errors import UsageError
from largebatch.figures import pyplot, save
from largebatch.io import atomic_write_text, read_jsonl

__all__ = [
    "collect_runs",
    "summarize",
    "markdown_table",
    "plot_accuracy_vs_updates",
    "plot_schedules",
    "plot_curvature_vs_batch",
    "write_report",
]

#: config keys that tell groups apart (everything the table shows as a setting)
GROUP_KEYS = ("dataset", "model", "method", "batch_size", "max_batch_size", "adversarial")


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; None if it is absent. Unreadable JSON is a UsageError."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not readable JSON ({exc}); remove or fix it") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# What each file of a run must hold for the tables and figures (key: check).
_NUMBER_OR_NONE = (lambda v: v is None or _is_number(v), "a number or null")
_SHAPES: dict[str, dict[str, tuple[Any, str]]] = {
    "summary": {
        "final_test_acc": _NUMBER_OR_NONE,  # null: the run's dataset has no test split
        "best_test_acc": _NUMBER_OR_NONE,
        "updates": (_is_number, "a number"),
        "wall_s": (_is_number, "a number"),
        "hessian_s": (_is_number, "a number"),
        "final_batch_size": (_is_number, "a number"),
    },
    "config": {
        "dataset": (lambda v: isinstance(v, str), "a string"),
        "model": (lambda v: isinstance(v, str), "a string"),
        "method": (lambda v: isinstance(v, str), "a string"),
        "batch_size": (_is_number, "a number"),
        "max_batch_size": (_is_number, "a number"),
    },
    "epoch": {
        "epoch": (_is_number, "a number"),
        "updates": (_is_number, "a number"),
        "batch_size": (_is_number, "a number"),
        "lr": (_is_number, "a number"),
        "test_acc": _NUMBER_OR_NONE,
        "eigenvalue": _NUMBER_OR_NONE,
    },
    "robust": {
        "clean_acc": _NUMBER_OR_NONE,
        "fgsm_acc": _NUMBER_OR_NONE,
        "pgd_acc": _NUMBER_OR_NONE,
    },
}


def _checked(value: Any, shape: str, path: Path, optional_keys: bool = False) -> dict[str, Any]:
    """``value`` if it is a mapping whose keys hold what the report needs."""
    if not isinstance(value, dict):
        raise UsageError(f"{path} does not hold a largebatch {shape} (not a mapping)")
    for key, (check, wanted) in _SHAPES[shape].items():
        if key not in value:
            if optional_keys or (shape == "epoch" and key == "eigenvalue"):
                continue
            raise UsageError(f"{path} does not hold a largebatch {shape}: no {key!r}")
        if not check(value[key]):
            raise UsageError(
                f"{path} does not hold a largebatch {shape}: {key!r} is {value[key]!r}, "
                f"not {wanted}"
            )
    return value


def _read_run(folder: Path, summary_path: Path) -> dict[str, Any] | None:
    """One finished run's files, checked; None if it has no config (not a run)."""
    run = summary_path.parent
    config_path = run / "config.yaml"
    if not config_path.exists():
        return None
    summary = _checked(_read_json(summary_path), "summary", summary_path)
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{config_path} is not readable YAML ({reason})") from None
    config = _checked(config, "config", config_path)
    adversarial = config.get("adversarial")
    config["adversarial"] = (
        bool(adversarial) if adversarial is not None else config.get("method") == "absa"
    )
    metrics = run / "metrics.jsonl"
    try:
        history = read_jsonl(metrics) if metrics.exists() else []
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{metrics} is not readable ({exc})") from None
    for record in history:
        _checked(record, "epoch", metrics)
    robust = _read_json(run / "robust.json") or {}
    hessian = _read_json(run / "hessian.json") or {}
    if not isinstance(hessian, dict):
        raise UsageError(f"{run / 'hessian.json'} does not hold a largebatch Hessian result")
    eigenvalues = hessian.get("eigenvalues") or {}
    values = eigenvalues.get("values", [None]) if isinstance(eigenvalues, dict) else None
    if not isinstance(values, list) or not values or not _NUMBER_OR_NONE[0](values[0]):
        raise UsageError(f"{run / 'hessian.json'} has no list of eigenvalues")
    return {
        "name": str(run.relative_to(folder)),
        "config": config,
        "summary": summary,
        "history": history,
        "robust": _checked(robust, "robust", run / "robust.json", optional_keys=True),
        "hessian": hessian,
    }


def collect_runs(folder: str | Path) -> list[dict[str, Any]]:
    """Every finished run under ``folder`` (or ``folder/runs``), sorted by name.

    A run is a folder with ``summary.json`` and ``config.yaml``. A file that does not hold
    what the report needs is a UsageError naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of runs")
    runs = []
    for summary_path in sorted(folder.rglob("summary.json")):
        run = _read_run(folder, summary_path)
        if run is not None:
            runs.append(run)
    if not runs:
        raise UsageError(f"no finished runs (summary.json) under {folder}")
    return runs


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; no spread (None) from fewer than two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    spread = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), spread


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group of runs that differ only in seed: mean and std over seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[tuple(run["config"].get(k) for k in GROUP_KEYS)].append(run)
    rows = []
    for key, everyone in groups.items():
        row: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        # runs trained to a target loss that did not reach it are counted, not averaged
        members = [m for m in everyone if m["summary"].get("reached_target") is not False]
        if any("reached_target" in m["summary"] for m in everyone):
            row["reached_target"] = f"{len(members)}/{len(everyone)}"
        row["seeds"] = len(members)
        summaries = [m["summary"] for m in members]
        for name in ("final_test_acc", "best_test_acc", "updates", "wall_s", "final_batch_size"):
            row[name], row[f"{name}_std"] = _mean_std(s.get(name) for s in summaries)
        row["hessian_share"], _ = _mean_std(
            s["hessian_s"] / s["wall_s"] if s.get("wall_s") else None for s in summaries
        )
        for name in ("clean_acc", "fgsm_acc", "pgd_acc"):
            row[name], row[f"{name}_std"] = _mean_std(m["robust"].get(name) for m in members)
        row["top_eigenvalue"], row["top_eigenvalue_std"] = _mean_std(
            (m["hessian"].get("eigenvalues") or {}).get("values", [None])[0] for m in members
        )
        rows.append(row)
    rows.sort(
        key=lambda r: (
            tuple(str(r[k]) for k in ("dataset", "model"))
            + (
                _METHOD_ORDER.get(r["method"], 9),
                r["max_batch_size"] or 0,
                r["batch_size"] or 0,
                bool(r["adversarial"]),
            )
        )
    )
    _add_update_ratios(rows)
    return rows


_METHOD_ORDER = {"bl": 0, "fb": 1, "gg": 2, "abs": 3, "absa": 4, "gns": 5}


def _add_update_ratios(rows: list[dict[str, Any]]) -> None:
    """Updates relative to the smallest-batch BL run of the same dataset and model."""
    reference: dict[tuple, float] = {}
    for row in rows:
        if row["method"] == "bl" and not row["adversarial"] and row["updates"]:
            key = (row["dataset"], row["model"])
            if key not in reference or row["batch_size"] < reference[key][0]:
                reference[key] = (row["batch_size"], row["updates"])
    for row in rows:
        ref = reference.get((row["dataset"], row["model"]))
        row["updates_vs_bl"] = row["updates"] / ref[1] if ref and row["updates"] else None


def _pct(mean: float | None, std: float | None) -> str:
    """A percentage, with its spread over seeds when there is one."""
    if mean is None:
        return "-"
    if std is None:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The paper's table: accuracy (mean ± std over seeds, in %), cost and robustness.

    Runs trained to a target loss add a column, how many runs of the group reached it;
    the other columns average only those that did (``seeds`` counts them)."""
    header = (
        "| dataset | model | method | B0 | Bmax | adv | seeds | test acc % | updates "
        "| updates / BL | final B | wall s | Hessian % | FGSM acc % | PGD acc % | top eig |"
    )
    targets = any("reached_target" in r for r in rows)
    if targets:  # runs trained to a target loss: how many of each group reached it
        header += " target reached |"
    lines = [header, "|" + "|".join([" --- "] * (header.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['method']} | {r['batch_size']} "
            f"| {r['max_batch_size']} | {'yes' if r['adversarial'] else 'no'} | {r['seeds']} "
            f"| {_pct(r['final_test_acc'], r['final_test_acc_std'])} "
            f"| {_num(r['updates'], '.0f')} | {_num(r['updates_vs_bl'], '.3f')} "
            f"| {_num(r['final_batch_size'], '.0f')} | {_num(r['wall_s'], '.0f')} "
            f"| {_num(None if r['hessian_share'] is None else 100 * r['hessian_share'], '.1f')} "
            f"| {_pct(r['fgsm_acc'], r['fgsm_acc_std'])} | {_pct(r['pgd_acc'], r['pgd_acc_std'])} "
            f"| {_num(r['top_eigenvalue'], '.4g')} |"
            + (f" {r.get('reached_target', '-')} |" if targets else "")
        )
    return "\n".join(lines)


def _label(config: dict[str, Any]) -> str:
    text = f"{config['method']} Bmax={config['max_batch_size']}"
    if config["method"] == "bl":
        text = f"bl B={config['batch_size']}"
    if config["adversarial"] and config["method"] != "absa":
        text += " +adv"
    return text


def _colors(labels: Iterable[str]) -> dict[str, Any]:
    cmap = pyplot().get_cmap("tab10")
    return {label: cmap(i % 10) for i, label in enumerate(sorted(set(labels)))}


def plot_accuracy_vs_updates(runs: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Test accuracy against optimizer updates (log scale), one colour per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = _colors(_label(r["config"]) for r in runs)
    shown = set()
    for run in runs:
        label = _label(run["config"])
        tested = [h for h in run["history"] if h["test_acc"] is not None]
        if not tested:
            continue
        x = [h["updates"] for h in tested]
        y = [100 * h["test_acc"] for h in tested]
        ax.plot(
            x,
            y,
            marker="o",
            ms=3,
            color=colors[label],
            label=None if label in shown else label,
            alpha=0.85,
        )
        shown.add(label)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer updates (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if shown:
        ax.legend(fontsize=8)
    save(fig, Path(path))


def plot_schedules(runs: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Batch size, learning rate and top eigenvalue against epoch."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), dpi=120)
    colors = _colors(_label(r["config"]) for r in runs)
    shown = set()
    for run in runs:
        label = _label(run["config"])
        epochs = [h["epoch"] for h in run["history"]]
        kw = {"color": colors[label], "alpha": 0.85, "marker": "o", "ms": 3}
        axes[0].plot(
            epochs,
            [h["batch_size"] for h in run["history"]],
            label=None if label in shown else label,
            **kw,
        )
        axes[1].plot(epochs, [h["lr"] for h in run["history"]], **kw)
        eig = [(h["epoch"], h["eigenvalue"]) for h in run["history"] if h.get("eigenvalue")]
        if eig:
            axes[2].plot(*zip(*eig, strict=True), **kw)
        shown.add(label)
    for ax, name in zip(axes[:2], ("global batch size", "learning rate"), strict=True):
        ax.set_yscale("log")
        ax.set_ylabel(name + " (log scale)")
    axes[2].set_ylabel("top Hessian eigenvalue")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    save(fig, Path(path))


def plot_curvature_vs_batch(rows: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """The analysis paper's figure: top eigenvalue and robust accuracy against batch size,
    for fixed-batch runs with and without adversarial training."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for adversarial, style in ((False, "-"), (True, "--")):
        group = sorted(
            (r for r in rows if r["method"] == "bl" and bool(r["adversarial"]) == adversarial),
            key=lambda r: r["batch_size"],
        )
        if not group:
            continue
        tag = "adversarial training" if adversarial else "standard training"
        batches = [r["batch_size"] for r in group]
        eig = [
            (b, r["top_eigenvalue"])
            for b, r in zip(batches, group, strict=True)
            if r["top_eigenvalue"] is not None
        ]
        if eig:
            axes[0].plot(*zip(*eig, strict=True), style, marker="o", label=tag)
        for attack, marker in (("clean_acc", "o"), ("fgsm_acc", "s"), ("pgd_acc", "^")):
            acc = [
                (b, 100 * r[attack])
                for b, r in zip(batches, group, strict=True)
                if r[attack] is not None
            ]
            if acc:
                axes[1].plot(
                    *zip(*acc, strict=True),
                    style,
                    marker=marker,
                    label=f"{attack.split('_')[0]}, {tag}",
                )
    axes[0].set_ylabel("top Hessian eigenvalue of the final model")
    axes[1].set_ylabel("test accuracy (%)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save(fig, Path(path))


def write_report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNG figures into ``out`` (default ``folder``), and
    ``claims.md`` with its figures when the runs form a batch-size study
    (:func:`largebatch.claims.write_claims`)."""
    folder = Path(folder)
    out = Path(out) if out is not None else folder
    runs = collect_runs(folder)
    rows = summarize(runs)
    sections = [
        "# largebatch report",
        "",
        f"{len(runs)} runs under `{folder}`.",
        "",
        markdown_table(rows),
        "",
    ]
    by_setting: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_setting[(run["config"]["dataset"], run["config"]["model"])].append(run)
    for (dataset, model), group in sorted(by_setting.items()):
        stem = f"{dataset}-{model}"
        title = f"{model} on {dataset}"
        sections += [f"## {title}", ""]
        plot_accuracy_vs_updates(group, out / f"{stem}-accuracy-vs-updates.png", title)
        sections += [f"![accuracy against updates]({stem}-accuracy-vs-updates.png)", ""]
        plot_schedules(group, out / f"{stem}-schedules.png", title)
        sections += [f"![schedules]({stem}-schedules.png)", ""]
        group_rows = [r for r in rows if (r["dataset"], r["model"]) == (dataset, model)]
        bl_batches = {r["batch_size"] for r in group_rows if r["method"] == "bl"}
        if len(bl_batches) > 1:
            plot_curvature_vs_batch(group_rows, out / f"{stem}-curvature-vs-batch.png", title)
            sections += [f"![curvature and robustness]({stem}-curvature-vs-batch.png)", ""]
    from largebatch.claims import write_claims

    if write_claims(runs, out, folder=str(folder)) is not None:
        sections += [
            "The analysis paper's claims, judged from these runs: [claims.md](claims.md).",
            "",
        ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(sections))
    return path
