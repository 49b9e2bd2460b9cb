"""largebatch: large-batch training with adaptive batch size, Hessian analysis and robustness.

``largebatch.fit(model, train_data, ...)`` trains your own objects with the shared loop
(see :func:`largebatch.train.fit`); it is imported on first use, so ``import largebatch``
stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "fit"]


def __getattr__(name: str) -> Any:
    if name == "fit":
        from largebatch.train import fit

        return fit
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")
