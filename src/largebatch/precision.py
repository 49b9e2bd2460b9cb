"""Mixed precision: autocast contexts and fp16 loss scaling.

``fp32`` runs everything in float32. ``bf16`` and ``fp16`` run the forward pass and the
loss under :func:`torch.autocast` (matrix products and convolutions in the low precision,
reductions in float32); the weights, the optimizer state and the gradients stay float32.
``fp16`` has a narrow exponent range, so its loss is scaled before the backward pass
(:class:`torch.amp.GradScaler`), and an update whose gradient overflowed is skipped while
the scale comes down. Hessian-vector products never run under autocast: the curvature
estimates stay in float32 whatever the training precision.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

__all__ = ["DTYPES", "autocast", "make_scaler", "tf32"]

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16; None for the other precisions, which need none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


@contextlib.contextmanager
def tf32(enabled: bool | None) -> Iterator[None]:
    """TF32 in CUDA float32 matrix products and convolutions on (True) or off (False)
    while the block runs; None, or no CUDA, leaves torch's settings alone.

    On Ampere and later GPUs cuDNN runs float32 convolutions in TF32 by default (10-bit
    mantissa, about 1e-3 relative error per product). With it off, CUDA computes in IEEE
    float32 and differs from the CPU by summation order only.
    """
    if enabled is None or not torch.cuda.is_available():
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():  # newer torch prefers fp32_precision; both still work
        warnings.simplefilter("ignore")
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.allow_tf32, cudnn.allow_tf32 = saved
