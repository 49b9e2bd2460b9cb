"""TensorBoard scalars of a run, plotted against samples seen.

Steps mean little when the batch changes, so every scalar's step is the cumulative
number of training samples. Groups: ``train/``, ``eval/``, ``batch/``, ``curvature/``.
Needs the ``tensorboard`` package (``pip install tensorboard``, part of the dev extras).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from largebatch.errors import UsageError
from largebatch.outputs import describe_os_error, probe_writable

__all__ = ["ScalarLog", "SCALARS"]

#: record key -> TensorBoard tag
SCALARS: dict[str, str] = {
    "train_loss": "train/loss",
    "train_acc": "train/accuracy",
    "test_loss": "eval/loss",
    "test_acc": "eval/accuracy",
    "test_bits": "eval/bits_per_token",
    "tokens": "batch/tokens",
    "batch_size": "batch/size",
    "lr": "batch/lr",
    "adv_ratio": "batch/adversarial_fraction",
    "updates": "batch/updates",
    "eigenvalue": "curvature/top_eigenvalue",
    "eig_matvecs": "curvature/products",
    "eig_s": "curvature/seconds",
    "stability": "curvature/stability_ratio",
    "gns": "batch/noise_scale",
    "gns_preconditioned": "batch/noise_scale_preconditioned",
}


class ScalarLog:
    """Writes each epoch's record (and each batch change inside it) to ``folder``.

    A folder that cannot be written is a one-line UsageError, found before the writer
    starts; a write that fails later is one too, raised by the next :meth:`epoch` (the
    writer's own thread stays silent: its error is raised here).
    """

    def __init__(self, folder: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError(
                "tensorboard: true needs the tensorboard package; pip install tensorboard"
            ) from None
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise UsageError(
                f"tensorboard folder {self.folder} is a file; move it away or set "
                "tensorboard: false"
            )
        with self._errors():
            self.folder.mkdir(parents=True, exist_ok=True)
            probe_writable(self.folder)
            _silence_writer_threads()
            self.writer = SummaryWriter(log_dir=str(self.folder))

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """An OSError on the folder (or raised by the writer's thread) as one line."""
        try:
            yield
        except OSError as exc:
            if isinstance(exc.filename, bytes):  # TensorBoard names its files in bytes
                exc.filename = os.fsdecode(exc.filename)
            subject = f"tensorboard folder {self.folder}"
            raise UsageError(describe_os_error(exc, subject)) from None

    def epoch(self, record: Mapping[str, Any]) -> None:
        step = int(record["samples"])
        with self._errors():
            for point in (record.get("points") or ())[:-1]:  # decision points in the epoch
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
        with self._errors():
            self.writer.flush()  # raises what the writer's thread failed with
            self.writer.close()

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the error under way is the one to report
            self.writer.close()


def _silence_writer_threads() -> None:
    """Keep the tracebacks of TensorBoard's writer threads off stderr: such a thread keeps
    its exception, and the writer raises it in the main thread at the next write or flush
    (see :class:`ScalarLog`). Other threads' errors are printed as before."""
    from tensorboard.summary.writer import event_file_writer

    writer_thread = getattr(event_file_writer, "_AsyncWriterThread", None)
    previous = threading.excepthook
    if writer_thread is None or getattr(previous, "largebatch_silences", None) is writer_thread:
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.thread, writer_thread):
            previous(args)

    hook.largebatch_silences = writer_thread  # type: ignore[attr-defined]
    threading.excepthook = hook
