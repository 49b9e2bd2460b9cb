"""CIFAR-10 and CIFAR-100: the python pickle batches, read without running pickled code."""

from __future__ import annotations

import codecs
import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from largebatch.data.files import (
    Where,
    check_labels,
    data_folder,
    describe,
    image_tensor,
    label_tensor,
    require_file,
)
from largebatch.source import UNIT_RANGE, DataSource

__all__ = ["load_cifar"]


@dataclass(frozen=True)
class _CifarLayout:
    where: Where
    subdir: str  # folder name inside the official archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        Where(
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
        Where(
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


def _unpickle(path: Path, where: Where) -> Any:
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # a damaged pickle can raise almost any exception type
        raise where.error(f"file {path} is not a readable CIFAR pickle ({describe(exc)})") from exc


def _batch_entry(batch: dict, key: bytes) -> Any:
    # The official files have bytes keys; pickles written by python 3 code may use str.
    return batch[key] if key in batch else batch.get(key.decode())


def _load_cifar_batch(path: Path, layout: _CifarLayout, where: Where):
    """One pickle batch -> uint8 images (N, 3, 32, 32), int64 labels (N,)."""
    batch = _unpickle(require_file(path, where), where)
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
        raise where.error(f"file {path} has non-integer labels ({describe(exc)})") from exc
    if labels.shape != (len(data),):
        raise where.error(f"file {path} has {labels.size} labels for {len(data)} images")
    check_labels(labels, 0, layout.num_classes - 1, path, where)
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar_split(folder: Path, files: tuple[str, ...], layout: _CifarLayout):
    parts = [_load_cifar_batch(folder / f, layout, layout.where) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return image_tensor(images, 255.0), label_tensor(labels)


def load_cifar(name: str, data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    layout = _CIFAR_LAYOUTS[name]
    folder = data_folder(name, data_dir, layout.where)
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
