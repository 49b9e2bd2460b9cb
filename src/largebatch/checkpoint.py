"""One atomic checkpoint holds everything needed to resume exactly or to evaluate.

The file is a ``torch.save`` dictionary tagged with a format name and version; it is
written to a temporary file and renamed, so an interrupted save never replaces a good
checkpoint with a broken one.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from largebatch.errors import CheckpointError
from largebatch.io import atomic_write

__all__ = [
    "FORMAT",
    "VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "checked_part",
    "checked_model_spec",
    "load_part",
]

FORMAT = "largebatch-checkpoint"
# terminal colour codes, which torch puts into some of its messages
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
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
        lines = [_ANSI.sub("", line).strip() for line in str(exc).splitlines()]
        unsafe = [line for line in lines if "Unsupported global" in line]
        if unsafe:  # torch refuses to unpickle an object that is not plain data
            raise CheckpointError(
                f"checkpoint {path} holds an object that is not plain data and cannot be "
                f"loaded safely ({unsafe[0][:200]}); it was not written by this largebatch"
            ) from None
        reason = (lines or [type(exc).__name__])[0][:200]
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


def checked_part(
    state: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Any
) -> Any:
    """``state[key]``, which must be a ``kind``; otherwise the checkpoint is incomplete."""
    value = state.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(
            f"checkpoint {path} has no valid {key!r} entry; it is incomplete or was not "
            "written by largebatch"
        )
    return value


def _numbers(value: Any, integers: bool) -> bool:
    kinds = (int,) if integers else (int, float)
    return isinstance(value, list | tuple) and all(
        isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) for v in value
    )


def checked_model_spec(state: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """The checkpoint's model spec, checked field by field before any model is built."""
    if state.get("model_spec", 0) is None and isinstance(state.get("model"), dict):
        raise CheckpointError(
            f"checkpoint {path} holds a model that was passed to largebatch.fit as an object, "
            "so it cannot be rebuilt here: build the model in Python and load "
            "checkpoint['model'] into it"
        )
    spec = checked_part(state, "model_spec", dict, path)
    problem = None
    if set(spec) != {"name", "input_shape", "num_classes", "mean", "std"}:
        problem = f"its keys are {sorted(map(str, spec))}"
    elif not isinstance(spec["name"], str):
        problem = "the model name is not a string"
    elif not _numbers(spec["input_shape"], True) or not 1 <= len(spec["input_shape"]) <= 3:
        problem = f"input_shape {spec['input_shape']!r} is not 1 to 3 integers"
    elif any(s < 1 or s > 1 << 16 for s in spec["input_shape"]):
        problem = f"input_shape {spec['input_shape']!r} is out of range"
    elif isinstance(spec["num_classes"], bool) or not isinstance(spec["num_classes"], int):
        problem = "num_classes is not an integer"
    elif not 0 <= spec["num_classes"] <= 1 << 20:
        problem = f"num_classes {spec['num_classes']} is out of range"
    else:
        for key in ("mean", "std"):
            if spec[key] is not None and not _numbers(spec[key], False):
                problem = f"{key} is not a list of numbers"
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} has an invalid model spec: {problem}")
    return spec


def load_part(target: Any, state: Any, path: Any, what: str) -> None:
    """``target.load_state_dict(state)``; a part that does not fit is a CheckpointError."""
    try:
        target.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        reason = " ".join(str(exc).split())[:240] or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} does not fit: {what}: {reason}") from None
