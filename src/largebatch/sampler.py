"""A sampler indexed by sample, not by batch.

The data order of an epoch is a permutation drawn from ``(seed, epoch)`` alone, so it is the
same whatever the batch size, and a run can change its batch size between epochs or resume
from a sample position and see exactly the data it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from largebatch import checks
from largebatch.accumulate import cuts
from largebatch.errors import InvalidValueError

__all__ = [
    "EpochSampler",
    "Shuffle",
    "LAZY_ORDER_ABOVE",
    "StreamOrder",
    "GrowingBatchSampler",
    "probe_batches",
    "order_seed",
    "augment_seed",
    "augment_rng_seed",
    "PROBE_SEED_OFFSET",
    "probe_seed",
]


# The seeds a run derives from its one ``seed``. Each has a name for what it seeds; the
# numbers are those runs have always used, so a run repeats exactly.


def order_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order (:meth:`EpochSampler.order`)."""
    return seed * 1_000_003 + epoch


def augment_seed(seed: int, epoch: int) -> int:
    """The per-epoch augmentation seed of lazily decoded images (the feed's
    ``augment_seed``: sample ``i`` of the epoch is transformed by a generator seeded from
    ``(augment_seed, i)``). The same number as :func:`order_seed` by history; kept, so
    that runs repeat, under a name of its own."""
    return order_seed(seed, epoch)


def augment_rng_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s generator for in-memory augmentation (the feed's
    ``augment_rng``, which draws the crops and flips of tensor data)."""
    return seed * 7919 + epoch


#: added to the run's seed for the curvature probe set, so it is drawn apart from the order
PROBE_SEED_OFFSET = 104_729


def probe_seed(seed: int) -> int:
    """The seed of the run's fixed probe set for curvature estimates (:func:`probe_batches`)."""
    return seed + PROBE_SEED_OFFSET


#: Above this many samples an epoch's order is a keyed bijection computed batch by batch
#: (:class:`Shuffle`): a permutation held in memory would take 8 bytes per sample (256 MB
#: at 32M). At or below it, the order is torch's ``randperm``, as runs have always used.
LAZY_ORDER_ABOVE = 1 << 22


class Shuffle:
    """A pseudo-random permutation of ``range(n)`` chosen by ``seed``, computed for any
    positions without holding it: a 4-round Feistel network on the smallest even number
    of bits that covers ``n``, walked again from values at or past ``n`` until they fall
    inside (each step is a bijection, so the walk is one too)."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        keys = np.random.default_rng([seed, n]).integers(0, 1 << 62, self.ROUNDS, np.uint64)
        self.keys = [np.uint64(k) for k in keys]

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """Where the permutation sends each position (int64, same shape)."""
        values = positions.numpy().astype(np.uint64)
        out = self._permute(values)
        outside = out >= self.n
        while outside.any():
            out[outside] = self._permute(out[outside])
            outside = out >= self.n
        return torch.from_numpy(out.astype(np.int64))

    def _permute(self, values: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self.half), self.mask
        left, right = values >> half, values & mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << half) | right


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit integer hash (the finaliser of splitmix64), arithmetic modulo 2**64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochSampler:
    """Shuffled order of ``num_samples`` indices per epoch, cut into batches on demand
    (above :data:`LAZY_ORDER_ABOVE` samples, computed batch by batch: :class:`Shuffle`)."""

    def __init__(self, num_samples: int, seed: int) -> None:
        who = type(self).__name__
        self.num_samples = checks.integer(num_samples, who, "num_samples", minimum=1)
        self.seed = checks.integer(seed, who, "seed", minimum=0, maximum=checks.MAX_SEED)

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices for ``epoch`` (int64, shape (num_samples,))."""
        epoch = checks.integer(epoch, f"{type(self).__name__}.order", "epoch", minimum=0)
        if self.num_samples > LAZY_ORDER_ABOVE:
            return self._shuffle(epoch)(torch.arange(self.num_samples))
        generator = torch.Generator().manual_seed(order_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=generator)

    def _shuffle(self, epoch: int) -> Shuffle:
        return Shuffle(self.num_samples, order_seed(self.seed, epoch))

    def batches(
        self, epoch: int, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Index batches of ``batch_size`` from sample position ``start`` up to ``stop``
        (default: the epoch's end); the last may be short."""
        who = f"{type(self).__name__}.batches"
        batch_size, start = self._checked(who, batch_size, start)
        if stop is not None:
            stop = checks.integer(stop, who, "stop", minimum=start)
        end = self.num_samples if stop is None else min(stop, self.num_samples)
        # a generator returned, not a generator function: the checks run at the call
        if self.num_samples > LAZY_ORDER_ABOVE:
            shuffle = self._shuffle(epoch)
            return (
                shuffle(torch.arange(i, min(i + batch_size, end)))
                for i in range(start, end, batch_size)
            )
        order = self.order(epoch)
        return (order[i : min(i + batch_size, end)] for i in range(start, end, batch_size))

    def num_batches(self, batch_size: int, start: int = 0) -> int:
        """Batches of ``batch_size`` from sample position ``start`` to the epoch's end."""
        batch_size, start = self._checked(f"{type(self).__name__}.num_batches", batch_size, start)
        return -(-(self.num_samples - start) // batch_size)

    def _checked(self, who: str, batch_size: Any, start: Any) -> tuple[int, int]:
        """``(batch_size, start)``: a batch of at least 1, a position in the epoch."""
        return (
            checks.integer(batch_size, who, "batch_size", minimum=1),
            checks.integer(start, who, "start", minimum=0, maximum=self.num_samples),
        )


class StreamOrder(EpochSampler):
    """The order of a stream: its positions as they come, ``0 .. num_samples - 1`` every
    epoch (the seed is not used), cut into batches without an order held in memory."""

    def order(self, epoch: int) -> torch.Tensor:
        return torch.arange(self.num_samples)

    def batches(
        self, epoch: int, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        who = f"{type(self).__name__}.batches"
        batch_size, start = self._checked(who, batch_size, start)
        end = self.num_samples if stop is None else min(stop, self.num_samples)
        return (torch.arange(i, min(i + batch_size, end)) for i in range(start, end, batch_size))


class GrowingBatchSampler:
    """Batches of sample indices for a loop of your own, whose size may change at any batch.

    Iterating gives one epoch: this rank's share of each global batch (under torchrun the
    global batch of ``batch_size`` samples is cut into contiguous per-rank slices, so the
    global batch does not depend on the world size). Set :attr:`batch_size` at any time;
    the next batch has the new size. The order of an epoch depends only on
    ``(seed, epoch)``, and the position is counted in samples, so :meth:`state_dict` taken
    mid-epoch resumes at the same sample with any batch size.

    Use it directly (``for idx in sampler: x, y = X[idx], Y[idx]``) or as a DataLoader's
    ``batch_sampler`` with ``num_workers=0``. A loader with workers draws a few batches
    ahead: the position then runs ahead too, and a new batch size takes effect late, so
    save at epoch ends in that case.

    Args:
        num_samples: size of the dataset.
        batch_size: global batch, over all ranks.
        seed: seed of the data order.
        rank, world_size: this process's place (default: read from torch.distributed when
            it is initialized, else a single process).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        who = type(self).__name__
        num_samples = checks.integer(num_samples, who, "num_samples", minimum=1)
        seed = checks.integer(seed, who, "seed", minimum=0, maximum=checks.MAX_SEED)
        self.order = EpochSampler(num_samples, seed)
        self.batch_size = batch_size
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        self.world_size = checks.integer(world_size, who, "world_size", minimum=1)
        self.rank = checks.integer(rank, who, "rank", minimum=0)
        if self.rank >= self.world_size:
            raise InvalidValueError(
                f"{who}: rank must be < world_size ({self.world_size}), got {self.rank}"
            )
        self.epoch = 0
        self.position = 0  # samples of this epoch already handed out (global)
        self.last_batch_samples = 0  # global size of the latest batch

    @property
    def batch_size(self) -> int:
        """The global batch of the next batches; set it at any time (an integer >= 1)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = checks.integer(value, type(self).__name__, "batch_size", minimum=1)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order.order(self.epoch)
        while self.position < self.order.num_samples:
            batch = order[self.position : self.position + self.batch_size]
            self.position += len(batch)
            self.last_batch_samples = len(batch)
            yield torch.tensor_split(batch, self.world_size)[self.rank].tolist()
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        """Batches left in the current epoch at the current batch size."""
        return self.order.num_batches(self.batch_size, self.position)

    def state_dict(self) -> dict[str, Any]:
        return checks.tagged(
            type(self).__name__,
            {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size},
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s state; a damaged one is refused, changing
        nothing."""
        who = type(self).__name__
        state = checks.state_of(state, who, ("epoch", "position", "batch_size"))
        where = f"{who}.load_state_dict"
        epoch = checks.integer(state["epoch"], where, "epoch", minimum=0)
        position = checks.integer(
            state["position"], where, "position", minimum=0, maximum=self.order.num_samples
        )
        batch_size = checks.integer(state["batch_size"], where, "batch_size", minimum=1)
        self.epoch, self.position, self.batch_size = epoch, position, batch_size


def probe_batches(
    x: torch.Tensor, y: torch.Tensor, samples: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed probe set: ``samples`` rows of ``(x, y)`` chosen by ``seed``, in batches.

    Used for curvature estimates, which need the same data on every call.
    """
    count = min(samples, len(y))
    if getattr(x, "stream", False):  # a stream's head: its first samples, read once
        x.head(count)  # in one pass, not batch by batch
        order = torch.arange(count)
    elif len(y) > LAZY_ORDER_ABOVE:  # no permutation of every sample held for a few
        order = Shuffle(len(y), seed)(torch.arange(count))
    else:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:count]
    return [(x[order[piece]], y[order[piece]]) for piece in cuts(count, batch_size)]
