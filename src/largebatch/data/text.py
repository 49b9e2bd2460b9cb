"""``text``: every UTF-8 text file under a folder as one stream of byte tokens.

The files (sorted by path, each followed by a newline) are joined once into a cache file
of bytes, ``$LARGEBATCH_CACHE/text/<digest>.bin`` (else ``~/.cache/largebatch/text``; the
digest is of the files' paths, sizes and modification times), which training reads
through a memory map: a corpus of any size trains in constant memory. A sample is a
window of ``seq_len`` tokens and its targets, the same window shifted by one token
(next-token prediction); windows do not overlap. The last twentieth of the windows, from
one token past the last training target, is the validation tail: no token of it is a
training input or target. Tokens are bytes, so there are 256 classes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from largebatch.data.files import describe
from largebatch.errors import DataError, UsageError
from largebatch.io import atomic_write
from largebatch.source import DataSource, as_source

__all__ = ["load_text", "TokenWindows", "VOCAB"]

VOCAB = 256  # byte tokens
VALIDATION_SHARE = 20  # one window in this many is in the validation tail


def _cache_dir() -> Path:
    root = os.environ.get("LARGEBATCH_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "largebatch") / "text"


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"text: {folder} is not a folder; give --data-dir a folder of text files")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"text: {folder} holds no files; put UTF-8 text files in it")
    return files


def _joined(folder: Path) -> Path:
    """The cache file of the folder's files joined (written once, checked as UTF-8)."""
    files = _files(folder)
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    target = _cache_dir() / f"{digest.hexdigest()[:24]}.bin"
    if target.exists():
        return target

    def write(out: Any) -> None:
        for path in files:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"text: cannot read {path}: {describe(exc)}") from None
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"text: {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                    "convert it or remove it from the folder"
                ) from None
            out.write(data)
            out.write(b"\n")

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, write)
    return target


class TokenWindows(torch.utils.data.Dataset):
    """Windows of a byte-token file: item ``i`` is ``(tokens[s:s+L], tokens[s+1:s+L+1])``
    as int64, ``s = first + i * L``. Opens its memory map on first use (so it pickles
    as a path, for reading workers)."""

    def __init__(self, path: Path, first: int, count: int, seq_len: int) -> None:
        self.path, self.first, self.count, self.seq_len = str(path), first, count, seq_len
        self._tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.count:
            raise IndexError(f"window {i} of {self.count}")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self.first + i * self.seq_len
        window = torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}


def load_text(data_dir: str | os.PathLike[str] | None, seq_len: int) -> DataSource:
    """The ``text`` dataset of the files under ``data_dir`` (see the module docstring)."""
    if data_dir is None:
        raise UsageError("dataset text needs --data-dir, a folder of UTF-8 text files")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UsageError(f"seq_len must be a positive integer, got {seq_len!r}")
    path = _joined(Path(data_dir))
    total = path.stat().st_size
    windows = (total - 1) // seq_len
    held = max(1, windows // VALIDATION_SHARE)
    train = windows - held
    first_test = train * seq_len + 1  # one token past the last training target
    test = (total - 1 - first_test) // seq_len
    if train < 1 or test < 1:
        raise DataError(
            f"text: {data_dir} holds {total} bytes, too few for windows of seq_len "
            f"{seq_len} in both a training part and a validation tail; lower seq_len"
        )
    source = as_source(
        TokenWindows(path, 0, train, seq_len),
        TokenWindows(path, first_test, test, seq_len),
        name="text",
    )
    source.num_classes = VOCAB
    return source
