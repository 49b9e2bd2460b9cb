"""One atomic checkpoint holds everything needed to resume exactly or to evaluate.

The file is a ``torch.save`` dictionary tagged with a format name and version; it is
written to a temporary file and renamed, so an interrupted save never replaces a good
checkpoint with a broken one. :class:`RunCheckpoint` is a run's checkpoint: the named
objects that make up its state, saved and restored together.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from largebatch.checks import plain
from largebatch.errors import CheckpointError, DivergedError, UsageError
from largebatch.io import atomic_write

__all__ = [
    "FORMAT",
    "VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "checked_part",
    "checked_model_spec",
    "load_part",
    "RunCheckpoint",
    "rng_state",
    "set_rng_state",
    "all_finite",
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
    if set(spec) - {"sizes"} != {"name", "input_shape", "num_classes", "mean", "std"}:
        problem = f"its keys are {sorted(map(str, spec))}"
    elif "sizes" in spec and not (
        isinstance(spec["sizes"], dict)
        and set(spec["sizes"]) <= {"d_model", "n_layers", "n_heads"}
        and _numbers(list(spec["sizes"].values()), True)
        and all(1 <= v <= 1 << 16 for v in spec["sizes"].values())
    ):
        problem = f"sizes {spec['sizes']!r} are not the transformer's positive sizes"
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


def rng_state() -> dict[str, Any]:
    """The global torch generators' states (CPU, and CUDA when there is one)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_finite(model: torch.nn.Module) -> bool:
    """Whether every floating-point tensor of the model's state is finite."""
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


class RunCheckpoint:
    """A run's checkpoint: named stateful objects, the RNG and the progress, in a file
    (written atomically by rank 0) or, without a path, in memory.

    ``objects`` maps names to anything with ``state_dict()``/``load_state_dict()``:
    ``model``, ``optimizer``, ``controller``, ``meters`` (a dict of meters by
    measurement name), ``scaler`` (the fp16 loss scaler, or None). ``extra`` holds plain
    entries saved as they are (the recipe's config record, the data's fingerprint, the
    model spec). The file's keys are those :mod:`largebatch.evaluate` and older runs
    read: ``config``, ``data``, ``model_spec``, ``model``, ``optimizer``, ``controller``,
    ``meters``, ``scaler``, ``run`` and ``rng``.
    """

    def __init__(self, path: str | Path | None, world: Any, extra: Mapping[str, Any] = ()) -> None:
        self.path = Path(path) if path is not None else None
        self.world = world
        self.extra = dict(extra)
        self._memory: bytes | None = None
        self._peeked: dict[str, Any] | None = None
        self.where = str(self.path) if self.path is not None else "the in-memory checkpoint"

    def exists(self) -> bool:
        return self.path.exists() if self.path is not None else self._memory is not None

    def save(self, objects: Mapping[str, Any], progress: Any) -> None:
        """Save ``objects`` and ``progress`` (rank 0 only). The last good checkpoint is
        never replaced by non-finite weights: that is a DivergedError. A sharded state
        (``collective``, :class:`largebatch.parallel.FSDP`) is gathered by every rank
        first."""
        for obj in objects.values():
            if getattr(obj, "collective", False):
                obj.gather()
        if not self.world.is_main:
            return
        if not all_finite(objects["model"]):
            raise DivergedError(
                f"the weights became non-finite in epoch {progress.epoch + 1}; lower --lr"
            )
        scaler = objects.get("scaler")
        payload = {
            **self.extra,
            "model": objects["model"].state_dict(),
            **self.check(objects),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "run": vars(progress),
            "rng": rng_state(),
        }
        if self.path is not None:
            save_checkpoint(self.path, payload)
        else:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            self._memory = buffer.getvalue()

    def check(self, objects: Mapping[str, Any]) -> dict[str, Any]:
        """The optimizer's, the controller's and the meters' states as plain data (so that
        the file loads with ``weights_only``: a user's hyper-parameter given as a NumPy
        number is saved as a Python one); a state holding anything else is refused, naming
        it. Call it before a run writes anything."""
        name = type(objects["controller"]).__name__
        optimizer = objects["optimizer"]
        return {
            "optimizer": plain(
                optimizer.state_dict(), f"the state of optimizer {type(optimizer).__name__}"
            ),
            "controller": plain(
                objects["controller"].state_dict(), f"the state of controller {name}"
            ),
            "meters": {
                key: plain(meter.state_dict(), f"the state of meter {key!r}")
                for key, meter in (objects.get("meters") or {}).items()
            },
        }

    def load(self) -> dict[str, Any]:
        """The saved dictionary, on the CPU."""
        # Loaded on the CPU: the RNG and generator states in it must stay CPU byte tensors
        # (torch.set_rng_state and Generator.set_state refuse CUDA ones); the model's and
        # the optimizer's load_state_dict copy each tensor to its parameter's device.
        if self.path is not None:
            return load_checkpoint(self.path, map_location="cpu")
        if self._memory is None:  # only rank 0 keeps one: rollback needs out under torchrun
            raise UsageError("on_divergence: rollback under torchrun needs out (a run folder)")
        return torch.load(io.BytesIO(self._memory), map_location="cpu", weights_only=True)

    def peek(self) -> dict[str, Any]:
        """The saved dictionary, read once for a look before :meth:`restore` (which then
        uses it instead of reading the file again)."""
        if self._peeked is None:
            self._peeked = self.load()
        return self._peeked

    def restore(self, objects: Mapping[str, Any]) -> Any:
        """Load the checkpoint into ``objects``; return its progress
        (:class:`~largebatch.progress.Progress`)."""
        from largebatch.progress import Progress

        saved, self._peeked = (self._peeked or self.load()), None
        path = self.where
        load_part(objects["model"], checked_part(saved, "model", dict, path), path, "model weights")
        load_part(
            objects["optimizer"], checked_part(saved, "optimizer", dict, path), path,
            "optimizer state",
        )  # fmt: skip
        load_part(
            objects["controller"], checked_part(saved, "controller", dict, path), path,
            "controller state",
        )  # fmt: skip
        states = saved.get("meters")
        if states is None and saved.get("tracker") is not None:  # written before meters existed
            states = {"eigenvalue": saved["tracker"]}
        for name, meter in (objects.get("meters") or {}).items():
            if (states or {}).get(name) is not None:
                load_part(meter, states[name], path, f"{name} meter state")
        scaler = objects.get("scaler")
        if scaler is not None and saved.get("scaler"):
            load_part(scaler, saved["scaler"], path, "loss scaler state")
        try:
            set_rng_state(checked_part(saved, "rng", dict, path))
            run = checked_part(saved, "run", dict, path)
            return Progress(**run)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path}: its run state is damaged ({exc})") from None
