"""Helpers shared by the tests (imported as ``helpers``: pytest puts tests/ on sys.path)."""

import signal
import sys
from collections.abc import Callable

import torch


def without_times(records: list[dict]) -> list[dict]:
    """Metrics records without the wall-clock fields, which differ between equal runs."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def with_alarm(build: Callable[..., torch.nn.Module], count: int, signum: int = signal.SIGTERM):
    """Wrap a model builder: the model raises ``signum`` at its ``count``-th training forward."""

    def build_with_alarm(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = [0]

        def hook(module, inputs, output):
            if module.training:
                calls[0] += 1
                if calls[0] == count:
                    signal.raise_signal(signum)

        model.register_forward_hook(hook)
        return model

    return build_with_alarm


def cli_train(out, *flags: str) -> list[str]:
    """``python -m largebatch train --device cpu --out OUT FLAGS...``"""
    return [
        sys.executable,
        "-m",
        "largebatch",
        "train",
        "--device",
        "cpu",
        "--out",
        str(out),
        *flags,
    ]
