"""``load_dataset``: dataset names to :class:`~largebatch.source.DataSource`, the limits
and the train-time augmentation; a ``package.module:callable`` names the user's own."""

from __future__ import annotations

import dataclasses
import functools
import numbers
import os
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import IterableDataset

from largebatch.data.cifar import load_cifar
from largebatch.data.idx import load_idx
from largebatch.data.imagenet import load_imagenet, load_tinyimagenet
from largebatch.data.small import load_digits, load_mnist1d, load_synthetic
from largebatch.data.svhn import load_svhn
from largebatch.data.text import load_text
from largebatch.errors import UsageError
from largebatch.interrupts import deliver_interrupts
from largebatch.source import DataSource, LazySplit, as_source
from largebatch.user_code import call_with_accepted, load_callable

__all__ = ["DATASETS", "load_dataset", "random_crop_flip"]

DATASETS: tuple[str, ...] = (
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "svhn",
    "digits",
    "mnist1d",
    "synthetic",
    "tinyimagenet",
    "imagenet",
    "text",
)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    augment: bool = False,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int | None = None,
    seq_len: int | None = None,
) -> DataSource:
    """Load dataset ``name`` (one of :data:`DATASETS`, or ``package.module:callable``).

    Args:
        name: dataset name; ``_`` is accepted for ``-`` and case is ignored. A
            ``package.module:callable`` path names a function of yours that returns
            ``(train, test)`` datasets (see :func:`largebatch.source.as_source`: tensors
            stay in memory, any other Dataset is read lazily by ``loader_workers``); it
            is given ``data_dir=`` and ``seed=`` when its signature takes them.
        data_dir: folder holding the dataset files. ``None`` uses :data:`DEFAULT_DATA_DIRS`
            (only Fashion-MNIST has one). For ``mnist1d`` it is the cache folder; ``None``
            means ``$LARGEBATCH_CACHE/mnist1d`` or else ``~/.cache/largebatch/mnist1d``.
            Ignored by ``digits`` and ``synthetic``; required by ``tinyimagenet`` and
            ``imagenet``.
        augment: attach random crop (zero padding 4) + horizontal flip as
            ``DataSource.augment`` for cifar10/cifar100, crop only for svhn (flipped digits
            are different digits). Other datasets get ``None`` whatever this says;
            ``tinyimagenet`` and ``imagenet`` augment in ``LazyImages.decode`` when given a
            seed.
        seed: seed of the ``synthetic`` data; the other datasets do not depend on it
            (digits uses a fixed split, mnist1d its package's standard seed).
        limit_train, limit_test: keep only the first N samples of each split (quick runs).
            The normalization statistics do not change with the limits. The image-folder
            datasets interleave their classes, so the first N samples cover every class.
        image_size: side of the square images decoded by ``tinyimagenet`` (default 64) and
            ``imagenet`` (default 224); ``None`` means that default. Ignored by the other
            datasets, whose images have a fixed size.
        seq_len: tokens per sample of ``text`` (default 128; see
            :mod:`largebatch.data.text`); ignored by the other datasets.

    Raises:
        UsageError: unknown name, or a limit or ``image_size`` that is not a positive
            integer.
        DataError: a missing, truncated or malformed dataset file.
    """
    if ":" in str(name):
        _check_limit("limit_train", limit_train)
        _check_limit("limit_test", limit_test)
        return _apply_limits(_user_dataset(str(name), data_dir, seed), limit_train, limit_test)
    key = str(name).strip().lower().replace("_", "-")
    if key not in _LOADERS:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    _check_limit("limit_train", limit_train)
    _check_limit("limit_test", limit_test)
    _check_limit("image_size", image_size)
    sized: dict[str, Any] = {"image_size": image_size} if key in _IMAGE_FOLDERS else {}
    if key == "text":
        sized = {"seq_len": 128 if seq_len is None else seq_len}
    source = _LOADERS[key](data_dir, seed, **sized)
    if augment and key in _AUGMENT_FLIP:
        source.augment = functools.partial(random_crop_flip, padding=4, flip=_AUGMENT_FLIP[key])
    return _apply_limits(source, limit_train, limit_test)


def _user_dataset(path: str, data_dir: Any, seed: int) -> DataSource:
    """``--dataset package.module:callable``: the callable returns ``(train, test)``
    datasets; it receives ``data_dir=`` and ``seed=`` when its signature takes them."""
    function = load_callable(path, "--dataset")
    what = f"--dataset {path}"
    result = call_with_accepted(
        function, what, data_dir=None if data_dir is None else str(data_dir), seed=seed
    )
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise UsageError(
            f"{what} returned a {type(result).__name__}; it must return (train, test) datasets"
        )
    if any(isinstance(part, IterableDataset) for part in result):
        raise UsageError(
            f"{what} returned a stream (an IterableDataset); the command line takes map-style "
            "datasets: train a stream with largebatch.fit(samples_per_epoch=...)"
        )
    return as_source(result[0], result[1], name=path, input_range=None, reading=deliver_interrupts)


def random_crop_flip(
    x: torch.Tensor, generator: torch.Generator, padding: int = 4, flip: bool = True
) -> torch.Tensor:
    """Per-sample random crop after zero padding, then random horizontal flip.

    Each sample of the ``(B, C, H, W)`` batch is padded with ``padding`` zeros on every side
    and cropped back to ``H x W`` at a uniformly drawn offset; with ``flip`` it is mirrored
    left-right with probability 1/2. All randomness comes from ``generator`` (which may live
    on another device than ``x``), so equal generator states give equal outputs.
    Returns a new ``(B, C, H, W)`` tensor on ``x``'s device.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects a (B, C, H, W) batch, got {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch, _, height, width = x.shape
    if padding > 0:
        shifts = torch.randint(
            0, 2 * padding + 1, (batch, 2), generator=generator, device=generator.device
        ).to(x.device)
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = shifts[:, :1] + torch.arange(height, device=x.device)  # (B, H)
        cols = shifts[:, 1:] + torch.arange(width, device=x.device)  # (B, W)
        samples = torch.arange(batch, device=x.device)[:, None, None]
        # Indexing dims 0, 2, 3 with tensors broadcast to (B, H, W) puts channels last.
        x = padded[samples, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        flips = torch.rand(batch, generator=generator, device=generator.device) < 0.5
        x = torch.where(flips.to(x.device)[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def _check_limit(label: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{label} must be a positive integer or None, got {value!r}")


def _first(t: torch.Tensor | LazySplit, limit: int | None) -> torch.Tensor | LazySplit:
    if limit is None or limit >= len(t):
        return t
    # Clone a tensor so a small slice does not keep the whole dataset's memory alive; a slice
    # of lazy images holds only indices.
    return t[:limit].clone() if isinstance(t, torch.Tensor) else t[:limit]


def _apply_limits(source: DataSource, limit_train: int | None, limit_test: int | None):
    return dataclasses.replace(
        source,
        train_x=_first(source.train_x, limit_train),
        train_y=_first(source.train_y, limit_train),
        test_x=_first(source.test_x, limit_test),
        test_y=_first(source.test_y, limit_test),
    )


# --------------------------------------------------------------------------- image folders


def _load_image_folder(
    name: str, data_dir: str | os.PathLike[str] | None, seed: int, image_size: int | None = None
) -> DataSource:
    load = {"tinyimagenet": load_tinyimagenet, "imagenet": load_imagenet}
    return load[name](data_dir, image_size=image_size)


# --------------------------------------------------------------------------- registry

_Loader = Callable[..., DataSource]  # (data_dir, seed), plus image_size for image folders
_LOADERS: dict[str, _Loader] = {
    "fashion-mnist": functools.partial(load_idx, "fashion-mnist"),
    "mnist": functools.partial(load_idx, "mnist"),
    "cifar10": functools.partial(load_cifar, "cifar10"),
    "cifar100": functools.partial(load_cifar, "cifar100"),
    "svhn": load_svhn,
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "synthetic": load_synthetic,
    "tinyimagenet": functools.partial(_load_image_folder, "tinyimagenet"),
    "imagenet": functools.partial(_load_image_folder, "imagenet"),
    "text": lambda data_dir, seed, seq_len: load_text(data_dir, seq_len),
}
assert tuple(_LOADERS) == DATASETS

# Datasets whose loader takes ``image_size``.
_IMAGE_FOLDERS = frozenset({"tinyimagenet", "imagenet"})

# Datasets with train-time augmentation, and whether it flips (digits must not be mirrored).
_AUGMENT_FLIP = {"cifar10": True, "cifar100": True, "svhn": False}
