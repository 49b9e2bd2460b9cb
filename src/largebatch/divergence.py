"""What happens when training diverges: stop, or roll back and lower the LR.

A non-finite loss, gradient or weight raises :class:`~largebatch.errors.DivergedError`.
Without a :class:`Rollback` the run stops there. With one, the run restores its last
checkpoint and multiplies the LR by ``factor`` from then on, at most ``max_rollbacks``
times; what happened is kept in the progress (``rollbacks``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from largebatch import checks
from largebatch.errors import DivergedError

__all__ = ["Rollback"]


class Rollback:
    """Restore the last checkpoint after a divergence, with the LR times ``factor``."""

    def __init__(self, factor: float = 0.5, max_rollbacks: int = 3) -> None:
        self.factor = checks.number(factor, "Rollback", "factor", low=0.0, high=1.0, low_open=True)
        self.max_rollbacks = checks.integer(max_rollbacks, "Rollback", "max_rollbacks", minimum=0)

    def allows(self, progress: Any) -> bool:
        """Whether a divergence now may roll back (fewer than ``max_rollbacks`` so far)."""
        return len(progress.rollbacks) < self.max_rollbacks

    def recover(
        self,
        error: DivergedError,
        progress: Any,
        restore: Callable[[], Any],
        echo: Callable[[str], None],
    ) -> Any:
        """The progress restored by ``restore()``, with the rollback noted and the LR
        scale lowered."""
        rollbacks = [
            *progress.rollbacks,
            {"epoch": progress.epoch + 1, "update": progress.updates + 1, "reason": str(error)},
        ]
        restored = restore()
        restored.rollbacks = rollbacks
        restored.lr_scale = progress.lr_scale * self.factor
        echo(
            f"diverged ({error}); rolled back to epoch {restored.epoch} sample "
            f"{restored.position}, LR scale now {restored.lr_scale:g}"
        )
        return restored
