"""The data the engine reads: a :class:`DataSource`, and user data turned into one.

A :class:`DataSource` holds a train and a test split: tensors in memory, or a
:class:`LazySplit` (images decoded on demand, such as
:class:`largebatch.data.imagefolder.LazyImages`). :func:`as_source` turns what a user hands
to :func:`largebatch.fit` (a map-style ``Dataset`` of ``(input, target)`` pairs, or a pair
of tensors) into a :class:`DataSource`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, get_worker_info
from tqdm import tqdm

from largebatch.distributed import World, gather_objects
from largebatch.errors import (
    DataError,
    InvalidTypeError,
    InvalidValueError,
    UsageError,
    UserCodeError,
)
from largebatch.inputs import Inputs

__all__ = [
    "UNIT_RANGE",
    "DataSource",
    "DatasetSplit",
    "IndexedSplit",
    "ItemTargets",
    "LazySplit",
    "positions",
    "as_source",
    "as_tensors",
    "is_classification",
    "user_failures",
    "checked_range",
]

UNIT_RANGE: tuple[float, float] = (0.0, 1.0)

#: What user items are read inside: a context manager factory (see :func:`as_tensors`).
Reading = Callable[[], AbstractContextManager[object]]


class LazySplit(Protocol):
    """Inputs decoded on demand, indexed like a tensor (what the feed and the loop use).

    It is pickled to the feed's decoding workers, so it should be cheap to pickle.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """``(len(self), *sample_shape)``, the shape :meth:`load` returns."""
        ...

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any) -> LazySplit:
        """A subset (a slice, integer indices or a mask); nothing is decoded."""
        ...

    def root_indices(self) -> torch.Tensor:
        """Positions of this subset's samples in the full split, int64 ``(len(self),)``."""
        ...

    def decode(self, root_indices: Any, augment_seed: int | None = None) -> torch.Tensor:
        """The samples at those positions of the full split; ``augment_seed`` None means
        no augmentation, else sample ``i`` draws from ``(augment_seed, i)``."""
        ...

    def load(self, augment_seed: int | None = None) -> torch.Tensor:
        """Every sample of this subset: ``decode(self.root_indices(), augment_seed)``."""
        ...


class IndexedSplit:
    """Indexing like a tensor, for a split read on demand (the part of a
    :class:`LazySplit` that does not read anything). A subset is a shallow copy holding
    only its positions in the full split; a subclass says how long the full split is
    (:meth:`_root_count`) and decodes."""

    _positions: np.ndarray | None = None  # None: every sample of the full split, in order

    def _root_count(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._root_count() if self._positions is None else len(self._positions)

    def __getitem__(self, key: Any) -> Any:
        count = len(self)
        if isinstance(key, slice):  # a range, not an index of every sample
            chosen = _range_positions(range(count)[key])
        elif isinstance(key, torch.Tensor) and key.dim() == 0:
            chosen = positions(key.reshape(1), count)
        elif isinstance(key, numbers.Integral) and not isinstance(key, bool):
            chosen = positions([key], count)
        else:
            chosen = positions(key, count)
        subset = copy.copy(self)  # what it reads is shared, never copied
        subset._positions = chosen if self._positions is None else self._positions[chosen]
        return subset

    def root_indices(self) -> torch.Tensor:
        """Positions of this subset's samples in the full split, int64 ``(len(self),)``."""
        if self._positions is None:
            return torch.arange(self._root_count(), dtype=torch.int64)
        return torch.from_numpy(self._positions.astype(np.int64, copy=True))


def _range_positions(chosen: range) -> np.ndarray:
    return np.arange(chosen.start, chosen.stop, chosen.step, dtype=np.int64)


def positions(key: Any, count: int) -> np.ndarray:
    """1-D int64 positions in ``[0, count)`` from integer indices (negative ones count from
    the end; a tensor, array, sequence or range) or a boolean mask of length ``count``."""
    if isinstance(key, torch.Tensor):
        array = key.detach().cpu().numpy()
    elif isinstance(key, range):
        array = np.arange(key.start, key.stop, key.step, dtype=np.int64)
    else:
        array = np.asarray(key)
    if array.ndim != 1:
        raise IndexError(f"a lazily read split takes 1-D indices, got shape {array.shape}")
    if array.dtype == np.bool_:
        if len(array) != count:
            raise IndexError(f"boolean mask of length {len(array)} for {count} samples")
        return np.flatnonzero(array).astype(np.int64)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = (array < -count) | (array >= count)
    if bad.any():
        raise IndexError(f"index {int(array[bad][0])} is out of range for {count} samples")
    return np.where(array < 0, array + count, array)


#: reading workers whose current item a :class:`DatasetSplit` keeps (more are not named)
MAX_READERS = 64

#: ``collate_fn(items) -> (inputs, targets)``: a list of a Dataset's items to one batch.
Collate = Callable[[list[Any]], Any]


class DatasetSplit(IndexedSplit):
    """A user's map-style ``Dataset``, read item by item when a batch needs it: the
    :class:`LazySplit` that :func:`largebatch.fit` trains on for data that is not tensors.

    Unlike image folders, whose labels are in memory, its items carry their targets, so
    it is *paired*: :meth:`decode` and :meth:`load` return ``(inputs, targets)``, and the
    :class:`DataSource` holds :attr:`targets` (a view with their count, dtype and shape)
    as ``train_y``. Sample ``i`` of the full split is ``dataset[i]``. A batch is:

    - by default, each item's ``(input, target)`` made tensors as :func:`as_tensors` does
      and stacked; with ``target_key``, each item a dict of tensors (or arrays or
      numbers), stacked entry by entry, whose ``target_key`` entry is the target and the
      rest the inputs (a dict: the model is called as ``model(**inputs)``);
    - with ``collate_fn``, whatever it makes of the list of items: ``(inputs, targets)``
      with ``inputs`` a tensor or a dict of tensors, or with ``target_key`` a dict
      holding the targets under that key. Each micro-batch is collated in one call (so
      it may pad its sequences to their longest); the samples are then the first axis of
      the targets.

    The first item is read here, to learn the shapes and the targets' type and to refuse
    a dataset that cannot work before training starts.
    """

    paired = True

    def __init__(
        self,
        dataset: Any,
        what: str,
        collate_fn: Collate | None = None,
        target_key: str | None = None,
    ) -> None:
        with user_failures(f"reading len({what})"):
            count = len(dataset)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise UsageError(f"len({what}) is a {type(count).__name__}, not an integer")
        if count < 1:
            raise UsageError(f"{what} is empty")
        self.dataset, self.what = dataset, what
        self.collate_fn, self.target_key = collate_fn, target_key
        self._count = int(count)
        # per reading worker: (its pid, the item it reads, when it began), so that the feed
        # can name the item a worker died on; in shared memory, written by the workers
        self._now = torch.full((MAX_READERS, 3), -1, dtype=torch.int64).share_memory_()
        self._sample: Any = None  # per-sample shapes of the first item's inputs
        x, y = self.decode([0])
        self._sample = _shapes(x)
        self.targets = ItemTargets(self, y.dtype, tuple(y.shape[1:]))
        if self._count > 1:  # a __len__ beyond the items fails here, not at the epoch's end
            self.decode([self._count - 1])

    @property
    def chunkable(self) -> bool:
        """Whether a batch may be read in pieces and joined (not with a collate_fn, which
        sees each micro-batch whole)."""
        return self.collate_fn is None

    def _root_count(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, ...]:
        """``(len(self), *sample_shape)`` of the inputs :meth:`load` returns (only the
        first axis for inputs that are a dict)."""
        sample = self._sample if isinstance(self._sample, tuple) else ()
        return (len(self), *sample)

    def decode(
        self, root_indices: Any, augment_seed: int | None = None
    ) -> tuple[Inputs, torch.Tensor]:
        """``(inputs, targets)`` of the items at those positions of the full dataset
        (``augment_seed`` is not used: a Dataset does its own augmentation)."""
        rows = positions(root_indices, self._count).tolist()
        items = []
        info = get_worker_info()
        for i in rows:
            if info is not None and info.id < MAX_READERS:
                self._now[info.id] = torch.tensor([os.getpid(), i, time.monotonic_ns()])
            with user_failures(f"reading {self.what}[{i}]"):
                try:
                    items.append(self.dataset[i])
                except IndexError as exc:
                    raise UsageError(
                        f"reading {self.what}[{i}] failed: IndexError: {exc}, though "
                        f"len({self.what}) is {self._count}; __len__ must count the items"
                    ) from None
        return self.collated(items, [f"{self.what}[{i}]" for i in rows])

    def collated(self, items: list[Any], names: list[str]) -> tuple[Inputs, torch.Tensor]:
        """``(inputs, targets)`` of these items (of this dataset's kind), collated by
        ``collate_fn`` or stacked; ``names`` name the items in messages."""
        if self.collate_fn is None:
            return self._stacked(names, items)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        where = f"collate_fn on {shown}"
        with user_failures(where):
            batch = self.collate_fn(items)
        return self._checked_batch(batch, len(names), where)

    def load(self, augment_seed: int | None = None) -> tuple[Inputs, torch.Tensor]:
        """``(inputs, targets)`` of every sample of this subset."""
        return self.decode(self.root_indices(), augment_seed)

    def item_read_by(self, pid: int) -> tuple[int, str] | None:
        """When the reading worker of process ``pid`` began its last item of this split,
        and which (``"train_data[57]"``); None when it read none."""
        for worker_pid, index, began in self._now.tolist():
            if worker_pid == pid:
                return began, f"{self.what}[{index}]"
        return None

    def _stacked(self, names: list[str], items: list[Any]) -> tuple[Inputs, torch.Tensor]:
        """The default collate: items of the first item's shapes, stacked."""
        pairs = [self._item(item, name) for name, item in zip(names, items, strict=True)]
        if self._sample is not None:
            for name, (x, y) in zip(names, pairs, strict=True):
                self._check_like_first(x, y, name)
        xs = [x for x, _ in pairs]
        x = (
            {key: torch.stack([part[key] for part in xs]) for key in xs[0]}
            if isinstance(xs[0], dict)
            else torch.stack(xs)
        )
        return x, _wide_labels(torch.stack([y for _, y in pairs]))

    def _item(self, item: Any, what: str) -> tuple[Inputs, torch.Tensor]:
        """One item as ``(input, target)`` tensors: a pair, or with ``target_key`` a dict."""
        if self.target_key is None:
            return _pair(item, what)
        if not isinstance(item, Mapping) or self.target_key not in item:
            raise UsageError(
                f"{what} is a {type(item).__name__}"
                + (f" with keys {sorted(map(str, item))[:5]}" if isinstance(item, Mapping) else "")
                + f"; with target_key={self.target_key!r} each item must be a dict holding it"
            )
        x = {
            str(key): _tensor(value, f"{what}[{key!r}]")
            for key, value in item.items()
            if key != self.target_key
        }
        if not x:
            raise UsageError(f"{what} holds only its target {self.target_key!r}: no inputs")
        return x, _tensor(item[self.target_key], f"{what}[{self.target_key!r}]")

    def _check_like_first(self, x: Inputs, y: torch.Tensor, what: str) -> None:
        if _shapes(x, full=True) != self._sample:  # one item: no sample axis
            raise UsageError(
                f"{what} input has shape {_shown(_shapes(x, full=True))}, the first item's "
                f"{_shown(self._sample)}; pad the inputs or pass a collate_fn"
            )
        if tuple(y.shape) != self.targets.sample_shape or y.dtype != self.targets.dtype:
            raise UsageError(
                f"{what} target is {y.dtype} {tuple(y.shape)}, the first item's "
                f"{self.targets.dtype} {self.targets.sample_shape}"
            )

    def _checked_batch(self, batch: Any, count: int, where: str) -> tuple[Inputs, torch.Tensor]:
        """``collate_fn``'s result as ``(inputs, targets)``, or one line saying what is wrong."""
        key = self.target_key
        if key is not None and isinstance(batch, Mapping):
            if key not in batch:
                raise UsageError(
                    f"{where}: collate_fn returned a dict without the target_key {key!r} "
                    f"(keys {sorted(map(str, batch))[:5]})"
                )
            batch = ({k: v for k, v in batch.items() if k != key}, batch[key])
        wanted = (
            f"a dict holding the targets under {key!r}, or (inputs, targets)"
            if key is not None
            else "(inputs, targets)"
        )
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise UsageError(
                f"{where}: collate_fn returned a {type(batch).__name__}; it must return "
                f"{wanted}: inputs a tensor or a dict of tensors, targets a tensor, each "
                "with a first axis over samples"
            )
        x, y = batch
        parts = list(x.values()) if isinstance(x, Mapping) else [x]
        if (
            not isinstance(y, torch.Tensor)
            or not parts
            or not all(isinstance(part, torch.Tensor) for part in parts)
        ):
            raise UsageError(
                f"{where}: collate_fn returned inputs of type {type(x).__name__} and targets "
                f"of type {type(y).__name__}; inputs must be a tensor or a dict of tensors, "
                "targets a tensor"
            )
        lengths = {len(part) if part.ndim else None for part in [*parts, y]}
        if lengths != {count}:
            raise UsageError(
                f"{where}: collate_fn returned inputs {_shown(_shapes(x, full=True))} and "
                f"targets of shape {tuple(y.shape)} for {count} items; each needs a first "
                "axis of one entry per item"
            )
        return (dict(x) if isinstance(x, Mapping) else x), _wide_labels(y)

    def __repr__(self) -> str:
        return f"DatasetSplit({len(self)} of {type(self.dataset).__name__} {self.what})"


def _shapes(x: Any, full: bool = False) -> Any:
    """Per-sample shapes: a tuple, or a dict of them for inputs that are a dict."""
    start = 0 if full else 1
    if isinstance(x, Mapping):
        return {key: tuple(value.shape[start:]) for key, value in x.items()}
    return tuple(x.shape[start:])


def _shown(shapes: Any) -> str:
    if isinstance(shapes, Mapping):
        return "{" + ", ".join(f"{key}: {value}" for key, value in shapes.items()) + "}"
    return str(shapes)


class StreamSplit:
    """A user's ``IterableDataset`` (a stream): read in order, ``samples_per_epoch``
    samples per epoch over all ranks, every epoch a new pass (``iter(dataset)``, after
    ``dataset.set_epoch(epoch)`` when it has one). The feed reads it; here only what is
    known without a pass: its length per epoch, and its *head*, the first items of a
    fresh pass, read once and kept, which the checks and the curvature probes index
    (``split[rows]`` for rows within the head).

    Under torchrun, rank ``r`` of ``W`` trains on the epoch's positions ``p`` with
    ``p % W == r``, in order, from its own pass: the dataset should yield rank ``r`` its
    own share, the items ``i`` with ``i % W == r`` (and, with reading workers, split that
    again by ``torch.utils.data.get_worker_info()``, in blocks of ``feed.CHUNK`` items
    taken in turn), as torch's DataLoader expects of an iterable dataset. Then each item
    is read once, and every update trains on the samples a single process would.
    """

    paired = True
    stream = True

    def __init__(
        self,
        dataset: Any,
        what: str,
        samples_per_epoch: int | None,
        collate_fn: Collate | None = None,
        target_key: str | None = None,
        world: World | None = None,
    ) -> None:
        self.dataset, self.what, self.world = dataset, what, world or World()
        if samples_per_epoch is None and hasattr(dataset, "__len__"):
            with user_failures(f"reading len({what})"):
                samples_per_epoch = len(dataset)
        elif samples_per_epoch is None and what == "eval_data":  # counted by one pass
            with user_failures(f"counting the items of {what}"):
                samples_per_epoch = sum(1 for _ in dataset)
        elif samples_per_epoch is None:
            raise UsageError(
                f"{what} is a stream (an IterableDataset) without __len__; pass "
                "samples_per_epoch=, the samples of one epoch over all processes"
            )
        if (
            isinstance(samples_per_epoch, bool)
            or not isinstance(samples_per_epoch, numbers.Integral)
            or samples_per_epoch < 1
        ):
            raise UsageError(
                f"samples_per_epoch must be a positive integer, got {samples_per_epoch!r}"
            )
        self.collate_fn, self.target_key = collate_fn, target_key
        self.samples_per_epoch = int(samples_per_epoch)
        self.stateful = callable(getattr(dataset, "state_dict", None)) and callable(
            getattr(dataset, "load_state_dict", None)
        )
        self._head: list[Any] = []
        self._ended = False  # a pass yields fewer items than the head asked for
        self._reader: DatasetSplit | None = None
        first = self.head(1)  # the first item: the shapes and the targets' type
        self.targets = ItemTargets(self, first.targets.dtype, first.targets.sample_shape)
        self._sample = first._sample

    def __len__(self) -> int:
        return self.samples_per_epoch

    @property
    def shape(self) -> tuple[int, ...]:
        sample = self._sample if isinstance(self._sample, tuple) else ()
        return (len(self), *sample)

    def head(self, count: int) -> DatasetSplit:
        """The first ``count`` items of a fresh pass (fewer if the stream is shorter), as
        a :class:`DatasetSplit` that reads them from memory. A longer head is read by a
        new pass; a stateful dataset gets its state back afterwards. Under torchrun every
        rank calls it: each reads its own positions and all get the same head."""
        if count > len(self._head) and not self._ended:
            rank, size = self.world.rank, self.world.size
            state = self._state_dict() if self.stateful else None
            with user_failures(f"starting a pass over {self.what}"):
                items = iter(self.dataset)
            mine: list[Any] = []
            while len(mine) < len(range(rank, count, size)):
                with user_failures(f"reading {self.what} item {rank + len(mine) * size}"):
                    item = next(items, _END)
                if item is _END:
                    break
                mine.append(item)
            shares = gather_objects(mine, self.world)  # rank r holds positions r, r + W, ...
            head = []
            for position in range(count):
                share = shares[position % size]
                if position // size >= len(share):
                    self._ended = True
                    break
                head.append(share[position // size])
            self._head, self._reader = head, None
            if state is not None:
                with user_failures(f"{self.what}.load_state_dict()"):
                    self.dataset.load_state_dict(state)
        if not self._head:
            raise UsageError(f"{self.what} is empty: a pass over it yields no item")
        if self._reader is None:
            self._reader = DatasetSplit(self._head, self.what, self.collate_fn, self.target_key)
        return self._reader

    def collated(self, items: list[Any], names: list[str]) -> tuple[Inputs, torch.Tensor]:
        """A micro-batch of the stream's items, collated and checked as the head's."""
        return self.head(1).collated(items, names)

    def _state_dict(self) -> Any:
        with user_failures(f"{self.what}.state_dict()"):
            return self.dataset.state_dict()

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            rows = _range_positions(range(len(self))[key])
        else:
            rows = positions(key, len(self))
        count = int(rows.max()) + 1 if len(rows) else 1
        head = self.head(count)
        if len(head) < count:
            raise DataError(
                f"{self.what} ended after {len(head)} items of a pass, short of the {count} "
                f"needed (samples_per_epoch is {len(self)}); lower samples_per_epoch"
            )
        return head[rows]

    def __repr__(self) -> str:
        return f"StreamSplit({type(self.dataset).__name__} {self.what}, {len(self)} per epoch)"


_END = object()


class ItemTargets:
    """The targets of a :class:`DatasetSplit`, read with its inputs (``split.load()`` gives
    both): only their count, dtype and per-sample shape are known without reading. Indexed
    like a tensor, so the engine can count, slice and type them as in-memory labels."""

    def __init__(self, split: DatasetSplit, dtype: torch.dtype, sample_shape: tuple[int, ...]):
        self.split, self.dtype, self.sample_shape = split, dtype, sample_shape

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: Any) -> ItemTargets:
        return ItemTargets(self.split[key], self.dtype, self.sample_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.sample_shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


@dataclass
class DataSource:
    """A loaded dataset, train and test split, as tensors in memory.

    Attributes:
        name: canonical dataset name (one of :data:`DATASETS`), or the
            ``package.module:callable`` path or label of a user's dataset.
        train_x, test_x: float32, shape ``(N, *input_shape)``, raw values inside
            ``input_range`` (images scaled to [0, 1]); never normalized. For the image-folder
            datasets a :class:`LazySplit` instead (such as
            :class:`~largebatch.data.imagefolder.LazyImages`), indexed like a
            tensor and decoded on demand; for a user's Dataset a :class:`DatasetSplit`.
        train_y, test_y: int64 class indices in ``[0, num_classes)``, shape ``(N,)`` (a
            user's targets in memory may be anything per sample); for a
            :class:`DatasetSplit` its :class:`ItemTargets`, read with the inputs.
        input_shape: shape of one sample, e.g. ``(1, 28, 28)`` or ``(40,)`` for mnist1d.
        num_classes: number of classes.
        input_range: ``(low, high)`` of valid raw inputs, for clamping adversarial
            examples; ``None`` means unbounded.
        mean, std: per-channel normalization statistics (one entry per channel; a single
            entry for 1-D inputs). The model applies ``(x - mean) / std`` as its first layer.
        augment: optional train-time augmentation ``augment(batch, generator) -> batch`` on a
            ``(B, C, H, W)`` batch, deterministic given the generator's state.
    """

    name: str
    train_x: torch.Tensor | LazySplit
    train_y: torch.Tensor
    test_x: torch.Tensor | LazySplit
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    input_range: tuple[float, float] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


@contextlib.contextmanager
def user_failures(what: str) -> Iterator[None]:
    """Any failure of the user's code in the block (an exception, ``sys.exit``) as one
    UserCodeError ``"{what} failed: ..."``; a UsageError passes, and Ctrl-C stays an
    interruption: a plain ``KeyboardInterrupt`` whose message names the code it landed in
    (``"reading train_data[5] was interrupted"``), so ``except KeyboardInterrupt`` works
    as everywhere."""
    try:
        yield
    except UsageError:
        raise
    except KeyboardInterrupt:  # Ctrl-C stays an interruption, but says where it landed
        raise KeyboardInterrupt(f"{what} was interrupted") from None
    except SystemExit as exc:
        raise UserCodeError(
            f"{what} failed: it called sys.exit({exc.code!r}); code run by largebatch must "
            "not exit (keep script code under if __name__ == '__main__':)"
        ) from None
    except BaseException as exc:
        raise UserCodeError(f"{what} failed: {type(exc).__name__}: {exc}") from None


def as_tensors(
    data: Any, what: str, *, reading: Reading = contextlib.nullcontext
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` stacked along a first sample axis.

    Accepts a pair of tensors (or arrays) of equal length, a ``TensorDataset`` of two
    tensors, or any map-style ``Dataset`` whose items are ``(input, target)`` pairs; the
    last is read once, item by item, into memory, inside ``reading()`` (the recipe passes
    :func:`largebatch.interrupts.deliver_interrupts`, so Ctrl-C stops a slow ``__getitem__``).
    """
    if isinstance(data, IterableDataset):
        raise UsageError(
            f"{what} is an iterable-style dataset; pass a map-style Dataset (with __len__ and "
            "__getitem__) or a pair of tensors (inputs, targets)"
        )
    if isinstance(data, TensorDataset):
        if len(data.tensors) != 2:
            raise UsageError(
                f"{what} is a TensorDataset of {len(data.tensors)} tensors; it needs two "
                "(inputs, targets)"
            )
        return _checked_pair(*data.tensors, what=what)
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data, Dataset):
        if all(isinstance(part, (torch.Tensor, np.ndarray)) for part in data):
            return _checked_pair(
                _tensor(data[0], f"{what} inputs"), _tensor(data[1], f"{what} targets"), what=what
            )
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise UsageError(
            f"{what} is a {type(data).__name__}; pass a map-style Dataset of (input, target) "
            "pairs or a pair of tensors (inputs, targets)"
        )
    with reading():  # the user's __getitem__ may be slow: Ctrl-C stops it
        inputs, targets = _read_items(data, what)
    shapes = {tuple(x.shape) for x in inputs}
    if len(shapes) > 1:
        raise UsageError(f"{what}: inputs have different shapes {sorted(shapes)[:3]}; pad them")
    target_shapes = {tuple(t.shape) for t in targets}
    if len(target_shapes) > 1:
        raise UsageError(f"{what}: targets have different shapes {sorted(target_shapes)[:3]}")
    return _checked_pair(torch.stack(inputs), torch.stack(targets), what=what)


def _read_items(data: Any, what: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every ``(input, target)`` of a map-style dataset, as tensors, item by item."""
    with user_failures(f"reading len({what})"):
        count = len(data)
    if count < 1:
        raise UsageError(f"{what} is empty")
    inputs, targets = [], []
    show = count >= 10_000 and sys.stderr.isatty()
    for i in tqdm(range(count), desc=f"reading {what}", disable=not show, file=sys.stderr):
        with user_failures(f"reading {what}[{i}]"):
            item = data[i]
        x, y = _pair(item, f"{what}[{i}]")
        inputs.append(x)
        targets.append(y)
    return inputs, targets


def _pair(item: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dataset's item as an ``(input, target)`` pair of tensors."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise UsageError(
            f"{what} is a {type(item).__name__}"
            + (f" of {len(item)} items" if isinstance(item, (tuple, list)) else "")
            + "; each sample must be an (input, target) pair (or pass a collate_fn)"
        )
    return _tensor(item[0], f"{what} input"), _tensor(item[1], f"{what} target")


def _wide_labels(y: torch.Tensor) -> torch.Tensor:
    """Integer labels narrower than int64 as int64, what the losses take."""
    return y.long() if y.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8) else y


#: NumPy dtype kinds that torch takes: bool, signed and unsigned integers, floats, complex
_NUMERIC_KINDS = "biufc"


def _tensor(value: Any, what: str = "value") -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _NUMERIC_KINDS:
            raise InvalidTypeError(
                f"{what} is a NumPy array of dtype {value.dtype}, which cannot become a "
                "tensor; convert it to numbers first (say .astype(np.float32))"
            )
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        raise UsageError(f"{what} is a {type(value).__name__}, not a tensor or a number")
    if isinstance(value, numbers.Integral):
        return torch.tensor(int(value), dtype=torch.long)
    return torch.tensor(float(value), dtype=torch.float32)


def _checked_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.ndim < 1 or y.ndim < 1:
        raise UsageError(f"{what}: inputs and targets need a first axis over samples")
    if len(x) != len(y):
        raise UsageError(f"{what}: {len(x)} inputs but {len(y)} targets")
    if len(y) < 1:
        raise UsageError(f"{what} is empty")
    for part, name in ((x, "inputs"), (y, "targets")):
        if part.is_floating_point() and not bool(torch.isfinite(part).all()):
            raise UsageError(f"{what}: the {name} hold NaN or infinite values")
    return x, _wide_labels(y)


def checked_range(input_range: Any) -> tuple[float, float] | None:
    """``input_range`` as two floats ``(low, high)`` with ``low < high`` (None stays None);
    anything else, strings of digits included, is refused in one line."""
    if input_range is None:
        return None
    values = list(input_range) if isinstance(input_range, (tuple, list)) else []
    if len(values) != 2 or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise InvalidTypeError(
            f"input_range must be two finite numbers (low, high), got {input_range!r}"
        )
    low, high = float(values[0]), float(values[1])
    if not low < high:
        raise InvalidValueError(
            f"input_range must be (low, high) with low < high, got {input_range!r}"
        )
    return low, high


def is_classification(targets: torch.Tensor) -> bool:
    """Integer labels, one per sample: accuracy is reported for these."""
    return targets.ndim == 1 and not targets.is_floating_point() and targets.dtype != torch.bool


def as_source(
    train: Any,
    test: Any = None,
    *,
    name: str = "custom",
    input_range: Sequence[float] | None = None,
    reading: Reading = contextlib.nullcontext,
    collate_fn: Collate | None = None,
    target_key: str | None = None,
    samples_per_epoch: int | None = None,
    world: World | None = None,
) -> DataSource:
    """A :class:`DataSource` from user data; ``test`` may be None.

    Tensors (a pair, or a ``TensorDataset``) stay in memory (see :func:`as_tensors`). Any
    other map-style ``Dataset`` is read lazily: a :class:`DatasetSplit` whose items the
    feed reads and collates (``collate_fn``, or stacked ``(input, target)`` pairs, or
    dicts holding the target under ``target_key``) when a batch needs them; only its
    first item is read here, inside ``reading()``.

    For integer labels in memory, ``num_classes`` is one more than the largest label of
    either split; otherwise 0 (not known without reading every sample, or no classes).
    """
    train_x, train_y = _split(
        train, "train_data", reading, collate_fn, target_key, samples_per_epoch, world
    )
    if test is None:
        test_x, test_y = train_x[:0], train_y[:0]
    else:
        test_x, test_y = _split(test, "eval_data", reading, collate_fn, target_key, None, world)
        if collate_fn is None and _sample_shapes(test_x) != _sample_shapes(train_x):
            raise UsageError(
                f"eval_data inputs have shape {_shown(_sample_shapes(test_x))}, train_data "
                f"{_shown(_sample_shapes(train_x))}"
            )
        if test_y.shape[1:] != train_y.shape[1:] or test_y.dtype != train_y.dtype:
            raise UsageError("eval_data targets differ from train_data's in shape or type")
    classes = 0
    if isinstance(train_y, torch.Tensor) and isinstance(test_y, torch.Tensor):
        if is_classification(train_y):
            labels = torch.cat([train_y, test_y])
            if int(labels.min()) < 0:
                raise UsageError("class labels must be >= 0")
            classes = int(labels.max()) + 1
    input_range = checked_range(input_range)
    return DataSource(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        input_shape=tuple(train_x.shape[1:]),
        num_classes=classes,
        input_range=input_range,
        mean=(),
        std=(),
    )


def _split(
    data: Any,
    what: str,
    reading: Reading,
    collate_fn: Collate | None,
    target_key: str | None,
    samples_per_epoch: int | None = None,
    world: World | None = None,
) -> tuple[Any, Any]:
    """One split: tensors in memory, or a :class:`DatasetSplit` and its targets."""
    if _in_memory(data):
        for name, value in (("collate_fn", collate_fn), ("target_key", target_key)):
            if value is not None:
                raise UsageError(
                    f"{what} is tensors, used as they are; {name} applies to a Dataset's items"
                )
        return as_tensors(data, what)
    if isinstance(data, IterableDataset):
        with reading():
            stream = StreamSplit(data, what, samples_per_epoch, collate_fn, target_key, world)
        return stream, stream.targets
    if samples_per_epoch is not None:
        raise UsageError(
            f"samples_per_epoch applies to a stream (an IterableDataset); {what} is a "
            f"{type(data).__name__}, whose epoch is all of it"
        )
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return as_tensors(data, what)  # refused there, with the reason
    with reading():  # the user's __getitem__ may be slow: Ctrl-C stops it
        split = DatasetSplit(data, what, collate_fn, target_key)
    return split, split.targets


def _sample_shapes(x: Any) -> Any:
    return x._sample if isinstance(x, (DatasetSplit, StreamSplit)) else tuple(x.shape[1:])


def _in_memory(data: Any) -> bool:
    """Tensors, which stay as they are: a ``TensorDataset`` or a pair of tensors/arrays."""
    if isinstance(data, TensorDataset):
        return True
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and not isinstance(data, Dataset)
        and all(isinstance(part, (torch.Tensor, np.ndarray)) for part in data)
    )
