"""The critical batch size, measured directly: ``largebatch cbs``.

From a checkpoint of ``largebatch train``, short runs branch at several batch sizes, each
from the same weights and optimizer state (the run's optimizer: SGD or AdamW), each for
the same number of samples in the same order, with the LR scaled from the checkpoint's
by the run's rule (``lr_scaling``; ``auto``: linear for SGD, square root for Adam's family).
The loss each reaches (mean cross-entropy per target of a fixed probe of training
samples, eval mode) is measured at evenly spaced sample counts.
The critical batch is the largest batch whose final loss is within ``tolerance``
(relative) of the best final loss of any batch: up to it, a larger batch costs no samples
(Merrill et al., "Critical batch size revisited", measure it this way). The best rather
than the smallest batch's, since a small batch whose LR was scaled down with it can fall
behind in few samples. The gradient noise scale
``tr(Sigma) / |G|^2`` at the checkpoint, which ``gns`` follows, is measured beside it,
and under Adam that of the gradients divided by its ``sqrt(v) + eps``.
:func:`critical_batch` does the same on a model, optimizer and data of one's own.

Writes ``cbs.json`` (everything), ``cbs.md`` (the table) and ``cbs.png`` (loss against
samples for each batch, and the final loss against the batch).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from largebatch.accumulate import accumulate, cuts
from largebatch.build import make_optimizer
from largebatch.checkpoint import checked_part, load_checkpoint, load_part
from largebatch.config import TrainConfig, check_number, check_seed
from largebatch.distributed import resolve_device
from largebatch.errors import UsageError
from largebatch.evaluate import load_trained_with_data
from largebatch.feed import loaded
from largebatch.figures import pyplot, save
from largebatch.io import atomic_write_json, atomic_write_text
from largebatch.lr import rule_for, scaling_factor
from largebatch.meters import noise_estimates, preconditioner
from largebatch.source import DataSource, as_source

__all__ = ["measure_critical_batch", "critical_batch", "suggested_schedule", "DEFAULT_TOLERANCE"]

#: A batch is within the critical batch while its loss is at most this much (relative)
#: above the best batch's, at the same samples.
DEFAULT_TOLERANCE = 0.02


def measure_critical_batch(
    checkpoint: str | Path,
    batch_sizes: Sequence[int],
    samples: int,
    out: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    lr_scaling: str | None = None,
    points: int = 4,
    probe_samples: int = 2048,
    noise_batches: int = 8,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | None = None,
    show_progress: bool | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Branch a run of ``samples`` samples at each of ``batch_sizes`` from ``checkpoint``;
    return (and write into ``out``) the losses, the critical batch and the noise scale."""
    sizes = _checked_sizes(batch_sizes)
    check_number("samples", samples, low=sizes[-1], integer=True)
    check_number("tolerance", tolerance, low=0, open_low=True)
    check_number("points", points, low=1, integer=True)
    check_number("probe_samples", probe_samples, low=1, integer=True)
    check_number("noise_batches", noise_batches, low=1, integer=True)
    check_seed(seed)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    for name in ("cbs.json", "cbs.md", "cbs.png"):
        if (out / name).exists():
            raise UsageError(f"{out / name} exists; give a new folder, or remove it first")
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    dev = resolve_device(device)
    model, config_dict, data = load_trained_with_data(checkpoint, dev, data_dir)
    saved = load_checkpoint(checkpoint)
    known = TrainConfig.__dataclass_fields__
    config = TrainConfig(**{k: v for k, v in config_dict.items() if k in known})
    optimizer = make_optimizer(None, model, config)  # the run's: SGD or AdamW
    load_part(
        optimizer, checked_part(saved, "optimizer", dict, Path(checkpoint)), Path(checkpoint),
        "optimizer state",
    )  # fmt: skip
    history = (saved.get("run") or {}).get("history") or []
    batch_at = int(history[-1]["batch_size"]) if history else config.batch_size
    if history:  # the LR the run last used, kept in proportion over the param groups
        ratio = float(history[-1]["lr"]) / float(optimizer.param_groups[0]["lr"] or 1.0)
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"]) * ratio if group["lr"] else float(history[-1]["lr"])
    rule = rule_for(lr_scaling or config.lr_scaling, optimizer)
    if rule == "adascale":
        raise UsageError("cbs scales the LR by linear or sqrt; adascale needs a noise scale")
    result = critical_batch(
        model, optimizer, data, sizes, samples, batch_at=batch_at, lr_scaling=rule,
        micro_batch_size=config.micro_batch_size, tolerance=tolerance, points=points,
        probe_samples=probe_samples, noise_batches=noise_batches, seed=seed,
        show_progress=show_progress, say=say,
    )  # fmt: skip
    at = int(history[-1]["samples"]) if history else 0
    schedule = suggested_schedule(
        config.batch_size, at, result["critical_batch"], config.max_batch_size
    )
    result = {"checkpoint": str(checkpoint), "dataset": config.dataset, "model": config.model,
              **result, "checkpoint_samples": at, "suggested_schedule": schedule}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "cbs.json", result)
    atomic_write_text(out / "cbs.md", _markdown(result))
    _plot(result, out / "cbs.png")
    return result


def critical_batch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    batch_sizes: Sequence[int],
    samples: int,
    *,
    batch_at: int,
    lr_scaling: str = "auto",
    micro_batch_size: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    points: int = 4,
    probe_samples: int = 2048,
    noise_batches: int = 8,
    seed: int = 0,
    show_progress: bool | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The critical batch of ``model`` where it stands, trained by ``optimizer`` (its
    state as the run left it, its LR the one of batch ``batch_at``) on ``data`` (a
    :class:`~largebatch.source.DataSource`, or anything ``as_source`` takes): a branch of
    ``samples`` samples per batch size from the same weights and optimizer state, the LR
    scaled by ``lr_scaling`` (``auto``: the optimizer's family). Model and optimizer are
    put back as they were. Returns what ``cbs.json`` holds but the checkpoint's names;
    the noise scale of the gradients as the optimizer scales them (Adam's
    ``sqrt(v) + eps``, :func:`largebatch.meters.preconditioner`) is measured beside the
    plain one (``noise_scale_preconditioned``; None for SGD)."""
    sizes = _checked_sizes(batch_sizes)
    check_number("samples", samples, low=sizes[-1], integer=True)
    check_number("batch_at", batch_at, low=1, integer=True)
    check_seed(seed)
    if not isinstance(data, DataSource):
        data = as_source(data)
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    show = sys.stderr.isatty() if show_progress is None else show_progress
    rule = rule_for(lr_scaling, optimizer)
    if rule == "adascale":
        raise UsageError("cbs scales the LR by linear or sqrt; adascale needs a noise scale")
    dev = next(model.parameters()).device
    lrs_at = [float(group["lr"]) for group in optimizer.param_groups]
    n = len(data.train_y)
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-samples // n))])
    probe = torch.randperm(n, generator=generator)[: min(probe_samples, n)]
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(optimizer.state_dict())

    def branch(batch: int) -> dict[str, Any]:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(copy.deepcopy(optimizer_state))
        factor = scaling_factor(rule, batch / batch_at, None, batch_at)
        for group, lr in zip(optimizer.param_groups, lrs_at, strict=True):
            group["lr"] = lr * factor
        micro = min(micro_batch_size or batch, batch)
        updates = samples // batch
        marks = sorted({max(1, round(updates * (i + 1) / points)) for i in range(points)})
        curve, started = [], time.perf_counter()
        bar = tqdm(total=updates, desc=f"batch {batch}", unit="update", disable=not show,
                   file=sys.stderr, leave=False)  # fmt: skip
        for step in range(1, updates + 1):
            rows = order[(step - 1) * batch : step * batch]
            model.train()
            optimizer.zero_grad(set_to_none=True)
            x, y = (part.to(dev) for part in loaded(data.train_x[rows], data.train_y[rows]))
            accumulate(model, F.cross_entropy, x, y, micro)
            optimizer.step()
            bar.update(1)
            if step in marks:
                curve.append({"samples": step * batch, "updates": step,
                              "loss": _probe_loss(model, data, probe, dev)})  # fmt: skip
        bar.close()
        final = curve[-1]["loss"]
        lr = lrs_at[0] * factor
        if not math.isfinite(final):
            say(f"cbs: batch {batch} diverged (lr {lr:.4g}); its loss counts as infinite")
            final = math.inf
        return {"batch_size": batch, "lr": lr, "lr_factor": factor, "updates": updates,
                "curve": curve, "final_loss": final,
                "seconds": time.perf_counter() - started}  # fmt: skip

    try:
        start_loss = _probe_loss(model, data, probe, dev)
        phi, grad_sq, trace, phi_pre = _noise_scale(
            model, optimizer, data, sizes, noise_batches, generator, dev
        )
        say(f"cbs: noise scale at the checkpoint {phi:.4g}" if phi is not None else
            "cbs: the noise scale could not be measured")  # fmt: skip
        branches = []
        for batch in sizes:
            branches.append(branch(batch))
            say(f"cbs: batch {batch}: loss {branches[-1]['final_loss']:.4f} after {samples}"
                " samples")  # fmt: skip
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        for group, lr in zip(optimizer.param_groups, lrs_at, strict=True):
            group["lr"] = lr
    reference = min(b["final_loss"] for b in branches)
    limit = reference + tolerance * abs(reference)
    within = [b["batch_size"] for b in branches if b["final_loss"] <= limit]
    return {
        "optimizer": type(optimizer).__name__,
        "samples": samples,
        "tolerance": tolerance,
        "lr_scaling": rule,
        "checkpoint_batch_size": batch_at,
        "checkpoint_lr": lrs_at[0],
        "start_loss": start_loss,
        "probe_samples": len(probe),
        "critical_batch": max(within),
        "noise_scale": phi,
        "noise_grad_sq": grad_sq,
        "noise_trace": trace,
        "noise_scale_preconditioned": phi_pre,
        "branches": branches,
    }


def suggested_schedule(base: int, at_samples: int, critical: int, cap: int | None = None) -> str:
    """A ``batch_schedule`` from one measurement, as Merrill et al. warm the batch up: the
    base batch until the checkpoint's ``at_samples``, the measured critical batch from
    there (never below the base, at most ``cap``, a multiple of the base)."""
    batch = max(base, min(critical, cap or critical)) // base * base
    return f"0:{base}" if batch == base or at_samples <= 0 else f"0:{base} {at_samples}:{batch}"


def _checked_sizes(batch_sizes: Sequence[int]) -> list[int]:
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence):
        raise UsageError("batch_sizes must be a list of batch sizes, e.g. 32 64 128")
    for size in batch_sizes:
        check_number("batch size", size, low=1, integer=True)
    sizes = sorted(set(batch_sizes))
    if len(sizes) < 2:
        raise UsageError("give at least two batch sizes to compare")
    return sizes


def _probe_loss(model: torch.nn.Module, data: Any, probe: torch.Tensor, dev: torch.device) -> float:
    """Mean cross-entropy per target of the probe samples (per token for a language
    model; targets of -100 left out, as the loss leaves them), eval mode, in chunks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in cuts(len(probe), 1024):
            index = probe[rows]
            x, y = (part.to(dev) for part in loaded(data.train_x[index], data.train_y[index]))
            total += float(F.cross_entropy(model(x).float(), y, reduction="sum"))
            count += int((y != -100).sum()) if not y.is_floating_point() else len(y)
    model.train()
    return total / max(count, 1)


def _noise_scale(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Any,
    sizes: list[int],
    batches: int,
    generator: torch.Generator,
    dev: torch.device,
) -> tuple[float | None, float | None, float | None, float | None]:
    """``(tr(Sigma) / |G|^2, |G|^2, tr(Sigma), preconditioned)`` at the model's weights
    from ``batches`` batches of the largest size, each cut into micro-batches of the
    smallest (train mode, as training computes them); the estimates are averaged over
    batches first. ``preconditioned``: the same ratio of the gradients divided by
    ``optimizer``'s preconditioner (None when it has none)."""
    micro, batch = sizes[0], sizes[-1] - sizes[-1] % sizes[0]
    n = len(data.train_y)
    if batch // micro < 2 or batch > n:
        return None, None, None, None
    params = [p for p in model.parameters() if p.requires_grad]
    scales = preconditioner(optimizer, params)
    inverse = (
        None
        if any(s is None for s in scales)
        else torch.cat([s.reshape(-1) for s in scales]).double().reciprocal()  # type: ignore[union-attr]
    )
    sums = {"plain": [0.0, 0.0], "pre": [0.0, 0.0]}
    model.train()
    for _ in range(batches):
        rows = torch.randperm(n, generator=generator)[:batch]
        pieces = []
        for part in cuts(batch, micro):
            index = rows[part]
            x, y = (part.to(dev) for part in loaded(data.train_x[index], data.train_y[index]))
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params)
            pieces.append(torch.cat([g.reshape(-1) for g in grads]).double())
        stacked = torch.stack(pieces)
        for key, rows_of in (
            ("plain", stacked),
            ("pre", None if inverse is None else stacked * inverse),
        ):
            if rows_of is None:
                continue
            mean_sq = float(rows_of.square().sum(1).mean())
            full_sq = float(rows_of.mean(0).square().sum())
            grad_sq, trace = noise_estimates(full_sq, mean_sq, micro, batch)
            sums[key][0] += grad_sq / batches
            sums[key][1] += trace / batches
    ratio = {k: (t / g if g > 0 else math.inf) for k, (g, t) in sums.items()}
    grad_sq, trace = sums["plain"]
    return ratio["plain"], grad_sq, trace, (None if inverse is None else ratio["pre"])


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Critical batch size: {result['model']} on {result['dataset']}",
        "",
        f"From `{result['checkpoint']}` (batch {result['checkpoint_batch_size']}, lr "
        f"{result['checkpoint_lr']:.4g}, probe loss {result['start_loss']:.4f}): one branch per "
        f"batch size, {result['samples']} samples each, the LR scaled by the "
        f"{result['lr_scaling']} rule. Loss: mean cross-entropy per "
        f"target of {result['probe_samples']} training samples, eval mode.",
        "",
        "| batch | lr | updates | final loss | vs the best | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    reference = min(b["final_loss"] for b in result["branches"])
    for b in result["branches"]:
        ratio = b["final_loss"] / reference - 1 if reference else math.nan
        lines.append(
            f"| {b['batch_size']} | {b['lr']:.4g} | {b['updates']} | {b['final_loss']:.4f} "
            f"| {100 * ratio:+.1f}% | {b['seconds']:.1f} |"
        )
    phi, pre = result["noise_scale"], result.get("noise_scale_preconditioned")
    lines += [
        "",
        f"Critical batch (the largest within {100 * result['tolerance']:g}% of the best "
        f"loss): **{result['critical_batch']}**. Gradient noise scale at the "
        f"checkpoint: {'not measured' if phi is None else f'{phi:.4g}'}"
        + (
            "."
            if pre is None
            else f"; of the gradients as {result['optimizer']} scales them: {pre:.4g}."
        ),
        "",
        "A batch warm-up from this measurement (the run's batch until the checkpoint's "
        f"{result['checkpoint_samples']} samples, the critical batch from there): "
        f'`--method schedule --set batch_schedule="{result["suggested_schedule"]}"`.',
        "",
        "![loss against samples and batch](cbs.png)",
        "",
    ]
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> None:
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4), dpi=120)
    for b in result["branches"]:
        xs = [0] + [p["samples"] for p in b["curve"]]
        ys = [result["start_loss"]] + [p["loss"] for p in b["curve"]]
        axes[0].plot(xs, ys, marker="o", label=f"B {b['batch_size']}")
    axes[0].set_xlabel("samples")
    axes[0].set_ylabel("probe loss")
    axes[0].legend(fontsize=8)
    sizes = [b["batch_size"] for b in result["branches"]]
    axes[1].plot(sizes, [b["final_loss"] for b in result["branches"]], marker="o")
    axes[1].axvline(result["critical_batch"], color="tab:red", ls="--", label="critical batch")
    if result["noise_scale"] is not None and 0 < result["noise_scale"] < math.inf:
        axes[1].axvline(result["noise_scale"], color="grey", ls=":", label="noise scale")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("batch size (log scale)")
    axes[1].set_ylabel(f"probe loss after {result['samples']} samples")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{result['model']} on {result['dataset']}: critical batch")
    save(fig, path)
