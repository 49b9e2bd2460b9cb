"""Hessian analysis of a trained checkpoint: top eigenvalues, trace, spectral density.

Backs ``largebatch hessian``. The loss is the mean cross-entropy over ``samples`` training
samples drawn with a fixed seed, in batches of ``batch_size``, or over the whole training
set (``samples="all"``, streamed one batch at a time so memory does not grow with it);
batch-norm runs in eval mode.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from largebatch.accumulate import cuts
from largebatch.config import check_number, check_seed
from largebatch.distributed import resolve_device
from largebatch.errors import UsageError
from largebatch.evaluate import load_trained_with_data
from largebatch.feed import loaded
from largebatch.figures import pyplot, save
from largebatch.hessian import TRACE_METHODS, hessian_trace, spectral_density, top_eigenvalues
from largebatch.io import atomic_write_json
from largebatch.outputs import check_output_file
from largebatch.sampler import probe_batches

__all__ = ["analyze_checkpoint", "check_analysis", "plot_density"]

#: Lanczos steps (Hessian-vector products) for the top eigenvalues; also the most of them.
EIGEN_STEPS = 300


class _Progress:
    """A bar over the samples that products go through, counting products, per task."""

    def __init__(self, samples: int, show: bool) -> None:
        self.samples = samples
        self.show = show
        self.bar: Any = None
        self.seen = 0

    def on_batch(self, count: int) -> None:
        if self.bar is None:
            return
        self.seen += count
        self.bar.update(count)
        self.bar.set_postfix_str(f"{self.seen // self.samples} products", refresh=False)

    @contextmanager
    def task(self, label: str) -> Iterator[None]:
        self.seen = 0
        self.bar = tqdm(
            desc=label, unit="sample", unit_scale=True, file=sys.stderr, disable=not self.show
        )
        try:
            yield
        finally:
            self.bar.close()
            self.bar = None


class _WholeSet:
    """The training set in order, in batches, built afresh on every pass (streamed)."""

    def __init__(self, x: Any, y: torch.Tensor, batch_size: int, device: torch.device) -> None:
        self.x, self.y, self.batch_size, self.device = x, y, batch_size, device

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for rows in cuts(len(self.y), self.batch_size):
            x, y = loaded(self.x[rows], self.y[rows])
            yield x.to(self.device), y.to(self.device)


def analyze_checkpoint(
    checkpoint: str | Path,
    samples: int | Literal["all"] = 256,
    top_k: int = 1,
    trace: bool = False,
    density: bool = False,
    out: str | Path | None = None,
    batch_size: int = 128,
    tol: float = 1e-3,
    trace_probes: int = 30,
    trace_tol: float | None = 0.01,
    trace_method: str = "hutch++",
    density_probes: int = 2,
    lanczos_steps: int = 80,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | None = None,
    say: Callable[[str], None] | None = None,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Curvature of the loss of ``checkpoint`` on ``samples`` training samples (``"all"``:
    the whole training set, streamed).

    Returns (and writes to ``out`` as JSON, with a PNG of the density beside it when
    ``density``) the top ``top_k`` eigenvalues with residuals and cost, and optionally the
    trace (``trace_method``; with ``trace_tol``, probes are added from ``trace_probes`` on
    until the relative standard error is at most ``trace_tol``, up to 10x as many) and the
    spectral density. ``show_progress``: a bar of samples and products on stderr (default:
    when stderr is a terminal).
    """
    check_analysis(
        samples, batch_size, top_k, tol, trace, trace_probes, density, density_probes,
        lanczos_steps, trace_tol, trace_method,
    )  # fmt: skip
    trace_tol = trace_tol or None  # 0: a fixed number of probes
    check_seed(seed)
    check_output_file(out)
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    dev = resolve_device(device)
    model, config, data = load_trained_with_data(checkpoint, dev, data_dir, limit_train=None)
    parameters = sum(p.numel() for p in model.parameters())
    if top_k > parameters:
        raise UsageError(f"top_k ({top_k}) exceeds the model's {parameters} parameters")
    if top_k > EIGEN_STEPS:
        raise UsageError(
            f"top_k ({top_k}) exceeds the {EIGEN_STEPS} Lanczos steps hessian takes; "
            f"use --top-k {EIGEN_STEPS} or less"
        )
    vector = parameters * next(model.parameters()).element_size()  # bytes
    needs = []  # (key, value, bytes it keeps at once)
    if density:  # a Lanczos basis of steps + 1 vectors and its projected float64 matrix
        steps = min(lanczos_steps, parameters)
        needs.append(("lanczos_steps", lanczos_steps, (steps + 1) * vector + steps**2 * 8))
    if trace and trace_method == "hutch++":  # the sketch H S and its orthonormal basis
        needs.append(("trace_probes", trace_probes, 2 * (trace_probes // 3) * vector))
    _check_fits(needs, dev)
    batches: Any
    if samples == "all":
        batches, used = _WholeSet(data.train_x, data.train_y, batch_size, dev), len(data.train_y)
    else:
        batches = [
            tuple(part.to(dev) for part in loaded(xb, yb))
            for xb, yb in probe_batches(data.train_x, data.train_y, samples, batch_size, seed)
        ]
        used = sum(len(yb) for _, yb in batches)
    progress = _Progress(used, sys.stderr.isatty() if show_progress is None else show_progress)
    options = {"stream": samples == "all", "on_batch": progress.on_batch}
    loss = F.cross_entropy

    def timed(label: str, work: Callable[[], Any]) -> tuple[Any, float]:
        say(f"hessian: {label} ...")
        started = time.perf_counter()
        with progress.task(label):
            result = work()
        seconds = time.perf_counter() - started
        say(f"hessian: {label} done in {seconds:.1f} s")
        return result, seconds

    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "dataset": config["dataset"],
        "model": config["model"],
        "method": config["method"],
        "samples": used,
        "parameters": parameters,
    }
    eig, seconds = timed(
        f"top-{top_k} eigenvalues",
        lambda: top_eigenvalues(
            model, loss, batches, k=top_k, tol=tol, max_iter=EIGEN_STEPS, seed=seed,
            operator_options=options,
        ),
    )  # fmt: skip
    result["eigenvalues"] = {**eig.as_dict(), "seconds": seconds}
    if trace:
        tr, seconds = timed(
            "trace",
            lambda: hessian_trace(
                model, loss, batches, probes=trace_probes, tol=trace_tol,
                max_probes=10 * trace_probes, method=trace_method, seed=seed,
                operator_options=options,
            ),
        )  # fmt: skip
        result["trace"] = {**tr.as_dict(), "seconds": seconds}
    if density:
        sd, seconds = timed(
            "spectral density",
            lambda: spectral_density(
                model, loss, batches, num_probes=density_probes, lanczos_steps=lanczos_steps,
                seed=seed, operator_options=options,
            ),
        )  # fmt: skip
        result["density"] = {**sd.as_dict(), "seconds": seconds}
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


def check_analysis(
    samples: int | Literal["all"] = 256,
    batch_size: int = 128,
    top_k: int = 1,
    tol: float = 1e-3,
    trace: bool = False,
    trace_probes: int = 30,
    density: bool = False,
    density_probes: int = 2,
    lanczos_steps: int = 80,
    trace_tol: float | None = 0.01,
    trace_method: str = "hutch++",
) -> None:
    """The settings of :func:`analyze_checkpoint`, checked before any work."""
    if samples != "all":
        check_number("samples", samples, low=1, integer=True)
    for key, value in (
        ("top_k", top_k),
        ("batch_size", batch_size),
        ("trace_probes", trace_probes),
        ("density_probes", density_probes),
    ):
        check_number(key, value, low=1, integer=True)
    check_number("lanczos_steps", lanczos_steps, low=2, integer=True)
    check_number("tol", tol, low=0, high=1, open_low=True)
    for key, flag in (("trace", trace), ("density", density)):
        if not isinstance(flag, bool):
            raise UsageError(f"{key} must be true or false, got {flag!r}")
    if trace_tol is not None:
        check_number("trace_tol", trace_tol, low=0, high=1)
    if trace_method not in TRACE_METHODS:
        raise UsageError(f"trace_method must be one of {', '.join(TRACE_METHODS)}")
    if trace_method == "hutch++" and trace_probes < 3:
        raise UsageError("trace_method hutch++ needs trace_probes >= 3")


def _check_fits(needs: list[tuple[str, int, int]], device: torch.device) -> None:
    """Refuse, before any work, a setting whose vectors can never fit in the memory of
    ``device`` (its total; the memory free at the time may be less)."""
    total = _total_memory(device)
    for key, value, needed in needs:
        if total is not None and needed > total:
            raise UsageError(
                f"{key} ({value}) needs {needed / 2**30:.1f} GiB for its vectors, more than "
                f"the {total / 2**30:.1f} GiB of memory on {device}; lower it"
            )


def _total_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device``; None when not known."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        pass
    return None


def plot_density(grid: list[float], density: list[float], path: str | Path, title: str) -> None:
    """Write a PNG of the smoothed eigenvalue density (log scale: the bulk sits near 0)."""
    fig, ax = pyplot().subplots(figsize=(6, 4), dpi=120)
    ax.semilogy(grid, [max(d, 1e-12) for d in density], color="tab:blue")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(title)
    ax.set_ylim(bottom=max(1e-8, min(d for d in density if d > 0) if any(density) else 1e-8))
    ax.grid(True, alpha=0.3)
    save(fig, path)
