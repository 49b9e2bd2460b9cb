"""Batches for the training loop and for evaluation.

Two kinds of data reach the loop:

- In-memory tensors (MNIST-like, CIFAR, SVHN, ...): a batch is an index into the tensor,
  which costs less than any loader could, so they skip the loader entirely. Train-time
  augmentation runs on the whole global batch from one generator (on the training device,
  so a GPU does its own cropping and flipping).
- Data read on demand (a :class:`largebatch.source.LazySplit`: images on disk, such as
  :class:`largebatch.data.imagefolder.LazyImages`, or a user's map-style Dataset, a
  :class:`largebatch.source.DatasetSplit` whose items carry their targets): a persistent pool of
  :class:`torch.utils.data.DataLoader` worker processes decodes them. The pool is created
  once per run and reused by every epoch and every evaluation, whatever the batch size:
  the loader's items are *requests* (a chunk of sample indices and an augmentation seed)
  that the main process lays out for the whole epoch, so prefetching runs ahead across
  update boundaries and a batch-size change is only a different list of requests.
  Augmentation randomness comes from ``(seed, sample index)``, so the decoded batch does
  not depend on the number of workers, processes or the chunking; a Dataset is read
  item by item (``dataset[i]``), each training sample once per epoch, by this rank only
  for its own slice.

On CUDA the loader pins its output so host-to-device copies can be asynchronous.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from largebatch.accumulate import cuts
from largebatch.distributed import World, shard
from largebatch.errors import UsageError
from largebatch.source import DataSource, IndexedSplit

__all__ = ["Feed", "is_lazy", "loaded", "default_workers"]

#: Samples per loader request: small enough to spread a large batch over the workers.
CHUNK = 64


def is_lazy(x: Any) -> bool:
    """True for inputs decoded on demand (anything that is not a tensor)."""
    return not isinstance(x, torch.Tensor)


def loaded(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A subset's ``(inputs, targets)`` as tensors: lazy images decoded with the evaluation
    transform, a user's Dataset items read (its targets come with them)."""
    if getattr(x, "paired", False):
        return x.load()
    return (x.load() if is_lazy(x) else x), y


def default_workers() -> int:
    """Worker processes for decoding when the config does not say: the usable cores, up to 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class _Requests(Sampler):
    """The loader's sampler: whatever list of requests was set before ``iter(loader)``."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tuple[int, ...], int | None]] = []

    def __iter__(self) -> Iterator[tuple[str, tuple[int, ...], int | None]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class _Decoder(Dataset):
    """Runs in the workers: decodes one request ``(split, root indices, augment seed)``.

    A :class:`UsageError` (an unreadable image, a failing ``__getitem__``) is returned, not
    raised, so that the main process can raise it with its one-line message instead of
    the loader's wrapped traceback.
    """

    def __init__(self, splits: dict[str, Any]) -> None:
        self.splits = splits

    def __getitem__(self, request: tuple[str, tuple[int, ...], int | None]) -> Any:
        split, indices, seed = request
        try:
            return self.splits[split].decode(list(indices), augment_seed=seed)
        except UsageError as exc:
            return exc

    def __len__(self) -> int:  # not used: the sampler says what to load
        return 0


class Feed:
    """Where the training loop and evaluation get their batches (this rank's share).

    Args:
        data: the data source.
        device: where the batches go; on CUDA the loader pins host memory.
        world: this process's place in a distributed run (each rank loads its slice only).
        workers: decoding processes for lazy data (None: :func:`default_workers`; 0: decode
            in the main process). Ignored for in-memory tensors.
    """

    def __init__(
        self,
        data: DataSource,
        device: torch.device,
        world: World | None = None,
        workers: int | None = None,
    ) -> None:
        self.data = data
        self.device = device
        self.world = world or World()
        self.lazy = is_lazy(data.train_x) or is_lazy(data.test_x)
        self._loader: DataLoader | None = None
        if self.lazy:
            count = default_workers() if workers is None else workers
            self._requests = _Requests()
            self._loader = DataLoader(
                _Decoder({"train": data.train_x, "test": data.test_x}),
                batch_size=None,
                collate_fn=_as_is,  # not default_convert: a pair stays a tuple
                sampler=self._requests,
                num_workers=count,
                persistent_workers=count > 0,
                pin_memory=device.type == "cuda",
                prefetch_factor=4 if count > 0 else None,
            )

    # ------------------------------------------------------------------ training

    def train_batches(
        self,
        batches: Iterable[torch.Tensor],
        micro: int,
        augment: bool,
        augment_rng: torch.Generator,
        augment_seed: int,
    ) -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Per update: the global batch's indices and this rank's micro-batches ``(x, y)``.

        ``augment_rng`` drives in-memory augmentation (its state advances per batch and is
        what a mid-epoch checkpoint saves); lazy images use ``augment_seed`` per sample.
        """
        data = self.data
        if not is_lazy(data.train_x):
            for indices in batches:
                if augment and data.augment is not None:
                    # augment the whole global batch, so each rank's slice is what one
                    # process sees; on CUDA the augmentation runs on the device
                    x = data.train_x[indices].to(self.device, non_blocking=True)
                    x = shard(data.augment(x, augment_rng), self.world)
                    y = shard(data.train_y[indices], self.world)
                else:
                    local = shard(indices, self.world)
                    x, y = data.train_x[local], data.train_y[local]
                yield indices, [(x[piece], y[piece]) for piece in cuts(len(y), micro)]
            return
        seed = augment_seed if augment else None
        plan = []  # per update: (global indices, [(local micro-batch positions, n chunks)])
        requests: list[tuple[str, tuple[int, ...], int | None]] = []
        roots = _root_positions(data.train_x)
        for indices in batches:
            local = shard(indices, self.world)
            micros = []
            for piece in cuts(len(local), micro):
                part = local[piece]
                chunks = _chunks((part if roots is None else roots[part]).tolist())
                requests.extend(("train", c, seed) for c in chunks)
                micros.append((part, len(chunks)))
            plan.append((indices, micros))
        decoded = self._run(requests)
        for indices, micros in plan:
            yield (
                indices,
                [
                    self._batch([next(decoded) for _ in range(n)], data.train_y, part)
                    for part, n in micros
                ],
            )

    # ---------------------------------------------------------------- evaluation

    def eval_batches(
        self, split: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the ``"train"`` or ``"test"`` split, in order, in batches.

        Lazy images get the evaluation transform (no augmentation).
        """
        x, y = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
        mine = shard(torch.arange(len(y)), self.world)
        x, y = (x[mine[0] : mine[-1] + 1] if len(mine) else x[:0]), y[mine]
        if not is_lazy(x):
            for piece in cuts(len(y), batch_size):
                yield x[piece], y[piece]
            return
        requests, counts = [], []
        roots = x.root_indices()
        for piece in cuts(len(y), batch_size):
            chunks = _chunks(roots[piece].tolist())
            requests.extend((split, c, None) for c in chunks)
            counts.append((piece, len(chunks)))
        decoded = self._run(requests)
        for piece, n in counts:
            yield self._batch([next(decoded) for _ in range(n)], y, piece)

    # ---------------------------------------------------------------- the pool

    def _run(self, requests: list[tuple[str, tuple[int, ...], int | None]]) -> Iterator[Any]:
        """Decoded chunks for ``requests``, in order; a decoding error is raised here."""
        assert self._loader is not None
        self._requests.items = requests
        for item in self._loader:
            if isinstance(item, UsageError):
                raise type(item)(str(item)) from None
            yield item

    def _batch(
        self, parts: list[Any], targets: Any, rows: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``(x, y)`` from its decoded chunks: ``targets[rows]`` are its labels,
        unless the chunks are ``(inputs, targets)`` pairs (a user's Dataset)."""
        if isinstance(parts[0], tuple):
            return self._join([p[0] for p in parts]), self._join([p[1] for p in parts])
        return self._join(parts), targets[rows]

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One batch from its decoded chunks. On CUDA each (pinned) chunk is copied to the
        device asynchronously and the chunks are joined there: joining them on the host
        would put the batch in unpinned memory and make its copy synchronous."""
        if self.device.type == "cuda":
            parts = [part.to(self.device, non_blocking=True) for part in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def close(self) -> None:
        """Stop the worker processes (they also stop when the feed is garbage-collected)."""
        if self._loader is not None:
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self._loader = None

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _as_is(item: Any) -> Any:
    return item


def _root_positions(split: Any) -> torch.Tensor | None:
    """Where a subset's samples sit in the full split; None for a full split of an
    :class:`~largebatch.source.IndexedSplit` (sample ``i`` is at ``i``: no N-long table)."""
    if isinstance(split, IndexedSplit) and split._positions is None:
        return None
    return split.root_indices()


def _chunks(indices: Sequence[int]) -> list[tuple[int, ...]]:
    return [tuple(indices[piece]) for piece in cuts(len(indices), CHUNK)]
