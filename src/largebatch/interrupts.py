"""Ctrl-C during start-up: held, then raised where it is safe.

A KeyboardInterrupt raised at an arbitrary point of start-up can land in the middle of
an import or a torch call: a library's broad ``except`` may swallow it (the run then goes
on), or it is thrown through a pybind11 callback, which aborts the process. While
:func:`hold_interrupts` is active, SIGINT is only noted; :func:`raise_if_held` raises
it as KeyboardInterrupt at a point the caller chose. The recipe then enters a
:class:`StopFlag` (stop after the current update), which calls :func:`raise_if_held`
first; the training loop polls it.

The user's own code (a ``--model``/``--dataset`` module imported and called during
start-up) runs under :func:`deliver_interrupts`: there Ctrl-C raises at once, so an
import that hangs can still be stopped.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["hold_interrupts", "deliver_interrupts", "raise_if_held", "StopFlag"]

_held: list[int] = []


def _note(signum: int, _frame: object) -> None:
    _held.append(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def hold_interrupts() -> Iterator[None]:
    """Note SIGINT instead of raising it inside the block; raise it when the block ends."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    raise_if_held()


@contextlib.contextmanager
def deliver_interrupts() -> Iterator[None]:
    """Inside a :func:`hold_interrupts` block: let SIGINT raise KeyboardInterrupt at once
    in this block (a SIGINT held already is raised on entry), and hold it again after.

    Elsewhere (no hold active, another handler installed, another thread) it changes
    nothing.
    """
    if not _in_main_thread() or signal.getsignal(signal.SIGINT) is not _note:
        yield
        return
    raise_if_held()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, _note)


def raise_if_held() -> None:
    """Raise KeyboardInterrupt if a SIGINT was held."""
    if _held:
        _held.clear()
        raise KeyboardInterrupt


class StopFlag:
    """SIGINT and SIGTERM as a stop request (a context manager): the training loop polls
    :meth:`requested` and stops after the update in progress. A second signal stops at
    once (KeyboardInterrupt). Entering raises a Ctrl-C held during start-up, before
    anything is written."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def requested(self) -> str | None:
        """The name of the signal that asked to stop (``"SIGTERM"``), or None."""
        return None if self.signal is None else signal.Signals(self.signal).name

    def __enter__(self) -> StopFlag:
        raise_if_held()  # a Ctrl-C during start-up: stop before anything is written
        if _in_main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
