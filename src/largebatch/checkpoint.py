"""One atomic checkpoint holds everything needed to resume exactly or to evaluate.

The file is a ``torch.save`` dictionary tagged with a format name and version; it is
written to a temporary file and renamed, so an interrupted save never replaces a good
checkpoint with a broken one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from largebatch.errors import CheckpointError
from largebatch.io import atomic_write

__all__ = ["FORMAT", "VERSION", "save_checkpoint", "load_checkpoint"]

FORMAT = "largebatch-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, plain containers) atomically to ``path``."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # any failure to parse the file means it is not a usable checkpoint
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a largebatch checkpoint ({reason})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a largebatch checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state.get('version')}; "
            f"this largebatch reads version {VERSION}"
        )
    return state
