"""Code named by import path: ``package.module:callable``, as given to ``--model`` and
``--dataset``.

:func:`load_callable` imports and resolves such a name; :func:`call_with_accepted` calls it
with the keyword arguments its signature takes. Both run the user's code with Ctrl-C
delivered and turn its failures into one-line :class:`~largebatch.errors.UserCodeError`.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Any

from largebatch.errors import UsageError, UserCodeError
from largebatch.interrupts import deliver_interrupts
from largebatch.source import user_failures as _failures

__all__ = ["load_callable", "call_with_accepted"]


def load_callable(path: str, what: str) -> Callable[..., Any]:
    """The callable named ``package.module:attribute`` (``what`` names it in errors).

    The current folder is searched first, as ``python -m`` would. The import runs with
    Ctrl-C delivered (see :func:`largebatch.interrupts.deliver_interrupts`); any failure
    in it is a one-line UserCodeError.
    """
    module_name, _, attribute = str(path).partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{what} {path!r} must look like package.module:callable")
    if "" not in sys.path:
        sys.path.insert(0, "")
    with deliver_interrupts(), _failures(f"{what} {path!r}: importing {module_name!r}"):
        try:
            target: Any = importlib.import_module(module_name)
        except ImportError as exc:
            raise UserCodeError(f"{what} {path!r}: cannot import {module_name!r} ({exc})") from None
    with deliver_interrupts(), _failures(f"{what} {path!r}: reading {attribute!r}"):
        for part in attribute.split("."):
            if not hasattr(target, part):
                raise UserCodeError(
                    f"{what} {path!r}: {module_name!r} has no attribute {attribute!r}"
                )
            target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{what} {path!r} is a {type(target).__name__}, not a callable")
    return target


def call_with_accepted(function: Callable[..., Any], what: str, **offered: Any) -> Any:
    """Call ``function`` with those of ``offered`` that its signature accepts.

    The call runs with Ctrl-C delivered; any failure inside the user's code (an
    exception, ``sys.exit``) becomes a one-line UserCodeError naming ``what``.
    """
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    chosen = {k: v for k, v in offered.items() if takes_any or k in parameters}
    with deliver_interrupts(), _failures(what):
        return function(**chosen)
