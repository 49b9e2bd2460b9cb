"""A sampler indexed by sample, not by batch.

The data order of an epoch is a permutation drawn from ``(seed, epoch)`` alone, so it is the
same whatever the batch size, and a run can change its batch size between epochs or resume
from a sample position and see exactly the data it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["EpochSampler", "probe_batches"]


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

    def batches(self, epoch: int, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Index batches of ``batch_size`` from sample position ``start``; the last may be short."""
        order = self.order(epoch)
        for begin in range(start, self.num_samples, batch_size):
            yield order[begin : begin + batch_size]

    def num_batches(self, batch_size: int, start: int = 0) -> int:
        return -(-(self.num_samples - start) // batch_size)


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
