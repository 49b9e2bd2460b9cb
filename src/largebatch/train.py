"""The recipe: names and config to objects, the run folder held, then the engine.

:func:`train` loads the dataset and builds the model that the config names (built-in
names, or ``package.module:callable`` paths to your own code); :func:`fit` takes your
model and data as objects. Both build the run's parts (:mod:`largebatch.build`), hold
the run folder (:func:`largebatch.outputs.run_folder`), check that a resumed run is the
same run on the same data, and call :func:`largebatch.engine.run`, the one loop.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from largebatch import checks
from largebatch.build import build_parts, model_spec, settings
from largebatch.checkpoint import RunCheckpoint, checked_part
from largebatch.config import TrainConfig, config_to_dict
from largebatch.controllers import BatchController
from largebatch.data import load_dataset
from largebatch.distributed import World, resolve_device, setup, thread_count
from largebatch.engine import (
    TrainingInterrupted,
    WorldOutgrown,
    reached_target,
    run,
    tokens_per_sample,
)
from largebatch.errors import (
    CheckpointError,
    ConfigError,
    InvalidTypeError,
    UsageError,
)
from largebatch.interrupts import StopFlag, deliver_interrupts
from largebatch.io import atomic_write_json
from largebatch.lr import BASE_LR_KEY, lrs_kept, rule_for
from largebatch.meters import Meter
from largebatch.models import build_model
from largebatch.outputs import WORLD_FILE, RunWriter, run_folder, summary
from largebatch.parallel import unwrapped
from largebatch.scalars import ScalarLog
from largebatch.scoring import LossFn
from largebatch.source import Collate, DataSource, as_source, checked_range

__all__ = [
    "train",
    "fit",
    "seed_everything",
    "optimizer_record",
    "resolve_device",
    "model_spec",
    "TrainingInterrupted",
]

# Keys a resumed run may change; every other key must match the checkpoint.
_RESUMABLE_CHANGES = {
    "epochs",
    "max_epochs",
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
    "parallel",  # how gradients meet changes no number of the run
    "fsdp_sync_each_micro_batch",
    "fsdp_checkpoint",  # either kind of checkpoint resumes under the other
    "max_accumulation",  # the launcher's last round goes on at the higher accumulation
    "on_outgrown",
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
    "seq_len",
    "loader_workers",
)
# Config keys of the built-in optimizer, meaningless next to an optimizer of the user's.
_SGD_KEYS = ("lr", "optimizer", "momentum", "weight_decay", "betas")


def train(
    config: TrainConfig,
    *,
    show_progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
    stop_after: int | None = None,
    controller: BatchController | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says, writing results to ``config.out``; return the summary.

    ``stop_after`` ends the call after that many epochs of this call (checkpoint saved,
    no summary written), as an interruption at an epoch boundary would; ``resume``
    continues. Useful for time-sliced jobs and for testing exact resume.

    ``show_progress`` (default: when stderr is a terminal) shows a progress bar per epoch;
    ``echo`` receives the table of epochs, one line each (None for silence);
    ``controller`` replaces the one ``config.method`` names (a replay of a schedule, say).
    """
    config.validate()
    _check_call_options("train()", show_progress=show_progress, echo=echo, stop_after=stop_after)
    world, device_name = setup(config.device)
    # Rank 0 holds the run folder's lock for the whole run, so that a second process on
    # the same --out is refused before it reads any data.
    with thread_count(config.threads), run_folder(config.out, world, config.resume):
        seed_everything(config.seed)
        data = load_dataset(
            config.dataset,
            config.data_dir,
            augment=config.augment,
            seed=config.seed,
            limit_train=config.limit_train,
            limit_test=config.limit_test,
            image_size=config.image_size,
            seq_len=config.seq_len,
        )
        spec = model_spec(config, data)
        return _run(
            config,
            build_model(**spec),
            data,
            world,
            device_name,
            spec=spec,
            write=True,
            controller=controller,
            show_progress=show_progress,
            echo=echo,
            stop_after=stop_after,
        )


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
    workers: int | None = None,
    collate_fn: Collate | None = None,
    target_key: str | None = None,
    samples_per_epoch: int | None = None,
    shard_policy: Callable[[nn.Module], Any] | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Train ``model`` on ``train_data`` with the loop the command line uses; return the
    summary (the keys of ``summary.json``).

    Args:
        model: any ``nn.Module`` taking a batch of inputs; under torchrun, also one you
            wrapped in ``DistributedDataParallel`` (used as it is; see the README).
        train_data, eval_data: a pair of tensors ``(inputs, targets)`` (or a
            ``TensorDataset``), used in memory; or a map-style ``torch.utils.data.Dataset``,
            read lazily: ``dataset[i]`` is called when a batch needs sample ``i`` (each
            training sample once per epoch, by the rank that trains on it), by ``workers``
            processes, so data larger than memory trains. Its items are ``(input,
            target)`` pairs of equal shapes, or anything ``collate_fn`` turns into a
            batch. Or a stream, an ``IterableDataset``: read in order, a new pass every
            epoch (after ``set_epoch(epoch)`` when it has one), ``samples_per_epoch``
            samples per epoch; under torchrun rank ``r`` of ``W`` trains on the positions
            ``p % W == r``, from its own pass, which should yield the items ``i % W == r``
            (split again by ``get_worker_info()`` between its workers; they are taken in
            turns of 64 items, ``largebatch.feed.CHUNK``). A stream with
            ``state_dict``/``load_state_dict`` is read in the training process and
            resumes from its state; another resumed mid-epoch reads its pass up to the
            position again (``skipped_samples`` in that epoch's record). ``eval_data``
            None skips evaluation; a stream there is read whole.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch's mean loss; default
            cross-entropy. Accuracy is reported when the targets are integer labels and
            the outputs are ``(batch, classes)`` logits; otherwise loss only.
        optimizer: an optimizer over ``model``'s parameters, or a factory
            ``params -> Optimizer``; default SGD with the config's ``lr``, ``momentum``
            and ``weight_decay``. Every LR change multiplies each param group's own LR
            (the one it holds when ``fit`` is called); when ``fit`` returns or raises,
            each group's ``lr`` is put back as it was, so a second call with the same
            optimizer starts from the same LRs (its other state stays).
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
        workers: processes that read a Dataset's items (None: the usable cores, up to 8;
            0: read in the training process). The run does not depend on it: the samples
            and their order are the same; only a Dataset that draws random numbers of its
            own (random augmentation) differs with the number of workers.
        collate_fn: ``collate_fn(items) -> (inputs, targets)``, a list of a Dataset's
            items to one micro-batch (called once per micro-batch, so it may pad to the
            longest item): ``inputs`` a tensor or a dict of tensors (the model is then
            called as ``model(**inputs)``), ``targets`` a tensor, each with a first axis
            over samples, which is what the run counts. Default: each item's ``(input,
            target)`` made tensors and stacked.
        target_key: items (or ``collate_fn``'s batches) are dicts holding the target
            under this key and the inputs under the others: ``model(**inputs)``, as
            Hugging Face models take a batch.
        samples_per_epoch: a stream's epoch, in samples over all processes (default: its
            ``len()``, for a stream that has one).
        shard_policy: under ``parallel="fsdp"``, ``shard_policy(model)`` gives the blocks
            (submodules) that ``fully_shard`` takes before the root, in place of the rule
            by parameter share (see the README); ignored in one process.
        **config: keys of :class:`~largebatch.config.TrainConfig` (``method``, ``epochs``,
            ``batch_size``, ``max_batch_size``, ``micro_batch_size``, ``seed``,
            ``device``, ``precision``, adversarial and Hessian settings, ``resume``, ...).

    Raises:
        UsageError: bad data, config, model or optimizer (one line, before training).
        TrainingInterrupted: Ctrl-C or SIGTERM; with ``out``, the checkpoint was saved.
        KeyboardInterrupt: Ctrl-C while a Dataset is read, before training; its message
            names the item; nothing was written.
    """
    if workers is not None:
        checks.integer(workers, "fit()", "workers", minimum=0)
    if collate_fn is not None and not callable(collate_fn):
        raise InvalidTypeError(
            f"collate_fn is a {_shown(collate_fn)}; pass a function items -> (inputs, targets)"
        )
    if target_key is not None and not isinstance(target_key, str):
        raise InvalidTypeError(f"target_key is a {_shown(target_key)}; pass a key name (str)")
    if shard_policy is not None and not callable(shard_policy):
        raise InvalidTypeError(
            f"shard_policy is a {_shown(shard_policy)}; pass a function model -> blocks"
        )
    cfg = _fit_config(model, train_data, optimizer, out, config, workers)
    if shard_policy is not None and cfg.parallel != "fsdp":
        raise ConfigError(f"shard_policy is for parallel='fsdp', not {cfg.parallel!r}")
    input_range = _check_fit_objects(loss_fn, optimizer, controller, meters, input_range)
    _check_call_options("fit()", show_progress=show_progress, echo=echo, stop_after=stop_after)
    _check_flag(verbose, "verbose")
    if not verbose:
        echo, show_progress = (lambda _line: None), False
    elif echo is None:
        echo = print
    world, device_name = setup(cfg.device)
    seed_everything(cfg.seed)
    out_folder = None if out is None else cfg.out
    with thread_count(cfg.threads), run_folder(out_folder, world, cfg.resume, what="out"):
        data = as_source(
            train_data, eval_data, name=cfg.dataset, input_range=input_range,
            reading=deliver_interrupts, collate_fn=collate_fn, target_key=target_key,
            samples_per_epoch=samples_per_epoch, world=world,
        )  # fmt: skip
        return _run(
            cfg,
            model,
            data,
            world,
            device_name,
            spec=None,
            write=out is not None,
            loss_fn=loss_fn or F.cross_entropy,
            optimizer=optimizer,
            controller=controller,
            meters=meters,
            show_progress=show_progress,
            echo=echo,
            stop_after=stop_after,
            shard_policy=shard_policy,
        )


def _check_flag(value: Any, name: str, who: str = "fit()") -> None:
    checks.boolean(value, who, name)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _check_call_options(who: str, *, show_progress: Any, echo: Any, stop_after: Any) -> None:
    """The keywords that fit() and train() share, before any work starts."""
    if show_progress is not None:
        _check_flag(show_progress, "show_progress", who)
    if echo is not None and not callable(echo):
        raise InvalidTypeError(
            f"{who}: echo must be a function taking one line (print, say) or None, got "
            f"{_shown(echo)}"
        )
    if stop_after is not None:
        checks.integer(stop_after, who, "stop_after", minimum=1)


def _check_fit_objects(
    loss_fn: Any, optimizer: Any, controller: Any, meters: Any, input_range: Any
) -> tuple[float, float] | None:
    """fit()'s objects are of the types it takes (before any work starts); returns
    ``input_range`` as two floats."""
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidTypeError(
            f"loss_fn is a {type(loss_fn).__name__}; pass a function (outputs, targets) -> loss"
        )
    if optimizer is not None and not (
        isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)
    ):
        raise InvalidTypeError(
            f"optimizer is a {_shown(optimizer)}; pass a torch.optim.Optimizer over the "
            "model's parameters or a factory params -> Optimizer (None: the default SGD)"
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
    return checked_range(input_range)


def _fit_config(
    model: Any,
    train_data: Any,
    optimizer: Any,
    out: Any,
    config: dict[str, Any],
    workers: int | None = None,
) -> TrainConfig:
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"model is a {type(model).__name__}, not a torch.nn.Module")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise InvalidTypeError(
            f"out must be a folder path (str or pathlib.Path), got {type(out).__name__} {out!r}"
        )
    if "loader_workers" in config:
        raise ConfigError("fit() takes the processes that read a Dataset as workers=")
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
    labels = {"dataset": type(train_data).__name__, "model": type(unwrapped(model)).__name__}
    cfg = TrainConfig(
        **labels, **config, loader_workers=workers, out=str(out) if out is not None else "(none)"
    )
    if cfg.resume and out is None:
        raise ConfigError("resume needs out, the folder of the run to continue")
    if cfg.tensorboard and out is None:
        raise ConfigError("tensorboard needs out, the folder its event files go to")
    return cfg.validate(names=False)


def _run(
    config: TrainConfig,
    model: nn.Module,
    data: DataSource,
    world: World,
    device_name: str,
    *,
    spec: dict[str, Any] | None,
    write: bool,
    loss_fn: LossFn = F.cross_entropy,
    optimizer: Any = None,
    controller: BatchController | None = None,
    meters: Mapping[str, Meter] | None = None,
    show_progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
    stop_after: int | None = None,
    shard_policy: Callable[[nn.Module], Any] | None = None,
) -> dict[str, Any]:
    """Build the parts, check a resumed run, run the engine with the run's files; return
    the summary. With ``write``, ``config.out`` (held by :func:`run_folder`) receives the
    run files and the checkpoint; without, the checkpoint for rollbacks is kept in
    memory."""
    device = torch.device(device_name) if world.enabled else resolve_device(device_name)
    if not world.is_main:  # only rank 0 talks and writes
        echo, show_progress = None, False
    say = echo or (lambda _line: None)
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    parts = build_parts(
        config, model, data, world, device,
        loss_fn=loss_fn, optimizer=optimizer, controller=controller, meters=meters,
        shard_policy=shard_policy,
    )  # fmt: skip
    hyper = optimizer_record(parts.optimizer)  # as the run starts
    recorded = _config_record(config, hyper if optimizer is not None else None)
    fingerprint = _data_fingerprint(data)
    out = Path(config.out)
    checkpoint = RunCheckpoint(
        out / "checkpoint.pt" if write else None,
        world,
        extra={"config": recorded, "data": fingerprint, "model_spec": spec},
    )
    if config.resume and checkpoint.exists():
        # lr_scaling auto means the rule it picks for this optimizer: a run of an older
        # version, which recorded that rule by name, resumes
        means = {"lr_scaling": rule_for(config.lr_scaling, parts.optimizer)}
        _check_resumable(checkpoint, recorded, fingerprint, config.epoch_limit, means)
    line = (
        f"training {config.model} on {config.dataset} ({len(data.train_y)} samples), "
        f"method {parts.controller.name}, device {device}"
        + (f", {world.size} processes" if world.enabled else "")
    )
    scalars = ScalarLog if config.tensorboard else None
    bits = tokens_per_sample(data) > 1  # a language model's table
    with RunWriter(out if write else None, recorded, world, say, scalars, bits=bits) as writer:
        # Ctrl-C and SIGTERM are caught from here on: a signal never leaves a half-started
        # run, and arrives at the loop as a stop request. The decoding workers (image
        # folders only) start inside the engine, so they inherit the handler.
        plan = settings(config)
        asked = out / WORLD_FILE
        if write and world.is_main:  # a request of an earlier round is answered by now
            asked.unlink(missing_ok=True)
        # the user's optimizer is handed back with the LRs it came with (see lrs_kept)
        with StopFlag() as stop, lrs_kept(parts.optimizer):
            try:
                progress = run(
                    parts,
                    plan,
                    world=world,
                    device=device,
                    checkpoint=checkpoint,
                    resume=config.resume,
                    should_stop=stop.requested,
                    on_start=lambda progress: writer.start(progress.history, line),
                    on_record=writer.record,
                    echo=say,
                    show_progress=show_progress,
                    stop_after=stop_after,
                )
            except WorldOutgrown as outgrown:  # saved; the launcher (or the user) goes on
                if write and world.is_main:
                    atomic_write_json(asked, outgrown.request)
                result = {**summary(config, outgrown.progress, parts.controller)}
                return {**result, "optimizer": hyper, "outgrown": outgrown.request}
        result = {**summary(config, progress, parts.controller), "optimizer": hyper}
        if config.target_train_loss is not None:
            result.update(_target_record(config.target_train_loss, progress.history))
        if progress.epoch < config.epoch_limit and not reached_target(plan, progress):
            say(f"stopped after epoch {progress.epoch}; continue with --resume")
            return result
        writer.finish(result)
    return result


def _target_record(target: float, history: list[dict[str, Any]]) -> dict[str, Any]:
    """When the run reached its target training loss: the epoch, updates and samples
    there (None each when it did not)."""
    first = next((r for r in history if r["train_loss"] <= target), None)
    return {
        "target_train_loss": target,
        "reached_target": first is not None,
        "target_epoch": first["epoch"] if first else None,
        "target_updates": first["updates"] if first else None,
        "target_samples": first["samples"] if first else None,
    }


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        if isinstance(value, np.generic):  # a NumPy number: YAML and JSON take Python's
            value = value.item()
        if isinstance(value, (bool, int, float, str)) or value is None:
            return value
        if isinstance(value, (tuple, list)) and all(
            isinstance(v, (int, float, np.number)) for v in value
        ):
            return [v.item() if isinstance(v, np.generic) else v for v in value]
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


def _check_resumable(
    checkpoint: RunCheckpoint,
    recorded: dict[str, Any],
    fingerprint: dict[str, Any],
    epochs: int,
    means: dict[str, Any] | None = None,
) -> None:
    """The checkpoint to resume is of the same run (config and data), and has not done
    more than ``epochs`` epochs; checked before anything is written. ``means``: what a
    key's value stands for (a saved value equal to it matches too)."""
    saved = checkpoint.peek()
    path = checkpoint.where
    _check_same_config(checked_part(saved, "config", dict, path), recorded, path, means or {})
    _check_same_data(saved.get("data"), fingerprint, path)
    done = saved.get("run", {}).get("epoch") if isinstance(saved.get("run"), dict) else None
    if isinstance(done, int) and done > epochs:
        folder = Path(path).parent
        raise UsageError(
            f"{folder} has finished {done} epochs already; resume it with --epochs "
            f"{done} or more (now {epochs})"
        )


def _check_same_config(
    saved: dict[str, Any], recorded: dict[str, Any], path: str | Path, means: dict[str, Any]
) -> None:
    for key, value in recorded.items():
        if key in _RESUMABLE_CHANGES or key not in saved:
            continue
        before = saved[key]
        if key in means and before == means[key]:
            continue
        if key == "optimizer":  # the checkpoint restores the hyper-parameters, not the class
            # a user's optimizer is recorded as {"class", "param_groups"}, the built-in by name
            key = "optimizer class"
            before, value = (v.get("class") if isinstance(v, dict) else v for v in (before, value))
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
