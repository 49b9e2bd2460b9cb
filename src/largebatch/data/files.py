"""Helpers shared by the dataset readers: where the files are, one-line errors, tensors."""

from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from largebatch.errors import DataError

__all__ = [
    "DEFAULT_DATA_DIRS",
    "Where",
    "channel_stats",
    "check_labels",
    "data_folder",
    "describe",
    "image_tensor",
    "label_tensor",
    "read_maybe_gzip",
    "require_file",
    "write_atomically",
]

#: Folder used when ``data_dir`` is None. Datasets missing here need an explicit folder
#: (mnist1d uses its cache folder instead, see :func:`load_dataset`).
DEFAULT_DATA_DIRS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}

_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Where:
    """Which dataset a file belongs to and how the user gets good files (for messages)."""

    label: str
    hint: str

    def error(self, problem: str) -> DataError:
        """``DataError('<label> <problem>; <hint>')`` on one line."""
        return DataError(" ".join(f"{self.label} {problem}; {self.hint}".splitlines()))


def describe(exc: BaseException) -> str:
    """Short one-line description of a low-level exception, for wrapping messages."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def data_folder(name: str, data_dir: str | os.PathLike[str] | None, where: Where) -> Path:
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


def require_file(path: Path, where: Where) -> Path:
    if not path.is_file():
        raise where.error(f"file {path} not found")
    return path


def check_labels(labels: np.ndarray, low: int, high: int, path: Path, where: Where) -> None:
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


def image_tensor(images: np.ndarray, scale: float) -> torch.Tensor:
    """uint8 (or small float) array -> float32 tensor divided by ``scale``."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32)).div_(scale)


def label_tensor(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``(N, C, ...)`` images, or one pair for ``(N, L)`` data."""
    channels = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 2 else x.reshape(1, -1)
    mean = channels.double().mean(dim=1)
    std = channels.double().std(dim=1)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant data: avoid dividing by 0
    return tuple(mean.tolist()), tuple(std.tolist())


def read_maybe_gzip(path: Path, where: Where) -> bytes:
    """File contents, gunzipped when they start with the gzip magic (whatever the name)."""
    try:
        raw = path.read_bytes()
        return gzip.decompress(raw) if raw.startswith(_GZIP_MAGIC) else raw
    except (OSError, EOFError, zlib.error) as exc:  # unreadable, truncated or corrupt gzip
        raise where.error(f"file {path} cannot be read ({describe(exc)})") from exc


def write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
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
        warnings.warn(f"cannot write MNIST-1D cache {path} ({describe(exc)})", stacklevel=4)
