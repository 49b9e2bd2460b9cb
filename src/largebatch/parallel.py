"""How the gradients of the ranks meet: one owner, a strategy object.

Under torchrun each rank runs its contiguous slice of every global batch as micro-batches,
each weighted by its share of the *global* batch (:func:`largebatch.accumulate.backward_share`),
so the update's gradient is the *sum* of the ranks' gradients. A :class:`Parallel` says how
that sum is made, and :class:`~largebatch.accumulate.GlobalBatch` asks it at three points
of an update, so the loop never branches on which one runs:

- :meth:`Parallel.prepare`: the module the forward passes run through (the model itself,
  or a wrapper that synchronises in the backward pass);
- :meth:`Parallel.micro_batch`: a context around one micro-batch's forward and backward,
  told whether this backward may synchronise (the update's last micro-batch, when the
  update can synchronise in the backward at all, see :meth:`Parallel.sync_in_backward`);
- :meth:`Parallel.finish`: once the micro-batches are done, what is left to reduce: the
  gradients unless the backward already did, and the extras, which are the batch-norm
  running statistics moved once per update (averaged over the ranks) and the stop flag
  (summed, so every rank learns that one rank was asked to stop).

Kinds (config ``parallel``): ``flat``, every gradient copied into one flat tensor,
all-reduced once per update after the backward passes and copied back (nothing overlaps
the backward pass). In a single process every kind is the same: nothing to reduce.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from largebatch.distributed import World, all_reduce_, all_reduce_gradients
from largebatch.errors import InvalidValueError

__all__ = ["PARALLEL_KINDS", "Parallel", "Flat", "make_parallel"]

#: the values of config ``parallel``
PARALLEL_KINDS = ("flat",)


class Parallel:
    """One process: the gradients are complete after the backward passes. Subclasses
    reduce them over the ranks of ``world``."""

    name = "single"

    def __init__(self, world: World | None = None) -> None:
        self.world = world or World()

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module that runs the forward passes of ``model`` (the model itself here)."""
        return model

    def sync_in_backward(self, batch_samples: int, local_reads: bool) -> bool:
        """Whether this update's gradients may meet during its last backward pass.
        ``batch_samples``: the update's global batch; ``local_reads``: a meter reads
        each micro-batch's gradient on this rank. Every rank must answer the same."""
        return False

    def micro_batch(self, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """The context of one micro-batch's forward and backward; ``sync``: this backward
        is the one in which the gradients meet."""
        return contextlib.nullcontext()

    def finish(
        self,
        params: Sequence[nn.Parameter],
        buffers: Sequence[torch.Tensor],
        flag: float,
        synced: bool,
    ) -> float:
        """Reduce what is left of an update: the gradients of ``params`` unless
        ``synced`` (the backward pass reduced them), the batch-norm running statistics
        ``buffers`` (averaged) and ``flag`` (summed; returned)."""
        return flag

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (a loss-term count, say)."""
        return all_reduce_(tensor, self.world)


class Flat(Parallel):
    """All gradients, the running statistics and the flag in one flat all-reduce after
    the backward passes (:func:`largebatch.distributed.all_reduce_gradients`)."""

    name = "flat"

    def finish(
        self,
        params: Sequence[nn.Parameter],
        buffers: Sequence[torch.Tensor],
        flag: float,
        synced: bool,
    ) -> float:
        return all_reduce_gradients(list(params), self.world, flag, buffers)


def make_parallel(kind: str, world: World) -> Parallel:
    """The strategy that config ``parallel: kind`` names, for ``world``."""
    if kind not in PARALLEL_KINDS:
        raise InvalidValueError(
            f"parallel must be one of {', '.join(PARALLEL_KINDS)}, got {kind!r}"
        )
    if not world.enabled:
        return Parallel(world)
    return Flat(world)
