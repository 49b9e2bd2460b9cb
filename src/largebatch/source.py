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
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset
from tqdm import tqdm

from largebatch.errors import InvalidTypeError, InvalidValueError, UsageError, UserCodeError

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
        if isinstance(key, slice):
            chosen = np.arange(count)[key]
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


#: ``collate_fn(items) -> (inputs, targets)``: a list of a Dataset's items to one batch.
Collate = Callable[[list[Any]], Any]


class DatasetSplit(IndexedSplit):
    """A user's map-style ``Dataset``, read item by item when a batch needs it: the
    :class:`LazySplit` that :func:`largebatch.fit` trains on for data that is not tensors.

    Unlike image folders, whose labels are in memory, its items carry their targets, so
    it is *paired*: :meth:`decode` and :meth:`load` return ``(inputs, targets)``, and the
    :class:`DataSource` holds :attr:`targets` (a view with their count, dtype and shape)
    as ``train_y``. Sample ``i`` of the full split is ``dataset[i]``; a batch is the items
    collated by ``collate_fn``, or by default each item's ``(input, target)`` made a tensor
    as :func:`as_tensors` does and stacked.

    The first item is read here, to learn the sample shape and the targets' type and to
    refuse a dataset that cannot work before training starts.
    """

    paired = True

    def __init__(self, dataset: Any, what: str, collate_fn: Collate | None = None) -> None:
        with user_failures(f"reading len({what})"):
            count = len(dataset)
        if isinstance(count, bool) or not isinstance(count, numbers.Integral):
            raise UsageError(f"len({what}) is a {type(count).__name__}, not an integer")
        if count < 1:
            raise UsageError(f"{what} is empty")
        self.dataset, self.what, self.collate_fn = dataset, what, collate_fn
        self._count = int(count)
        self._sample: tuple[int, ...] | None = None  # shape of one input, from the first item
        x, y = self.decode([0])
        self._sample = tuple(x.shape[1:])
        self.targets = ItemTargets(self, y.dtype, tuple(y.shape[1:]))

    def _root_count(self) -> int:
        return self._count

    @property
    def shape(self) -> tuple[int, ...]:
        """``(len(self), *sample_shape)``, the shape of the inputs :meth:`load` returns."""
        return (len(self), *(self._sample or ()))

    def decode(
        self, root_indices: Any, augment_seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of the items at those positions of the full dataset
        (``augment_seed`` is not used: a Dataset does its own augmentation)."""
        rows = positions(root_indices, self._count).tolist()
        items = []
        for i in rows:
            with user_failures(f"reading {self.what}[{i}]"):
                items.append(self.dataset[i])
        if self.collate_fn is None:
            return self._stacked(rows, items)
        shown = ", ".join(map(str, rows[:3])) + (", ..." if len(rows) > 3 else "")
        where = f"collate_fn on {self.what}[{shown}]"
        with user_failures(where):
            batch = self.collate_fn(items)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2) or not all(
            isinstance(part, torch.Tensor) for part in batch
        ):
            raise UsageError(
                f"{where}: collate_fn returned a {type(batch).__name__}; it must return "
                "(inputs, targets), two tensors with a first axis over samples"
            )
        x, y = batch
        if x.ndim < 1 or y.ndim < 1 or len(x) != len(y) or len(y) != len(rows):
            raise UsageError(
                f"{where}: collate_fn returned inputs of shape {tuple(x.shape)} and targets "
                f"of shape {tuple(y.shape)} for {len(rows)} items; both need a first axis "
                "of one entry per item"
            )
        return x, _wide_labels(y)

    def load(self, augment_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of every sample of this subset."""
        return self.decode(self.root_indices(), augment_seed)

    def _stacked(self, rows: list[int], items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The default collate: each item an ``(input, target)`` pair of tensors (or arrays
        or numbers) of the first item's shapes, stacked."""
        inputs, targets = [], []
        for i, item in zip(rows, items, strict=True):
            x, y = _pair(item, f"{self.what}[{i}]")
            if self._sample is not None and tuple(x.shape) != self._sample:
                raise UsageError(
                    f"{self.what}[{i}] input has shape {tuple(x.shape)}, the first item's "
                    f"{self._sample}; pad the inputs or pass a collate_fn"
                )
            if self._sample is not None and (
                tuple(y.shape) != self.targets.sample_shape or y.dtype != self.targets.dtype
            ):
                raise UsageError(
                    f"{self.what}[{i}] target is {y.dtype} {tuple(y.shape)}, the first item's "
                    f"{self.targets.dtype} {self.targets.sample_shape}"
                )
            inputs.append(x)
            targets.append(y)
        return torch.stack(inputs), _wide_labels(torch.stack(targets))

    def __repr__(self) -> str:
        return f"DatasetSplit({len(self)} of {type(self.dataset).__name__} {self.what})"


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
) -> DataSource:
    """A :class:`DataSource` from user data; ``test`` may be None.

    Tensors (a pair, or a ``TensorDataset``) stay in memory (see :func:`as_tensors`). Any
    other map-style ``Dataset`` is read lazily: a :class:`DatasetSplit` whose items the
    feed reads and collates (``collate_fn``, or stacked ``(input, target)`` pairs) when a
    batch needs them; only its first item is read here, inside ``reading()``.

    For integer labels in memory, ``num_classes`` is one more than the largest label of
    either split; otherwise 0 (not known without reading every sample, or no classes).
    """
    train_x, train_y = _split(train, "train_data", reading, collate_fn)
    if test is None:
        test_x, test_y = train_x[:0], train_y[:0]
    else:
        test_x, test_y = _split(test, "eval_data", reading, collate_fn)
        if collate_fn is None and test_x.shape[1:] != train_x.shape[1:]:
            raise UsageError(
                f"eval_data inputs have shape {tuple(test_x.shape[1:])}, train_data "
                f"{tuple(train_x.shape[1:])}"
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
    data: Any, what: str, reading: Reading, collate_fn: Collate | None
) -> tuple[torch.Tensor | DatasetSplit, torch.Tensor | ItemTargets]:
    """One split: tensors in memory, or a :class:`DatasetSplit` and its targets."""
    if _in_memory(data):
        if collate_fn is not None:
            raise UsageError(
                f"{what} is tensors, read as they are; collate_fn applies to a Dataset's items"
            )
        return as_tensors(data, what)
    if isinstance(data, IterableDataset) or not (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
    ):
        return as_tensors(data, what)  # refused there, with the reason
    with reading():  # the user's __getitem__ may be slow: Ctrl-C stops it
        split = DatasetSplit(data, what, collate_fn)
    return split, split.targets


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
