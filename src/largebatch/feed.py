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
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from largebatch import inputs
from largebatch.accumulate import cuts
from largebatch.distributed import World, gather_objects, shard
from largebatch.errors import DataError, UsageError
from largebatch.parallel import equal_cuts, longest_slice
from largebatch.source import DataSource, IndexedSplit, user_failures

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


#: what the loader's workers decode: ``(split, root indices, augment seed)``
Request = tuple[str, tuple[int, ...], int | None]


class _Requests(Sampler):
    """The loader's sampler: whatever requests were set before ``iter(loader)`` (made as
    the loader asks for them)."""

    def __init__(self) -> None:
        self.items: Iterable[Request] = []

    def __iter__(self) -> Iterator[Request]:
        return iter(self.items)

    def __len__(self) -> int:  # not known ahead; the loader does not ask
        raise TypeError("the feed's requests are made as the loader asks for them")


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
        equal_passes: bool = False,
    ) -> None:
        self.data = data
        self.device = device
        self.world = world or World()
        #: every rank gets as many micro-batches and evaluation batches (FSDP's passes)
        self.equal_passes = equal_passes
        self.lazy = is_lazy(data.train_x) or is_lazy(data.test_x)
        self._loader: DataLoader | None = None
        count = default_workers() if workers is None else workers
        self._streams = {
            split: _Stream(x, self.world, count)
            for split, x in (("train", data.train_x), ("test", data.test_x))
            if _is_stream(x)
        }
        if self.lazy:
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
        epoch: int = 0,
        stream_state: list[Any] | None = None,
    ) -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """Per update: the global batch's indices and this rank's micro-batches ``(x, y)``.

        ``augment_rng`` drives in-memory augmentation (its state advances per batch and is
        what a mid-epoch checkpoint saves); lazy images use ``augment_seed`` per sample.
        A stream's indices are the positions in ``epoch``; its pass goes on where the last
        call left it, or starts anew there (``stream_state``: the ranks' states that
        :meth:`stream_state` gave at that position, when the stream keeps one).
        """
        data = self.data
        if "train" in self._streams:
            yield from self._stream_batches(batches, micro, epoch, stream_state)
            return
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
                yield indices, [(x[p], y[p]) for p in self._cuts(len(y), len(indices), micro)]
            return
        seed = augment_seed if augment else None
        roots = _root_positions(data.train_x)
        size = _chunk_size(data.train_x)

        def updates() -> Iterator[tuple[torch.Tensor, list[tuple[torch.Tensor, list[Request]]]]]:
            for indices in batches:
                local, micros = shard(indices, self.world), []
                for piece in self._cuts(len(local), len(indices), micro):
                    part = local[piece]
                    chunks = _chunks((part if roots is None else roots[part]).tolist(), size)
                    micros.append((part, [("train", c, seed) for c in chunks]))
                yield indices, micros

        for indices, micros in self._decoded(updates()):
            yield indices, [self._batch(parts, data.train_y, part) for part, parts in micros]

    def _stream_batches(
        self, batches: Iterable[torch.Tensor], micro: int, epoch: int, state: list[Any] | None
    ) -> Iterator[tuple[torch.Tensor, list[tuple[Any, torch.Tensor]]]]:
        stream, split = self._streams["train"], self.data.train_x
        started = False
        for indices in batches:
            if not started:
                stream.seek(epoch, int(indices[0]), state)
                started = True
            mine = stream.mine(indices)
            got = stream.take(len(mine), epoch)
            stream.position = int(indices[-1]) + 1
            if isinstance(got, tuple):  # stacked by the workers
                x, y = got
                cut = self._cuts(len(y), len(indices), micro)
                pieces = [(inputs.rows(x, piece), y[piece]) for piece in cut]
            else:
                names = [f"{split.what} item {p} of epoch {epoch + 1}" for p in mine.tolist()]
                pieces = [
                    split.collated(got[piece], names[piece]) for piece in cuts(len(got), micro)
                ]
            yield indices, [tuple(self._join([part]) for part in piece) for piece in pieces]

    @property
    def streams(self) -> bool:
        """Whether the training data is a stream (read in order, position by position)."""
        return "train" in self._streams

    def stream_skipped(self) -> int:
        """Samples that resumed passes read and dropped since the last call."""
        stream = self._streams.get("train")
        if stream is None:
            return 0
        skipped, stream.skipped = stream.skipped, 0
        return skipped

    def stream_state(self) -> list[Any] | None:
        """The training stream's state on every rank, where its pass stands (a collective;
        None for data that is not a stream keeping a state)."""
        stream = self._streams.get("train")
        return None if stream is None else stream.state()

    # ---------------------------------------------------------------- evaluation

    def eval_batches(
        self, split: str, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's slice of the ``"train"`` or ``"test"`` split, in order, in batches.

        Lazy images get the evaluation transform (no augmentation).
        """
        x, y = getattr(self.data, f"{split}_x"), getattr(self.data, f"{split}_y")
        if split in self._streams:  # one whole pass, this rank's positions
            yield from self._streams[split].whole_pass(batch_size, self._join)
            return
        total = len(y)
        mine = shard(torch.arange(total), self.world)
        x, y = (x[mine[0] : mine[-1] + 1] if len(mine) else x[:0]), y[mine]
        if not is_lazy(x):
            for piece in self._cuts(len(y), total, batch_size):
                yield x[piece], y[piece]
            return
        roots, size = x.root_indices(), _chunk_size(x)
        steps = (
            (piece, [(piece, [(split, c, None) for c in _chunks(roots[piece].tolist(), size)])])
            for piece in self._cuts(len(y), total, batch_size)
        )
        for piece, [(_, parts)] in self._decoded(steps):
            yield self._batch(parts, y, piece)

    def _cuts(self, length: int, total: int, size: int) -> list[slice]:
        """This rank's ``length`` samples of ``total`` in micro-batches of at most
        ``size``; with :attr:`equal_passes`, as many on every rank (FSDP)."""
        if self.equal_passes:
            return equal_cuts(length, longest_slice(total, self.world), size)
        return cuts(length, size)

    # ---------------------------------------------------------------- the pool

    def _decoded(
        self, steps: Iterable[tuple[Any, list[tuple[Any, list[Request]]]]]
    ) -> Iterator[tuple[Any, list[tuple[Any, list[Any]]]]]:
        """Each step ``(key, [(part, requests)])`` as ``(key, [(part, decoded chunks)])``,
        in order. The steps are planned only as the loader asks for their requests (it
        runs a bounded number ahead of training), so no list of an epoch's requests is
        held: memory does not grow with the data."""
        plan: deque[tuple[Any, list[tuple[Any, int]]]] = deque()

        def requests() -> Iterator[Request]:
            for key, parts in steps:
                plan.append((key, [(part, len(asked)) for part, asked in parts]))
                for _, asked in parts:
                    yield from asked

        decoded = self._run(requests())
        early: deque[Any] = deque()  # chunks that came before their step was taken
        while True:
            while not plan:
                item = next(decoded, _END)
                if item is _END:
                    break
                early.append(item)
            if not plan:
                return
            key, parts = plan.popleft()
            yield (
                key,
                [
                    (part, [early.popleft() if early else next(decoded) for _ in range(n)])
                    for part, n in parts
                ],
            )

    def _run(self, requests: Iterable[Request]) -> Iterator[Any]:
        """Decoded chunks for ``requests``, in order; a decoding error is raised here."""
        assert self._loader is not None
        self._requests.items = requests
        try:
            for item in self._loader:
                if isinstance(item, UsageError):
                    raise type(item)(str(item)) from None
                yield item
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise
            raise DataError(self._worker_died(str(exc))) from None

    def _worker_died(self, message: str) -> str:
        """One line for a reading worker that died: its pid and, for a user's Dataset, the
        item it was reading."""
        found = re.search(r"pid(?:\(s\))? ([\d, ]+)\)(.*)", message)
        pids = [int(p) for p in re.findall(r"\d+", found.group(1))] if found else []
        why = " ".join((found.group(2) if found else message).split()).rstrip(".")
        reading = [
            item
            for split in (self.data.train_x, self.data.test_x)
            if hasattr(split, "item_read_by")
            for item in map(split.item_read_by, pids)
            if item is not None
        ]
        where = f" while reading {max(reading)[1]}" if reading else ""
        return (
            f"a data-reading worker (pid {', '.join(map(str, pids)) or '?'}) died{where} "
            f"({why}); "
            "the item may crash the process (native code) or exhaust memory (try workers=0 "
            "to see its error)"
        )

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
            device = self.device
            parts = [inputs.each(part, lambda t: t.to(device, non_blocking=True)) for part in parts]
        return inputs.join(parts)

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


class _Stacked:
    """A stream's chunk of items stacked in the worker that read them (default collate)."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __call__(self, items: list[Any]) -> tuple[Any, torch.Tensor]:
        return self.split.collated(items, [f"{self.split.what} item"] * len(items))


def _is_stream(x: Any) -> bool:
    return bool(getattr(x, "stream", False))


class _Stream:
    """This rank's reading of a stream (:class:`~largebatch.source.StreamSplit`): a pass
    per epoch, its items in order, position ``p`` of the epoch to rank ``p % W``.

    Read by ``workers`` loader processes, which stack the items in chunks of
    :data:`CHUNK` (without a collate_fn: a tensor per item would cost more to pass than
    to read) or send them as they are; or in this process, item by item, for a stream
    that keeps a state (``state_dict``): its state then stands exactly where training
    does, and a resumed run goes on from it. Without one, a resumed pass reads and drops
    the items before its position (counted in :attr:`skipped`).
    """

    def __init__(self, split: Any, world: World, workers: int) -> None:
        self.split, self.world = split, world
        self.workers = 0 if split.stateful else workers
        self.stacked = self.workers > 0 and split.collate_fn is None  # chunks, not items
        self.epoch: int | None = None
        self.position = 0  # the next position of the epoch this pass gives
        self.read = 0  # items this rank took from the pass
        self.skipped = 0  # items dropped to reach a resumed position
        self._items: Iterator[Any] | None = None
        self._chunk: tuple[Any, torch.Tensor, int] | None = None  # stacked, rows used

    def _start(self) -> Iterator[Any]:
        dataset = self.split.dataset
        self._chunk = None
        if self.workers == 0:
            with user_failures(f"starting a pass over {self.split.what}"):
                return iter(dataset)
        loader = DataLoader(
            dataset, batch_size=CHUNK if self.stacked else None, num_workers=self.workers,
            collate_fn=_Stacked(self.split) if self.stacked else _as_is, prefetch_factor=4,
        )  # fmt: skip
        return iter(loader)

    def seek(self, epoch: int, position: int, state: list[Any] | None) -> None:
        """Go on from ``position`` of ``epoch``: where the pass stands, or a new pass."""
        if self._items is not None and (self.epoch, self.position) == (epoch, position):
            return
        dataset, what = self.split.dataset, self.split.what
        if callable(getattr(dataset, "set_epoch", None)):
            with user_failures(f"{what}.set_epoch({epoch})"):
                dataset.set_epoch(epoch)
        restored = (
            position > 0
            and self.split.stateful
            and state is not None
            and len(state) == self.world.size
        )
        if restored:
            with user_failures(f"{what}.load_state_dict()"):
                dataset.load_state_dict(state[self.world.rank])
        self._items, self.epoch, self.position, self.read = self._start(), epoch, 0, 0
        self.skipped = 0
        ahead = len(range(self.world.rank, position, self.world.size))
        if restored:
            self.position, self.read = position, ahead
        else:
            self.take(ahead, epoch)
            self.skipped = ahead
        self.position = position

    def mine(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's positions among a batch's."""
        if not self.world.enabled:
            return indices
        return indices[indices % self.world.size == self.world.rank]

    def take(self, count: int, epoch: int) -> list[Any] | tuple[Any, torch.Tensor]:
        """The pass's next ``count`` items of this rank: a list of items, or stacked
        ``(inputs, targets)`` when the workers stack them; a pass that ends first is an
        error."""
        assert self._items is not None
        if self.stacked and count:
            return self._rows(count, epoch)
        items = []
        for _ in range(count):
            items.append(self._next(epoch))
            self.read += 1
        return items

    def _next(self, epoch: int) -> Any:
        with user_failures(f"reading {self.split.what} item {self.read}"):
            item = next(self._items, _END)  # type: ignore[arg-type]
        if item is _END:
            raise DataError(
                f"{self.split.what} ended after {self.read} items on this process in "
                f"epoch {epoch + 1}, short of samples_per_epoch "
                f"({len(self.split)} over {self.world.size} process(es)); lower it"
            )
        return item

    def _rows(self, count: int, epoch: int) -> tuple[Any, torch.Tensor]:
        """``count`` rows from the workers' stacked chunks."""
        xs, ys, needed = [], [], count
        while needed:
            if self._chunk is None:
                x, y = self._next(epoch)
                self._chunk = (x, y, 0)
            x, y, used = self._chunk
            n = min(needed, len(y) - used)
            xs.append(inputs.rows(x, slice(used, used + n)))
            ys.append(y[used : used + n])
            self._chunk = (x, y, used + n) if used + n < len(y) else None
            needed -= n
            self.read += n
        return inputs.join(xs), torch.cat(ys)

    def state(self) -> list[Any] | None:
        if not self.split.stateful:
            return None
        with user_failures(f"{self.split.what}.state_dict()"):
            mine = self.split.dataset.state_dict()
        return gather_objects(mine, self.world)

    def whole_pass(self, batch_size: int, join: Any) -> Iterator[tuple[Any, torch.Tensor]]:
        """A new pass to its end, this rank's positions, in batches (evaluation; read in
        this process)."""
        with user_failures(f"starting a pass over {self.split.what}"):
            items = iter(self.split.dataset)
        position, kept = 0, []
        while True:
            with user_failures(f"reading {self.split.what} item {position}"):
                item = next(items, _END)
            if item is _END or len(kept) == batch_size:
                if kept:
                    names = [f"{self.split.what} item {p}" for p, _ in kept]
                    x, y = self.split.collated([i for _, i in kept], names)
                    yield join([x]), join([y])
                kept = []
            if item is _END:
                break
            if position % self.world.size == self.world.rank:
                kept.append((position, item))
            position += 1


_END = object()


def _root_positions(split: Any) -> torch.Tensor | None:
    """Where a subset's samples sit in the full split; None for a full split of an
    :class:`~largebatch.source.IndexedSplit` (sample ``i`` is at ``i``: no N-long table)."""
    if isinstance(split, IndexedSplit) and split._positions is None:
        return None
    return split.root_indices()


def _chunk_size(split: Any) -> int | None:
    """Samples per request: :data:`CHUNK`, or None (one request per batch) for a split
    whose batches must be made whole (a Dataset with a collate_fn)."""
    return CHUNK if getattr(split, "chunkable", True) else None


def _chunks(indices: Sequence[int], size: int | None = CHUNK) -> list[tuple[int, ...]]:
    if size is None:
        return [tuple(indices)] if len(indices) else []
    return [tuple(indices[piece]) for piece in cuts(len(indices), size)]
