"""The analysis paper's claims, judged from a batch-size study: ``claims.md``.

A study is a ``compare`` grid of fixed-batch (``bl``) runs at two or more batch sizes,
trained to one training loss, with and without adversarial training, over seeds, each
final model evaluated (``robust.json``: attacks at several eps, the generalization gap)
and analysed (``hessian.json``: top eigenvalue, trace, density). :func:`write_claims`
gives one row per claim of "Hessian-based analysis of large batch training and
robustness to adversaries" (Yao et al., 2018) for each dataset and model: the numbers
behind it (mean ± std over seeds) and a verdict, with the rule that decided it.

Verdicts: **shown** (the difference goes the claimed way and Welch's t-test over seeds
gives p < 0.05), **contradicted** (it goes the other way with p < 0.05), **not shown**
(no difference at that level). With three seeds a test has little power: a real but
small effect can read "not shown".
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largebatch.figures import pyplot, save
from largebatch.hessian.results import NEGATIVE_THRESHOLD
from largebatch.io import atomic_write_text

__all__ = ["Cell", "study_cells", "judge", "write_claims", "SIGNIFICANCE", "NEGATIVE_SHARE"]

#: p-value below which a difference over seeds counts (Welch's two-sided t-test).
SIGNIFICANCE = 0.05
#: A spectrum's negative part is significant when more than this share of its
#: eigenvalues lie below -NEGATIVE_THRESHOLD times the spectral radius.
NEGATIVE_SHARE = 0.01
#: A run reached the common training loss when its final one is within 5% of the target.
TARGET_SLACK = 0.05


@dataclass
class Cell:
    """The runs of one batch size, with or without adversarial training, over seeds."""

    batch_size: int
    adversarial: bool
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, measure: str) -> list[float]:
        """``measure`` (a key of :func:`measures`) of each run that has it."""
        found = (measures(run).get(measure) for run in self.runs)
        return [v for v in found if v is not None and math.isfinite(v)]


def measures(run: dict[str, Any]) -> dict[str, float | None]:
    """What the claims read from one run: the curvature (``eig``: top eigenvalue,
    ``trace``, ``negative_mass``, ``min_ratio``: the most negative node over the top
    eigenvalue), accuracies in % (``clean``, ``<attack>@<eps>``), the generalization
    ``gap`` (eval-mode training accuracy minus test accuracy, points) and the training
    losses (``train_loss``: the last epoch's, the target's measure)."""
    robust, hessian, summary = run["robust"], run["hessian"], run["summary"]
    eig = _first((hessian.get("eigenvalues") or {}).get("values"))
    density = hessian.get("density") or {}
    out: dict[str, float | None] = {
        "eig": eig,
        "trace": (hessian.get("trace") or {}).get("estimate"),
        "negative_mass": density.get("negative_mass"),
        "min_ratio": (
            density["min_eigenvalue"] / eig
            if density.get("min_eigenvalue") is not None and eig
            else None
        ),
        "clean": _pct(robust.get("clean_acc")),
        "gap": _pct(robust.get("generalization_gap")),
        "train_loss": summary.get("final_train_loss"),
        "eval_train_loss": robust.get("train_loss"),
    }
    rows = robust.get("by_eps")
    if rows is None and robust.get("eps") is not None:  # one eps (an older robust.json)
        rows = [{k: v for k, v in robust.items() if k in ("eps", "fgsm_acc", "pgd_acc")}]
    for row in rows or []:
        for key, value in row.items():
            if key.endswith("_acc") and value is not None:
                out[f"{key[:-4]}@{row['eps']:g}"] = _pct(value)
    return out


def _first(values: Any) -> float | None:
    return values[0] if isinstance(values, list) and values else None


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def study_cells(runs: list[dict[str, Any]]) -> dict[tuple[str, str], list[Cell]]:
    """The runs of each (dataset, model) that form a batch-size study, by cell: ``bl``
    runs with a Hessian analysis at two or more batch sizes. Other settings are left out."""
    grouped: dict[tuple[str, str], dict[tuple[int, bool], Cell]] = defaultdict(dict)
    for run in runs:
        config = run["config"]
        if config.get("method") != "bl" or measures(run)["eig"] is None:
            continue
        key = (int(config["batch_size"]), bool(config["adversarial"]))
        cells = grouped[(config["dataset"], config["model"])]
        cells.setdefault(key, Cell(*key)).runs.append(run)
    return {
        setting: sorted(cells.values(), key=lambda c: (c.adversarial, c.batch_size))
        for setting, cells in sorted(grouped.items())
        if len({c.batch_size for c in cells.values()}) >= 2
    }


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test of ``mean(b) != mean(a)``; None from fewer than
    two values a side. Equal values on both sides differ with p 0 when the means differ."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    scale = max(abs(v) for v in a + b) or 1.0
    if max(statistics.pvariance(a), statistics.pvariance(b)) <= (1e-12 * scale) ** 2:
        return 1.0 if math.isclose(statistics.fmean(a), statistics.fmean(b)) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


@dataclass
class Finding:
    """One comparison: ``b`` against ``a`` of one measure, and what it says."""

    label: str
    a: list[float]
    b: list[float]
    p: float | None

    @property
    def difference(self) -> float | None:
        if not self.a or not self.b:
            return None
        return statistics.fmean(self.b) - statistics.fmean(self.a)

    def says(self, claimed_sign: int) -> str:
        """``shown``, ``contradicted`` or ``not shown`` for a claimed sign of b - a."""
        d = self.difference
        if d is None or self.p is None or self.p >= SIGNIFICANCE or d == 0:
            return "not shown"
        return "shown" if (d > 0) == (claimed_sign > 0) else "contradicted"

    def text(self, fmt: str) -> str:
        p = "n/a" if self.p is None else f"{self.p:.2g}"
        return f"{self.label}: {_spread(self.a, fmt)} → {_spread(self.b, fmt)} (p {p})"


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return format(mean, fmt)
    return f"{format(mean, fmt)} ± {format(statistics.stdev(values), fmt)}"


def _compare(label: str, a: Cell | None, b: Cell | None, measure: str) -> Finding:
    va = a.values(measure) if a else []
    vb = b.values(measure) if b else []
    return Finding(label, va, vb, welch(va, vb))


def _majority(verdicts: list[str]) -> str:
    """The verdict most findings give, ``not shown`` on a tie or with none."""
    counts = {v: verdicts.count(v) for v in ("shown", "contradicted")}
    for verdict, count in counts.items():
        if count * 2 > len(verdicts):
            return verdict
    return "not shown"


@dataclass
class Claim:
    """A row of ``claims.md``."""

    claim: str
    measure: str
    numbers: list[str]
    verdict: str
    reason: str


def judge(cells: list[Cell]) -> list[Claim]:
    """Every claim's row for one dataset and model."""
    standard = {c.batch_size: c for c in cells if not c.adversarial}
    robust = {c.batch_size: c for c in cells if c.adversarial}
    batches = sorted(standard)
    small, large = (standard[batches[0]], standard[batches[-1]]) if batches else (None, None)
    span = f"B {batches[0]} → {batches[-1]}" if batches else "-"
    return [
        _accuracy_claim(small, large, span),
        _spectrum_claim(small, large, span),
        _robustness_claim(small, large, span),
        _adversarial_claim(standard, robust),
        _saddle_claim(standard),
        _correlation_claim(cells),
    ]


def _accuracy_claim(small: Cell | None, large: Cell | None, span: str) -> Claim:
    test = _compare(f"test acc % {span}", small, large, "clean")
    gap = _compare(f"gap (points) {span}", small, large, "gap")
    verdict = test.says(-1)
    return Claim(
        "Large-batch training loses accuracy (the generalization gap), here at equal training loss",
        "clean test accuracy and train-test accuracy gap, standard training, smallest "
        "against largest batch",
        [test.text(".2f"), gap.text(".2f")],
        verdict,
        _reason(verdict, "test accuracy falls with the batch", "it rises with the batch", test),
    )


def _spectrum_claim(small: Cell | None, large: Cell | None, span: str) -> Claim:
    eig = _compare(f"top eigenvalue {span}", small, large, "eig")
    trace = _compare(f"trace {span}", small, large, "trace")
    verdict = eig.says(+1)
    reason = _reason(
        verdict, "the top eigenvalue rises with the batch", "it falls with the batch", eig
    )
    if trace.a and trace.b:
        agrees = trace.says(+1)
        reason += f"; the trace: {agrees}" + (f" (p {trace.p:.2g})" if trace.p is not None else "")
    return Claim(
        "Large-batch training converges to points with a larger Hessian spectrum",
        f"top eigenvalue (and trace) on {_samples(small, large)}, standard training",
        [eig.text(".3g"), trace.text(".4g")],
        verdict,
        reason,
    )


def _samples(*cells: Cell | None) -> str:
    """The training samples the analysis used, as words."""
    counts = {r["hessian"].get("samples") for c in cells if c for r in c.runs}
    counts.discard(None)
    if not counts:
        return "the training samples analysed"
    return " / ".join(f"{n} training samples" for n in sorted(counts))


def _robustness_claim(small: Cell | None, large: Cell | None, span: str) -> Claim:
    keys = sorted(
        {k for c in (small, large) if c for r in c.runs for k in measures(r) if "@" in k},
        key=lambda k: (k.split("@")[0], float(k.split("@")[1])),
    )
    pgd = [k for k in keys if k.startswith("pgd@")] or keys
    findings = [
        _compare(f"{k.replace('@', ' acc % at eps ')} {span}", small, large, k) for k in pgd
    ]
    verdicts = [f.says(-1) for f in findings]
    verdict = _majority(verdicts)
    reason = (
        f"{verdicts.count('shown')} of {len(findings)} eps lower with p < {SIGNIFICANCE}, "
        f"{verdicts.count('contradicted')} higher"
        if findings
        else "no attack was evaluated"
    )
    return Claim(
        "Large-batch models are less robust to adversarial attacks",
        "PGD accuracy at each eps, standard training, smallest against largest batch",
        [f.text(".1f") for f in findings],
        verdict if findings else "not shown",
        reason + " (robust accuracy follows clean accuracy too: see the first row)",
    )


def _adversarial_claim(standard: dict[int, Cell], robust: dict[int, Cell]) -> Claim:
    common = sorted(set(standard) & set(robust))
    findings = [
        _compare(f"top eigenvalue at B {b}, standard → adversarial", standard[b], robust[b], "eig")
        for b in common
    ]
    verdicts = [f.says(-1) for f in findings]
    lower = sum(1 for f in findings if (f.difference or 0) < 0)
    verdict = _majority(verdicts) if findings else "not shown"
    if verdict == "shown" and lower < len(findings):
        verdict = "not shown"  # a smaller spectrum at most batch sizes but not at all
    reason = (
        f"smaller at {lower} of {len(findings)} batch sizes, {verdicts.count('shown')} "
        f"with p < {SIGNIFICANCE} ({verdicts.count('contradicted')} larger with p < "
        f"{SIGNIFICANCE}); shown needs smaller at every batch size, significantly at most"
        if findings
        else "no adversarially trained runs"
    )
    return Claim(
        "Adversarial training leads to regions with a smaller Hessian spectrum",
        "top eigenvalue with and without adversarial training, at each batch size",
        [f.text(".3g") for f in findings],
        verdict,
        reason,
    )


def _saddle_claim(standard: dict[int, Cell]) -> Claim:
    numbers, significant, measured = [], [], 0
    for batch, cell in sorted(standard.items()):
        mass, ratio = cell.values("negative_mass"), cell.values("min_ratio")
        if not mass:
            continue
        measured += 1
        numbers.append(
            f"B {batch}: negative mass {_spread([100 * m for m in mass], '.2f')} %, "
            f"most negative / top {_spread(ratio, '.3f')}, "
            f"gap {_spread(cell.values('gap'), '.1f')} points"
        )
        if statistics.fmean(mass) > NEGATIVE_SHARE:
            significant.append(batch)
    batches = sorted(standard)
    if not measured:
        verdict, reason = "not shown", "no spectral density was computed"
    elif not significant:
        verdict = "shown"
        grows = _compare("gap", standard[batches[0]], standard[batches[-1]], "gap").says(+1)
        reason = (
            f"at every batch size (up to {batches[-1]}) at most {100 * NEGATIVE_SHARE:g}% of "
            f"the spectrum lies below -{NEGATIVE_THRESHOLD:g} x the spectral radius: the "
            "final points are minima up to a negligible negative part, so saddle points "
            f"do not explain whatever gap there is (the gap grows with the batch: {grows})"
        )
    else:
        grows = _compare("gap", standard[batches[0]], standard[batches[-1]], "gap").says(+1)
        verdict = (
            "contradicted" if batches[-1] in significant and grows == "shown" else ("not shown")
        )
        reason = (
            f"a negative part above {100 * NEGATIVE_SHARE:g}% of the spectrum at B "
            f"{', '.join(map(str, significant))}; the gap grows with the batch: {grows}"
        )
    return Claim(
        "Saddle points are not the cause of the generalization gap: the final spectrum "
        "has no significant negative part, even at the gradient-descent limit",
        f"share of the spectral density below -{NEGATIVE_THRESHOLD:g} x the spectral "
        "radius, and the most negative Ritz value over the top eigenvalue, standard "
        "training, every batch size",
        numbers,
        verdict,
        reason,
    )


def _correlation_claim(cells: list[Cell]) -> Claim:
    runs = [r for c in cells for r in c.runs]
    keys = sorted({k for r in runs for k in measures(r) if k.startswith("pgd@")},
                  key=lambda k: float(k.split("@")[1]))  # fmt: skip
    key = keys[len(keys) // 2] if keys else None
    pairs = [
        (m["eig"], m[key])
        for m in map(measures, runs)
        if key and m.get(key) is not None and m["eig"] is not None
    ]
    if len(pairs) < 4:
        return Claim(
            "Points with a larger Hessian spectrum are less robust to adversarial perturbation",
            "rank correlation of the top eigenvalue and PGD accuracy over all final models",
            [],
            "not shown",
            "fewer than 4 models with both measured",
        )
    from scipy import stats

    if len({e for e, _ in pairs}) < 2 or len({a for _, a in pairs}) < 2:
        rho, p = 0.0, 1.0  # a constant side: no rank correlation to speak of
    else:
        result = stats.spearmanr([e for e, _ in pairs], [a for _, a in pairs])
        rho, p = float(result.statistic), float(result.pvalue)
    if p < SIGNIFICANCE and rho != 0:
        verdict = "shown" if rho < 0 else "contradicted"
    else:
        verdict = "not shown"
    eps = key.split("@")[1]
    return Claim(
        "Points with a larger Hessian spectrum are less robust to adversarial perturbation",
        f"Spearman rank correlation of the top eigenvalue and PGD accuracy at eps {eps} "
        "over every final model (both trainings, every batch size and seed)",
        [f"rho {rho:.2f} over {len(pairs)} models (p {p:.2g})"],
        verdict,
        f"{'negative' if rho < 0 else 'positive'} correlation, p "
        f"{'<' if p < SIGNIFICANCE else '>='} {SIGNIFICANCE}",
    )


def _reason(verdict: str, claimed: str, opposite: str, finding: Finding) -> str:
    p = "n/a" if finding.p is None else f"{finding.p:.2g}"
    if verdict == "shown":
        return f"{claimed}, p {p}"
    if verdict == "contradicted":
        return f"{opposite}, p {p}"
    if finding.p is None:
        return "fewer than two seeds a side: no test"
    return f"the difference is within the spread over seeds (p {p})"


def _target_rows(cells: list[Cell]) -> tuple[list[str], list[str]]:
    """The table of how each cell's runs ended against the common training loss, and
    the cells where a run missed it by more than :data:`TARGET_SLACK`."""
    lines = [
        "| batch | adversarial | runs | reached the target | final training loss "
        "| eval-mode training loss | epochs | updates |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    missed = []
    for cell in cells:
        summaries = [r["summary"] for r in cell.runs]
        target = next((s["target_train_loss"] for s in summaries if "target_train_loss" in s), None)
        reached = sum(1 for s in summaries if s.get("reached_target"))
        losses = cell.values("train_loss")
        if target is not None and any(v > (1 + TARGET_SLACK) * target for v in losses):
            missed.append(f"B {cell.batch_size}{' adversarial' if cell.adversarial else ''}")
        lines.append(
            f"| {cell.batch_size} | {'yes' if cell.adversarial else 'no'} | {len(cell.runs)} "
            f"| {reached if target is not None else '-'} | {_spread(losses, '.4f')} "
            f"| {_spread(cell.values('eval_train_loss'), '.4f')} "
            f"| {_spread([float(s['epochs']) for s in summaries], '.1f')} "
            f"| {_spread([float(s['updates']) for s in summaries], '.0f')} |"
        )
    return lines, missed


def claims_markdown(setting: tuple[str, str], cells: list[Cell], stem: str) -> list[str]:
    """The section of ``claims.md`` for one dataset and model."""
    dataset, model = setting
    targets = {r["summary"].get("target_train_loss") for c in cells for r in c.runs}
    target_text = ", ".join(f"{t:g}" for t in sorted(t for t in targets if t is not None))
    lines = [f"## {model} on {dataset}", ""]
    lines += [
        "### Every batch size at the same training loss",
        "",
        f"Target training loss: {target_text or 'none (equal epochs)'}. The training loss "
        "is the last epoch's running mean over the batches trained on (the adversarial "
        "share included); the eval-mode loss is the final model's on the training set.",
        "",
    ]
    table, missed = _target_rows(cells)
    lines += table + [""]
    if not target_text:
        lines += ["These runs were not trained to a target: differences between batch "
                  "sizes mix the batch with the amount of training.", ""]  # fmt: skip
    elif missed:
        lines += [f"Not within {100 * TARGET_SLACK:g}% of the target: {', '.join(missed)}. "
                  "Their comparisons carry under-training.", ""]  # fmt: skip
    else:
        lines += [f"Every run ended within {100 * TARGET_SLACK:g}% of the target.", ""]
    lines += [
        "### The claims",
        "",
        "| claim | measured | numbers (mean ± std over seeds) | verdict | why |",
        "| --- | --- | --- | --- | --- |",
    ]
    for claim in judge(cells):
        numbers = "<br>".join(claim.numbers) or "-"
        lines.append(
            f"| {claim.claim} | {claim.measure} | {numbers} | **{claim.verdict}** "
            f"| {claim.reason} |"
        )
    lines += [""]
    for figure in _figures(cells):
        lines += [f"![{FIGURES[figure][1]}]({stem}-claims-{figure}.png)", ""]
    return lines


def write_claims(runs: list[dict[str, Any]], out: str | Path, folder: str = "") -> Path | None:
    """Write ``claims.md`` and its figures into ``out`` when ``runs`` hold a batch-size
    study (see :func:`study_cells`); return its path, or None when they do not."""
    studies = study_cells(runs)
    if not studies:
        return None
    out = Path(out)
    lines = [
        "# The analysis paper's claims",
        "",
        f"Judged from the runs under `{folder}`" if folder else "Judged from the runs",
        "",
        'Each claim of Yao et al. (2018), "Hessian-based analysis of large batch training '
        'and robustness to adversaries", with the numbers behind it and a verdict: '
        f"**shown** (the claimed direction, Welch's t-test over seeds p < {SIGNIFICANCE}), "
        f"**contradicted** (the opposite direction, p < {SIGNIFICANCE}) or **not shown**. "
        'With few seeds a test has little power: "not shown" is not "false". The '
        "paper's further claim that the inner loop of robust training is saddle-free "
        "(a statement about the Hessian in the input) is not measured here.",
        "",
    ]
    for setting, cells in studies.items():
        stem = f"{setting[0]}-{setting[1]}"
        lines += claims_markdown(setting, cells, stem)
        title = f"{setting[1]} on {setting[0]}"
        for figure in _figures(cells):
            FIGURES[figure][0](cells, out / f"{stem}-claims-{figure}.png", title)
    path = out / "claims.md"
    atomic_write_text(path, "\n".join(lines))
    return path


_TAGS = ((False, "-", "standard training"), (True, "--", "adversarial training"))


def _errorbars(
    ax: Any, cells: list[Cell], measure: str, label: str, style: str, scale: float = 1.0
) -> None:
    points = []
    for cell in sorted(cells, key=lambda c: c.batch_size):
        values = [scale * v for v in cell.values(measure)]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            points.append((cell.batch_size, statistics.fmean(values), spread))
    if points:
        xs, ys, es = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=es, fmt=style, marker="o", capsize=3, label=label)


def _by_training(cells: list[Cell]) -> Iterable[tuple[list[Cell], str, str]]:
    for adversarial, style, tag in _TAGS:
        group = [c for c in cells if c.adversarial == adversarial]
        if group:
            yield group, style, tag


def _batch_axes(axes: Iterable[Any], title: str, fig: Any) -> None:
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax)
    fig.suptitle(title)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_spectrum(cells: list[Cell], path: Path, title: str) -> None:
    """Top eigenvalue and trace against batch size (mean and std over seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for group, style, tag in _by_training(cells):
        _errorbars(axes[0], group, "eig", tag, style)
        _errorbars(axes[1], group, "trace", tag, style)
    axes[0].set_ylabel("top Hessian eigenvalue")
    axes[1].set_ylabel("Hessian trace")
    _batch_axes(axes, title, fig)
    save(fig, path)


def plot_robustness(cells: list[Cell], path: Path, title: str) -> None:
    """Clean accuracy and each attack's accuracy at each eps against batch size."""
    keys = sorted({k for c in cells for r in c.runs for k in measures(r) if "@" in k},
                  key=lambda k: (k.split("@")[0], float(k.split("@")[1])))  # fmt: skip
    attacks = sorted({k.split("@")[0] for k in keys}) or ["clean"]
    plt = pyplot()
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.5 * len(attacks), 4), dpi=120)
    axes = list(axes) if len(attacks) > 1 else [axes]
    for ax, attack in zip(axes, attacks, strict=True):
        for group, style, tag in _by_training(cells):
            _errorbars(ax, group, "clean", f"clean, {tag}", style)
            for key in (k for k in keys if k.startswith(f"{attack}@")):
                _errorbars(ax, group, key, f"eps {key.split('@')[1]}, {tag}", style)
        ax.set_ylabel(f"{attack.upper()} accuracy (%)")
    _batch_axes(axes, title, fig)
    save(fig, path)


def plot_negative(cells: list[Cell], path: Path, title: str) -> None:
    """The negative part of the spectrum against batch size: its mass and the most
    negative eigenvalue relative to the top one."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for group, style, tag in _by_training(cells):
        _errorbars(axes[0], group, "negative_mass", tag, style, scale=100.0)
        _errorbars(axes[1], group, "min_ratio", tag, style)
    axes[0].axhline(100 * NEGATIVE_SHARE, color="grey", lw=0.8, ls=":")
    axes[0].set_ylabel(f"% of spectrum below -{NEGATIVE_THRESHOLD:g} x radius")
    axes[1].set_ylabel("most negative eigenvalue / top eigenvalue")
    _batch_axes(axes, title, fig)
    save(fig, path)


def plot_densities(cells: list[Cell], path: Path, title: str) -> None:
    """The spectral density of each cell's first run (lowest seed), one panel per training."""
    plt = pyplot()
    trainings = list(_by_training(cells))
    fig, axes = plt.subplots(1, len(trainings), figsize=(5.5 * len(trainings), 4), dpi=120)
    axes = list(axes) if len(trainings) > 1 else [axes]
    for ax, (group, _, tag) in zip(axes, trainings, strict=True):
        for cell in sorted(group, key=lambda c: c.batch_size):
            first = min(cell.runs, key=lambda r: r["config"].get("seed", 0))
            density = first["hessian"].get("density") or {}
            if density.get("grid"):
                values = [max(d, 1e-12) for d in density["density"]]
                ax.semilogy(density["grid"], values, label=f"B {cell.batch_size}")
        ax.set_title(tag)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.set_ylim(bottom=1e-8)
        ax.grid(True, alpha=0.3)
        _legend(ax)
    fig.suptitle(title)
    save(fig, path)


#: The figures of a study: what draws each, its caption.
FIGURES: dict[str, tuple[Callable[[list[Cell], Path, str], None], str]] = {
    "spectrum": (plot_spectrum, "top eigenvalue and trace against batch size"),
    "robustness": (plot_robustness, "clean, FGSM and PGD accuracy against batch size"),
    "negative": (plot_negative, "negative part of the spectrum against batch size"),
    "densities": (plot_densities, "spectral densities of the seed-0 models"),
}


def _figures(cells: list[Cell]) -> list[str]:
    """The figures that ``cells`` have data for."""
    runs = [r for c in cells for r in c.runs]
    names = ["spectrum"]
    if any("@" in k for r in runs for k in measures(r)):
        names.append("robustness")
    if any((r["hessian"].get("density") or {}).get("negative_mass") is not None for r in runs):
        names += ["negative", "densities"]
    return names
