"""The training loop: one loop for every method, over objects you pass in.

Read :func:`run`, then :class:`_Epochs`, top to bottom. A run is epochs; an epoch is
segments between decision points; a segment is updates at the batch size then in force.
Each update is one :class:`~largebatch.accumulate.GlobalBatch` step (micro-batches,
adversarial share, forward, backward, all-reduce, meters, finite check, optimizer step).
At each decision point the wanted meters measure and the controller decides; at each
epoch's end the model is scored on the test split and the record is emitted. Methods
differ only in the controller.

The engine takes objects (:class:`Parts`, :class:`Settings`, a
:class:`~largebatch.checkpoint.RunCheckpoint`) and returns data (the
:class:`~largebatch.progress.Progress`); it names no config key, file, signal or meter
class. :mod:`largebatch.build` makes the objects from a config; :mod:`largebatch.train`
holds the run folder and hands the records to :class:`largebatch.outputs.RunWriter`.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import closing
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from largebatch import inputs
from largebatch.accumulate import GlobalBatch, micro_batches
from largebatch.adversarial import NOT_ONE_TENSOR
from largebatch.checkpoint import RunCheckpoint
from largebatch.controllers import BatchController, Decision, checked_decision
from largebatch.distributed import World, broadcast_object
from largebatch.divergence import Rollback
from largebatch.errors import DivergedError, UsageError
from largebatch.feed import Feed
from largebatch.lr import (
    BASE_LR_KEY,
    LRScaler,
    critical_lr,
    momentum_of,
    stability,
    tempered_factor,
)
from largebatch.meters import Meter, Point, SharpnessMeter, time_of
from largebatch.parallel import Parallel, longest_slice
from largebatch.progress import RECORD_DEFAULTS, Progress, meter_defaults
from largebatch.sampler import EpochSampler, StreamOrder, augment_rng_seed, augment_seed
from largebatch.scoring import LossFn, RunningScore, check_fits, score
from largebatch.source import DataSource

__all__ = ["Parts", "Settings", "TrainingInterrupted", "run", "reached_target"]

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Parts:
    """The objects a run is made of; :func:`largebatch.build.build_parts` makes them from a
    config, or you do.

    Attributes:
        model: the network (moved to the run's device).
        data: train and test split (:class:`~largebatch.source.DataSource`).
        optimizer: an optimizer over ``model``'s parameters.
        controller: the batch controller (:mod:`largebatch.controllers`).
        loss_fn: ``loss_fn(outputs, targets)``, the batch's mean loss.
        meters: meters by measurement name (those the controller may ask for).
        attack: the adversarial share of each micro-batch
            (:class:`~largebatch.adversarial.AdversarialShare`), or None.
        rollback: what a divergence does (:class:`~largebatch.divergence.Rollback`);
            None: it stops the run.
        count: the loss terms of a micro-batch's targets when ``loss_fn`` is a mean over
            terms other than samples (:func:`~largebatch.accumulate.token_count`); each
            micro-batch is then weighted by its share of the global batch's terms. None:
            samples. The epoch's training loss stays a mean over samples of the
            micro-batches' losses.
        parallel: how the ranks' gradients meet (:mod:`largebatch.parallel`); None:
            the flat all-reduce under torchrun.
        gauge: the stability safeguard's gauge
            (:class:`~largebatch.meters.SharpnessMeter`): at a decision that grows the
            batch and raises the LR factor, it reads the largest stable LR along the
            grown batch's step, and the factor is capped there
            (:func:`~largebatch.lr.tempered_factor`; ``reason: stability`` in the
            record's ``batch_changes``). None: no safeguard.
    """

    model: nn.Module
    data: DataSource
    optimizer: torch.optim.Optimizer
    controller: BatchController
    loss_fn: LossFn = F.cross_entropy
    meters: Mapping[str, Meter] = field(default_factory=dict)
    attack: Callable[..., torch.Tensor] | None = None
    rollback: Rollback | None = None
    count: Callable[[torch.Tensor], int] | None = None
    parallel: Parallel | None = None
    gauge: SharpnessMeter | None = None


@dataclass(frozen=True)
class Settings:
    """The loop's own knobs.

    Attributes:
        epochs: epochs of the whole run (the most, with ``target_train_loss``).
        target_train_loss: stop at the first epoch end whose training loss is at most
            this (None: run all ``epochs``).
        micro_batch_size: the largest batch run at once (None: the whole update).
        eval_batch_size: batch of the evaluation pass.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 adds loss scaling).
        channels_last: channels-last memory format for images (None: on CUDA only).
        augment: random crop and flip of the training images.
        seed: seed of the data order and the augmentation.
        loader_workers: decoding processes of lazily read images (None: automatic).
        max_accumulation: the most micro-batches per process per update (None: no
            limit). A decision past it has outgrown the world (:meth:`_Epochs.outgrown`).
        on_outgrown: then ``continue`` at the higher accumulation (a line says so), or
            ``stop``: save at that point and raise :class:`WorldOutgrown`.
        recovery: the recovery after a growth: when the training loss of a decision
            window within ``RECOVERY_POINTS`` decision points after a growth that raised
            the LR exceeds the window before the growth by more than this fraction of
            it (of ``RECOVERY_FLOOR`` times the run's first window loss, when that is
            larger), or is not finite, the growth's LR step is undone
            (``progress.lr_scale``) and ``reason: recovery`` goes to ``batch_changes``.
            None: off.
    """

    epochs: int
    target_train_loss: float | None = None
    micro_batch_size: int | None = None
    eval_batch_size: int = 1000
    precision: str = "fp32"
    channels_last: bool | None = None
    augment: bool = False
    seed: int = 0
    loader_workers: int | None = None
    max_accumulation: int | None = None
    on_outgrown: str = "continue"
    recovery: float | None = None


#: decision points after a growth that the recovery watches
RECOVERY_POINTS = 2
#: a rise is measured against at least this share of the run's first window loss
RECOVERY_FLOOR = 0.1


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; the run saved its checkpoint after the current update."""


class WorldOutgrown(Exception):
    """A decision made the accumulation exceed ``max_accumulation`` under ``on_outgrown:
    stop``: the run saved its checkpoint at that decision point. ``request``: what it asks
    for (:meth:`_Epochs.outgrown`); ``progress``: where it stopped."""

    def __init__(self, request: dict[str, Any], progress: Progress) -> None:
        super().__init__(request["reason"])
        self.request, self.progress = request, progress


def _never() -> str | None:
    return None


def _nothing(_: Any) -> None:
    return None


def run(
    parts: Parts,
    settings: Settings,
    *,
    world: World,
    device: torch.device,
    checkpoint: RunCheckpoint,
    resume: bool = False,
    should_stop: Callable[[], str | None] = _never,
    on_start: Callable[[Progress], None] = _nothing,
    on_record: Callable[[dict[str, Any]], None] = _nothing,
    echo: Callable[[str], None] = _nothing,
    show_progress: bool = False,
    stop_after: int | None = None,
) -> Progress:
    """Train ``parts`` for ``settings.epochs`` epochs; return where the run ended.

    ``checkpoint`` is saved at the start, after every epoch and when stopped; with
    ``resume`` and a saved checkpoint the run continues from it. ``should_stop()``
    returns why to stop (a signal's name) or None; the loop stops after the update in
    progress and raises :class:`TrainingInterrupted`. ``on_start(progress)`` runs once
    every rank has restored, before the first save (the recipe writes its files there);
    ``on_record(record)`` gets each epoch's record once the checkpoint holds it; ``echo``
    gets the lines worth telling (a rollback). ``stop_after`` ends the call after that
    many epochs of this call, as an interruption at an epoch's end would.
    """
    data, controller, optimizer = parts.data, parts.controller, parts.optimizer
    if len(data.train_y) < 1:
        raise UsageError("the training data is empty")
    channels_last = _uses_channels_last(settings.channels_last, data, device)
    model = parts.model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fits = check_fits(model, parts.loss_fn, data, device)
    if not fits.tensor_inputs and getattr(parts.attack, "eps", 0) > 0:
        if controller.decision().adv_ratio > 0:
            raise UsageError(NOT_ONE_TENSOR)
    if fits.needs_pairs and len(data.train_y) < 2 * world.size:  # no update could run
        raise UsageError(
            f"the model's batch norm needs at least 2 samples per process in every update, "
            f"but the training data has {len(data.train_y)} sample(s) for {world.size} "
            "process(es): no update could run; give it more samples"
        )
    if fits.needs_pairs and controller.decision().batch_size < 2 * world.size:
        raise UsageError(
            f"the model's batch norm sees one value per channel and sample, so it needs at "
            f"least 2 samples per process in every update; a batch of "
            f"{controller.decision().batch_size} with {world.size} process(es) is too small"
        )
    resuming = resume and checkpoint.exists()
    if not resuming:  # a reused optimizer starts from the LRs its groups hold now
        for group in optimizer.param_groups:
            group[BASE_LR_KEY] = float(group["lr"])
    lr = LRScaler(optimizer)
    update = GlobalBatch(
        model, optimizer, parts.loss_fn, world, device, settings.precision, parts.attack,
        channels_last, count=parts.count, parallel=parts.parallel,
    )  # fmt: skip
    # what a checkpoint holds of them (a sharded model's: the full state, gathered)
    model_state, optimizer_state = update.parallel.stateful(model, optimizer)
    saved = {
        "model": model_state,
        "optimizer": optimizer_state,
        "controller": controller,
        "meters": dict(parts.meters),
        "scaler": update.scaler,
        # themselves, for a sharded checkpoint (written, or read at any world size)
        "live": (model, optimizer),
        "sharded": update.parallel.sharded_checkpoints,
    }
    checkpoint.check(saved)  # a state that could never be loaded: refused before any write
    progress = checkpoint.restore(saved) if resuming else Progress()
    last = settings.epochs
    if stop_after is not None:
        last = min(last, progress.epoch + stop_after)
    # closing: a wrapper that synchronises in the backward pass (DDP's hooks on the
    # parameters) must not outlive the run: the model is the user's
    equal = update.parallel.equal_passes
    with (
        Feed(data, device, world, settings.loader_workers, equal) as feed,
        closing(update.parallel),
    ):
        order = (StreamOrder if feed.streams else EpochSampler)(len(data.train_y), settings.seed)
        epochs = _Epochs(parts, settings, feed, update, lr, order, world, fits, show_progress, echo)
        broadcast_object(None, world)  # every rank has read the checkpoint before any write
        reason = should_stop()
        if reason is not None:  # a signal during start-up: stop before anything is written
            raise TrainingInterrupted(f"{reason}: stopped before the run started; nothing written")
        on_start(progress)
        if not checkpoint.exists():
            checkpoint.save(saved, progress)  # a start for a rollback or a crash in epoch 1

        def left() -> bool:  # training still to do
            return progress.epoch < last and not reached_target(settings, progress)

        if left() and epochs.outgrown(progress) is not None:  # (resumed on too few processes)
            raise WorldOutgrown(epochs.request, progress)
        while left():
            started = time.perf_counter()
            try:
                train = epochs.train(progress, should_stop)
            except DivergedError as error:
                if parts.rollback is None or not parts.rollback.allows(progress):
                    raise
                progress = parts.rollback.recover(
                    error, progress, lambda: checkpoint.restore(saved), echo
                )
                continue
            if train is None:  # stopped part-way through the epoch
                progress.wall_s += time.perf_counter() - started
                checkpoint.save(saved, progress)
                if epochs.request is not None:  # at a decision point that outgrew the world
                    raise WorldOutgrown(epochs.request, progress)
                raise TrainingInterrupted(
                    f"{epochs.stop_reason}: {_where(checkpoint)} epoch {progress.epoch + 1}, "
                    f"sample {progress.position} of {order.num_samples}"
                    + ("; continue with --resume" if checkpoint.path is not None else "")
                )
            batch_size, lr_now = epochs.last_batch, optimizer.param_groups[0]["lr"]
            test = score(
                model, feed, settings.eval_batch_size, device, precision=settings.precision,
                channels_last=channels_last, loss_fn=parts.loss_fn, accuracy=fits.accuracy,
            )  # fmt: skip
            point = Point(progress.epoch, progress.samples, epoch_end=True)
            told = {"test_acc": test[1], "test_loss": test[0], "window_loss": epochs.window_loss}
            measured = epochs.decide(progress, point, told)
            progress.wall_s += time.perf_counter() - started
            record = progress.end_epoch(
                train,
                test,
                measured,
                batch_size=batch_size,
                lr=lr_now,
                adv_ratio=epochs.last_adv_ratio,
                stability=stability(measured["eigenvalue"], lr_now, momentum_of(optimizer)),
                own_keys=epochs.own_keys,
                tokens_per_sample=tokens_per_sample(data),
            )
            checkpoint.save(saved, progress)
            on_record(record)
            if left() and epochs.outgrown(progress) is not None:
                raise WorldOutgrown(epochs.request, progress)
            reason = epochs.stop_reason or should_stop()
            if reason is not None:
                raise TrainingInterrupted(
                    f"{reason}: saved {checkpoint.where} after epoch {progress.epoch}; "
                    "continue with --resume"
                    if checkpoint.path is not None
                    else f"{reason}: stopped after epoch {progress.epoch}"
                )
    return progress


def tokens_per_sample(data: DataSource) -> int:
    """Target entries per sample: 1 for a label, ``seq_len`` for a sequence of next tokens."""
    return math.prod(tuple(data.train_y.shape[1:]))


def reached_target(settings: Settings, progress: Progress) -> bool:
    """Whether the run has reached its target training loss (at its last epoch's end)."""
    target, history = settings.target_train_loss, progress.history
    return target is not None and bool(history) and history[-1]["train_loss"] <= target


def _where(checkpoint: RunCheckpoint) -> str:
    return f"saved {checkpoint.where} at" if checkpoint.path is not None else "stopped in"


def _uses_channels_last(asked: bool | None, data: DataSource, device: torch.device) -> bool:
    """Channels-last memory format: asked for, or by default for images on CUDA."""
    if len(data.input_shape) != 3:
        return False
    return device.type == "cuda" if asked is None else asked


class _Epochs:
    """The epochs of a run: segments between decision points, updates, decisions."""

    def __init__(self, parts: Parts, settings: Settings, feed: Feed, update: GlobalBatch,
                 lr: LRScaler, order: EpochSampler, world: World, fits: Any,
                 show_progress: bool, echo: Callable[[str], None] = _nothing) -> None:  # fmt: skip
        self.parts, self.settings, self.feed, self.update = parts, settings, feed, update
        self.echo = echo
        self.lr, self.order, self.world, self.show_progress = lr, order, world, show_progress
        self.controller, self.meters = parts.controller, dict(parts.meters)
        self.accuracy = fits.accuracy
        self.needs_pairs = fits.needs_pairs  # no piece of one sample (batch norm would fail)
        self.own_keys = [
            k for m in self.meters.values() for k in m.record_keys if k not in RECORD_DEFAULTS
        ]
        self.last_batch = self.controller.decision().batch_size
        self.last_adv_ratio = self.controller.decision().adv_ratio
        self.stop_reason: str | None = None  # set once this or another rank asked to stop
        self.window_loss: float | None = None  # the epoch's last window, for its end
        self.request: dict[str, Any] | None = None  # the world the run asks for (stop)
        self._told: int | None = None  # the batch whose outgrowing a line announced

    def outgrown(self, progress: Progress) -> dict[str, Any] | None:
        """Whether the batch now decided needs more than ``max_accumulation`` micro-batches
        per process per update on this world. Under ``on_outgrown: stop`` that is the
        request (also kept as :attr:`request`): ``processes``, the fewest that keep the
        accumulation within the limit, with ``processes_now``, ``batch_size``,
        ``micro_batch_size``, ``accumulation``, ``max_accumulation``, ``epoch``,
        ``samples``, ``reason``; under ``continue`` None, after a line (once per batch)."""
        limit, batch = self.settings.max_accumulation, self.controller.decision().batch_size
        if limit is None:
            return None
        micro = min(self.settings.micro_batch_size or batch, batch)
        size = self.world.size if self.world.enabled else 1
        accumulation = -(-longest_slice(batch, self.world) // micro)
        if accumulation <= limit:
            return None
        wanted = -(-batch // (micro * limit))
        reason = (
            f"a batch of {batch} needs {accumulation} micro-batches of at most {micro} per "
            f"process per update on {size} process(es), more than max_accumulation {limit}: "
            f"{wanted} processes would keep it within"
        )
        if self.settings.on_outgrown != "stop":
            if self._told != batch:
                self.echo(f"outgrown: {reason}; going on (on_outgrown: continue)")
                self._told = batch
            return None
        self.request = {
            "processes": wanted, "processes_now": size, "batch_size": batch,
            "micro_batch_size": micro, "accumulation": accumulation, "max_accumulation": limit,
            "epoch": progress.epoch, "samples": progress.samples, "reason": reason,
        }  # fmt: skip
        self.echo(f"outgrown: {reason}; saved, asking for {wanted} processes")
        return self.request

    def wanted(self) -> list[Meter]:
        return [self.meters[n] for n in sorted(self.controller.wants) if n in self.meters]

    def decide(
        self, progress: Progress, point: Point, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A decision point: run the wanted meters, step the controller, note a change.

        Returns the meters' numbers (every record key present) and ``measure_s``, the
        seconds they took."""
        controller, optimizer = self.controller, self.parts.optimizer
        before = controller.decision()
        measured = meter_defaults(self.meters)
        told: dict[str, Any] = {}
        seconds = 0.0
        for meter in self.wanted():
            model = self.update.model
            numbers = meter.at_decision(
                self.update.parallel.whole(model) if meter.whole_model else model, point
            )
            measured.update(numbers)
            told.update(meter.told(numbers))
            seconds += time_of(numbers)
        told = {**measured, **told, **(extra or {}), "epoch_end": point.epoch_end}
        told["samples"] = point.samples
        controller.step(told)
        # every rank measured the same numbers; rank 0's decision is the one kept
        controller.load_state_dict(broadcast_object(controller.state_dict(), self.world))
        after = checked_decision(controller, controller.decision())
        tempered = self.safeguard(progress, before, after)
        seconds += tempered.get("gauge_s", 0.0)
        self.recover(progress, point.samples, before, after, told.get("window_loss"))
        current = optimizer.param_groups[0]["lr"]
        progress.note_point(
            point.samples,
            after,
            self.lr.bases()[0] * progress.factor(after) * progress.lr_scale,
            measured,
            stability(measured["eigenvalue"], current, momentum_of(optimizer)),
        )
        if after.batch_size != before.batch_size:
            if tempered.get("lr_cap") is not None:
                capped = replace(after, lr_factor=tempered["lr_cap"])
                progress.note_change(point.samples, capped, "stability", **tempered)
            else:  # with the gauge's reading when it read one (the growth's margin)
                progress.note_change(point.samples, after, controller.last_reason, **tempered)
        progress.measure_s += seconds
        return {**measured, "measure_s": seconds}

    def safeguard(self, progress: Progress, before: Decision, after: Decision) -> dict[str, Any]:
        """The stability safeguard at a decision: when ``after`` grows the batch and raises
        the LR factor above the one in force, the gauge reads the largest stable LR along
        the grown batch's step and ``progress.lr_cap`` is set to the factor that
        :func:`tempered_factor` allows (None again when the growth passes whole). Returns
        the reading for the record (empty when there was none)."""
        gauge = self.parts.gauge
        in_force = progress.factor(before)
        grows = after.batch_size > before.batch_size and after.lr_factor > in_force
        if gauge is None or not grows:
            return {}
        started = time.perf_counter()
        base = self.lr.bases()[0] * progress.lr_scale
        # the sharpness along the grown batch's step, over the step its LR would take
        # on the model whole, with the optimizer's state whole (under fsdp: copies)
        parallel, model = self.update.parallel, self.update.model
        whole = parallel.whole(model)
        own = gauge.optimizer
        gauge.optimizer = parallel.whole_optimizer(model, own)
        try:
            sharpness, _ = gauge.measure(whole, batch=after.batch_size, step=base * after.lr_factor)
        finally:
            gauge.optimizer = own
        stable = math.isfinite(sharpness) and sharpness > 0
        limit = critical_lr(sharpness, self.parts.optimizer) if stable else None
        factor = tempered_factor(in_force, after.lr_factor, None if limit is None else limit / base)
        progress.lr_cap = factor if factor < after.lr_factor else None
        return {
            "proposed_lr_factor": after.lr_factor,
            "lr_cap": progress.lr_cap,
            "gauge_sharpness": sharpness if math.isfinite(sharpness) else None,
            "gauge_lr": limit,
            "gauge_s": time.perf_counter() - started,
        }

    def recover(
        self,
        progress: Progress,
        samples: int,
        before: Decision,
        after: Decision,
        window: float | None,
    ) -> None:
        """The recovery after a growth (``settings.recovery``): a growth watched since a
        decision point whose window loss now exceeds the loss before it by more than the
        tolerance has its LR step undone (``progress.lr_scale`` scaled by the factor in
        force before over the one after); then this decision's growth, if it raises the
        LR factor in force, is watched for the next ``RECOVERY_POINTS`` points."""
        tolerance = self.settings.recovery
        if tolerance is None:
            return
        if progress.first_loss is None and window is not None and math.isfinite(window):
            progress.first_loss = window
        watch = progress.watch
        if watch is not None and window is not None:
            # near a zero training loss a small window's noise is no rise: the scale is
            # at least a tenth of the run's first window loss
            scale = max(watch["loss"], RECOVERY_FLOOR * (progress.first_loss or 0.0))
            if not window <= watch["loss"] + tolerance * scale:  # NaN or inf is a rise too
                progress.lr_scale *= watch["before"] / watch["after"]
                progress.watch = None
                progress.note_change(
                    samples, replace(after, lr_factor=progress.factor(after)), "recovery",
                    loss_before=watch["loss"], loss_after=window,
                    lr_scale=progress.lr_scale,
                )  # fmt: skip
            elif watch["points"] > 1:
                progress.watch = {**watch, "points": watch["points"] - 1}
            else:
                progress.watch = None
        in_force, grown = progress.factor(before), progress.factor(after)
        raises = after.batch_size > before.batch_size and grown > in_force
        if raises and window is not None and math.isfinite(window):
            progress.watch = {
                "loss": window, "before": in_force, "after": grown, "points": RECOVERY_POINTS
            }  # fmt: skip

    def train(
        self, progress: Progress, should_stop: Callable[[], str | None]
    ) -> dict[str, Any] | None:
        """One pass over the training set, from sample ``progress.position``.

        The epoch runs in segments between decision points: each segment plans its
        batches at the batch size then in force (so the input feed plans no further than
        the next decision point). Returns the epoch's train loss and accuracy, or None
        when a stop was asked for: then ``progress`` holds the position and partial sums.
        """
        order, epoch = self.order, progress.epoch
        self.update.model.train()
        augment_rng = torch.Generator().manual_seed(augment_rng_seed(self.settings.seed, epoch))
        if progress.augment_rng is not None:
            augment_rng.set_state(progress.augment_rng)
        running = RunningScore(
            self.world, self.update.device, self.accuracy,
            progress.partial_loss, progress.partial_correct,
        )  # fmt: skip
        bar = tqdm(
            initial=progress.position,
            total=order.num_samples,
            desc=f"epoch {epoch + 1}/{self.settings.epochs}",
            unit="sample",
            unit_scale=True,
            leave=False,
            disable=not self.show_progress,
            file=sys.stderr,
        )
        try:
            while progress.position < order.num_samples:
                stopped = self._segment(progress, should_stop, running, augment_rng, bar)
                progress.skipped += self.feed.stream_skipped()
                if stopped:
                    progress.partial_loss, progress.partial_correct = running.totals()
                    progress.augment_rng = augment_rng.get_state()
                    progress.stream = self.feed.stream_state()
                    return None
                if progress.position < order.num_samples:  # a decision point in the epoch
                    told = {"window_loss": self._window(progress, running)}
                    self.decide(progress, Point(epoch, progress.samples, epoch_end=False), told)
                    if self.outgrown(progress) is not None:  # save here
                        progress.partial_loss, progress.partial_correct = running.totals()
                        progress.augment_rng = augment_rng.get_state()
                        progress.stream = self.feed.stream_state()
                        return None
        finally:
            bar.close()
        loss, correct = running.totals()
        dropped, seen = progress.dropped, max(order.num_samples - progress.dropped, 1)
        if self.settings.recovery is not None:
            self.window_loss = progress.window_loss(loss, order.num_samples - dropped)
        progress.mark_loss, progress.mark_seen = 0.0, 0
        progress.position, progress.partial_loss, progress.partial_correct = 0, 0.0, 0
        progress.augment_rng, progress.dropped = None, 0
        skipped, progress.skipped, progress.stream = progress.skipped, 0, None
        return {
            "train_loss": loss / seen,
            "train_acc": correct / seen if self.accuracy else None,
            "dropped_samples": dropped,
            # a resumed stream without a state read its epoch up to the position again
            **({"skipped_samples": skipped} if skipped else {}),
        }

    def _window(self, progress: Progress, running: RunningScore) -> float | None:
        """The training loss since the last decision point (a collective; only with the
        recovery on)."""
        if self.settings.recovery is None:
            return None
        loss, _ = running.totals()
        return progress.window_loss(loss, progress.position - progress.dropped)

    def _segment(
        self,
        progress: Progress,
        should_stop: Callable[[], str | None],
        running: RunningScore,
        augment_rng: torch.Generator,
        bar: tqdm,
    ) -> bool:
        """Updates from ``progress.position`` to the next decision point; True when a stop
        was asked for."""
        settings, order, controller = self.settings, self.order, self.controller
        decision = checked_decision(controller, controller.decision())
        global_batch = decision.batch_size
        if self.needs_pairs and global_batch < 2 * self.world.size:
            raise UsageError(
                f"{type(controller).__name__} decided a batch of {global_batch}, but the "
                f"model's batch norm needs at least 2 samples per process "
                f"({2 * self.world.size} with {self.world.size} process(es))"
            )
        micro = min(settings.micro_batch_size or global_batch, global_batch)
        # each meter says which updates it measures (every stride-th of the run) and the
        # micro-batches those run in
        window = controller.decide_every or order.num_samples
        plans = [(meter, *meter.plan(global_batch, micro, window)) for meter in self.wanted()]
        num_batches = order.num_batches(global_batch)
        first_step = num_batches - order.num_batches(global_batch, progress.position)
        end = _next_decision_point(progress, global_batch, order.num_samples, controller)
        batches = self.feed.train_batches(
            order.batches(progress.epoch, global_batch, start=progress.position, stop=end),
            micro,
            augment=settings.augment,
            augment_rng=augment_rng,
            augment_seed=augment_seed(settings.seed, progress.epoch),
            epoch=progress.epoch,
            stream_state=progress.stream,
        )
        self.last_batch, self.last_adv_ratio = global_batch, decision.adv_ratio
        for step, (indices, pieces) in enumerate(batches, start=first_step):
            warmup = controller.warmup_factor(step / num_batches)
            self.lr.apply(progress.factor(decision) * progress.lr_scale * warmup)
            due = [(meter, size) for meter, size, stride in plans if progress.updates % stride == 0]
            size = min((size for _, size in due), default=micro)
            if self.needs_pairs:
                size = max(size, 2)  # batch norm cannot normalise a single sample
            if size < micro:
                pieces = _recut(pieces, size)
            if self.update.parallel.equal_passes:  # fsdp: no rank may skip a pass
                _check_equal_passes(pieces, global_batch, micro, self.world, self.needs_pairs)
            elif self.needs_pairs:
                pieces = _without_single_samples(pieces)
                if len(indices) < 2 * self.world.size:  # a rank would get a single sample
                    progress.dropped += len(indices)
                    progress.position += len(indices)
                    bar.update(len(indices))
                    continue
            anyone = self.update.step(
                pieces,
                len(indices),
                adv_ratio=decision.adv_ratio,
                meters=[meter for meter, _ in due],
                point=Point(progress.epoch, progress.samples + len(indices), epoch_end=False),
                score=running,
                stop=lambda: should_stop() is not None,
                where=f"epoch {progress.epoch + 1}, update {progress.updates + 1}",
            )
            if self.stop_reason is None:  # asked here, or by another rank (as SIGTERM)
                self.stop_reason = should_stop() or ("SIGTERM" if anyone else None)
            progress.updates += 1
            progress.samples += len(indices)
            progress.position += len(indices)
            bar.update(len(indices))
            if self.stop_reason is not None and progress.position < order.num_samples:
                return True
        return False


def _recut(pieces: Batches, size: int) -> Batches:
    """The same samples, in order, in micro-batches of ``size`` (the last may be short);
    micro-batches that cannot be joined (inputs padded to different lengths by a
    collate_fn) are cut one by one."""
    if not inputs.joinable([x for x, _ in pieces]):
        return [piece for x, y in pieces for piece in micro_batches(x, y, size)]
    x = inputs.join([x for x, _ in pieces])
    y = pieces[0][1] if len(pieces) == 1 else torch.cat([y for _, y in pieces])
    return list(micro_batches(x, y, size))


def _check_equal_passes(pieces: Batches, batch: int, micro: int, world: World, pairs: bool) -> None:
    """Under a sharded model every rank runs every micro-batch's passes: none may be
    empty, nor (batch norm) of one sample."""
    low = 2 if pairs else 1
    if any(len(y) < low for _, y in pieces):
        raise UsageError(
            f"a batch of {batch} over {world.size} processes in micro-batches of at most "
            f"{micro} leaves a process a micro-batch of fewer than {low} sample(s), which "
            "parallel: fsdp cannot skip; use a larger batch or micro_batch_size"
        )


def _without_single_samples(pieces: Batches) -> Batches:
    """A last micro-batch of one sample joins the one before it (batch norm in training
    mode cannot normalise a single value per channel)."""
    if len(pieces) < 2 or len(pieces[-1][1]) != 1:
        return pieces
    (x1, y1), (x2, y2) = pieces[-2:]
    if not inputs.joinable([x1, x2]):
        return pieces
    return [*pieces[:-2], (inputs.join([x1, x2]), torch.cat([y1, y2]))]


def _next_decision_point(
    progress: Progress, batch: int, num_samples: int, controller: BatchController
) -> int:
    """Sample position in the epoch where the segment from ``progress.position`` ends:
    the first update boundary at or past the controller's next decision point, or the
    end."""
    every = controller.decide_every
    if every is None:
        return num_samples
    to_go = (progress.samples // every + 1) * every - progress.samples
    return min(num_samples, progress.position + -(-to_go // batch) * batch)
