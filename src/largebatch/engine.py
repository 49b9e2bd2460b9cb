"""The training engine: one loop for every method, over objects you pass in.

:func:`fit` takes your model, data, loss and optimizer; :func:`largebatch.train.train`
builds them from names and calls the same :func:`run`. Read :func:`run` and
:func:`_train_epoch` top to bottom: per update the micro-batches (attack, forward,
backward, accumulate), the all-reduce, the step; at each decision point the wanted
meters and the controller's decision; per epoch the evaluation and the records written
to ``out``. Methods differ only in the controller.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from largebatch.accumulate import backward_share
from largebatch.adversarial import fgsm, pgd
from largebatch.checkpoint import checked_part, load_checkpoint, load_part, save_checkpoint
from largebatch.checks import integer, number, plain
from largebatch.config import TrainConfig, config_to_dict, save_config
from largebatch.controllers import BatchController, Decision, checked_decision, make_controller
from largebatch.data import DataSource
from largebatch.distributed import (
    World,
    all_reduce_,
    all_reduce_gradients,
    broadcast_object,
    setup,
    shard,
)
from largebatch.errors import (
    CheckpointError,
    ConfigError,
    DivergedError,
    InvalidTypeError,
    UsageError,
)
from largebatch.hessian import EigenTracker
from largebatch.interrupts import raise_if_held
from largebatch.io import append_jsonl, atomic_write_json, write_jsonl
from largebatch.lr import BASE_LR_KEY, LRScaler
from largebatch.meters import (
    EIGENVALUE,
    NOISE_SCALE,
    CurvatureMeter,
    GradientNoiseMeter,
    Meter,
    Point,
    time_of,
)
from largebatch.outputs import RUN_FILES, RunFolder, foreign_files, remove_own_temporaries
from largebatch.pipeline import Feed, materialize
from largebatch.precision import autocast, make_scaler
from largebatch.sampler import EpochSampler, probe_batches
from largebatch.scalars import ScalarLog
from largebatch.user_data import as_source, is_classification

__all__ = [
    "fit",
    "run",
    "Parts",
    "evaluate",
    "resolve_device",
    "seed_everything",
    "run_folder",
    "make_tracker",
    "RunState",
    "TrainingInterrupted",
    "RUN_FILES",
    "TABLE_HEADER",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

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
    "tensorboard",
}

# Config keys that name or shape built-in data and models: fit() takes the objects.
_RECIPE_KEYS = (
    "dataset",
    "model",
    "data_dir",
    "augment",
    "limit_train",
    "limit_test",
    "image_size",
    "loader_workers",
)
# Config keys of the default SGD, meaningless next to an optimizer of the user's.
_SGD_KEYS = ("lr", "momentum", "weight_decay")


@dataclass
class RunState:
    """Counters that carry over across epochs and restarts (cumulative)."""

    epoch: int = 0  # epochs finished
    updates: int = 0  # optimizer steps
    samples: int = 0  # training samples processed
    wall_s: float = 0.0  # training + evaluation time, eigenvalue time included
    hessian_s: float = 0.0  # time spent on curvature estimates
    measure_s: float = 0.0  # time spent by all meters (curvature included)
    history: list[dict[str, Any]] = field(default_factory=list)
    # An epoch interrupted part-way: samples done, their loss and accuracy sums, and the
    # augmentation generator's state, so that resuming finishes it exactly.
    position: int = 0
    partial_loss: float = 0.0
    partial_correct: int = 0
    augment_rng: torch.Tensor | None = None
    # Samples of the epoch in progress left out: a last batch that would give a rank a
    # single sample, with a batch norm that cannot train on one (see _Loop.needs_pairs).
    dropped: int = 0
    # Divergence guard: LR multiplier after rollbacks, and what happened.
    lr_scale: float = 1.0
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    # Batch changes of the epoch in progress: sample count, new batch, LR factor, reason.
    changes: list[dict[str, Any]] = field(default_factory=list)
    # The epoch's decision points: samples, batch, LR, noise scale and eigenvalue there.
    points: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Parts:
    """The objects a run is made of.

    Attributes:
        model: the network (moved to the run's device).
        data: train and test split (:class:`~largebatch.data.DataSource`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch's mean loss.
        optimizer: an optimizer over ``model``'s parameters, a factory
            ``params -> Optimizer``, or None for SGD from the config.
        spec: how :func:`largebatch.models.build_model` rebuilds the model from the
            checkpoint (named models); None for a model given as an object.
        controller: the batch controller; None builds it from the config's method.
        meters: meters by measurement name, added to (or replacing) the built-in ones.
    """

    model: nn.Module
    data: DataSource
    loss_fn: LossFn = F.cross_entropy
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None
    spec: dict[str, Any] | None = None
    controller: BatchController | None = None
    meters: Mapping[str, Meter] | None = None


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
        raise_if_held()  # a Ctrl-C during start-up: stop before anything is written
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def run_folder(
    out: str | None, world: World, resume: bool = False, what: str = "--out"
) -> Iterator[None]:
    """Hold run folder ``out`` for the block (rank 0 takes its lock; every rank learns
    whether that worked). Refused here, before any data is read: a second process on the
    same folder, a folder holding a run when ``resume`` is off, and a folder holding files
    that no run of ours wrote (unless resuming the run in it). ``out=None`` holds nothing."""
    with contextlib.ExitStack() as held:
        problem = None
        if world.is_main and out is not None:
            try:
                held.enter_context(RunFolder(out, what))
                _check_claim(Path(out), resume, what)
            except UsageError as exc:
                held.close()
                problem = str(exc)
        problem = broadcast_object(problem, world)
        if problem is not None:
            raise UsageError(problem)
        yield


def _check_claim(out: Path, resume: bool, what: str) -> None:
    if resume and (out / "checkpoint.pt").exists():
        return  # the run's own folder: only our files are rewritten
    if (out / "checkpoint.pt").exists() or (out / "summary.json").exists():
        resume_it = "--resume" if what == "--out" else "resume=True"
        raise UsageError(
            f"{out} already holds a run; pass {resume_it} to continue it or choose another {what}"
        )
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (
            f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        )
        raise UsageError(
            f"{what} {out} holds files that no largebatch run wrote ({shown}); nothing was "
            "changed; choose an empty or new folder"
        )


# --------------------------------------------------------------------------- fit


def fit(
    model: nn.Module,
    train_data: Any,
    *,
    eval_data: Any = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    out: str | Path | None = None,
    input_range: tuple[float, float] | None = None,
    controller: BatchController | None = None,
    meters: Mapping[str, Meter] | None = None,
    show_progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    verbose: bool = True,
    **config: Any,
) -> dict[str, Any]:
    """Train ``model`` on ``train_data`` with the loop the command line uses; return the
    summary (the keys of ``summary.json``).

    Args:
        model: any ``nn.Module`` taking a batch of inputs.
        train_data, eval_data: a map-style ``torch.utils.data.Dataset`` whose items are
            ``(input, target)`` pairs, or a pair of tensors ``(inputs, targets)``; read
            once into memory. ``eval_data`` None skips evaluation.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss; default
            cross-entropy. Accuracy is reported when the targets are integer labels and
            the outputs are ``(batch, classes)`` logits; otherwise loss only.
        optimizer: an optimizer over ``model``'s parameters, or a factory
            ``params -> Optimizer``; default SGD with the config's ``lr``, ``momentum``
            and ``weight_decay``. Every LR change multiplies each param group's own LR.
        out: folder for ``config.yaml``, ``metrics.jsonl``, ``summary.json`` and
            ``checkpoint.pt`` (needed for ``resume``); None writes nothing.
        input_range: ``(low, high)`` where adversarial examples are clamped; None: no clamp.
        controller: a :class:`~largebatch.controllers.BatchController` of your own in
            place of the one ``method`` names.
        meters: extra meters by measurement name, for your controller's ``measures``.
        show_progress: progress bar per epoch (default: when stderr is a terminal).
        echo: receives the table of epochs, one line each; default ``print``.
        stop_after: end the call after that many epochs, as an interruption would.
        verbose: False silences the table and the progress bar (as Keras's ``fit``).
        **config: keys of :class:`~largebatch.config.TrainConfig` (``method``, ``epochs``,
            ``batch_size``, ``max_batch_size``, ``micro_batch_size``, ``seed``,
            ``device``, ``precision``, adversarial and Hessian settings, ``resume``, ...).

    Raises:
        UsageError: bad data, config, model or optimizer (one line, before training).
        TrainingInterrupted: Ctrl-C or SIGTERM; with ``out``, the checkpoint was saved.
    """
    cfg = _fit_config(model, train_data, optimizer, out, config)
    _check_fit_objects(loss_fn, controller, meters, input_range)
    if not verbose:
        echo, show_progress = (lambda _line: None), False
    elif echo is None:
        echo = print
    world, device_name = setup(cfg.device)
    seed_everything(cfg.seed)
    with run_folder(None if out is None else cfg.out, world, cfg.resume, what="out"):
        data = as_source(train_data, eval_data, name=cfg.dataset, input_range=input_range)
        parts = Parts(
            model=model,
            data=data,
            loss_fn=loss_fn or F.cross_entropy,
            optimizer=optimizer,
            controller=controller,
            meters=meters,
        )
        return run(
            cfg,
            parts,
            world,
            device_name,
            write=out is not None,
            show_progress=show_progress,
            echo=echo,
            stop_after=stop_after,
        )


def _check_fit_objects(loss_fn: Any, controller: Any, meters: Any, input_range: Any) -> None:
    """fit()'s objects are of the types it takes (before any work starts)."""
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidTypeError(
            f"loss_fn is a {type(loss_fn).__name__}; pass a function (outputs, targets) -> loss"
        )
    if controller is not None and not isinstance(controller, BatchController):
        hint = (
            f" (for a built-in one, pass method={controller!r})"
            if isinstance(controller, str)
            else ""
        )
        raise InvalidTypeError(
            f"controller is a {type(controller).__name__}; pass a "
            f"largebatch.controllers.BatchController{hint}"
        )
    if meters is not None:
        if not isinstance(meters, Mapping):
            raise InvalidTypeError(
                f"meters is a {type(meters).__name__}; pass a dict {{measurement name: Meter}}"
            )
        for name, meter in meters.items():
            if not isinstance(name, str) or not isinstance(meter, Meter):
                raise InvalidTypeError(
                    f"meters[{name!r}] is a {type(meter).__name__}; each value must be a "
                    "largebatch.meters.Meter, each key a measurement name"
                )
    if input_range is not None and (
        not isinstance(input_range, (tuple, list)) or len(input_range) != 2
    ):
        raise InvalidTypeError(f"input_range must be a pair (low, high), got {input_range!r}")


def _fit_config(
    model: Any, train_data: Any, optimizer: Any, out: Any, config: dict[str, Any]
) -> TrainConfig:
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise InvalidTypeError(
            f"out must be a folder path (str or pathlib.Path), got {type(out).__name__} {out!r}"
        )
    for key in _RECIPE_KEYS:
        if key in config:
            raise ConfigError(
                f"fit() takes no {key!r}: it trains the model and data you pass in; "
                "use largebatch.train.train or the command line for built-in names"
            )
    if optimizer is not None:
        given = [key for key in _SGD_KEYS if key in config]
        if given:
            raise ConfigError(
                f"{', '.join(given)} configure the default SGD; set them on your optimizer"
            )
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (see largebatch.config.TrainConfig)")
    labels = {"dataset": type(train_data).__name__, "model": type(model).__name__}
    cfg = TrainConfig(**labels, **config, out=str(out) if out is not None else "(none)")
    if cfg.resume and out is None:
        raise ConfigError("resume needs out, the folder of the run to continue")
    if cfg.tensorboard and out is None:
        raise ConfigError("tensorboard needs out, the folder its event files go to")
    return cfg.validate(names=False)


# --------------------------------------------------------------------------- the run


def run(
    config: TrainConfig,
    parts: Parts,
    world: World,
    device_name: str,
    *,
    write: bool = True,
    show_progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``parts`` as ``config`` says; return the summary.

    With ``write``, ``config.out`` (held by :func:`run_folder`) receives the run files and
    the checkpoint; without, the checkpoint for rollbacks is kept in memory.
    """
    device = torch.device(device_name) if world.enabled else resolve_device(device_name)
    if world.enabled and config.hessian_samples < world.size:
        raise UsageError(
            f"hessian_samples ({config.hessian_samples}) must be at least the number of "
            f"processes ({world.size})"
        )
    if not world.is_main:  # only rank 0 talks and writes
        echo, show_progress = None, False
    echo = echo or (lambda _line: None)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    out = Path(config.out)
    store = _CheckpointStore(out / "checkpoint.pt" if write else None, world)
    data = parts.data
    if len(data.train_y) < 1:
        raise UsageError("the training data is empty")
    _check_parameters(parts.model)
    channels_last = _uses_channels_last(config, data, device)
    model = parts.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    accuracy, needs_pairs = _check_model(model, parts.loss_fn, data, device)
    if needs_pairs and config.batch_size < 2 * world.size:
        raise UsageError(
            f"the model's batch norm sees one value per channel and sample, so it needs at "
            f"least 2 samples per process in every update; batch_size {config.batch_size} "
            f"with {world.size} process(es) is too small"
        )
    optimizer = _make_optimizer(parts.optimizer, model, config)
    resuming = config.resume and store.exists()
    if not resuming:  # a reused optimizer starts from the LRs its groups hold now
        for group in optimizer.param_groups:
            group[BASE_LR_KEY] = float(group["lr"])
    lr = LRScaler(optimizer)
    scaler = make_scaler(device, config.precision)
    controller = parts.controller or make_controller(
        _guarded_by(config, optimizer) if parts.optimizer is not None else config,
        len(data.train_y),
    )
    _check_controller(controller)
    meters = _make_meters(controller, parts, config, device, world)
    hyper = optimizer_record(optimizer)  # as the run starts
    recorded = _config_record(config, hyper if parts.optimizer is not None else None)
    fingerprint = _data_fingerprint(data)
    sampler = EpochSampler(len(data.train_y), config.seed)
    loop = _Loop(
        config,
        model,
        parts.loss_fn,
        optimizer,
        lr,
        scaler,
        controller,
        meters,
        sampler,
        device,
        world,
        channels_last,
        accuracy,
        show_progress,
        needs_pairs,
    )
    state = RunState()

    def restore() -> RunState:
        return _restore(
            store.load(),
            store.where,
            recorded,
            fingerprint,
            model,
            optimizer,
            controller,
            meters,
            scaler,
        )

    if resuming:
        state = restore()
        if state.epoch > config.epochs:
            raise UsageError(
                f"{out} has finished {state.epoch} epochs already; resume it with --epochs "
                f"{state.epoch} or more (now {config.epochs})"
            )
    # Ctrl-C and SIGTERM are caught from before the first write: a signal never leaves a
    # half-started run, and arrives at the loop as a stop request.
    # The decoding workers (image folders only) start inside, so they inherit the handler.
    with (
        _StopFlag() as stop,
        Feed(data, device, world, config.loader_workers) as feed,
        contextlib.ExitStack() as closing,
    ):
        loop.feed = feed
        _states(controller, meters)  # a state that could never be loaded: refused before writing
        # every rank has read the checkpoint before rank 0 writes anything
        broadcast_object(None, world)
        scalars = None
        if write and world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if config.tensorboard:  # first: a folder it cannot write to changes nothing
                scalars = closing.enter_context(ScalarLog(out / "tensorboard"))
            remove_own_temporaries(out, RUN_FILES)  # left by a save that a crash cut short
            save_config(recorded, out / "config.yaml")
            # The checkpoint's history is the truth: it drops epochs logged after the last save.
            write_jsonl(out / "metrics.jsonl", state.history)

        echo(
            f"training {config.model} on {config.dataset} ({len(data.train_y)} samples), "
            f"method {controller.name}, device {device}"
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
            store.save(
                {
                    "config": recorded,
                    "data": fingerprint,
                    "model_spec": parts.spec,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **_states(controller, meters),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "run": vars(state),
                    "rng": _rng_state(),
                }
            )

        if not store.exists():
            save()  # the starting point, so that a rollback or a crash in epoch 1 has one
        while state.epoch < last_epoch:
            started = time.perf_counter()
            try:
                train_stats = loop.train_epoch(state, stop)
            except DivergedError as exc:
                if not _may_roll_back(config, state):
                    raise
                state = _roll_back(exc, state, restore, config.divergence_lr_factor, echo)
                continue
            if train_stats is None:  # interrupted part-way through the epoch
                state.wall_s += time.perf_counter() - started
                save()
                name = signal.Signals(stop.signal).name
                where = f"saved {store.where} at" if write else "stopped in"
                raise TrainingInterrupted(
                    f"{name}: {where} epoch {state.epoch + 1}, sample "
                    f"{state.position} of {sampler.num_samples}"
                    + ("; continue with --resume" if write else "")
                )
            batch_size, lr_now = loop.last_batch, optimizer.param_groups[0]["lr"]
            test_loss, test_acc = evaluate(
                model,
                feed,
                config.eval_batch_size,
                device,
                precision=config.precision,
                channels_last=channels_last,
                loss_fn=parts.loss_fn,
                accuracy=accuracy,
            )
            point = Point(state.epoch, state.samples, epoch_end=True)
            measured = loop.decide(state, point, {"test_acc": test_acc, "test_loss": test_loss})
            state.epoch += 1
            state.hessian_s += measured["eig_s"]
            state.wall_s += time.perf_counter() - started
            record = {
                "epoch": state.epoch,
                "batch_size": batch_size,
                "lr": lr_now,
                **{k: measured[k] for k in CurvatureMeter.record_keys},
                "adv_ratio": loop.last_adv_ratio,
                "updates": state.updates,
                "samples": state.samples,
                **train_stats,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "wall_s": state.wall_s,
                "hessian_s": state.hessian_s,
                "measure_s": state.measure_s,
                **{k: measured[k] for k in GradientNoiseMeter.record_keys if k != "gns_s"},
                "stability": _stability(measured["eigenvalue"], lr_now, optimizer),
                "batch_changes": state.changes,
                "points": state.points,
            }
            state.changes, state.points = [], []
            state.history.append(record)
            if write and world.is_main:
                append_jsonl(out / "metrics.jsonl", record)
            if scalars is not None:
                scalars.epoch(record)
            save()
            echo(_format_row(record))
            if stop.signal is not None:
                name = signal.Signals(stop.signal).name
                raise TrainingInterrupted(
                    f"{name}: saved {store.where} after epoch {state.epoch}; continue with --resume"
                    if write
                    else f"{name}: stopped after epoch {state.epoch}"
                )

    summary = {**_summary(config, state, controller), "optimizer": hyper}
    if state.epoch < config.epochs:
        echo(f"stopped after epoch {state.epoch}; continue with --resume")
        return summary
    if write and world.is_main:
        atomic_write_json(out / "summary.json", summary)
        echo(f"results in {out}/ (metrics.jsonl, summary.json, checkpoint.pt, config.yaml)")
    return summary


def _stability(
    eigenvalue: float | None, lr: float, optimizer: torch.optim.Optimizer
) -> float | None:
    """``eigenvalue * lr / (2 (1 + momentum))``: 1 is the stability limit of heavy-ball SGD
    on a quadratic with that top curvature (None without an eigenvalue)."""
    if eigenvalue is None:
        return None
    momentum = float(optimizer.param_groups[0].get("momentum", 0.0) or 0.0)
    return eigenvalue * lr / (2.0 * (1.0 + momentum))


class _CheckpointStore:
    """The run's checkpoint: a file written atomically, or bytes in memory (no ``out``)."""

    def __init__(self, path: Path | None, world: World) -> None:
        self.path = path
        self.world = world
        self._memory: bytes | None = None
        self.where = str(path) if path is not None else "the in-memory checkpoint"

    def exists(self) -> bool:
        return self.path.exists() if self.path is not None else self._memory is not None

    def save(self, payload: dict[str, Any]) -> None:
        if self.path is not None:
            save_checkpoint(self.path, payload)
        else:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            self._memory = buffer.getvalue()

    def load(self) -> dict[str, Any]:
        # Loaded on the CPU: the RNG and generator states in it must stay CPU byte tensors
        # (torch.set_rng_state and Generator.set_state refuse CUDA ones); the model's and
        # the optimizer's load_state_dict copy each tensor to its parameter's device.
        if self.path is not None:
            return load_checkpoint(self.path, map_location="cpu")
        if self._memory is None:  # only rank 0 keeps one: rollback needs out under torchrun
            raise UsageError("on_divergence: rollback under torchrun needs out (a run folder)")
        return torch.load(io.BytesIO(self._memory), map_location="cpu", weights_only=True)


def _check_parameters(model: nn.Module) -> None:
    """Something to train, and not on the meta device (before any work)."""
    params = list(model.parameters())
    if not params:
        raise UsageError(f"the model ({type(model).__name__}) has no parameters: nothing to train")
    if not any(p.requires_grad for p in params):
        raise UsageError(
            "every parameter of the model is frozen (requires_grad=False): nothing to train"
        )
    if any(t.is_meta for t in (*params, *model.buffers())):
        raise UsageError(
            "the model is on the meta device (no values yet); materialize it first, e.g. "
            "model.to_empty(device='cpu') and initialise its weights"
        )


def _check_model(
    model: nn.Module, loss_fn: LossFn, data: DataSource, device: torch.device
) -> tuple[bool, bool]:
    """Run the model and the loss on a few training samples (eval mode): the first two and
    those with the extreme labels, then one test sample. What would crash or go wrong
    later fails here with one line: a model or loss that does not fit the data, labels
    beyond the output width, outputs that are not one tensor, non-finite outputs or loss,
    a loss that no parameter's gradient reaches.

    Returns whether accuracy applies (integer labels and ``(batch, classes)`` logits with
    an output for every label), and whether a batch-norm layer sees one value per channel
    and sample (``BatchNorm1d`` on ``(batch, features)``): in training mode that layer
    fails on a batch of one sample."""
    rows = _check_rows(data.train_y)
    x = materialize(data.train_x[rows]).to(device)
    y = data.train_y[rows].to(device)
    classes = is_classification(data.train_y)
    was_training = model.training
    model.eval()
    single_values: list[bool] = []
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, inputs: single_values.append(inputs[0].shape[2:].numel() == 1)
        )
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        outputs, loss = _run_user_model(model, loss_fn, x, y, grad=True)
        for hook in hooks:
            hook.remove()
        _check_outputs(outputs, loss)
        if not loss.requires_grad:
            raise UsageError(
                "the loss does not depend on the model's parameters (detached, or computed "
                "under torch.no_grad?); nothing would be trained"
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, trainable, allow_unused=True)
        if all(g is None for g in grads):
            raise UsageError("no parameter of the model gets a gradient from the loss")
        if len(data.test_y):
            test_rows = _check_rows(data.test_y)[-1:]
            x_test = materialize(data.test_x[test_rows]).to(device)
            y_test = data.test_y[test_rows].to(device)
            _check_outputs(*_run_user_model(model, loss_fn, x_test, y_test, False, "test"), "test")
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    accuracy = (
        classes
        and outputs.ndim == 2
        and len(outputs) == len(y)
        and data.num_classes <= outputs.shape[1]
    )
    return accuracy, any(single_values)


def _check_rows(labels: torch.Tensor) -> torch.Tensor:
    """The first two samples, and for class labels those with the smallest and largest."""
    rows = list(range(min(2, len(labels))))
    if is_classification(labels) and len(labels) > 2:
        rows += [int(labels.argmin()), int(labels.argmax())]
    return torch.tensor(rows)


def _run_user_model(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    grad: bool,
    split: str = "training",
) -> tuple[torch.Tensor, Any]:
    """``model(x)`` and ``loss_fn(outputs, y)``; what fails in them is one line."""
    with torch.set_grad_enabled(grad):
        outputs = _user_call(lambda: model(x), x, y, split)
        if not isinstance(outputs, torch.Tensor):
            raise UsageError(
                f"the model returns a {type(outputs).__name__}, not one tensor; wrap it so "
                "that forward returns what the loss takes (e.g. the logits: a forward that "
                "returns model(x)[0])"
            )
        if loss_fn is F.cross_entropy and is_classification(y) and outputs.ndim == 2:
            top = int(y.max())  # cross-entropy reads an output per class
            if top >= outputs.shape[1]:
                raise UsageError(
                    f"the labels go up to {top}, but the model gives {outputs.shape[1]} outputs "
                    f"per sample; it needs at least {top + 1} (one per class)"
                )
        return outputs, _user_call(lambda: loss_fn(outputs, y), x, y, split)


def _user_call(call: Callable[[], Any], x: torch.Tensor, y: torch.Tensor, split: str) -> Any:
    try:
        return call()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"the model or loss_fn fails on {split} samples of shape {tuple(x.shape[1:])} "
            f"with targets {tuple(y.shape[1:])} {y.dtype}: {type(exc).__name__}: "
            + " ".join(str(exc).split())[:300]
        ) from None


def _check_outputs(outputs: torch.Tensor, loss: Any, split: str = "training") -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError(
            "loss_fn(outputs, targets) must return the batch's mean loss, one number; got "
            + (
                f"shape {tuple(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else type(loss).__name__
            )
        )
    if not bool(torch.isfinite(outputs.detach()).all()):
        raise UsageError(
            f"the model's outputs on the first {split} samples are not finite (NaN or "
            "infinity); check its initialisation and the inputs"
        )
    if not bool(torch.isfinite(loss.detach())):
        raise UsageError(f"the loss on the first {split} samples is {float(loss):g}, not finite")


def _check_controller(controller: BatchController) -> None:
    """A controller's cadence and first decision are valid before any work."""
    if controller.decide_every is not None:
        integer(controller.decide_every, type(controller).__name__, "decide_every", minimum=1)
    checked_decision(controller, controller.decision())


def _guarded_by(config: TrainConfig, optimizer: torch.optim.Optimizer) -> TrainConfig:
    """``config`` with the LR and momentum of the optimizer that runs (the curvature
    guard's cap is computed from them)."""
    group = optimizer.param_groups[0]
    momentum = float(group.get("momentum", 0.0) or 0.0)
    return dataclasses.replace(config, lr=float(group["lr"]), momentum=momentum)


def _config_record(config: TrainConfig, users_optimizer: dict[str, Any] | None) -> dict[str, Any]:
    """What ``config.yaml`` and the checkpoint record: the config, and with an optimizer
    of the user's, its record (:func:`optimizer_record`) in place of the default SGD's
    keys."""
    record = config_to_dict(config)
    if users_optimizer is not None:
        for key in _SGD_KEYS:
            record.pop(key)
        record["optimizer"] = users_optimizer
    return record


def optimizer_record(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's class and each param group's hyper-parameters (plain values)."""

    def simple(value: Any) -> Any:
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            return list(value)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        return repr(value)

    groups = [
        {key: simple(value) for key, value in group.items() if key not in ("params", BASE_LR_KEY)}
        for group in optimizer.param_groups
    ]
    return {"class": type(optimizer).__name__, "param_groups": groups}


def _data_fingerprint(data: DataSource) -> dict[str, Any]:
    """Enough of the data to tell, on resume, that it is the same: sizes, shapes, and a
    digest of up to 64 evenly spread training samples (in-memory data only)."""
    count = len(data.train_y)
    digest = None
    if isinstance(data.train_x, torch.Tensor):
        rows = torch.linspace(0, count - 1, min(64, count)).long()
        hasher = hashlib.sha256()
        for part in (data.train_x[rows], data.train_y[rows]):
            hasher.update(part.detach().cpu().contiguous().numpy().tobytes())
        digest = hasher.hexdigest()[:16]
    return {
        "train samples": count,
        "test samples": len(data.test_y),
        "input shape": list(data.input_shape),
        "sample digest": digest,
    }


def _states(controller: BatchController, meters: Mapping[str, Meter]) -> dict[str, Any]:
    """The controller's and meters' states as plain data (so that the checkpoint loads
    with ``weights_only``); a state holding anything else is refused, naming it."""
    name = type(controller).__name__
    return {
        "controller": plain(controller.state_dict(), f"the state of controller {name}"),
        "meters": {
            key: plain(meter.state_dict(), f"the state of meter {key!r}")
            for key, meter in meters.items()
        },
    }


def _make_optimizer(given: Any, model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if given is None:
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    optimizer = given
    if not isinstance(given, torch.optim.Optimizer):
        if not callable(given):
            raise UsageError(
                f"optimizer is a {type(given).__name__}; pass a torch.optim.Optimizer or a "
                "factory params -> Optimizer"
            )
        try:
            optimizer = given(model.parameters())
        except Exception as exc:
            raise UsageError(f"the optimizer factory failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(
                f"the optimizer factory returned a {type(optimizer).__name__}, not an Optimizer"
            )
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
        raise UsageError("the optimizer holds parameters that are not the model's")
    step = inspect.signature(optimizer.step).parameters.get("closure")
    if step is not None and step.default is inspect.Parameter.empty:
        raise UsageError(
            f"{type(optimizer).__name__} needs a closure in step() (it evaluates the loss "
            "several times per update), which a batch-size controller's loop cannot give; "
            "use a first-order optimizer such as SGD, Adam or AdamW"
        )
    for i, group in enumerate(optimizer.param_groups):
        number(group["lr"], type(optimizer).__name__, f"param_groups[{i}]['lr']", low=0.0)
    return optimizer


def make_tracker(
    config: TrainConfig,
    data: DataSource,
    device: torch.device,
    world: World,
    loss_fn: LossFn,
    samples: int | None = None,
) -> EigenTracker:
    """The top-eigenvalue tracker on a probe set drawn once from the training data.

    Under torchrun each rank holds a slice of every probe batch and the Hessian-vector
    products are all-reduced, so every rank gets the single-process eigenvalue.
    """
    probe = probe_batches(
        data.train_x,
        data.train_y,
        samples or config.hessian_samples,
        config.micro_batch_size or config.batch_size,
        seed=config.seed + _PROBE_SEED_OFFSET,
    )
    probe = [
        (shard(materialize(x), world).to(device), shard(y, world).to(device)) for x, y in probe
    ]
    probe = [(x, y) for x, y in probe if len(y)]
    if config.hessian_mode == "reference":
        return EigenTracker(loss_fn, probe, method="reference", seed=config.seed)
    return EigenTracker(
        loss_fn,
        probe,
        tol=config.hessian_tol,
        max_matvecs=config.hessian_max_matvecs,
        method="lanczos",
        seed=config.seed,
    )


def _make_meters(
    controller: BatchController,
    parts: Parts,
    config: TrainConfig,
    device: torch.device,
    world: World,
) -> dict[str, Meter]:
    """One meter per measurement the controller may ask for (the user's first)."""
    given = dict(parts.meters or {})
    meters: dict[str, Meter] = {}
    for name in sorted(controller.measures):
        if name in given:
            meters[name] = given.pop(name)
        elif name == EIGENVALUE:
            # the guard's ceiling needs a stable estimate: a larger probe (>= 1024 samples)
            samples = config.guard_samples if config.curvature_guard else config.hessian_samples
            tracker = make_tracker(config, parts.data, device, world, parts.loss_fn, samples)
            meters[name] = CurvatureMeter(
                tracker,
                config.hessian_every,
                strict=config.hessian_mode != "reference",
                every_samples=config.hessian_every_samples,
            )
        elif name == NOISE_SCALE:
            meters[name] = GradientNoiseMeter(config.gns_micro_batch, config.gns_decay, world)
        else:
            raise UsageError(
                f"controller {controller.name!r} wants measurement {name!r}, which no meter "
                "provides; pass meters={name: meter}"
            )
    return {**meters, **given}


# --------------------------------------------------------------------------- the loop


class _Loop:
    """The per-update work of a run, with the objects it needs (built once by :func:`run`)."""

    def __init__(self, config: TrainConfig, model: nn.Module, loss_fn: LossFn,
                 optimizer: torch.optim.Optimizer, lr: LRScaler,
                 scaler: torch.amp.GradScaler | None, controller: BatchController,
                 meters: dict[str, Meter], sampler: EpochSampler, device: torch.device,
                 world: World, channels_last: bool, accuracy: bool,
                 show_progress: bool, needs_pairs: bool) -> None:  # fmt: skip
        self.config, self.model, self.loss_fn = config, model, loss_fn
        self.optimizer, self.lr, self.scaler = optimizer, lr, scaler
        self.controller, self.meters, self.sampler = controller, meters, sampler
        self.device, self.world, self.channels_last = device, world, channels_last
        self.accuracy, self.show_progress = accuracy, show_progress
        self.needs_pairs = needs_pairs  # no piece of one sample (batch norm would fail)
        self.feed: Feed | None = None
        self.bn_stats = _StatsPerUpdate(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.last_batch = controller.decision().batch_size
        self.last_adv_ratio = controller.decision().adv_ratio

    def wanted(self) -> list[Meter]:
        return [self.meters[n] for n in sorted(self.controller.wants) if n in self.meters]

    def decide(
        self, state: RunState, point: Point, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A decision point: run the wanted meters, step the controller, note a change.

        Returns the meters' numbers (the curvature record's keys always present) and
        ``measure_s``, the seconds they took."""
        model, controller = self.model, self.controller
        before = controller.decision()
        measured: dict[str, Any] = {**CurvatureMeter.empty(), **GradientNoiseMeter.empty()}
        seconds = 0.0
        for meter in self.wanted():
            numbers = meter.at_decision(model, point)
            measured.update(numbers)
            seconds += time_of(numbers)
        told = {**measured, **(extra or {}), "epoch_end": point.epoch_end}
        told.update({EIGENVALUE: measured["usable_eigenvalue"], "samples": point.samples})
        controller.step(told)
        # every rank measured the same numbers; rank 0's decision is the one kept
        controller.load_state_dict(broadcast_object(controller.state_dict(), self.world))
        after = checked_decision(controller, controller.decision())
        state.points.append(
            {
                "samples": point.samples,
                "batch_size": after.batch_size,
                "lr": self.lr.bases()[0] * after.lr_factor * state.lr_scale,
                "gns": measured.get(NOISE_SCALE),
                "eigenvalue": measured["eigenvalue"],
                "stability": _stability(
                    measured["eigenvalue"], self.optimizer.param_groups[0]["lr"], self.optimizer
                ),
            }
        )
        if after.batch_size != before.batch_size:
            state.changes.append(
                {
                    "samples": point.samples,
                    "batch_size": after.batch_size,
                    "lr_factor": after.lr_factor,
                    "reason": controller.last_reason or "schedule",
                }
            )
        state.measure_s += seconds
        return {**measured, "measure_s": seconds}

    def train_epoch(self, state: RunState, stop: _StopFlag) -> dict[str, float | None] | None:
        """One pass over the training set, from sample ``state.position``.

        The epoch runs in segments between decision points: each segment plans its
        batches at the batch size then in force (so the input feed plans no further than
        the next decision point). Returns the epoch's train loss and accuracy, or None
        when ``stop`` was raised: then ``state`` holds the position and partial sums.
        """
        config, world, sampler, device = self.config, self.world, self.sampler, self.device
        self.model.train()
        epoch = state.epoch
        augment_rng = torch.Generator().manual_seed(config.seed * 7919 + epoch)
        if state.augment_rng is not None:
            augment_rng.set_state(state.augment_rng)
        # The partial sums of a resumed epoch are global: rank 0 carries them.
        sums = _Sums(state, world, device)
        bar = tqdm(
            initial=state.position,
            total=sampler.num_samples,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="sample",
            unit_scale=True,
            leave=False,
            disable=not self.show_progress,
            file=sys.stderr,
        )
        try:
            while state.position < sampler.num_samples:
                stopped = self._segment(state, stop, sums, augment_rng, bar)
                if stopped:
                    state.partial_loss, state.partial_correct = sums.totals()
                    state.augment_rng = augment_rng.get_state()
                    return None
                if state.position < sampler.num_samples:  # a decision point inside the epoch
                    self.decide(state, Point(epoch, state.samples, epoch_end=False))
        finally:
            bar.close()
        loss, correct = sums.totals()
        dropped, seen = state.dropped, sampler.num_samples - state.dropped
        state.position, state.partial_loss, state.partial_correct = 0, 0.0, 0
        state.augment_rng, state.dropped = None, 0
        return {
            "train_loss": loss / seen,
            "train_acc": correct / seen if self.accuracy else None,
            "dropped_samples": dropped,
        }

    def _segment(
        self,
        state: RunState,
        stop: _StopFlag,
        sums: _Sums,
        augment_rng: torch.Generator,
        bar: tqdm,
    ) -> bool:
        """Updates from ``state.position`` to the next decision point; True when stopped."""
        config, sampler = self.config, self.sampler
        decision = checked_decision(self.controller, self.controller.decision())
        global_batch = decision.batch_size
        micro = min(config.micro_batch_size or config.batch_size, global_batch)
        # each meter says which updates it measures (every stride-th of the run) and the
        # micro-batches those run in
        window = self.controller.decide_every or sampler.num_samples
        plans = [(meter, *meter.plan(global_batch, micro, window)) for meter in self.wanted()]
        num_batches = sampler.num_batches(global_batch)
        first_step = num_batches - sampler.num_batches(global_batch, state.position)
        end = _next_decision_point(state, global_batch, sampler.num_samples, self.controller)
        assert self.feed is not None
        batches = self.feed.train_batches(
            sampler.batches(state.epoch, global_batch, start=state.position, stop=end),
            micro,
            augment=config.augment,
            augment_rng=augment_rng,
            augment_seed=config.seed * 1_000_003 + state.epoch,
        )
        self.last_batch, self.last_adv_ratio = global_batch, decision.adv_ratio
        for step, (indices, micro_batches) in enumerate(batches, start=first_step):
            warmup = self.controller.warmup_factor(step / num_batches)
            self.lr.apply(decision.lr_factor * state.lr_scale * warmup)
            due = [(meter, size) for meter, size, stride in plans if state.updates % stride == 0]
            meters = [meter for meter, _ in due]
            size = min((size for _, size in due), default=micro)
            if size < micro:
                micro_batches = _split(micro_batches, size)
            if self.needs_pairs:
                micro_batches = _without_single_samples(micro_batches)
                if len(indices) < 2 * self.world.size:  # a rank would get a single sample
                    state.dropped += len(indices)
                    state.position += len(indices)
                    bar.update(len(indices))
                    continue
            self._update(indices, micro_batches, decision, state, stop, sums, meters)
            state.updates += 1
            state.samples += len(indices)
            state.position += len(indices)
            bar.update(len(indices))
            if stop.signal is not None and state.position < sampler.num_samples:
                return True
        return False

    def _update(
        self,
        indices: torch.Tensor,
        micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
        decision: Decision,
        state: RunState,
        stop: _StopFlag,
        sums: _Sums,
        meters: list[Meter],
    ) -> None:
        """One optimizer update over a global batch, run as micro-batches whose gradients
        accumulate, each weighted by its share of the batch (the short last batch of an
        epoch is weighted by its true size). Under torchrun each rank runs its slice and
        one all-reduce sums the gradients (see :mod:`largebatch.distributed`)."""
        model, optimizer, scaler, device = self.model, self.optimizer, self.scaler, self.device
        optimizer.zero_grad(set_to_none=True)
        accumulating = len(micro_batches) > 1
        if accumulating:
            self.bn_stats.begin()
        for xb, yb in micro_batches:
            xb = _to_device(xb, device, self.channels_last)
            yb = yb.to(device, non_blocking=True)
            xb = self._with_adversarial_share(xb, yb, decision.adv_ratio)
            with autocast(device, self.config.precision):
                out = model(xb)
                loss = self.loss_fn(out, yb)
            backward_share(loss, len(yb), len(indices), scaler)
            sums.add(loss, out, yb, self.accuracy)
            for meter in meters:
                meter.after_backward(model, len(yb), len(indices))
            if accumulating:
                self.bn_stats.micro_batch_done(len(yb))
        if accumulating:
            self.bn_stats.end()
        stop_flag = all_reduce_gradients(
            self.params, self.world, 1.0 if stop.signal else 0.0, self.bn_stats.running
        )
        if stop_flag and stop.signal is None:  # another rank was signalled
            stop.signal = signal.SIGTERM
        # A diverged run must stop before a non-finite update reaches the weights; one
        # check (one device sync) covers the loss and the gradient.
        # With fp16 loss scaling, an overflowing gradient is the scaler's business: it skips
        # the step and lowers the scale. Only a non-finite loss is divergence then.
        point = Point(state.epoch, state.samples + len(indices), epoch_end=False)
        for meter in meters:  # (before unscaling: with fp16, the scale cancels in ratios)
            meter.at_update(model, point)
        if scaler is not None:
            scaler.unscale_(optimizer)
            grad_norm = torch.zeros((), device=device)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if not torch.isfinite(sums.loss + grad_norm.to(sums.loss.device)):
            what = "loss" if not torch.isfinite(sums.loss) else "gradient"
            raise DivergedError(
                f"training {what} became non-finite in epoch {state.epoch + 1} "
                f"(update {state.updates + 1}, lr {optimizer.param_groups[0]['lr']:.4g}); "
                "lower --lr and try again"
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def _with_adversarial_share(
        self, x: torch.Tensor, y: torch.Tensor, ratio: float
    ) -> torch.Tensor:
        """Replace the first ``round(ratio * len(x))`` samples by attacked ones (ABSA).

        As in the reference code, nothing is replaced while ``ratio * len(x) < 1``. The
        attack runs in eval mode, so batch-norm statistics only ever see the training batch.
        """
        config = self.config
        count = round(ratio * len(x))
        if ratio * len(x) < 1 or count < 1 or config.adv_eps == 0:
            return x
        # The reference clamps to the min and max of the whole batch, not of the attacked part.
        clamp = (
            (x.min().item(), x.max().item())
            if config.adv_clamp == "batch"
            else self.feed.data.input_range  # type: ignore[union-attr]
        )
        head_x, head_y = x[:count], y[:count]
        if config.adv_attack == "pgd":
            steps = config.adv_pgd_steps
            attacked = pgd(
                self.model,
                head_x,
                head_y,
                config.adv_eps,
                2.5 * config.adv_eps / steps,
                steps,
                loss_fn=self.loss_fn,
                clamp=clamp,
            )
        else:
            attacked = fgsm(self.model, head_x, head_y, config.adv_eps, self.loss_fn, clamp=clamp)
        return torch.cat([attacked, x[count:]])


def _split(
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]], size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same samples, in order, in micro-batches of ``size`` (the last may be short)."""
    if len(micro_batches) == 1:
        x, y = micro_batches[0]
    else:
        x = torch.cat([x for x, _ in micro_batches])
        y = torch.cat([y for _, y in micro_batches])
    return [(x[b : b + size], y[b : b + size]) for b in range(0, len(y), size)]


def _without_single_samples(
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A last micro-batch of one sample joins the one before it (batch norm in training
    mode cannot normalise a single value per channel)."""
    if len(micro_batches) < 2 or len(micro_batches[-1][1]) != 1:
        return micro_batches
    (x1, y1), (x2, y2) = micro_batches[-2:]
    return [*micro_batches[:-2], (torch.cat([x1, x2]), torch.cat([y1, y2]))]


def _next_decision_point(
    state: RunState, batch: int, num_samples: int, controller: BatchController
) -> int:
    """Sample position in the epoch where the segment from ``state.position`` ends: the
    first update boundary at or past the controller's next decision point, or the end."""
    every = controller.decide_every
    if every is None:
        return num_samples
    to_go = (state.samples // every + 1) * every - state.samples
    return min(num_samples, state.position + -(-to_go // batch) * batch)


class _Sums:
    """The epoch's loss and correct-prediction sums, on the device (no sync per update)."""

    def __init__(self, state: RunState, world: World, device: torch.device) -> None:
        self.world = world
        self.loss = torch.tensor(state.partial_loss if world.is_main else 0.0, device=device)
        self.correct = torch.tensor(
            state.partial_correct if world.is_main else 0, device=device, dtype=torch.long
        )

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor, accuracy: bool) -> None:
        self.loss += loss.detach().float() * len(y)
        if accuracy:
            self.correct += (out.argmax(1) == y).sum()

    def totals(self) -> tuple[float, int]:
        """Summed over the ranks (a collective: every rank calls it)."""
        loss = all_reduce_(self.loss.clone(), self.world)
        correct = all_reduce_(self.correct.clone(), self.world)
        return loss.item(), int(correct.item())


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


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    feed: Feed,
    batch_size: int,
    device: torch.device,
    split: str = "test",
    precision: str = "fp32",
    channels_last: bool = False,
    loss_fn: LossFn | None = None,
    accuracy: bool = True,
) -> tuple[float | None, float | None]:
    """Mean loss and accuracy (fraction) of ``model`` in eval mode on a split.

    ``loss_fn`` defaults to cross-entropy; accuracy is None when ``accuracy`` is False,
    and both are None for an empty split. Under torchrun each rank evaluates its slice
    and the sums are all-reduced.
    """
    loss_fn = loss_fn or F.cross_entropy
    total = len(getattr(feed.data, f"{split}_y"))
    if total == 0:
        return None, None
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for xb, yb in feed.eval_batches(split, batch_size):
        xb, yb = _to_device(xb, device, channels_last), yb.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(xb)
        sums[0] += loss_fn(out.float(), yb).double() * len(yb)
        if accuracy:
            sums[1] += (out.argmax(1) == yb).sum()
    model.train(was_training)
    loss_sum, correct = all_reduce_(sums, feed.world).tolist()
    return loss_sum / total, (correct / total if accuracy else None)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _uses_channels_last(config: TrainConfig, data: DataSource, device: torch.device) -> bool:
    """Channels-last memory format: asked for, or by default for images on CUDA."""
    if len(data.input_shape) != 3:
        return False
    return device.type == "cuda" if config.channels_last is None else config.channels_last


# --------------------------------------------------------------------------- checkpoints


def _restore(
    saved: dict[str, Any],
    path: str,
    recorded: dict[str, Any],
    fingerprint: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: BatchController,
    meters: dict[str, Meter],
    scaler: torch.amp.GradScaler | None,
) -> RunState:
    """Load checkpoint ``saved`` (read from ``path``) into the run's objects; return its
    counters."""
    _check_resumable(checked_part(saved, "config", dict, path), recorded, path)
    _check_same_data(saved.get("data"), fingerprint, path)
    load_part(model, checked_part(saved, "model", dict, path), path, "model weights")
    load_part(optimizer, checked_part(saved, "optimizer", dict, path), path, "optimizer state")
    load_part(controller, checked_part(saved, "controller", dict, path), path, "controller state")
    states = saved.get("meters")
    if states is None and saved.get("tracker") is not None:  # written before meters existed
        states = {EIGENVALUE: saved["tracker"]}
    for name, meter in meters.items():
        if (states or {}).get(name) is not None:
            load_part(meter, states[name], path, f"{name} meter state")
    if scaler is not None and saved.get("scaler"):
        load_part(scaler, saved["scaler"], path, "loss scaler state")
    try:
        _set_rng_state(checked_part(saved, "rng", dict, path))
        run = checked_part(saved, "run", dict, path)
        return RunState(**run)
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


def _check_resumable(saved: dict[str, Any], recorded: dict[str, Any], path: str | Path) -> None:
    for key, value in recorded.items():
        if key in _RESUMABLE_CHANGES or key not in saved:
            continue
        before = saved[key]
        if key == "optimizer":  # the checkpoint restores the hyper-parameters, not the class
            key, before, value = "optimizer class", before.get("class"), value["class"]
        if before != value:
            raise CheckpointError(
                f"cannot resume {path}: it was trained with {key}={before!r}, "
                f"not {value!r}; use another --out for a new run"
            )


def _check_same_data(saved: Any, fingerprint: dict[str, Any], path: str | Path) -> None:
    """A resumed run must see the data it was trained on (checkpoints without a
    fingerprint, from before it was recorded, are not checked)."""
    if not isinstance(saved, dict):
        return
    for key, value in fingerprint.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"cannot resume {path}: its training data had {key} {saved[key]!r}, this "
                f"data has {value!r}; resume with the same data or use another --out"
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


# --------------------------------------------------------------------------- output


def _number(value: float | None, width: int, spec: str) -> str:
    return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"


def _format_row(record: dict[str, Any]) -> str:
    return (
        f"{record['epoch']:>5} {record['batch_size']:>7} {record['lr']:>9.4g} "
        f"{record['updates']:>8} {record['train_loss']:>10.4f} "
        f"{_number(record['train_acc'], 9, '.4f')} {_number(record['test_loss'], 9, '.4f')} "
        f"{_number(record['test_acc'], 8, '.4f')} {_number(record.get('eigenvalue'), 9, '.3g')} "
        f"{record['wall_s']:>8.1f}"
    )


TABLE_HEADER = (
    f"{'epoch':>5} {'batch':>7} {'lr':>9} {'updates':>8} {'train_loss':>10} {'train_acc':>9} "
    f"{'test_loss':>9} {'test_acc':>8} {'eigval':>9} {'wall_s':>8}"
)


def _summary(config: TrainConfig, state: RunState, controller: BatchController) -> dict[str, Any]:
    history = state.history
    last = history[-1] if history else {}
    accuracies = [r["test_acc"] for r in history if r.get("test_acc") is not None]
    return {
        "method": controller.name,
        "dataset": config.dataset,
        "model": config.model,
        "seed": config.seed,
        "epochs": state.epoch,
        "final_test_acc": last.get("test_acc", math.nan),
        "best_test_acc": max(accuracies, default=None if history else math.nan),
        "final_test_loss": last.get("test_loss", math.nan),
        "final_train_loss": last.get("train_loss", math.nan),
        "updates": state.updates,
        "samples": state.samples,
        "wall_s": state.wall_s,
        "hessian_s": state.hessian_s,
        "measure_s": state.measure_s,
        "final_batch_size": last.get("batch_size", controller.decision().batch_size),
        "base_batch_size": config.batch_size,
        "rollbacks": len(state.rollbacks),
        "max_batch_size": config.max_batch_size,
    }
