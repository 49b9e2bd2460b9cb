"""Ctrl-C during start-up: held, then raised where it is safe.

A KeyboardInterrupt raised at an arbitrary point of start-up can land in the middle of
an import or a torch call: a library's broad ``except`` may swallow it (the run then goes
on), or it is thrown through a pybind11 callback, which aborts the process. While
:func:`hold_interrupts` is active, SIGINT is only noted; :func:`raise_if_held` raises
it as KeyboardInterrupt at a point the caller chose. The training loop installs its own
handler (stop after the current update) and calls :func:`raise_if_held` first.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["hold_interrupts", "raise_if_held"]

_held: list[int] = []


@contextlib.contextmanager
def hold_interrupts() -> Iterator[None]:
    """Note SIGINT instead of raising it inside the block; raise it when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: _held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    raise_if_held()


def raise_if_held() -> None:
    """Raise KeyboardInterrupt if a SIGINT was held."""
    if _held:
        _held.clear()
        raise KeyboardInterrupt
