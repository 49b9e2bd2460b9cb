"""The data the engine reads: a :class:`DataSource`, and user data turned into one.

A :class:`DataSource` holds a train and a test split: tensors in memory, or a
:class:`LazySplit` (images decoded on demand, such as
:class:`largebatch.data.imagefolder.LazyImages`). :func:`as_source` turns what a user hands
to :func:`largebatch.fit` (a map-style ``Dataset`` of ``(input, target)`` pairs, or a pair
of tensors) into a :class:`DataSource`.
"""

from __future__ import annotations

import contextlib
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
    "LazySplit",
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
            tensor and decoded on demand.
        train_y, test_y: int64 class indices in ``[0, num_classes)``, shape ``(N,)``.
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
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UsageError(
                f"{what}[{i}] is a {type(item).__name__}"
                + (f" of {len(item)} items" if isinstance(item, (tuple, list)) else "")
                + "; each sample must be an (input, target) pair"
            )
        inputs.append(_tensor(item[0], f"{what}[{i}] input"))
        targets.append(_tensor(item[1], f"{what}[{i}] target"))
    return inputs, targets


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
    if y.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        y = y.long()
    return x, y


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
) -> DataSource:
    """A :class:`DataSource` from user data (see :func:`as_tensors`, which reads each split
    inside ``reading()``); ``test`` may be None.

    For integer labels, ``num_classes`` is one more than the largest label of either
    split; otherwise 0 (no classes: accuracy is not reported).
    """
    train_x, train_y = as_tensors(train, "train_data", reading=reading)
    if test is None:
        test_x, test_y = train_x[:0], train_y[:0]
    else:
        test_x, test_y = as_tensors(test, "eval_data", reading=reading)
        if test_x.shape[1:] != train_x.shape[1:]:
            raise UsageError(
                f"eval_data inputs have shape {tuple(test_x.shape[1:])}, train_data "
                f"{tuple(train_x.shape[1:])}"
            )
        if test_y.shape[1:] != train_y.shape[1:] or test_y.dtype != train_y.dtype:
            raise UsageError("eval_data targets differ from train_data's in shape or type")
    classes = 0
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
