"""IDX files (MNIST, Fashion-MNIST): ``train-images-idx3-ubyte`` and friends, gzipped or plain."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import numpy as np
import torch

from largebatch.data.files import (
    Where,
    check_labels,
    data_folder,
    image_tensor,
    label_tensor,
    read_maybe_gzip,
)
from largebatch.source import UNIT_RANGE, DataSource

__all__ = ["load_idx"]

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_IDX_DATASETS: dict[str, tuple[Where, tuple[float, ...], tuple[float, ...]]] = {
    "fashion-mnist": (
        Where(
            "Fashion-MNIST",
            "install Debian package dataset-fashion-mnist or pass --data-dir with the IDX files",
        ),
        (0.2860,),
        (0.3530,),
    ),
    "mnist": (
        Where(
            "MNIST",
            "pass --data-dir with the four MNIST IDX files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-..., .gz or plain)",
        ),
        (0.1307,),
        (0.3081,),
    ),
}


def _find_idx_file(folder: Path, base: str, where: Where) -> Path:
    """``base.gz`` or else plain ``base`` in ``folder``."""
    for candidate in (folder / f"{base}.gz", folder / base):
        if candidate.is_file():
            return candidate
    raise where.error(f"file {folder / base}.gz not found (nor uncompressed {base})")


def _parse_idx(
    data: bytes, path: Path, magic: int, sample_shape: tuple[int, ...], where: Where
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


def _read_idx(folder: Path, base: str, magic: int, shape: tuple[int, ...], where: Where):
    path = _find_idx_file(folder, base, where)
    return path, _parse_idx(read_maybe_gzip(path, where), path, magic, shape, where)


def _load_idx_split(folder: Path, prefix: str, where: Where) -> tuple[torch.Tensor, ...]:
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
    check_labels(labels, 0, 9, label_path, where)
    return image_tensor(images[:, None], 255.0), label_tensor(labels)


def load_idx(name: str, data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    where, mean, std = _IDX_DATASETS[name]
    folder = data_folder(name, data_dir, where)
    train_x, train_y = _load_idx_split(folder, "train", where)
    test_x, test_y = _load_idx_split(folder, "t10k", where)
    return DataSource(
        name, train_x, train_y, test_x, test_y, (1, 28, 28), 10, UNIT_RANGE, mean, std
    )
