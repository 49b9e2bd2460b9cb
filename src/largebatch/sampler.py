"""A sampler indexed by sample, not by batch.

The data order of an epoch is a permutation drawn from ``(seed, epoch)`` alone, so it is the
same whatever the batch size, and a run can change its batch size between epochs or resume
from a sample position and see exactly the data it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["EpochSampler", "GrowingBatchSampler", "probe_batches"]


class EpochSampler:
    """Shuffled order of ``num_samples`` indices per epoch, cut into batches on demand."""

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        self.num_samples = num_samples
        self.seed = seed

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices for ``epoch`` (int64, shape (num_samples,))."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def batches(
        self, epoch: int, batch_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Index batches of ``batch_size`` from sample position ``start`` up to ``stop``
        (default: the epoch's end); the last may be short."""
        order = self.order(epoch)
        end = self.num_samples if stop is None else min(stop, self.num_samples)
        for begin in range(start, end, batch_size):
            yield order[begin : min(begin + batch_size, end)]

    def num_batches(self, batch_size: int, start: int = 0) -> int:
        return -(-(self.num_samples - start) // batch_size)


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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.order = EpochSampler(num_samples, seed)
        self.batch_size = batch_size
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = world_size or (torch.distributed.get_world_size() if distributed else 1)
        self.rank = (
            rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        )
        self.epoch = 0
        self.position = 0  # samples of this epoch already handed out (global)
        self.last_batch_samples = 0  # global size of the latest batch

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
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.batch_size = int(state["batch_size"])


def probe_batches(
    x: torch.Tensor, y: torch.Tensor, samples: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed probe set: ``samples`` rows of ``(x, y)`` chosen by ``seed``, in batches.

    Used for curvature estimates, which need the same data on every call.
    """
    count = min(samples, len(y))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:count]
    return [
        (x[order[i : i + batch_size]], y[order[i : i + batch_size]])
        for i in range(0, count, batch_size)
    ]
