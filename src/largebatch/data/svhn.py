"""SVHN cropped digits (format 2): ``train_32x32.mat`` and ``test_32x32.mat``."""

from __future__ import annotations

import faulthandler
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

__all__ = ["load_svhn"]

_SVHN_WHERE = Where(
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


def _read_mat(path: Path, where: Where) -> dict[str, Any]:
    from scipy.io import loadmat  # scipy.io is slow to import; only SVHN needs it

    require_file(path, where)
    if not _loadmat_survives(path):
        raise where.error(f"file {path} is corrupt (the MATLAB reader crashed on it)")
    try:
        return loadmat(path, variable_names=("X", "y"))
    except Exception as exc:  # bad headers, truncated streams, v7.3 (HDF5) files...
        raise where.error(f"file {path} is not a readable MATLAB file ({describe(exc)})") from exc


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
    check_labels(labels, 0, 10, path, where)
    # SVHN stores digit 0 as label 10.
    digits = np.asarray(labels, dtype=np.int64) % 10
    return image_tensor(images.transpose(3, 2, 0, 1), 255.0), label_tensor(digits)


def load_svhn(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    folder = data_folder("svhn", data_dir, _SVHN_WHERE)
    train_x, train_y = _load_svhn_split(folder / "train_32x32.mat")
    test_x, test_y = _load_svhn_split(folder / "test_32x32.mat")
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    return DataSource(
        "svhn", train_x, train_y, test_x, test_y, (3, 32, 32), 10, UNIT_RANGE, mean, std
    )
