"""Datasets, read from standard file formats in a local folder; nothing is ever downloaded.

:func:`load_dataset` returns a :class:`DataSource`: float32 inputs in their raw range (images
scaled to [0, 1]), int64 labels, and the per-channel normalization statistics that the
*model* applies as its first layer. Keeping the data un-normalized means adversarial
perturbations (FGSM eps) and their clamping are expressed in raw input units.

Every problem with a user's files (missing folder or file, wrong magic number, truncated
payload or gzip stream, bad pickle, wrong shapes, labels out of range) raises
:class:`largebatch.errors.DataError` with a single-line message that names the file and says
how to get a good one. The command line prints it as ``error: ...`` and exits with status 2.

Supported names (:data:`DATASETS`):

- ``fashion-mnist``, ``mnist``: IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzipped
  (``.gz``) or plain. Fashion-MNIST defaults to the Debian package's folder.
- ``cifar10``, ``cifar100``: the python pickle batches, in the given folder or in its
  ``cifar-10-batches-py`` / ``cifar-100-python`` subfolder.
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` (cropped digits, label 10 means 0).
- ``digits``: scikit-learn's 8x8 digits, fixed 80/20 split.
- ``mnist1d``: generated locally by the ``mnist1d`` package and cached as ``.npz``.
- ``synthetic``: small learnable images generated from ``seed``, for tests.
- ``tinyimagenet``, ``imagenet``: image files in their usual folder layouts, too large for
  memory: ``train_x`` / ``test_x`` are :class:`largebatch.imagefolder.LazyImages`, decoded
  (and augmented) on demand; see :mod:`largebatch.imagefolder`.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import faulthandler
import functools
import gzip
import math
import numbers
import os
import pickle
import random
import struct
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from largebatch.errors import DataError, UsageError

if TYPE_CHECKING:
    from largebatch.imagefolder import LazyImages

__all__ = ["DATASETS", "DEFAULT_DATA_DIRS", "DataSource", "load_dataset", "random_crop_flip"]

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
)

#: Folder used when ``data_dir`` is None. Datasets missing here need an explicit folder
#: (mnist1d uses its cache folder instead, see :func:`load_dataset`).
DEFAULT_DATA_DIRS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

UNIT_RANGE: tuple[float, float] = (0.0, 1.0)


@dataclass
class DataSource:
    """A loaded dataset, train and test split, as tensors in memory.

    Attributes:
        name: canonical dataset name (one of :data:`DATASETS`), or the
            ``package.module:callable`` path or label of a user's dataset.
        train_x, test_x: float32, shape ``(N, *input_shape)``, raw values inside
            ``input_range`` (images scaled to [0, 1]); never normalized. For the image-folder
            datasets a :class:`~largebatch.imagefolder.LazyImages` instead, indexed like a
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
    train_x: torch.Tensor | LazyImages
    train_y: torch.Tensor
    test_x: torch.Tensor | LazyImages
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    input_range: tuple[float, float] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    augment: bool = False,
    seed: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int | None = None,
) -> DataSource:
    """Load dataset ``name`` (one of :data:`DATASETS`, or ``package.module:callable``).

    Args:
        name: dataset name; ``_`` is accepted for ``-`` and case is ignored. A
            ``package.module:callable`` path names a function of yours that returns
            ``(train, test)`` datasets (see :func:`largebatch.user_data.as_tensors`); it
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
    sized = {"image_size": image_size} if key in _IMAGE_FOLDERS else {}
    source = _LOADERS[key](data_dir, seed, **sized)
    if augment and key in _AUGMENT_FLIP:
        source.augment = functools.partial(random_crop_flip, padding=4, flip=_AUGMENT_FLIP[key])
    return _apply_limits(source, limit_train, limit_test)


def _user_dataset(path: str, data_dir: Any, seed: int) -> DataSource:
    """``--dataset package.module:callable``: the callable returns ``(train, test)``
    datasets; it receives ``data_dir=`` and ``seed=`` when its signature takes them."""
    from largebatch.user_data import as_source, call_with_accepted, load_callable

    function = load_callable(path, "--dataset")
    what = f"--dataset {path}"
    result = call_with_accepted(
        function, what, data_dir=None if data_dir is None else str(data_dir), seed=seed
    )
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise UsageError(
            f"{what} returned a {type(result).__name__}; it must return (train, test) datasets"
        )
    return as_source(result[0], result[1], name=path, input_range=None)


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


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class _Where:
    """Which dataset a file belongs to and how the user gets good files (for messages)."""

    label: str
    hint: str

    def error(self, problem: str) -> DataError:
        """``DataError('<label> <problem>; <hint>')`` on one line."""
        return DataError(" ".join(f"{self.label} {problem}; {self.hint}".splitlines()))


def _describe(exc: BaseException) -> str:
    """Short one-line description of a low-level exception, for wrapping messages."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _data_folder(name: str, data_dir: str | os.PathLike[str] | None, where: _Where) -> Path:
    """The existing folder to read ``name`` from (``data_dir`` or the default folder)."""
    if data_dir is None:
        if name not in DEFAULT_DATA_DIRS:
            raise where.error("has no default folder")
        data_dir = DEFAULT_DATA_DIRS[name]
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise where.error(
            f"folder {folder} {'is not a folder' if folder.exists() else 'not found'}"
        )
    return folder


def _require_file(path: Path, where: _Where) -> Path:
    if not path.is_file():
        raise where.error(f"file {path} not found")
    return path


def _check_labels(labels: np.ndarray, low: int, high: int, path: Path, where: _Where) -> None:
    """Labels must exist and be integers in ``[low, high]``."""
    if labels.size == 0:
        raise where.error(f"file {path} holds no samples")
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise where.error(f"file {path} has non-integer labels")
    found_low, found_high = labels.min(), labels.max()
    if found_low < low or found_high > high:
        raise where.error(
            f"file {path} has labels in [{found_low:g}, {found_high:g}], expected [{low}, {high}]"
        )


# --------------------------------------------------------------------------- tensors


def _image_tensor(images: np.ndarray, scale: float) -> torch.Tensor:
    """uint8 (or small float) array -> float32 tensor divided by ``scale``."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32)).div_(scale)


def _label_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``(N, C, ...)`` images, or one pair for ``(N, L)`` data."""
    channels = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 2 else x.reshape(1, -1)
    mean = channels.double().mean(dim=1)
    std = channels.double().std(dim=1)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant data: avoid dividing by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def _check_limit(label: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{label} must be a positive integer or None, got {value!r}")


def _first(t: torch.Tensor | LazyImages, limit: int | None) -> torch.Tensor | LazyImages:
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


# --------------------------------------------------------------------------- IDX (MNIST)

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"

_IDX_DATASETS: dict[str, tuple[_Where, tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": (
        _Where(
            "Fashion-MNIST",
            "install Debian package dataset-fashion-mnist or pass --data-dir with the IDX files",
        ),
        (0.2860,),
        (0.3530,),
    ),
    "mnist": (
        _Where(
            "MNIST",
            "pass --data-dir with the four MNIST IDX files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-..., .gz or plain)",
        ),
        (0.1307,),
        (0.3081,),
    ),
}


def _find_idx_file(folder: Path, base: str, where: _Where) -> Path:
    """``base.gz`` or else plain ``base`` in ``folder``."""
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    raise where.error(f"file {folder / base}.gz not found (nor uncompressed {base})")


def _read_maybe_gzip(path: Path, where: _Where) -> bytes:
    """File contents, gunzipped when they start with the gzip magic (whatever the name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw.startswith(_GZIP_MAGIC) else raw
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, truncated or corrupt gzip
        raise where.error(f"file {path} cannot be read ({_describe(exc)})") from exc


def _parse_idx(
    data: bytes, path: Path, magic: int, sample_shape: tuple[int, ...], where: _Where
) -> np.ndarray:
    """Check an IDX header and payload size; return the uint8 array ``(N, *sample_shape)``."""
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    header_size = 4 * (2 + len(sample_shape))
    if len(data) < header_size:
        raise where.error(f"file {path} is too short for an IDX {kind} header ({len(data)} bytes)")
    found_magic, count, *dims = struct.unpack(f">{2 + len(sample_shape)}I", data[:header_size])
    if found_magic != magic:
        raise where.error(
            f"file {path} has magic number {found_magic}, expected {magic} (IDX {kind} file)"
        )
    if tuple(dims) != sample_shape:
        raise where.error(
            f"file {path} holds {kind} of shape {tuple(dims)}, expected {sample_shape}"
        )
    expected = count * math.prod(sample_shape)
    if len(data) - header_size != expected:
        raise where.error(
            f"file {path} has {len(data) - header_size} data bytes but its header announces "
            f"{count} {kind} = {expected} bytes (truncated or corrupt file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(count, *sample_shape)


def _read_idx(folder: Path, base: str, magic: int, shape: tuple[int, ...], where: _Where):
    path = _find_idx_file(folder, base, where)
    return path, _parse_idx(_read_maybe_gzip(path, where), path, magic, shape, where)


def _load_idx_split(folder: Path, prefix: str, where: _Where) -> tuple[torch.Tensor, ...]:
    """``prefix`` is ``train`` or ``t10k``; returns images (N, 1, 28, 28) in [0, 1], labels."""
    image_path, images = _read_idx(
        folder, f"{prefix}-images-idx3-ubyte", _IDX_IMAGES_MAGIC, (28, 28), where
    )
    label_path, labels = _read_idx(
        folder, f"{prefix}-labels-idx1-ubyte", _IDX_LABELS_MAGIC, (), where
    )
    if len(images) != len(labels):
        raise where.error(
            f"file {label_path} holds {len(labels)} labels but {image_path} holds "
            f"{len(images)} images"
        )
    _check_labels(labels, 0, 9, label_path, where)
    return _image_tensor(images[:, None], 255.0), _label_tensor(labels)


def _load_idx_dataset(name: str, data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    where, mean, std = _IDX_DATASETS[name]
    folder = _data_folder(name, data_dir, where)
    train_x, train_y = _load_idx_split(folder, "train", where)
    test_x, test_y = _load_idx_split(folder, "t10k", where)
    return DataSource(
        name, train_x, train_y, test_x, test_y, (1, 28, 28), 10, UNIT_RANGE, mean, std
    )


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    where: _Where
    subdir: str  # folder name inside the official archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        _Where(
            "CIFAR-10",
            "pass --data-dir with the folder cifar-10-batches-py extracted from "
            "cifar-10-python.tar.gz (or its parent)",
        ),
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        b"labels",
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarLayout(
        _Where(
            "CIFAR-100",
            "pass --data-dir with the folder cifar-100-python extracted from "
            "cifar-100-python.tar.gz (or its parent)",
        ),
        "cifar-100-python",
        ("train",),
        ("test",),
        b"fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
}


@functools.cache
def _pickle_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle needs: numpy array reconstruction (old and new module
    names, as numpy 2 renamed numpy.core to numpy._core) and codecs.encode for bytes."""
    core = getattr(np, "_core", None) or np.core
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for prefix in ("numpy.core", "numpy._core"):
        table[(f"{prefix}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        table[(f"{prefix}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return table


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy arrays, so a planted pickle in a
    data folder cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _pickle_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, not a numpy array")
        return allowed[(module, name)]


def _unpickle(path: Path, where: _Where) -> Any:
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can raise almost any exception type
        raise where.error(f"file {path} is not a readable CIFAR pickle ({_describe(exc)})") from exc


def _batch_entry(batch: dict, key: bytes) -> Any:
    # The official files have bytes keys; pickles written by python 3 code may use str.
    return batch[key] if key in batch else batch.get(key.decode())


def _load_cifar_batch(path: Path, layout: _CifarLayout, where: _Where):
    """One pickle batch -> uint8 images (N, 3, 32, 32), int64 labels (N,)."""
    batch = _unpickle(_require_file(path, where), where)
    key_names = f"b'data' and {layout.label_key!r}"
    if not isinstance(batch, dict):
        raise where.error(f"file {path} holds a {type(batch).__name__}, expected a dict")
    data, labels = _batch_entry(batch, b"data"), _batch_entry(batch, layout.label_key)
    if data is None or labels is None:
        found = ", ".join(repr(k) for k in list(batch)[:8])
        raise where.error(f"file {path} lacks the keys {key_names} (found: {found})")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2) or (
        data.shape[1] != 3 * 32 * 32
    ):
        shape = getattr(data, "shape", type(data).__name__)
        raise where.error(f"file {path} has b'data' {shape}, expected uint8 of shape (N, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise where.error(f"file {path} has non-integer labels ({_describe(exc)})") from exc
    if labels.shape != (len(data),):
        raise where.error(f"file {path} has {labels.size} labels for {len(data)} images")
    _check_labels(labels, 0, layout.num_classes - 1, path, where)
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_split(folder: Path, files: tuple[str, ...], layout: _CifarLayout):
    parts = [_load_cifar_batch(folder / f, layout, layout.where) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _image_tensor(images, 255.0), _label_tensor(labels)


def _load_cifar(name: str, data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    layout = _CIFAR_LAYOUTS[name]
    folder = _data_folder(name, data_dir, layout.where)
    # Accept the parent of the folder that the official archive extracts to.
    nested = folder / layout.subdir
    if not (folder / layout.test_files[0]).exists() and nested.is_dir():
        folder = nested
    train_x, train_y = _load_cifar_split(folder, layout.train_files, layout)
    test_x, test_y = _load_cifar_split(folder, layout.test_files, layout)
    return DataSource(
        name,
        train_x,
        train_y,
        test_x,
        test_y,
        (3, 32, 32),
        layout.num_classes,
        UNIT_RANGE,
        layout.mean,
        layout.std,
    )


# --------------------------------------------------------------------------- SVHN

_SVHN_WHERE = _Where(
    "SVHN",
    "pass --data-dir with train_32x32.mat and test_32x32.mat (SVHN cropped digits, format 2)",
)


def _loadmat_survives(path: Path) -> bool:
    """Whether scipy's MATLAB reader can read ``path`` without crashing the process.

    scipy.io.loadmat's compiled reader can die with a segmentation fault on some corrupt
    files (found by fuzzing), which no ``except`` can catch. So on POSIX a forked child
    reads the file first; the parent reads it only if the child came back alive.
    """
    if not hasattr(os, "fork"):
        return True
    from scipy.io import loadmat

    pid = os.fork()
    if pid == 0:  # child: read, then leave without running any cleanup of the parent's
        faulthandler.disable()  # the crash is expected here: no stack dump on stderr
        code = 0
        try:
            loadmat(path, variable_names=("X", "y"))
        except BaseException:  # a clean exception is reported by the parent's own read
            code = 0
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return not os.WIFSIGNALED(status)


def _read_mat(path: Path, where: _Where) -> dict[str, Any]:
    from scipy.io import loadmat  # scipy.io is slow to import; only SVHN needs it

    _require_file(path, where)
    if not _loadmat_survives(path):
        raise where.error(f"file {path} is corrupt (the MATLAB reader crashed on it)")
    try:
        return loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # bad headers, truncated streams, v7.3 (HDF5) files...
        raise where.error(f"file {path} is not a readable MATLAB file ({_describe(exc)})") from exc


def _load_svhn_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) in 1..10 -> (N, 3, 32, 32) in [0, 1], 0..9."""
    where = _SVHN_WHERE
    mat = _read_mat(path, where)
    missing = [v for v in ("X", "y") if v not in mat]
    if missing:
        raise where.error(f"file {path} lacks the variable(s) {', '.join(missing)}")
    images, labels = mat["X"], np.asarray(mat["y"])
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise where.error(f"file {path} has X {images.shape}, expected uint8 (32, 32, 3, N)")
    if labels.dtype.kind not in "iuf" or labels.size != images.shape[3]:
        raise where.error(f"file {path} has y {labels.shape}, expected ({images.shape[3]}, 1)")
    labels = labels.reshape(-1)
    _check_labels(labels, 0, 10, path, where)
    # SVHN stores digit 0 as label 10.
    digits = np.asarray(labels, dtype=np.int64) % 10
    return _image_tensor(images.transpose(3, 2, 0, 1), 255.0), _label_tensor(digits)


def _load_svhn(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    folder = _data_folder("svhn", data_dir, _SVHN_WHERE)
    train_x, train_y = _load_svhn_split(folder / "train_32x32.mat")
    test_x, test_y = _load_svhn_split(folder / "test_32x32.mat")
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    return DataSource(
        "svhn", train_x, train_y, test_x, test_y, (3, 32, 32), 10, UNIT_RANGE, mean, std
    )


# --------------------------------------------------------------------------- digits


def _load_digits(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to [0, 1]; fixed 80/20 split."""
    from sklearn.datasets import load_digits  # slow import, only needed here

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None] / 16.0
    # A fixed permutation, independent of `seed`, so every run tests on the same samples.
    order = np.random.RandomState(0).permutation(len(images))
    n_train = round(0.8 * len(images))
    train, test = order[:n_train], order[n_train:]
    train_x = torch.from_numpy(images[train])
    mean, std = _channel_stats(train_x)
    return DataSource(
        "digits",
        train_x,
        _label_tensor(bunch.target[train]),
        torch.from_numpy(images[test]),
        _label_tensor(bunch.target[test]),
        (1, 8, 8),
        10,
        UNIT_RANGE,
        mean,
        std,
    )


# --------------------------------------------------------------------------- mnist1d

_MNIST1D_FILE = "mnist1d.npz"
_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")
_MNIST1D_LENGTH = 40


def _mnist1d_cache_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = os.environ.get("LARGEBATCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "largebatch"
    return base / "mnist1d"


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The standard MNIST-1D (4000 train, 1000 test, length 40), generated locally.

    Uses ``make_dataset`` directly: ``mnist1d.data.get_dataset`` tries a download first.
    """
    import mnist1d.data  # imports matplotlib; only needed when the cache is cold

    # make_dataset reseeds the global numpy and python RNGs; restore them for the caller.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        made = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x": np.asarray(made["x"], dtype=np.float32),
        "y": np.asarray(made["y"], dtype=np.int64),
        "x_test": np.asarray(made["x_test"], dtype=np.float32),
        "y_test": np.asarray(made["y_test"], dtype=np.int64),
    }


def _valid_mnist1d(arrays: dict[str, np.ndarray]) -> bool:
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        x, y = arrays[x_key], arrays[y_key]
        if x.ndim != 2 or x.shape[1] != _MNIST1D_LENGTH or y.shape != (len(x),) or len(x) == 0:
            return False
        if x.dtype != np.float32 or y.dtype != np.int64 or not np.isfinite(x).all():
            return False
        if y.min() < 0 or y.max() > 9:
            return False
    return True


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the cache is absent or unusable."""
    if not path.is_file():
        return None
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is corrupt.
        with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _MNIST1D_KEYS}
    except Exception:  # truncated zip, foreign file, missing key: regenerate instead
        arrays = None
    if arrays is None or not _valid_mnist1d(arrays):
        warnings.warn(f"MNIST-1D cache {path} is corrupt; regenerating it", stacklevel=4)
        return None
    return arrays


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``.npz`` via a temporary file + rename so readers never see half a file.

    A cache that cannot be written only costs regeneration next time, so it warns.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        warnings.warn(f"cannot write MNIST-1D cache {path} ({_describe(exc)})", stacklevel=4)


def _load_mnist1d(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    """MNIST-1D: (N, 40) float32 signals, already standardized by the generator (about mean 0,
    std 1) and unbounded, so ``input_range`` is None; mean/std are computed on train."""
    path = _mnist1d_cache_dir(data_dir) / _MNIST1D_FILE
    arrays = _read_mnist1d_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d()
        _write_atomically(path, arrays)
    train_x = torch.from_numpy(arrays["x"])
    mean, std = _channel_stats(train_x)
    return DataSource(
        "mnist1d",
        train_x,
        torch.from_numpy(arrays["y"]),
        torch.from_numpy(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]),
        (_MNIST1D_LENGTH,),
        10,
        None,
        mean,
        std,
    )


# --------------------------------------------------------------------------- synthetic

_SYNTHETIC_SHAPE = (1, 16, 16)
_SYNTHETIC_TRAIN, _SYNTHETIC_TEST = 512, 256
_SYNTHETIC_NOISE = 0.3


def _synthetic_split(templates: torch.Tensor, n: int, generator: torch.Generator):
    """``n`` noisy copies of the class templates, classes balanced and shuffled."""
    labels = (torch.arange(n) % len(templates))[torch.randperm(n, generator=generator)]
    noise = _SYNTHETIC_NOISE * torch.randn((n, *templates.shape[1:]), generator=generator)
    return (templates[labels] + noise).clamp_(0.0, 1.0), labels


def _load_synthetic(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    """10 classes of (1, 16, 16) images in [0, 1], 512 train / 256 test, a function of seed.

    Each class has a random binary template (pixels 0.2 or 0.8); samples add Gaussian noise
    (std 0.3) and clip, so a small MLP learns it in an epoch or two.
    """
    generator = torch.Generator().manual_seed(seed)
    templates = 0.2 + 0.6 * (torch.rand((10, *_SYNTHETIC_SHAPE), generator=generator) < 0.5)
    train_x, train_y = _synthetic_split(templates, _SYNTHETIC_TRAIN, generator)
    test_x, test_y = _synthetic_split(templates, _SYNTHETIC_TEST, generator)
    mean, std = _channel_stats(train_x)
    return DataSource(
        "synthetic", train_x, train_y, test_x, test_y, _SYNTHETIC_SHAPE, 10, UNIT_RANGE, mean, std
    )


# --------------------------------------------------------------------------- image folders


def _load_image_folder(
    name: str, data_dir: str | os.PathLike[str] | None, seed: int, image_size: int | None = None
) -> DataSource:
    # Imported here: largebatch.imagefolder builds on this module's helpers.
    from largebatch import imagefolder

    load = {"tinyimagenet": imagefolder.load_tinyimagenet, "imagenet": imagefolder.load_imagenet}
    return load[name](data_dir, image_size=image_size)


# --------------------------------------------------------------------------- registry

_Loader = Callable[..., DataSource]  # (data_dir, seed), plus image_size for image folders
_LOADERS: dict[str, _Loader] = {
    "fashion-mnist": functools.partial(_load_idx_dataset, "fashion-mnist"),
    "mnist": functools.partial(_load_idx_dataset, "mnist"),
    "cifar10": functools.partial(_load_cifar, "cifar10"),
    "cifar100": functools.partial(_load_cifar, "cifar100"),
    "svhn": _load_svhn,
    "digits": _load_digits,
    "mnist1d": _load_mnist1d,
    "synthetic": _load_synthetic,
    "tinyimagenet": functools.partial(_load_image_folder, "tinyimagenet"),
    "imagenet": functools.partial(_load_image_folder, "imagenet"),
}
assert tuple(_LOADERS) == DATASETS

# Datasets whose loader takes ``image_size``.
_IMAGE_FOLDERS = frozenset({"tinyimagenet", "imagenet"})

# Datasets with train-time augmentation, and whether it flips (digits must not be mirrored).
_AUGMENT_FLIP = {"cifar10": True, "cifar100": True, "svhn": False}
