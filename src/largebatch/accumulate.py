"""Gradient accumulation with each micro-batch weighted by its share of the batch.

A global batch of ``n`` samples run as micro-batches of ``n_k`` samples gives the gradient
of the whole batch at once when each micro-batch's mean loss is scaled by ``n_k / n``
before its backward pass. Weighting each micro-batch by ``1 / count`` instead (what a
fixed ``loss / accumulation_steps`` does) over-weights a short last micro-batch.

:class:`GlobalBatch` is the whole update the training loop runs (and a loop of yours can
run): micro-batches, adversarial share, batch norm per update, the all-reduce, the meters'
hooks, the finite check and the step. :func:`accumulate` is the bare gradient part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from largebatch import checks, inputs
from largebatch.distributed import World
from largebatch.errors import DivergedError, InvalidValueError
from largebatch.inputs import Inputs
from largebatch.meters import Meter, Point, reads_micro_batches
from largebatch.parallel import Flat, Parallel
from largebatch.precision import autocast, make_scaler

__all__ = [
    "cuts",
    "micro_batches",
    "backward_share",
    "accumulate",
    "IGNORE_INDEX",
    "token_count",
    "to_device",
    "BatchNormPerUpdate",
    "GlobalBatch",
]


def cuts(count: int, size: int) -> list[slice]:
    """The slices that cut ``count`` samples into consecutive pieces of at most ``size``
    (the last may be short): the one rule for micro-batches, probe batches and the
    feed's pieces."""
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


def micro_batches(
    x: torch.Tensor, y: torch.Tensor, size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` cut into consecutive pieces of at most ``size`` samples (``x`` one tensor
    or a dict of them, see :mod:`largebatch.inputs`)."""
    size = _checked(x, y, size, "micro_batches", "size")  # at the call, not at the first batch
    return ((inputs.rows(x, piece), y[piece]) for piece in cuts(len(y), size))


def backward_share(
    loss: torch.Tensor,
    samples: int,
    batch_samples: int,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Backward of a micro-batch's mean ``loss``, weighted by ``samples / batch_samples``.

    ``scaler``: the fp16 loss scaler, when there is one.
    """
    weighted = loss * (samples / batch_samples)
    (scaler.scale(weighted) if scaler is not None else weighted).backward()


#: The target value that a per-token loss skips (torch's ``cross_entropy`` default), as
#: padding of sequences of unequal length.
IGNORE_INDEX = -100


def token_count(y: torch.Tensor) -> int:
    """The loss terms of a micro-batch of per-token targets: those not ``IGNORE_INDEX``."""
    return int((y != IGNORE_INDEX).sum())


def accumulate(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batch_size: int,
    count: Callable[[torch.Tensor], int] | None = None,
) -> float:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over the batch ``(x, y)``.

    Runs the batch as micro-batches of at most ``micro_batch_size`` samples; the result
    equals one backward over the whole batch (batch-norm statistics aside). Does not zero
    the gradients first. Returns the batch's mean loss.

    ``count``: the loss terms of a micro-batch's targets, for a loss that is a mean over
    terms other than samples (:func:`token_count` for a per-token loss over padded
    sequences); each micro-batch is then weighted by its terms' share of the batch's.
    """
    micro_batch_size = _checked(x, y, micro_batch_size, "accumulate", "micro_batch_size")
    pieces = list(micro_batches(x, y, micro_batch_size))
    shares = [len(yb) if count is None else count(yb) for _, yb in pieces]
    whole = sum(shares)
    total = 0.0
    for (xb, yb), share in zip(pieces, shares, strict=True):
        if share:  # a micro-batch of padding only has no mean loss: it is skipped
            loss = loss_fn(inputs.run(model, xb), yb)
            backward_share(loss, share, whole)
            total += float(loss.detach()) * share
    return total / max(whole, 1)


def _checked(x: torch.Tensor, y: torch.Tensor, size: int, who: str, field: str) -> int:
    """``size`` as an integer >= 1; ``x`` and ``y`` must hold as many samples."""
    if inputs.count(x) != len(y):
        raise InvalidValueError(f"{who}: x has {inputs.count(x)} samples but y has {len(y)}")
    return checks.integer(size, who, field, minimum=1)


def to_device(x: Inputs, device: torch.device, channels_last: bool = False) -> Inputs:
    """``x`` (a tensor, or a dict of them) on ``device`` (without waiting for the copy),
    channels-last when asked."""
    x = inputs.each(x, lambda t: t.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class BatchNormPerUpdate:
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


#: ``attack(model, x, y, ratio, loss_fn) -> x``: the adversarial share of a micro-batch
Attack = Callable[
    [nn.Module, torch.Tensor, torch.Tensor, float, Callable[..., torch.Tensor]], torch.Tensor
]


class GlobalBatch:
    """One optimizer update over a global batch, the update that ``largebatch.fit`` runs
    and that a loop of your own can run too.

    :meth:`step` takes this rank's micro-batches of the update and: zeroes the gradients;
    per micro-batch replaces the adversarial share (``attack``), runs the forward pass
    under autocast and the backward pass weighted by the micro-batch's share of the
    global batch (:func:`backward_share`), adds to the epoch's sums and calls each
    meter's ``after_backward`` (or, for a meter that reads this rank's slice under
    torchrun, ``at_slice`` once the strategy has taken its gradient's norm); moves
    batch-norm statistics once per update (:class:`BatchNormPerUpdate`); under torchrun
    has ``parallel`` reduce the gradients (in the last backward pass, or after them) and
    the extras (the running statistics, a stop flag); calls each meter's
    ``at_update``; refuses a non-finite loss or gradient
    (:class:`~largebatch.errors.DivergedError`: nothing reaches the weights); and steps
    the optimizer (through the fp16 loss scaler, when there is one).

    Args:
        model, optimizer, loss_fn: what is trained; ``loss_fn(outputs, targets)`` returns
            the mean loss.
        world: the process group (:class:`~largebatch.distributed.World`).
        device: where the micro-batches go.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; fp16 adds loss scaling).
        attack: the adversarial share (:class:`~largebatch.adversarial.AdversarialShare`),
            or None.
        channels_last: put image micro-batches in channels-last memory format.
        count: the loss terms of a micro-batch's targets, when the loss is a mean over
            terms other than samples (:func:`token_count`: tokens of padded sequences).
            Each micro-batch's backward is then weighted by its terms' share of the
            global batch's (summed over the ranks: one more all-reduce of one number),
            so accumulation equals one large batch. None: samples.
        parallel: how the ranks' gradients meet (:mod:`largebatch.parallel`); default
            the flat all-reduce under torchrun, nothing in one process.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        world: World,
        device: torch.device,
        precision: str = "fp32",
        attack: Attack | None = None,
        channels_last: bool = False,
        count: Callable[[torch.Tensor], int] | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        self.count = count
        self.parallel = parallel or (Flat(world) if world.enabled else Parallel(world))
        self.parallel.prepare(model)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.world, self.device, self.precision = world, device, precision
        self.attack, self.channels_last = attack, channels_last
        self.scaler = make_scaler(device, precision)
        self.batch_norm = BatchNormPerUpdate(model)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def step(
        self,
        micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        batch_samples: int,
        *,
        adv_ratio: float = 0.0,
        meters: Sequence[Meter] = (),
        point: Point | None = None,
        score: Any = None,
        stop: bool | Callable[[], bool] = False,
        where: str | None = None,
    ) -> bool:
        """One update from this rank's ``micro_batches`` of a global batch of
        ``batch_samples`` samples. ``score`` (a :class:`~largebatch.scoring.RunningScore`)
        receives each micro-batch's loss and predictions; ``point`` is where the meters
        are told the update happened; ``where`` names the update in a divergence's
        message (e.g. ``"epoch 3, update 17"``). ``stop`` is this rank's wish to stop (a
        callable is asked just before the all-reduce, so a signal that arrived during the
        update counts); returns whether any rank wished it."""
        model, optimizer, scaler, device = self.model, self.optimizer, self.scaler, self.device
        optimizer.zero_grad(set_to_none=True)
        accumulating = len(micro_batches) > 1
        if accumulating:
            self.batch_norm.begin()
        # the divergence check reads the epoch's running loss when there is one
        loss_sum = None if score is not None else torch.zeros((), device=device)
        shares, whole, empty = self._shares(micro_batches, batch_samples)
        # the gradients may meet in the last backward pass only when every rank has one
        # and no meter reads this rank's own micro-batch gradients (all ranks agree)
        local = any(reads_micro_batches(meter, batch_samples) for meter in meters)
        sliced = [meter for meter in meters if meter.reads_slice(batch_samples)]
        sync = self.parallel.sync_in_backward(batch_samples, local or empty, bool(sliced))
        last = max((i for i, share in enumerate(shares) if share), default=-1)
        # adversarial examples at the update's weights, on the model whole (under fsdp a
        # copy, brought up to date once per update: a collective)
        attacked = self.parallel.whole(model) if self.attack is not None and adv_ratio else model
        for index, ((xb, yb), share) in enumerate(zip(micro_batches, shares, strict=True)):
            if not share:  # no loss terms (all padding): nothing to learn from, no mean
                continue
            xb = to_device(xb, device, self.channels_last)
            yb = yb.to(device, non_blocking=True)
            if self.attack is not None:  # through the model itself: no gradient sync
                xb = self.attack(attacked, xb, yb, adv_ratio, self.loss_fn)
            with self.parallel.micro_batch(sync and index == last) as module:
                with autocast(device, self.precision):
                    out = inputs.run(module, xb)
                    loss = self.loss_fn(out, yb)
                backward_share(loss, share, whole, scaler)
            if loss_sum is None:
                score.add(loss, out, yb)
            else:
                loss_sum += loss.detach().float() * len(yb)
            for meter in meters:
                if meter not in sliced:
                    meter.after_backward(model, len(yb), batch_samples)
            if accumulating:
                self.batch_norm.micro_batch_done(len(yb))
        if accumulating:
            self.batch_norm.end()
        wish = stop() if callable(stop) else stop
        flag = 1.0 if wish else 0.0
        total = score.loss if loss_sum is None else loss_sum
        extras = list(self.batch_norm.running)
        if self.world.enabled:  # whether any rank's loss is non-finite rides along: every
            # rank must stop (or roll back) at the same update, even when the gradients
            # stayed finite (a loss that overflowed on one rank only)
            extras.append(torch.isfinite(total).logical_not().float().reshape(1))
        stopping = self.parallel.finish(self.params, extras, flag, sync)
        lost = bool(extras[-1].item() > 0) if self.world.enabled else None
        if sliced:  # this rank's gradient before the ranks' gradients met
            samples = sum(len(yb) for _, yb in micro_batches)
            for meter in sliced:
                meter.at_slice(self.parallel.local_sq_norms(), samples, batch_samples)
        for meter in meters:  # (before unscaling: with fp16, the scale cancels in ratios)
            meter.at_update(model, point)
        # A diverged run must stop before a non-finite update reaches the weights; one
        # check (one device sync) covers the loss and the gradient.
        # With fp16 loss scaling, an overflowing gradient is the scaler's business: it skips
        # the step and lowers the scale. Only a non-finite loss is divergence then.
        if scaler is not None:
            scaler.unscale_(optimizer)
            grad_norm = torch.zeros((), device=device)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if hasattr(grad_norm, "full_tensor"):  # sharded gradients (fsdp): the whole norm
                grad_norm = grad_norm.full_tensor()
        if lost or not torch.isfinite(total + grad_norm.to(total.device)):
            what = "loss" if lost or not torch.isfinite(total) else "gradient"
            raise DivergedError(
                f"training {what} became non-finite{f' in {where}' if where else ''} "
                f"(lr {optimizer.param_groups[0]['lr']:.4g}); lower --lr and try again"
            )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return bool(stopping)

    def _shares(
        self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], batch_samples: int
    ) -> tuple[list[int], int, bool]:
        """Each micro-batch's weight, the global batch's total (samples, or with
        ``count`` the micro-batches' loss terms, summed over the ranks), and whether
        some rank has nothing to learn from in this update (every rank gets the same)."""
        if self.count is None:
            shares = [len(yb) for _, yb in micro_batches]
            return shares, batch_samples, batch_samples < self.world.size
        shares = [int(self.count(yb)) for _, yb in micro_batches]
        # [terms, ranks without any], summed over the ranks in one all-reduce
        sums = torch.tensor(
            [float(sum(shares)), 0.0 if sum(shares) else 1.0],
            dtype=torch.float64,
            device=self.device,
        )
        whole, empty = self.parallel.sum_(sums).tolist()
        return shares, max(int(whole), 1), empty > 0
