"""Clean and adversarial accuracy of a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from largebatch.adversarial import fgsm, pgd
from largebatch.checkpoint import checked_model_spec, checked_part, load_checkpoint, load_part
from largebatch.config import check_number, check_seed
from largebatch.data import DataSource, load_dataset
from largebatch.distributed import resolve_device
from largebatch.errors import UsageError
from largebatch.feed import Feed
from largebatch.io import atomic_write_json
from largebatch.models import build_model
from largebatch.outputs import check_output_file
from largebatch.source import is_classification

__all__ = [
    "ATTACKS",
    "check_evaluation",
    "load_trained",
    "load_trained_with_data",
    "evaluate_checkpoint",
]

ATTACKS: tuple[str, ...] = ("none", "fgsm", "pgd")


def load_trained(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of checkpoint ``path`` (eval mode, on ``device``) and the checkpoint itself."""
    saved = load_checkpoint(path, map_location=device)
    spec = checked_model_spec(saved, path)
    config = checked_part(saved, "config", dict, path)
    for key, kind in (("dataset", str), ("model", str), ("method", str), ("seed", int)):
        checked_part(config, key, kind, f"{path} (config)")
    model = build_model(**spec).to(device)
    load_part(model, checked_part(saved, "model", dict, path), path, "model weights")
    model.eval()
    return model, saved


def load_trained_with_data(
    path: str | Path,
    device: torch.device,
    data_dir: str | None = None,
    **limits: int | None,
) -> tuple[torch.nn.Module, dict[str, Any], DataSource]:
    """The model of checkpoint ``path``, its training config, and its dataset.

    ``data_dir`` replaces the folder used in training; ``limits`` (``limit_train``,
    ``limit_test``) default to the training run's.
    """
    model, saved = load_trained(path, device)
    config = saved["config"]
    limits = {k: v if v is not None else config.get(k) for k, v in limits.items()}
    data = load_dataset(
        config["dataset"],
        data_dir or config.get("data_dir"),
        seed=config["seed"],
        image_size=config.get("image_size"),
        seq_len=config.get("seq_len"),
        **limits,
    )
    return model, config, data


def evaluate_checkpoint(
    checkpoint: str | Path,
    attack: str = "none",
    eps: float = 0.03,
    steps: int = 10,
    alpha: float | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    batch_size: int = 500,
    device: str = "auto",
    seed: int = 0,
    out: str | Path | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Accuracy of ``checkpoint`` on its test set (``split="train"``: on its training set,
    as the run used it), clean and under ``attack`` (``none|fgsm|pgd``).

    ``eps`` is the L-inf budget in raw input units; PGD takes ``steps`` steps of ``alpha``
    (default ``2.5 * eps / steps``) from a random start. ``limit``: the first samples of
    the split only. Returns and optionally writes ``{"clean_acc", "clean_loss" (mean
    cross-entropy), "adv_acc", "attack", "eps", "steps", "samples", ...}``.
    """
    check_evaluation(attack, eps, steps, alpha)
    if split not in ("train", "test"):
        raise UsageError(f"split must be train or test, got {split!r}")
    check_number("batch_size", batch_size, low=1, integer=True)
    if limit is not None:
        check_number("limit", limit, low=1, integer=True)
    check_seed(seed)
    check_output_file(out)
    dev = resolve_device(device)
    model, config, data = load_trained_with_data(
        checkpoint, dev, data_dir, **{f"limit_{split}": limit}
    )
    if not is_classification(data.train_y):
        raise UsageError(
            f"evaluate measures classification accuracy; the targets of {config['dataset']!r} "
            "are not class labels (token sequences, say): the run's metrics.jsonl holds its "
            "validation loss"
        )
    if len(getattr(data, f"{split}_y")) == 0:
        raise UsageError(
            f"the run's dataset has no test split; to evaluate {checkpoint}, its dataset "
            f"{config['dataset']!r} must return (train, test) with a test set"
        )
    step = alpha if alpha is not None else 2.5 * eps / steps
    generator = torch.Generator().manual_seed(seed)
    clamp = data.input_range
    clean = adv = 0
    loss = 0.0
    with Feed(data, dev) as feed:
        for x, y in feed.eval_batches(split, batch_size):
            x, y = x.to(dev), y.to(dev)
            clean_batch, adv_batch, loss_batch = _accuracy_counts(
                model, x, y, attack, eps, step, steps, clamp, generator
            )
            clean += clean_batch
            adv += adv_batch
            loss += loss_batch
    n = len(getattr(data, f"{split}_y"))
    result = {
        "checkpoint": str(checkpoint),
        "dataset": config["dataset"],
        "model": config["model"],
        "method": config["method"],
        "attack": attack,
        "eps": eps,
        "steps": steps if attack == "pgd" else None,
        "alpha": step if attack == "pgd" else None,
        "split": split,
        "samples": n,
        "clean_acc": clean / n,
        "clean_loss": loss / n,
        "adv_acc": adv / n if attack != "none" else None,
    }
    if out is not None:
        atomic_write_json(out, result)
    return result


def check_evaluation(attack: str, eps: float, steps: int, alpha: float | None = None) -> None:
    """The attack settings of an evaluation, checked before any work (eps in raw input
    units, at least 0; PGD steps at least 1; a step size, if given, above 0)."""
    if not isinstance(attack, str) or attack not in ATTACKS:
        raise UsageError(f"unknown attack {attack!r}; choose one of: {', '.join(ATTACKS)}")
    check_number("eps", eps, low=0)
    check_number("steps", steps, low=1, integer=True)
    if alpha is not None:
        check_number("alpha", alpha, low=0, open_low=True)


def _accuracy_counts(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    eps: float,
    step: float,
    steps: int,
    clamp: tuple[float, float] | None,
    generator: torch.Generator,
) -> tuple[int, int, float]:
    """Correct predictions on ``(x, y)``, clean and under ``attack`` (0 for none), and
    the summed clean cross-entropy."""
    with torch.no_grad():
        logits = model(x)
        clean = int((logits.argmax(1) == y).sum().item())
        loss = float(F.cross_entropy(logits.float(), y, reduction="sum"))
    if attack == "fgsm":
        x_adv = fgsm(model, x, y, eps, clamp=clamp)
    elif attack == "pgd":
        x_adv = pgd(model, x, y, eps, step, steps, clamp=clamp, generator=generator)
    else:
        return clean, 0, loss
    with torch.no_grad():
        adv = int((model(x_adv).argmax(1) == y).sum().item())
    return clean, adv, loss
