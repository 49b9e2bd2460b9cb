"""TensorBoard scalars of a run, plotted against samples seen.

Steps mean little when the batch changes, so every scalar's step is the cumulative
number of training samples. Groups: ``train/``, ``eval/``, ``batch/``, ``curvature/``.
Needs the ``tensorboard`` package (``pip install tensorboard``, part of the dev extras).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from largebatch.errors import UsageError

__all__ = ["ScalarLog", "SCALARS"]

#: record key -> TensorBoard tag
SCALARS: dict[str, str] = {
    "train_loss": "train/loss",
    "train_acc": "train/accuracy",
    "test_loss": "eval/loss",
    "test_acc": "eval/accuracy",
    "batch_size": "batch/size",
    "lr": "batch/lr",
    "adv_ratio": "batch/adversarial_fraction",
    "updates": "batch/updates",
    "eigenvalue": "curvature/top_eigenvalue",
    "eig_matvecs": "curvature/products",
    "eig_s": "curvature/seconds",
    "stability": "curvature/stability_ratio",
    "gns": "batch/noise_scale",
}


class ScalarLog:
    """Writes each epoch's record (and each batch change inside it) to ``folder``."""

    def __init__(self, folder: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError(
                "tensorboard: true needs the tensorboard package; pip install tensorboard"
            ) from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, record: Mapping[str, Any]) -> None:
        step = int(record["samples"])
        for point in (record.get("points") or ())[:-1]:  # decision points inside the epoch
            at = int(point["samples"])
            self.writer.add_scalar("batch/size", point["batch_size"], at)
            self.writer.add_scalar("batch/lr", point["lr"], at)
            if point.get("gns") is not None:
                self.writer.add_scalar("batch/noise_scale", point["gns"], at)
        for key, tag in SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
