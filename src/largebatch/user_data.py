"""User objects as the loop's inputs: datasets given in Python, and code named by import path.

:func:`as_source` turns what a user hands to :func:`largebatch.fit` (a map-style
``Dataset`` of ``(input, target)`` pairs, or a pair of tensors) into the
:class:`~largebatch.data.DataSource` the loop reads. :func:`load_callable` resolves
``package.module:callable`` names, as given to ``--model`` and ``--dataset``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import numbers
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset
from tqdm import tqdm

from largebatch.data import DataSource
from largebatch.errors import UsageError, UserCodeError
from largebatch.interrupts import deliver_interrupts

__all__ = [
    "as_source",
    "as_tensors",
    "load_callable",
    "call_with_accepted",
    "is_classification",
]


@contextlib.contextmanager
def _failures(what: str) -> Iterator[None]:
    """Any failure of the user's code in the block (an exception, ``sys.exit``) as one
    UserCodeError ``"{what} failed: ..."``; a UsageError passes, and Ctrl-C stays an
    interruption."""
    try:
        yield
    except (UsageError, KeyboardInterrupt):
        raise
    except SystemExit as exc:
        raise UserCodeError(
            f"{what} failed: it called sys.exit({exc.code!r}); code run by largebatch must "
            "not exit (keep script code under if __name__ == '__main__':)"
        ) from None
    except BaseException as exc:
        raise UserCodeError(f"{what} failed: {type(exc).__name__}: {exc}") from None


def load_callable(path: str, what: str) -> Callable[..., Any]:
    """The callable named ``package.module:attribute`` (``what`` names it in errors).

    The current folder is searched first, as ``python -m`` would. The import runs with
    Ctrl-C delivered (see :func:`largebatch.interrupts.deliver_interrupts`); any failure
    in it is a one-line UserCodeError.
    """
    module_name, _, attribute = str(path).partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{what} {path!r} must look like package.module:callable")
    if "" not in sys.path:
        sys.path.insert(0, "")
    with deliver_interrupts(), _failures(f"{what} {path!r}: importing {module_name!r}"):
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserCodeError(f"{what} {path!r}: cannot import {module_name!r} ({exc})") from None
    with deliver_interrupts(), _failures(f"{what} {path!r}: reading {attribute!r}"):
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise UserCodeError(
                    f"{what} {path!r}: {module_name!r} has no attribute {attribute!r}"
                )
            target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{what} {path!r} is a {type(target).__name__}, not a callable")
    return target


def call_with_accepted(function: Callable[..., Any], what: str, **offered: Any) -> Any:
    """Call ``function`` with those of ``offered`` that its signature accepts.

    The call runs with Ctrl-C delivered; any failure inside the user's code (an
    exception, ``sys.exit``) becomes a one-line UserCodeError naming ``what``.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    chosen = {k: v for k, v in offered.items() if takes_any or k in parameters}
    with deliver_interrupts(), _failures(what):
        return function(**chosen)


def as_tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` stacked along a first sample axis.

    Accepts a pair of tensors (or arrays) of equal length, a ``TensorDataset`` of two
    tensors, or any map-style ``Dataset`` whose items are ``(input, target)`` pairs; the
    last is read once, item by item, into memory.
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
            return _checked_pair(_tensor(data[0]), _tensor(data[1]), what=what)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise UsageError(
            f"{what} is a {type(data).__name__}; pass a map-style Dataset of (input, target) "
            "pairs or a pair of tensors (inputs, targets)"
        )
    with deliver_interrupts():  # the user's __getitem__ may be slow: Ctrl-C stops it
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
    with _failures(f"reading len({what})"):
        count = len(data)
    if count < 1:
        raise UsageError(f"{what} is empty")
    inputs, targets = [], []
    show = count >= 10_000 and sys.stderr.isatty()
    for i in tqdm(range(count), desc=f"reading {what}", disable=not show, file=sys.stderr):
        with _failures(f"reading {what}[{i}]"):
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


def _tensor(value: Any, what: str = "value") -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
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


def is_classification(targets: torch.Tensor) -> bool:
    """Integer labels, one per sample: accuracy is reported for these."""
    return targets.ndim == 1 and not targets.is_floating_point() and targets.dtype != torch.bool


def as_source(
    train: Any,
    test: Any = None,
    *,
    name: str = "custom",
    input_range: Sequence[float] | None = None,
) -> DataSource:
    """A :class:`DataSource` from user data (see :func:`as_tensors`); ``test`` may be None.

    For integer labels, ``num_classes`` is one more than the largest label of either
    split; otherwise 0 (no classes: accuracy is not reported).
    """
    train_x, train_y = as_tensors(train, "train_data")
    if test is None:
        test_x, test_y = train_x[:0], train_y[:0]
    else:
        test_x, test_y = as_tensors(test, "eval_data")
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
    if input_range is not None:
        low, high = (float(v) for v in input_range)
        if not low < high:
            raise UsageError(f"input_range must be (low, high) with low < high, got {input_range}")
        input_range = (low, high)
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
