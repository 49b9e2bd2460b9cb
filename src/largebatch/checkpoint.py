"""One atomic checkpoint holds everything needed to resume exactly or to evaluate.

The file is a ``torch.save`` dictionary tagged with a format name and version; it is
written to a temporary file and renamed, so an interrupted save never replaces a good
checkpoint with a broken one. :class:`RunCheckpoint` is a run's checkpoint: the named
objects that make up its state, saved and restored together.

A sharded model (``parallel: fsdp``, ``fsdp_checkpoint: sharded``) is saved through
``torch.distributed.checkpoint`` (DCP): every rank writes its own shards of the model and
the optimizer into a new folder under ``checkpoint.shards/`` beside the file, then rank 0
writes the file, which names that folder (its ``shards`` entry; ``model`` and
``optimizer`` are None in it), and removes the folders it no longer names. The file is
still the one thing replaced atomically: a crash mid-save leaves the previous file and
the folder it names. :func:`load_checkpoint` reads the shards back whole, in one
process's layout (the optimizer's state by parameter index), for anything that reads a
checkpoint; a run that resumes loads them through DCP into its own objects instead, so
it resumes at any world size, sharded or not (:func:`load_shards`).
"""

from __future__ import annotations

import io
import math
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from largebatch.checks import plain
from largebatch.errors import CheckpointError, DivergedError, UsageError
from largebatch.io import atomic_write
from largebatch.parallel import resharded

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
    "SHARDS",
    "save_shards",
    "load_shards",
    "read_shards",
]

FORMAT = "largebatch-checkpoint"
# terminal colour codes, which torch puts into some of its messages
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
VERSION = 1
#: the folder beside a checkpoint file that holds its sharded state (one folder per save)
SHARDS = "checkpoint.shards"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors, numbers, plain containers) atomically to ``path``."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", shards: bool = True
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; anything else is a
    CheckpointError. A sharded one's ``model`` and ``optimizer`` are read whole from its
    folder (:func:`read_shards`) unless ``shards`` is False."""
    state = _load_file(Path(path), map_location)
    if shards and state.get("shards") is not None:
        folder = _shard_folder(Path(path), state)
        state["model"], optimizer = read_shards(folder, map_location)
        if optimizer is not None:  # (otherwise the file holds it: a state without tensors)
            state["optimizer"] = optimizer
    return state


def _shard_folder(path: Path, state: Mapping[str, Any]) -> Path:
    """The folder that the checkpoint file ``path`` names for its shards (checked: a
    folder of :data:`SHARDS` beside it)."""
    name = state.get("shards")
    parts = Path(name).parts if isinstance(name, str) else ()
    if len(parts) != 2 or parts[0] != SHARDS or parts[1] in ("..", "."):
        raise CheckpointError(f"checkpoint {path} names shards {name!r}, not a folder of {SHARDS}")
    folder = path.parent / name
    if not (folder / ".metadata").is_file():
        raise CheckpointError(
            f"checkpoint {path} is sharded, but its shards {folder} are missing or incomplete"
        )
    return folder


def save_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of ``model``'s state and ``optimizer``'s (unless it
    has none yet: before its first step, nothing to shard) to the new ``folder`` through
    DCP (a collective; when it returns on rank 0, every rank's part and the metadata are
    written)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(resharded(model))}
    if optimizer.state:  # (torch would take a step at LR 0 to make one: not before ours)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=folder)


def load_shards(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    """Load a sharded checkpoint's ``folder`` into ``model`` and ``optimizer`` (None: the
    checkpoint holds no optimizer state), sharded or not and at any world size (DCP
    reads each rank's part; a collective under torchrun)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    resharded(model)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:  # (a fresh optimizer's state made first, at LR 0, then replaced)
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():  # one process: DCP says it assumes so
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=folder)
    except Exception as exc:  # a missing key or a shape that does not match
        reason = _ANSI.sub("", str(exc)).strip().splitlines()
        raise CheckpointError(
            f"checkpoint shards {folder} do not fit this model and optimizer "
            f"({(reason or [type(exc).__name__])[0][:200]})"
        ) from None
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def read_shards(
    folder: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A sharded checkpoint's model state (by name) and optimizer state (by parameter
    index, as one process's ``optimizer.state_dict()`` has it; None when the folder
    holds none), whole, in this process alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    try:
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(folder),
            planner=_EmptyStateDictLoadPlanner(),
            no_dist=True,
        )
    except Exception as exc:
        reason = _ANSI.sub("", str(exc)).strip().splitlines()
        raise CheckpointError(
            f"checkpoint shards {folder} cannot be read "
            f"({(reason or [type(exc).__name__])[0][:200]})"
        ) from None
    model = {k: v.to(map_location) if isinstance(v, torch.Tensor) else v
             for k, v in state.get("model", {}).items()}  # fmt: skip
    optimizer = state.get("optimizer")
    return model, _by_index(optimizer, map_location) if optimizer is not None else None


def _by_index(state: Mapping[str, Any], map_location: Any) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (DCP's) keyed by index instead, in
    the order of the parameter groups, as ``optimizer.state_dict()`` gives it."""
    groups, index = [], {}
    for group in state.get("param_groups", []):
        names = list(group.get("params", []))
        for name in names:
            index[name] = len(index)
        groups.append({**group, "params": [index[name] for name in names]})
    entries = {
        index[name]: {
            key: value.to(map_location) if isinstance(value, torch.Tensor) else value
            for key, value in entry.items()
        }
        for name, entry in state.get("state", {}).items()
        if name in index
    }
    return {"state": dict(sorted(entries.items())), "param_groups": groups}


def _load_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """The checkpoint file itself, checked as ours (a sharded one's shards not read)."""
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


def _finite_shards(model: torch.nn.Module, world: Any) -> bool:
    """Whether every floating-point tensor of the model's state is finite on every rank
    (each rank looks at its shards; a collective under torchrun)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in model.state_dict().values()]
    bad = sum(int(not torch.isfinite(t).all()) for t in local if t.is_floating_point())
    if world.enabled:
        import torch.distributed as dist

        flag = torch.tensor([float(bad)], device=next(model.parameters()).device)
        dist.all_reduce(flag)
        bad = int(flag.item())
    return bad == 0


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
        """Save ``objects`` and ``progress`` (rank 0 writes the file). The last good
        checkpoint is never replaced by non-finite weights: that is a DivergedError. A
        sharded state (``collective``, :class:`largebatch.parallel.FSDP`) is gathered by
        every rank first, or, with ``sharded`` true in ``objects`` and a path, written
        sharded: every rank writes its part of ``live`` (the model and the optimizer
        themselves) through DCP (see the module's docstring)."""
        if objects.get("sharded") and self.path is not None:
            self._save_sharded(objects, progress)
            return
        for obj in objects.values():
            if getattr(obj, "collective", False):
                obj.gather()
        # every rank holds the same weights (or, gathered, the same whole state): every
        # rank raises, so that all stop or roll back together
        if not all_finite(objects["model"]):
            raise DivergedError(
                f"the weights became non-finite in epoch {progress.epoch + 1}; lower --lr"
            )
        if not self.world.is_main:
            return
        payload = {
            **self.extra,
            "model": objects["model"].state_dict(),
            **self.check(objects),
            **self._run_state(objects, progress),
        }
        if self.path is not None:
            save_checkpoint(self.path, payload)
            self._prune(None)
        else:
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            self._memory = buffer.getvalue()

    def _run_state(self, objects: Mapping[str, Any], progress: Any) -> dict[str, Any]:
        scaler = objects.get("scaler")
        return {
            "scaler": scaler.state_dict() if scaler is not None else None,
            "run": vars(progress),
            "rng": rng_state(),
        }

    def _save_sharded(self, objects: Mapping[str, Any], progress: Any) -> None:
        """Every rank: its shards into a new folder; then rank 0: the file naming it,
        and the folders it no longer names removed."""
        assert self.path is not None
        model, optimizer = objects["live"]
        resharded(model)  # an evaluation left the root's parameters gathered
        if not _finite_shards(model, self.world):  # every rank raises
            raise DivergedError(
                f"the weights became non-finite in epoch {progress.epoch + 1}; lower --lr"
            )
        name = f"{progress.epoch:04d}-{progress.updates:08d}-{secrets.token_hex(4)}"
        if self.world.enabled:  # rank 0's name on every rank
            import torch.distributed as dist

            holder = [name]
            dist.broadcast_object_list(holder, src=0)
            name = holder[0]
        save_shards(self.path.parent / SHARDS / name, model, optimizer)
        if not self.world.is_main:
            return
        payload = {
            **self.extra,
            "model": None,
            "optimizer": None,
            "shards": f"{SHARDS}/{name}",
            **self.check(objects),
            **self._run_state(objects, progress),
        }
        save_checkpoint(self.path, payload)
        self._prune(name)

    def _prune(self, keep: str | None) -> None:
        """Remove the shard folders beside the file other than ``keep`` (the one it names:
        earlier saves' and any that a crash left half-written)."""
        assert self.path is not None
        folder = self.path.parent / SHARDS
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            if entry.name != keep and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    def check(self, objects: Mapping[str, Any]) -> dict[str, Any]:
        """The optimizer's, the controller's and the meters' states as plain data (so that
        the file loads with ``weights_only``: a user's hyper-parameter given as a NumPy
        number is saved as a Python one); a state holding anything else is refused, naming
        it. Call it before a run writes anything. A sharded save leaves the optimizer out
        (its shards go through DCP)."""
        name = type(objects["controller"]).__name__
        optimizer = objects["optimizer"]
        if objects.get("sharded") and self.path is not None:
            # its shards go through DCP; before its first step, the file holds it
            optimizer = objects["live"][1]
            if optimizer.state:
                optimizer = None
        return {
            "optimizer": None
            if optimizer is None
            else plain(
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
            return load_checkpoint(self.path, map_location="cpu", shards=False)
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
        if saved.get("shards") is not None and self.path is not None:  # each rank its part
            model, optimizer = objects.get("live") or (objects["model"], objects["optimizer"])
            in_file = saved.get("optimizer")  # no state yet: in the file
            folder = _shard_folder(self.path, saved)
            load_shards(folder, model, optimizer if in_file is None else None)
            if in_file is not None:
                load_part(objects["optimizer"], checked_part(saved, "optimizer", dict, path),
                          path, "optimizer state")  # fmt: skip
        else:
            load_part(
                objects["model"], checked_part(saved, "model", dict, path), path,
                "model weights",
            )  # fmt: skip
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
