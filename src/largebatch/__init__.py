"""largebatch: large-batch training with adaptive batch size, Hessian analysis and robustness."""

__version__ = "0.1.0"
__all__ = ["__version__"]
