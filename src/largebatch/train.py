"""The recipe behind ``largebatch train``: names to objects, then the engine.

:func:`train` loads the dataset and builds the model that the config names (built-in
names, or ``package.module:callable`` paths to your own code), then runs
:func:`largebatch.engine.run`, the loop that :func:`largebatch.fit` runs too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F

from largebatch.config import TrainConfig
from largebatch.data import DataSource, load_dataset
from largebatch.distributed import setup
from largebatch.engine import (
    RUN_FILES,
    TABLE_HEADER,
    Parts,
    RunState,
    TrainingInterrupted,
    evaluate,
    resolve_device,
    run,
    run_folder,
    seed_everything,
)
from largebatch.models import build_model

__all__ = [
    "train",
    "evaluate",
    "resolve_device",
    "model_spec",
    "RunState",
    "TrainingInterrupted",
    "RUN_FILES",
    "TABLE_HEADER",
]


def model_spec(config: TrainConfig, data: DataSource) -> dict[str, Any]:
    """What :func:`largebatch.models.build_model` needs to rebuild the model from a checkpoint."""
    return {
        "name": config.model,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "mean": list(data.mean),
        "std": list(data.std),
    }


def train(
    config: TrainConfig,
    *,
    show_progress: bool | None = None,
    echo: Callable[[str], None] | None = print,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train as ``config`` says, writing results to ``config.out``; return the summary.

    ``stop_after`` ends the call after that many epochs of this call (checkpoint saved,
    no summary written), as an interruption at an epoch boundary would; ``resume``
    continues. Useful for time-sliced jobs and for testing exact resume.

    ``show_progress`` (default: when stderr is a terminal) shows a progress bar per epoch;
    ``echo`` receives the table of epochs, one line each (None for silence).
    """
    config.validate()
    world, device_name = setup(config.device)
    # Rank 0 holds the run folder's lock for the whole run, so that a second process on
    # the same --out is refused before it reads any data.
    with run_folder(config.out, world, config.resume):
        seed_everything(config.seed)
        data = load_dataset(
            config.dataset,
            config.data_dir,
            augment=config.augment,
            seed=config.seed,
            limit_train=config.limit_train,
            limit_test=config.limit_test,
            image_size=config.image_size,
        )
        spec = model_spec(config, data)
        model = build_model(**spec)
        parts = Parts(model=model, data=data, loss_fn=F.cross_entropy, spec=spec)
        return run(
            config,
            parts,
            world,
            device_name,
            show_progress=show_progress,
            echo=echo,
            stop_after=stop_after,
        )
