"""PNG figures: one place that picks matplotlib's file backend and writes a figure
atomically (a crash never leaves half a PNG where a good one was)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from largebatch.io import atomic_write

__all__ = ["pyplot", "save"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed); imported on first use,
    since matplotlib is slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG (atomically) and close it."""
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png"))
    pyplot().close(fig)
