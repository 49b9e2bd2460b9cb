"""Hessian analysis of a trained checkpoint: top eigenvalues, trace, spectral density.

Backs ``largebatch hessian``. The loss is the mean cross-entropy over ``samples`` training
samples drawn with a fixed seed, in batches of ``batch_size``; batch-norm runs in eval mode.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from largebatch.config import check_number, check_seed
from largebatch.errors import UsageError
from largebatch.evaluate import load_trained_with_data
from largebatch.hessian import hessian_trace, spectral_density, top_eigenvalues
from largebatch.io import atomic_write, atomic_write_json
from largebatch.outputs import check_output_file
from largebatch.pipeline import materialize
from largebatch.sampler import probe_batches
from largebatch.train import resolve_device

__all__ = ["analyze_checkpoint", "plot_density"]


def _timed(label: str, say: Callable[[str], None], work: Callable[[], Any]) -> tuple[Any, float]:
    say(f"hessian: {label} ...")
    started = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - started
    say(f"hessian: {label} done in {seconds:.1f} s")
    return result, seconds


def analyze_checkpoint(
    checkpoint: str | Path,
    samples: int = 256,
    top_k: int = 1,
    trace: bool = False,
    density: bool = False,
    out: str | Path | None = None,
    batch_size: int = 128,
    tol: float = 1e-3,
    trace_probes: int = 100,
    density_probes: int = 2,
    lanczos_steps: int = 80,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Curvature of the loss of ``checkpoint`` on ``samples`` training samples.

    Returns (and writes to ``out`` as JSON, with a PNG of the density beside it when
    ``density``) the top ``top_k`` eigenvalues with residuals and cost, and optionally the
    Hutchinson trace and the spectral density.
    """
    for key, value in (
        ("samples", samples),
        ("top_k", top_k),
        ("batch_size", batch_size),
        ("trace_probes", trace_probes),
        ("density_probes", density_probes),
    ):
        check_number(key, value, low=1, integer=True)
    check_number("lanczos_steps", lanczos_steps, low=2, integer=True)
    check_number("tol", tol, low=0, high=1, open_low=True)
    check_seed(seed)
    check_output_file(out)
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    dev = resolve_device(device)
    model, config, data = load_trained_with_data(checkpoint, dev, data_dir, limit_train=None)
    parameters = sum(p.numel() for p in model.parameters())
    if top_k > parameters:
        raise UsageError(f"top_k ({top_k}) exceeds the model's {parameters} parameters")
    batches = [
        (materialize(xb).to(dev), yb.to(dev))
        for xb, yb in probe_batches(data.train_x, data.train_y, samples, batch_size, seed)
    ]
    used = sum(len(yb) for _, yb in batches)
    loss = F.cross_entropy
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "dataset": config["dataset"],
        "model": config["model"],
        "method": config["method"],
        "samples": used,
        "parameters": parameters,
    }
    eig, seconds = _timed(
        f"top-{top_k} eigenvalues",
        say,
        lambda: top_eigenvalues(model, loss, batches, k=top_k, tol=tol, max_iter=300, seed=seed),
    )
    result["eigenvalues"] = {**eig.as_dict(), "seconds": seconds}
    if trace:
        tr, seconds = _timed(
            "trace",
            say,
            lambda: hessian_trace(model, loss, batches, probes=trace_probes, seed=seed),
        )
        result["trace"] = {**tr.as_dict(), "seconds": seconds}
    if density:
        sd, seconds = _timed(
            "spectral density",
            say,
            lambda: spectral_density(
                model,
                loss,
                batches,
                num_probes=density_probes,
                lanczos_steps=lanczos_steps,
                seed=seed,
            ),
        )
        result["density"] = {
            "grid": sd.grid.tolist(),
            "density": sd.density.tolist(),
            "seconds": seconds,
            "matvecs": sd.matvecs,
        }
    if out is not None:
        out = Path(out)
        atomic_write_json(out, result)
        if density:
            png = out.with_suffix(".png")
            plot_density(
                result["density"]["grid"],
                result["density"]["density"],
                png,
                title=f"{config['model']} / {config['method']}: Hessian spectrum",
            )
            result["density_png"] = str(png)
    return result


def plot_density(grid: list[float], density: list[float], path: str | Path, title: str) -> None:
    """Write a PNG of the smoothed eigenvalue density (log scale: the bulk sits near 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.semilogy(grid, [max(d, 1e-12) for d in density], color="tab:blue")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title)
    ax.set_ylim(bottom=max(1e-8, min(d for d in density if d > 0) if any(density) else 1e-8))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
