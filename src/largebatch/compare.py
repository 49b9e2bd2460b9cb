"""Run a grid of training runs and evaluate each: ``largebatch compare``.

An experiment file is YAML::

    base:                      # config keys shared by every run
      dataset: fashion-mnist
      model: c1
      epochs: 9
    grid:                      # every combination of these values is one run
      method: [bl, fb, gg, abs, absa]
      max_batch_size: [4096]
      seed: [0, 1, 2]
      point:                   # a mapping sets several keys together (a bundle)
        - {batch_size: 32, lr: 0.02}
        - {batch_size: 1024, lr: 0.113}
    evaluate:                  # robustness of each final model (optional)
      attacks: [fgsm, pgd]
      eps: 0.02                # or a list: every attack at every eps
      pgd_steps: 10
    hessian:                   # curvature of each final model (optional)
      samples: 256             # or all: the whole training set, streamed
      top_k: 1
      trace: false
      density: false           # with the negative mass and most negative eigenvalue

A grid key whose values are mappings (``point`` above) is a bundle: each mapping's keys
are set together, and the run's name shows their values (``b32-lr0.02``).

Each run trains into ``OUT/runs/<name>/``. A finished run (its summary and evaluations
written) is skipped, an interrupted one resumed, and a failed one recorded in its
``error.txt`` without stopping the grid.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from largebatch.analysis import analyze_checkpoint, check_analysis
from largebatch.config import TrainConfig, apply_overrides, check_number, read_yaml
from largebatch.errors import ConfigError, UsageError
from largebatch.evaluate import check_evaluation
from largebatch.io import atomic_write_json, atomic_write_text
from largebatch.outputs import RunFolder

__all__ = ["Experiment", "load_experiment", "expand_grid", "run_name", "run_experiment"]

_SECTIONS = {"base", "grid", "evaluate", "hessian"}
# Characters a run's folder name keeps; any other (a path separator in a grid value such
# as data_dir: [../x]) becomes "_", so every run stays one folder under OUT/runs.
_UNSAFE = re.compile(r"[^A-Za-z0-9._+,=-]")
_SHORT = {
    "method": "",
    "max_batch_size": "bmax",
    "batch_size": "b",
    "seed": "seed",
    "adversarial": "adv",
}


#: Options of the ``hessian`` section (those of :func:`~largebatch.analysis.analyze_checkpoint`).
HESSIAN_OPTIONS = (
    "samples", "batch_size", "top_k", "tol", "trace", "trace_probes", "trace_tol", "density",
    "density_probes", "lanczos_steps",
)  # fmt: skip


@dataclass
class Experiment:
    """A grid of runs: ``base`` config keys, ``grid`` keys with value lists, evaluations.

    ``eps``: every attack runs at each of them. ``hessian``: the options of
    :func:`~largebatch.analysis.analyze_checkpoint` for each final model (None: no
    analysis).
    """

    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    attacks: list[str] = field(default_factory=lambda: ["fgsm"])
    eps: list[float] = field(default_factory=lambda: [0.02])
    pgd_steps: int = 10
    eval_limit: int | None = None
    hessian: dict[str, Any] | None = None

    def evaluation(self) -> dict[str, Any]:
        """The evaluation settings, as ``robust.json`` records them."""
        return {"attacks": self.attacks, "eps": self.eps, "pgd_steps": self.pgd_steps,
                "limit": self.eval_limit}  # fmt: skip


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and check an experiment file; every run's config is validated up front.

    ``overrides`` (from ``--set``) replace keys of the ``base`` section.
    """
    path = Path(path)
    raw = read_yaml(path, "experiment file")
    if not isinstance(raw, dict) or not set(raw) <= _SECTIONS:
        raise ConfigError(
            f"experiment file {path} must be a mapping with sections {sorted(_SECTIONS)}"
        )
    grid = _checked_grid(raw.get("grid") or {}, path)
    evaluate = raw.get("evaluate") or {}
    hessian = raw.get("hessian") or {}
    if not isinstance(evaluate, dict) or not isinstance(hessian, dict):
        raise ConfigError(f"{path}: evaluate and hessian must be mappings")
    unknown = set(evaluate) - {"attacks", "eps", "pgd_steps", "limit"}
    unknown |= {f"hessian.{k}" for k in set(hessian) - set(HESSIAN_OPTIONS)}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: base must be a mapping of config key: value")
    fixed = (set(base) | set(overrides or {}) | set(grid)) & {"out", "resume"}
    if fixed:
        raise ConfigError(
            f"{path}: compare sets {' and '.join(sorted(fixed))} itself (each run goes to "
            "OUT/runs/<name> and resumes); remove it from base, grid and --set"
        )
    attacks = evaluate.get("attacks", ["fgsm"])
    if not isinstance(attacks, list) or not all(isinstance(a, str) for a in attacks):
        raise ConfigError(f"{path}: evaluate.attacks must be a list, e.g. [fgsm, pgd]")
    bad = set(attacks) - {"fgsm", "pgd"}
    if bad:
        raise ConfigError(f"{path}: unknown attacks {sorted(bad)}; choose from fgsm, pgd")
    eps = evaluate.get("eps", 0.02)
    eps = eps if isinstance(eps, list) else [eps]
    experiment = Experiment(
        base={**base, **(overrides or {})},
        grid=grid,
        attacks=list(attacks),
        eps=eps,
        pgd_steps=evaluate.get("pgd_steps", 10),
        eval_limit=evaluate.get("limit"),
        hessian=dict(hessian) or None,
    )
    try:
        if not eps:
            raise ConfigError("eps must be a number or a non-empty list of numbers")
        for value in eps:
            check_evaluation("none", value, experiment.pgd_steps)
        if experiment.eval_limit is not None:
            check_number("limit", experiment.eval_limit, low=1, integer=True)
        if experiment.hessian is not None:
            check_analysis(**experiment.hessian)
    except (ConfigError, UsageError) as exc:
        raise ConfigError(f"{path}: evaluate/hessian section: {exc}") from None
    experiment.eps = [float(e) for e in eps]
    for _, config in expand_grid(experiment, Path(".")):
        config.validate()
    return experiment


def _checked_grid(grid: Any, path: Path) -> dict[str, list[Any]]:
    """The grid section: config keys (or bundle names) to non-empty lists of values; a
    bundle lists mappings of config keys only."""
    if not isinstance(grid, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and v for k, v in grid.items()
    ):
        raise ConfigError(f"{path}: grid must map config keys to non-empty lists of values")
    for key, values in grid.items():
        bundles = [isinstance(v, dict) for v in values]
        if any(bundles) and not all(bundles):
            raise ConfigError(
                f"{path}: grid.{key} mixes mappings and plain values; a bundle key lists "
                "mappings of config keys only"
            )
        if bundles[0] and any(not v or not all(isinstance(k, str) for k in v) for v in values):
            raise ConfigError(f"{path}: grid.{key}: each bundle must map config keys to values")
    return grid


def run_name(values: dict[str, Any]) -> str:
    """A folder name from a grid point, e.g. ``absa-bmax4096-seed0``: one path component,
    not hidden, with characters other than letters, digits and ``._+,=-`` as ``_``."""
    parts = []
    for key, value in values.items():
        if isinstance(value, dict):  # a bundle: its keys' values, not the bundle's name
            parts.append(run_name(value))
            continue
        text = "-".join(str(v) for v in value) if isinstance(value, list) else str(value)
        parts.append(f"{_SHORT.get(key, key.replace('_', ''))}{text}")
    name = _UNSAFE.sub("_", "-".join(parts)).lstrip(".")
    return name or "run"


def expand_grid(experiment: Experiment, out: Path) -> list[tuple[str, TrainConfig]]:
    """Every (name, config) of the grid, in a stable order, writing under ``out/runs``."""
    base = apply_overrides(TrainConfig(), experiment.base)
    keys = list(experiment.grid)
    runs = []
    for combo in itertools.product(*(experiment.grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        name = run_name(values)
        config = apply_overrides(base, _flatten(values))
        config = dataclasses.replace(config, out=str(out / "runs" / name), resume=True)
        runs.append((name, config))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError("two grid points give the same run name; make the grid values distinct")
    return runs


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    """A grid point's config keys, a bundle's keys set in place of the bundle."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        for name, item in value.items() if isinstance(value, dict) else [(key, value)]:
            if name in flat:
                raise ConfigError(f"grid: {name} is set twice in one grid point (by {key})")
            flat[name] = item
    return flat


def _finished(run: Path, experiment: Experiment) -> bool:
    """Whether ``run`` is trained and evaluated as ``experiment`` now asks: a changed
    ``evaluate`` or ``hessian`` section evaluates again (without training again)."""
    return (run / "summary.json").exists() and not _missing(run, experiment)


def _missing(run: Path, experiment: Experiment) -> list[str]:
    """The evaluations of ``run`` not yet made with ``experiment``'s settings."""
    missing, model = [], _model_stamp(run)
    robust = _stored(run / "robust.json")
    if (
        robust is None
        or robust.get("settings") != experiment.evaluation()
        or (robust.get("model") != model)
    ):
        missing.append("robust.json")
    if experiment.hessian is not None:
        hessian = _stored(run / "hessian.json")
        if (
            hessian is None
            or hessian.get("settings") != experiment.hessian
            or (hessian.get("model") != model)
        ):
            missing.append("hessian.json")
    return missing


def _model_stamp(run: Path) -> list[int] | None:
    """Which final model an evaluation was made of: the checkpoint's size and time."""
    try:
        stat = (run / "checkpoint.pt").stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _stored(path: Path) -> dict[str, Any] | None:
    """A JSON mapping written by an earlier evaluation; None when absent or unreadable."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _evaluate_run(run: Path, experiment: Experiment) -> None:
    """``robust.json``: clean test accuracy, each attack at each eps (the first eps also
    as ``<attack>_acc``), and the eval-mode accuracy and loss on the training set and the
    test set with their gap; ``hessian.json``: the analysis of the final model. Each is
    made again only when its settings changed."""
    ckpt = run / "checkpoint.pt"
    missing = _missing(run, experiment)
    if "robust.json" in missing:
        _evaluate_robustness(ckpt, run, experiment)
    if "hessian.json" in missing:
        assert experiment.hessian is not None
        result = analyze_checkpoint(ckpt, **experiment.hessian, say=lambda _line: None)
        result.update(settings=experiment.hessian, model=_model_stamp(run))
        atomic_write_json(run / "hessian.json", result)


def _evaluate_robustness(ckpt: Path, run: Path, experiment: Experiment) -> None:
    from largebatch.evaluate import evaluate_checkpoint

    limit = experiment.eval_limit
    clean = evaluate_checkpoint(ckpt, limit=limit)
    train = evaluate_checkpoint(ckpt, split="train")
    results: dict[str, Any] = {
        "clean_acc": clean["clean_acc"],
        "test_loss": clean["clean_loss"],
        "train_acc": train["clean_acc"],
        "train_loss": train["clean_loss"],
        "generalization_gap": train["clean_acc"] - clean["clean_acc"],
        "by_eps": [],
    }
    for eps in experiment.eps:
        row: dict[str, Any] = {"eps": eps}
        for attack in experiment.attacks:
            result = evaluate_checkpoint(
                ckpt, attack=attack, eps=eps, steps=experiment.pgd_steps, limit=limit
            )
            row[f"{attack}_acc"] = result["adv_acc"]
        results["by_eps"].append(row)
    first = results["by_eps"][0]
    results.update({f"{a}_acc": first[f"{a}_acc"] for a in experiment.attacks})
    results.update(eps=first["eps"], pgd_steps=experiment.pgd_steps)
    results.update(settings=experiment.evaluation(), model=_model_stamp(run))
    atomic_write_json(run / "robust.json", results)


def run_experiment(
    experiment: Experiment,
    out: str | Path,
    show_progress: bool | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, str]:
    """Run every grid point not yet finished; return ``{name: "done"|"skipped"|"failed"}``."""
    out = Path(out)
    _check_not_a_run(out)
    runs = expand_grid(experiment, out)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    with RunFolder(out):  # a second compare on the same folder is refused
        return _run_grid(experiment, out, runs, show_progress, echo)


def _check_not_a_run(out: Path) -> None:
    """A grid's folder holds its runs in ``runs/``; the folder of one training run (its
    files at the top) would be pooled with them in the report."""
    for name in ("checkpoint.pt", "summary.json"):
        if (out / name).exists():
            raise UsageError(
                f"--out {out} is the folder of a training run (it holds {name}); give the "
                "grid a folder of its own"
            )


def _run_grid(
    experiment: Experiment,
    out: Path,
    runs: list[tuple[str, TrainConfig]],
    show_progress: bool,
    echo: Callable[[str], None],
) -> dict[str, str]:
    from largebatch.engine import TrainingInterrupted
    from largebatch.train import train

    status: dict[str, str] = {}
    bar = tqdm(total=len(runs), desc="grid", unit="run", disable=not show_progress, file=sys.stderr)
    for name, config in runs:
        run = Path(config.out)
        if _finished(run, experiment):
            status[name] = "skipped"
            bar.update(1)
            continue
        bar.set_postfix_str(name)
        try:
            train(config, show_progress=False, echo=None)
            _evaluate_run(run, experiment)
            status[name] = "done"
            (run / "error.txt").unlink(missing_ok=True)
        except TrainingInterrupted:
            raise  # Ctrl-C or SIGTERM stops the grid; the run resumes next time
        except Exception as exc:  # one failed run must not stop the grid
            status[name] = "failed"
            atomic_write_text(run / "error.txt", f"{type(exc).__name__}: {exc}\n")
        echo(f"{name}: {status[name]}")
        bar.update(1)
    bar.close()
    atomic_write_json(out / "grid.json", {"runs": [n for n, _ in runs], "status": status})
    return status
