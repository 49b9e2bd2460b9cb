"""The training loop that every method shares.

Read :func:`train` top to bottom: data, model, controller, then per epoch the batches
(forward, backward, accumulate, update), evaluation, the controller's decision, and the
records written to ``--out``. Methods differ only in the controller built from the config.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from largebatch.adversarial import fgsm, pgd
from largebatch.checkpoint import checked_part, load_checkpoint, load_part, save_checkpoint
from largebatch.config import TrainConfig, config_to_dict, save_config
from largebatch.controllers import BatchController, Decision, make_controller
from largebatch.data import DataSource, load_dataset
from largebatch.distributed import (
    World,
    all_reduce_,
    all_reduce_gradients,
    broadcast_object,
    setup,
    shard,
)
from largebatch.errors import CheckpointError, DivergedError, UsageError
from largebatch.hessian import EigenTracker, HessianOperatorError
from largebatch.io import append_jsonl, atomic_write_json, write_jsonl
from largebatch.models import build_model
from largebatch.outputs import RunFolder, remove_own_temporaries
from largebatch.pipeline import Feed, materialize
from largebatch.precision import autocast, make_scaler
from largebatch.sampler import EpochSampler, probe_batches

__all__ = [
    "train",
    "evaluate",
    "resolve_device",
    "model_spec",
    "RunState",
    "TrainingInterrupted",
]

#: the files a run writes into its folder
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt")

# The probe set is drawn with its own seed, apart from the data order.
_PROBE_SEED_OFFSET = 104_729

# Keys a resumed run may change; every other key must match the checkpoint.
_RESUMABLE_CHANGES = {
    "epochs",
    "out",
    "resume",
    "device",
    "eval_batch_size",
    "data_dir",
    "on_divergence",
    "divergence_lr_factor",
    "max_rollbacks",
    "loader_workers",
}


@dataclass
class RunState:
    """Counters that carry over across epochs and restarts (cumulative)."""

    epoch: int = 0  # epochs finished
    updates: int = 0  # optimizer steps
    samples: int = 0  # training samples processed
    wall_s: float = 0.0  # training + evaluation time, eigenvalue time included
    hessian_s: float = 0.0  # time spent on curvature estimates
    history: list[dict[str, Any]] = field(default_factory=list)
    # An epoch interrupted part-way: samples done, their loss and accuracy sums, and the
    # augmentation generator's state, so that resuming finishes it exactly.
    position: int = 0
    partial_loss: float = 0.0
    partial_correct: int = 0
    augment_rng: torch.Tensor | None = None
    # Divergence guard: LR multiplier after rollbacks, and what happened.
    lr_scale: float = 1.0
    rollbacks: list[dict[str, Any]] = field(default_factory=list)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; the run saved its checkpoint after the current update."""


class _StopFlag:
    """Set by SIGINT/SIGTERM; the loop stops after the update in progress. A second
    signal stops at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def model_spec(config: TrainConfig, data: DataSource) -> dict[str, Any]:
    """What :func:`largebatch.models.build_model` needs to rebuild the model from a checkpoint."""
    return {
        "name": config.model,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "mean": list(data.mean),
        "std": list(data.std),
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    feed: Feed,
    batch_size: int,
    device: torch.device,
    split: str = "test",
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) of ``model`` in eval mode on a split.

    Under torchrun each rank evaluates its slice and the sums are all-reduced.
    """
    total = len(getattr(feed.data, f"{split}_y"))
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for xb, yb in feed.eval_batches(split, batch_size):
        xb, yb = _to_device(xb, device, channels_last), yb.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(xb)
        sums[0] += F.cross_entropy(out.float(), yb, reduction="sum").double()
        sums[1] += (out.argmax(1) == yb).sum()
    model.train(was_training)
    loss_sum, correct = all_reduce_(sums, feed.world).tolist()
    return loss_sum / total, correct / total


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _uses_channels_last(config: TrainConfig, data: DataSource, device: torch.device) -> bool:
    """Channels-last memory format: asked for, or by default for images on CUDA."""
    if len(data.input_shape) != 3:
        return False
    return device.type == "cuda" if config.channels_last is None else config.channels_last


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataSource,
    sampler: EpochSampler,
    controller: BatchController,
    decision: Decision,
    config: TrainConfig,
    state: RunState,
    device: torch.device,
    show_progress: bool,
    stop: _StopFlag,
    world: World,
    feed: Feed,
    scaler: torch.amp.GradScaler | None,
    channels_last: bool,
) -> dict[str, float] | None:
    """One pass over the training set; each global batch is one optimizer update.

    A global batch is run as micro-batches of at most ``micro_batch_size`` samples whose
    gradients accumulate, each weighted by its share of the batch, so the update equals
    that of the whole batch at once (batch-norm statistics aside). The last, short batch
    of the epoch is used, weighted by its true size.

    Starts from sample ``state.position`` (a resumed, interrupted epoch). Returns the
    epoch's train loss and accuracy, or None when ``stop`` was raised: then ``state``
    holds the position and partial sums to resume from.

    Under torchrun each rank runs its contiguous slice of every global batch and one
    all-reduce per update sums the gradients (see :mod:`largebatch.distributed`).
    """
    model.train()
    epoch = state.epoch
    global_batch = decision.batch_size
    micro = min(config.micro_batch_size or config.batch_size, global_batch)
    base_lr = config.lr * decision.lr_factor * state.lr_scale
    params = [p for p in model.parameters() if p.requires_grad]
    bn_stats = _StatsPerUpdate(model)
    augment_rng = torch.Generator().manual_seed(config.seed * 7919 + epoch)
    if state.augment_rng is not None:
        augment_rng.set_state(state.augment_rng)
    num_batches = sampler.num_batches(global_batch)
    first_step = sampler.num_batches(global_batch) - sampler.num_batches(
        global_batch, state.position
    )
    # The partial sums of a resumed epoch are global: rank 0 carries them.
    loss_sum = torch.tensor(state.partial_loss if world.is_main else 0.0, device=device)
    correct = torch.tensor(
        state.partial_correct if world.is_main else 0, device=device, dtype=torch.long
    )
    seen = state.position
    bar = tqdm(
        initial=first_step,
        total=num_batches,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="upd",
        leave=False,
        disable=not show_progress,
        file=sys.stderr,
    )
    batches = feed.train_batches(
        sampler.batches(epoch, global_batch, start=state.position),
        micro,
        augment=config.augment,
        augment_rng=augment_rng,
        augment_seed=config.seed * 1_000_003 + epoch,
    )
    for step, (indices, micro_batches) in enumerate(batches, start=first_step):
        _set_lr(optimizer, base_lr * controller.warmup_factor(step / num_batches))
        optimizer.zero_grad(set_to_none=True)
        accumulating = len(micro_batches) > 1
        if accumulating:
            bn_stats.begin()
        for xb, yb in micro_batches:
            xb = _to_device(xb, device, channels_last)
            yb = yb.to(device, non_blocking=True)
            xb = _with_adversarial_share(model, xb, yb, decision.adv_ratio, config, data)
            with autocast(device, config.precision):
                out = model(xb)
                loss = F.cross_entropy(out, yb)
            weighted = loss * (len(yb) / len(indices))
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
            loss_sum += loss.detach().float() * len(yb)
            correct += (out.argmax(1) == yb).sum()
            if accumulating:
                bn_stats.micro_batch_done(len(yb))
        if accumulating:
            bn_stats.end()
        stop_flag = all_reduce_gradients(
            params, world, 1.0 if stop.signal else 0.0, bn_stats.running
        )
        if stop_flag and stop.signal is None:  # another rank was signalled
            stop.signal = signal.SIGTERM
        # A diverged run must stop before a non-finite update reaches the weights; one
        # check (one device sync) covers the loss and the gradient.
        # With fp16 loss scaling, an overflowing gradient is the scaler's business: it skips
        # the step and lowers the scale. Only a non-finite loss is divergence then.
        if scaler is not None:
            scaler.unscale_(optimizer)
            grad_norm = torch.zeros((), device=device)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(loss_sum + grad_norm):
            what = "loss" if not torch.isfinite(loss_sum) else "gradient"
            raise DivergedError(
                f"training {what} became non-finite in epoch {epoch + 1} "
                f"(update {state.updates + 1}, lr {optimizer.param_groups[0]['lr']:.4g}); "
                "lower --lr and try again"
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        state.updates += 1
        state.samples += len(indices)
        seen += len(indices)
        bar.update(1)
        if stop.signal is not None and seen < sampler.num_samples:
            bar.close()
            all_reduce_(loss_sum, world)
            all_reduce_(correct, world)
            state.position, state.augment_rng = seen, augment_rng.get_state()
            state.partial_loss, state.partial_correct = loss_sum.item(), int(correct.item())
            return None
    bar.close()
    all_reduce_(loss_sum, world)
    all_reduce_(correct, world)
    state.position, state.partial_loss, state.partial_correct = 0, 0.0, 0
    state.augment_rng = None
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen}


class _StatsPerUpdate:
    """Batch-norm running statistics move once per optimizer update, not per micro-batch.

    Each micro-batch's forward pass starts from the statistics of the update's start, and
    the update ends with the sample-weighted mean of where the micro-batches took them:
    ``(1 - m) r + m * mean(batch statistics)``. So an update's running statistics do not
    depend on how its global batch was cut into micro-batches or spread over ranks (the
    ranks' results are averaged in the gradient all-reduce), and one process with
    accumulation gives the running statistics, eval-mode accuracy and eigenvalue of any
    number of ranks.
    """

    def __init__(self, model: nn.Module) -> None:
        buffers = [(name.rsplit(".", 1)[-1], b) for name, b in model.named_buffers()]
        self.running = [b for n, b in buffers if b.is_floating_point() and n.startswith("running_")]
        self.counts = [b for n, b in buffers if n == "num_batches_tracked"]

    def begin(self) -> None:
        self._start = [b.clone() for b in self.running]
        self._start_counts = [c.clone() for c in self.counts]
        self._sums = [torch.zeros_like(b) for b in self.running]
        self._samples = 0

    def micro_batch_done(self, samples: int) -> None:
        for total, buffer, start in zip(self._sums, self.running, self._start, strict=True):
            total.add_(buffer, alpha=samples)
            buffer.copy_(start)
        self._samples += samples

    def end(self) -> None:
        for buffer, total in zip(self.running, self._sums, strict=True):
            buffer.copy_(total / max(self._samples, 1))
        for count, start in zip(self.counts, self._start_counts, strict=True):
            count.copy_(start + 1)


def _with_adversarial_share(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    ratio: float,
    config: TrainConfig,
    data: DataSource,
) -> torch.Tensor:
    """Replace the first ``round(ratio * len(x))`` samples by attacked ones (ABSA).

    As in the reference code, nothing is replaced while ``ratio * len(x) < 1``. The attack
    runs in eval mode, so batch-norm statistics only ever see the training batch.
    """
    count = round(ratio * len(x))
    if ratio * len(x) < 1 or count < 1 or config.adv_eps == 0:
        return x
    # The reference clamps to the min and max of the whole batch, not of the attacked part.
    clamp = (x.min().item(), x.max().item()) if config.adv_clamp == "batch" else data.input_range
    head_x, head_y = x[:count], y[:count]
    if config.adv_attack == "pgd":
        steps = config.adv_pgd_steps
        attacked = pgd(
            model, head_x, head_y, config.adv_eps, 2.5 * config.adv_eps / steps, steps, clamp=clamp
        )
    else:
        attacked = fgsm(model, head_x, head_y, config.adv_eps, clamp=clamp)
    return torch.cat([attacked, x[count:]])


def _make_tracker(
    config: TrainConfig, data: DataSource, device: torch.device, world: World
) -> EigenTracker:
    """The top-eigenvalue tracker on a probe set drawn once from the training data.

    Under torchrun each rank holds a slice of every probe batch and the Hessian-vector
    products are all-reduced, so every rank gets the single-process eigenvalue.
    """
    probe = probe_batches(
        data.train_x,
        data.train_y,
        config.hessian_samples,
        config.micro_batch_size or config.batch_size,
        seed=config.seed + _PROBE_SEED_OFFSET,
    )
    probe = [
        (shard(materialize(x), world).to(device), shard(y, world).to(device)) for x, y in probe
    ]
    probe = [(x, y) for x, y in probe if len(y)]
    if config.hessian_mode == "reference":
        return EigenTracker(F.cross_entropy, probe, method="reference", seed=config.seed)
    return EigenTracker(
        F.cross_entropy,
        probe,
        tol=config.hessian_tol,
        max_matvecs=config.hessian_max_matvecs,
        method="lanczos",
        seed=config.seed,
    )


def _curvature(
    tracker: EigenTracker | None,
    model: nn.Module,
    controller: BatchController,
    config: TrainConfig,
    epoch: int,
) -> dict[str, Any]:
    """The end-of-epoch eigenvalue estimate, when the controller wants one.

    ``usable_eigenvalue`` is what the controller is told: None when the estimate failed,
    is not finite, or (tracker mode) did not reach its tolerance within the budget, so a
    bad estimate keeps the batch where it is instead of moving it. The reference mode
    uses whatever its 10 power iterations give, as the reference code does.
    """
    record: dict[str, Any] = {
        "eigenvalue": None,
        "usable_eigenvalue": None,
        "eig_residual": None,
        "eig_matvecs": 0,
        "eig_converged": None,
        "eig_s": 0.0,
        "eig_error": None,
    }
    due = (epoch + 1) % config.hessian_every == 0
    if tracker is None or not controller.wants_eigenvalue or not due:
        return record
    started = time.perf_counter()
    try:
        result = tracker.estimate(model)
    except HessianOperatorError as exc:
        record["eig_s"] = time.perf_counter() - started
        record["eig_error"] = str(exc)
        return record
    value = result.eigenvalue
    finite = math.isfinite(value)
    record.update(
        eigenvalue=value if finite else None,
        eig_residual=float(result.residuals[0]),
        eig_matvecs=result.matvecs,
        eig_converged=bool(result.converged),
        eig_s=time.perf_counter() - started,
    )
    if finite and (result.converged or config.hessian_mode == "reference"):
        record["usable_eigenvalue"] = value
    return record


def _restore(
    path: Path,
    device: torch.device,
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: BatchController,
    tracker: EigenTracker | None,
    scaler: torch.amp.GradScaler | None,
) -> RunState:
    """Load checkpoint ``path`` into the run's objects; return its counters."""
    # Loaded on the CPU: the RNG and generator states in it must stay CPU byte tensors
    # (torch.set_rng_state and Generator.set_state refuse CUDA ones); the model's and the
    # optimizer's load_state_dict copy each tensor to its parameter's device.
    saved = load_checkpoint(path, map_location="cpu")
    _check_resumable(checked_part(saved, "config", dict, path), config, path)
    load_part(model, checked_part(saved, "model", dict, path), path, "model weights")
    load_part(optimizer, checked_part(saved, "optimizer", dict, path), path, "optimizer state")
    load_part(controller, checked_part(saved, "controller", dict, path), path, "controller state")
    if tracker is not None and saved.get("tracker") is not None:
        load_part(tracker, saved["tracker"], path, "eigenvalue tracker state")
    if scaler is not None and saved.get("scaler"):
        load_part(scaler, saved["scaler"], path, "loss scaler state")
    try:
        _set_rng_state(checked_part(saved, "rng", dict, path))
        return RunState(**checked_part(saved, "run", dict, path))
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: its run state is damaged ({exc})") from None


def _may_roll_back(config: TrainConfig, state: RunState) -> bool:
    return config.on_divergence == "rollback" and len(state.rollbacks) < config.max_rollbacks


def _roll_back(
    error: DivergedError,
    state: RunState,
    restore: Callable[[], RunState],
    factor: float,
    echo: Callable[[str], None],
) -> RunState:
    """Restore the last checkpoint after a divergence and lower the LR from there on."""
    rollbacks = [
        *state.rollbacks,
        {"epoch": state.epoch + 1, "update": state.updates + 1, "reason": str(error)},
    ]
    restored = restore()
    restored.rollbacks = rollbacks
    restored.lr_scale = state.lr_scale * factor
    echo(
        f"diverged ({error}); rolled back to epoch {restored.epoch} sample "
        f"{restored.position}, LR scale now {restored.lr_scale:g}"
    )
    return restored


def _all_finite(model: nn.Module) -> bool:
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    for key, value in config_to_dict(config).items():
        if key in _RESUMABLE_CHANGES or key not in saved:
            continue
        if saved[key] != value:
            raise CheckpointError(
                f"cannot resume {path}: it was trained with {key}={saved[key]!r}, "
                f"not {value!r}; use another --out for a new run"
            )


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _format_row(record: dict[str, Any]) -> str:
    eig = record.get("eigenvalue")
    eig_text = f"{eig:9.3g}" if eig is not None else f"{'-':>9}"
    return (
        f"{record['epoch']:>5} {record['batch_size']:>7} {record['lr']:>9.4g} "
        f"{record['updates']:>8} {record['train_loss']:>10.4f} {record['train_acc']:>9.4f} "
        f"{record['test_loss']:>9.4f} {record['test_acc']:>8.4f} {eig_text} "
        f"{record['wall_s']:>8.1f}"
    )


TABLE_HEADER = (
    f"{'epoch':>5} {'batch':>7} {'lr':>9} {'updates':>8} {'train_loss':>10} {'train_acc':>9} "
    f"{'test_loss':>9} {'test_acc':>8} {'eigval':>9} {'wall_s':>8}"
)


def train(
    config: TrainConfig,
    *,
    show_progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says, writing results to ``config.out``; return the summary.

    ``stop_after`` ends the call after that many epochs of this call (checkpoint saved,
    no summary written), as an interruption at an epoch boundary would; ``resume``
    continues. Useful for time-sliced jobs and for testing exact resume.

    ``show_progress`` (default: when stderr is a terminal) shows a progress bar per epoch;
    ``echo`` receives the table of epochs, one line each (None for silence).
    """
    config.validate()
    world, device_name = setup(config.device)
    if world.enabled and config.hessian_samples < world.size:
        raise UsageError(
            f"hessian_samples ({config.hessian_samples}) must be at least the number of "
            f"processes ({world.size})"
        )
    # Rank 0 alone writes; it holds the run folder's lock for the whole run, so that a
    # second process on the same --out is refused before it reads any data.
    with contextlib.ExitStack() as held:
        problem = None
        if world.is_main:
            try:
                held.enter_context(RunFolder(config.out))
            except UsageError as exc:
                problem = str(exc)
        problem = broadcast_object(problem, world)
        if problem is not None:
            raise UsageError(problem)
        return _train_in_folder(config, world, device_name, show_progress, echo, stop_after)


def _train_in_folder(
    config: TrainConfig,
    world: World,
    device_name: str,
    show_progress: bool | None,
    echo: Callable[[str], None] | None,
    stop_after: int | None,
) -> dict[str, Any]:
    """The body of :func:`train`, once the run folder is this run's alone."""
    device = torch.device(device_name) if world.enabled else resolve_device(device_name)
    if not world.is_main:  # only rank 0 talks and writes
        echo, show_progress = None, False
    echo = echo or (lambda _line: None)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pt"
    taken = ckpt_path.exists() or (out / "summary.json").exists()
    if not config.resume and broadcast_object(taken, world):
        raise UsageError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )

    _seed_everything(config.seed)
    data = load_dataset(
        config.dataset,
        config.data_dir,
        augment=config.augment,
        seed=config.seed,
        limit_train=config.limit_train,
        limit_test=config.limit_test,
        image_size=config.image_size,
    )
    spec = model_spec(config, data)
    channels_last = _uses_channels_last(config, data, device)
    model = build_model(**spec).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = make_scaler(device, config.precision)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    controller = make_controller(config)
    sampler = EpochSampler(len(data.train_y), config.seed)
    adaptive = config.method in ("abs", "absa")
    tracker = _make_tracker(config, data, device, world) if adaptive else None
    state = RunState()

    def restore() -> RunState:
        return _restore(ckpt_path, device, config, model, optimizer, controller, tracker, scaler)

    if config.resume and ckpt_path.exists():
        state = restore()
        if state.epoch > config.epochs:
            raise UsageError(
                f"{out} has finished {state.epoch} epochs already; resume it with --epochs "
                f"{state.epoch} or more (now {config.epochs})"
            )
    # Ctrl-C and SIGTERM are caught from before the first write: a signal never leaves a
    # half-started run, and arrives at the loop as a stop request.
    # The decoding workers (image folders only) start inside, so they inherit the handler.
    with _StopFlag() as stop, Feed(data, device, world, config.loader_workers) as feed:
        # every rank has read the checkpoint before rank 0 writes anything
        broadcast_object(None, world)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_own_temporaries(out, RUN_FILES)  # left by a save that a crash cut short
            save_config(config, out / "config.yaml")
            # The checkpoint's history is the truth: it drops epochs logged after the last save.
            write_jsonl(out / "metrics.jsonl", state.history)

        echo(
            f"training {config.model} on {config.dataset} ({len(data.train_y)} samples), "
            f"method {config.method}, device {device}"
            + (f", {world.size} processes" if world.enabled else "")
        )
        echo(TABLE_HEADER)
        for record in state.history:
            echo(_format_row(record))
        last_epoch = (
            config.epochs if stop_after is None else min(config.epochs, state.epoch + stop_after)
        )

        def save() -> None:
            if not world.is_main:
                return
            # The last good checkpoint is never replaced by non-finite weights.
            if not _all_finite(model):
                raise DivergedError(
                    f"the weights became non-finite in epoch {state.epoch + 1}; lower --lr"
                )
            save_checkpoint(
                ckpt_path,
                {
                    "config": config_to_dict(config),
                    "model_spec": spec,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "controller": controller.state_dict(),
                    "tracker": tracker.state_dict() if tracker is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "run": vars(state),
                    "rng": _rng_state(),
                },
            )

        if not ckpt_path.exists():
            save()  # the starting point, so that a rollback or a crash in epoch 1 has one
        while state.epoch < last_epoch:
            started = time.perf_counter()
            decision = controller.decision()
            try:
                train_stats = _train_epoch(
                    model,
                    optimizer,
                    data,
                    sampler,
                    controller,
                    decision,
                    config,
                    state,
                    device,
                    show_progress,
                    stop,
                    world,
                    feed,
                    scaler,
                    channels_last,
                )
            except DivergedError as exc:
                if not _may_roll_back(config, state):
                    raise
                state = _roll_back(exc, state, restore, config.divergence_lr_factor, echo)
                continue
            if train_stats is None:  # interrupted part-way through the epoch
                state.wall_s += time.perf_counter() - started
                save()
                name = signal.Signals(stop.signal).name
                raise TrainingInterrupted(
                    f"{name}: saved {ckpt_path} at epoch {state.epoch + 1}, sample "
                    f"{state.position} of {sampler.num_samples}; continue with --resume"
                )
            test_loss, test_acc = evaluate(
                model,
                feed,
                config.eval_batch_size,
                device,
                precision=config.precision,
                channels_last=channels_last,
            )
            curvature = _curvature(tracker, model, controller, config, state.epoch)
            controller.step({"eigenvalue": curvature["usable_eigenvalue"], "test_acc": test_acc})
            # every rank measured the same numbers; rank 0's decision is the one kept
            controller.load_state_dict(broadcast_object(controller.state_dict(), world))
            state.epoch += 1
            state.hessian_s += curvature["eig_s"]
            state.wall_s += time.perf_counter() - started
            record = {
                "epoch": state.epoch,
                "batch_size": decision.batch_size,
                "lr": optimizer.param_groups[0]["lr"],
                "eigenvalue": curvature["eigenvalue"],
                "eig_residual": curvature["eig_residual"],
                "eig_matvecs": curvature["eig_matvecs"],
                "eig_converged": curvature["eig_converged"],
                "eig_s": curvature["eig_s"],
                "eig_error": curvature["eig_error"],
                "adv_ratio": decision.adv_ratio,
                "updates": state.updates,
                "samples": state.samples,
                **train_stats,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "wall_s": state.wall_s,
                "hessian_s": state.hessian_s,
            }
            state.history.append(record)
            if world.is_main:
                append_jsonl(out / "metrics.jsonl", record)
            save()
            echo(_format_row(record))
            if stop.signal is not None:
                name = signal.Signals(stop.signal).name
                raise TrainingInterrupted(
                    f"{name}: saved {ckpt_path} after epoch {state.epoch}; continue with --resume"
                )

    if state.epoch < config.epochs:
        echo(f"stopped after epoch {state.epoch}; continue with --resume")
        return _summary(config, state, controller)
    summary = _summary(config, state, controller)
    if world.is_main:
        atomic_write_json(out / "summary.json", summary)
    echo(f"results in {out}/ (metrics.jsonl, summary.json, checkpoint.pt, config.yaml)")
    return summary


def _summary(config: TrainConfig, state: RunState, controller: BatchController) -> dict[str, Any]:
    history = state.history
    last = history[-1] if history else {}
    return {
        "method": config.method,
        "dataset": config.dataset,
        "model": config.model,
        "seed": config.seed,
        "epochs": state.epoch,
        "final_test_acc": last.get("test_acc", math.nan),
        "best_test_acc": max((r["test_acc"] for r in history), default=math.nan),
        "final_test_loss": last.get("test_loss", math.nan),
        "final_train_loss": last.get("train_loss", math.nan),
        "updates": state.updates,
        "samples": state.samples,
        "wall_s": state.wall_s,
        "hessian_s": state.hessian_s,
        "final_batch_size": last.get("batch_size", controller.decision().batch_size),
        "base_batch_size": config.batch_size,
        "rollbacks": len(state.rollbacks),
        "max_batch_size": config.max_batch_size,
    }
