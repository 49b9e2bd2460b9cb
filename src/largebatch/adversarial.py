"""L-infinity attacks: FGSM and PGD.

Both run the model in eval mode (batch-norm statistics untouched) and restore its mode on
return; gradients are taken with respect to the inputs only, so the parameters' ``.grad``
fields are left as they were. Budgets are in raw input units (images in [0, 1]).

``clamp`` is the valid input range ``(low, high)``, ``None`` for unbounded inputs, or
``"batch"`` for the reference code's behaviour: clamp to the min and max of the batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from largebatch import checks
from largebatch.errors import InvalidTypeError, InvalidValueError, UsageError

#: why a batch whose inputs are a dict of tensors gets no adversarial examples
NOT_ONE_TENSOR = (
    "adversarial examples (adversarial, method absa) perturb inputs that are one tensor; "
    "this data's inputs are a dict of tensors"
)

__all__ = ["fgsm", "pgd", "eval_mode", "AdversarialShare"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Clamp = tuple[float, float] | Literal["batch"] | None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, then restore each module's own mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _bounds(x: torch.Tensor, clamp: Clamp) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    if clamp is None:
        return -torch.inf, torch.inf
    if clamp == "batch":
        return x.min(), x.max()
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
        raise InvalidTypeError(f"clamp must be (low, high), 'batch' or None, got {clamp!r}")
    low, high = (checks.number(v, "clamp", f"clamp[{i}]") for i, v in enumerate(clamp))
    if not low <= high:
        raise InvalidValueError(f"clamp must be (low, high) with low <= high, got {clamp!r}")
    return low, high


def _input_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    loss_fn: LossFn | None = None,
    clamp: Clamp = (0.0, 1.0),
) -> torch.Tensor:
    """Fast gradient sign method: ``clamp(x + eps * sign(grad_x loss))``, detached."""
    eps = checks.number(eps, "fgsm", "eps", low=0.0)
    loss_fn = loss_fn or F.cross_entropy
    low, high = _bounds(x, clamp)
    with eval_mode(model):
        grad = _input_gradient(model, x, y, loss_fn)
    return torch.clamp(x.detach() + eps * grad.sign(), low, high).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    loss_fn: LossFn | None = None,
    clamp: Clamp = (0.0, 1.0),
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball of radius ``eps`` around ``x``.

    ``steps`` signed-gradient steps of size ``alpha``, each projected back into the ball
    and the valid range; ``random_start`` begins from a uniform point in the ball.
    """
    eps = checks.number(eps, "pgd", "eps", low=0.0)
    alpha = checks.number(alpha, "pgd", "alpha", low=0.0)
    steps = checks.integer(steps, "pgd", "steps", minimum=1)
    loss_fn = loss_fn or F.cross_entropy
    low, high = _bounds(x, clamp)
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        x_adv = x_adv + (2 * noise.to(x.device) - 1) * eps
        x_adv = torch.clamp(x_adv, low, high)
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_gradient(model, x_adv, y, loss_fn)
            x_adv = x_adv + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            x_adv = torch.clamp(x_adv, low, high).detach()
    return x_adv


class AdversarialShare:
    """Which samples of a micro-batch are replaced by attacked ones (ABSA), and how.

    Called as ``share(model, x, y, ratio, loss_fn)``: the first ``round(ratio * len(x))``
    samples are replaced by their attacked versions. As in the reference code, nothing is
    replaced while ``ratio * len(x) < 1``. The attack runs in eval mode, so batch-norm
    statistics only ever see the training batch.

    Args:
        attack: ``fgsm`` or ``pgd`` (``steps`` steps of ``2.5 * eps / steps``).
        eps: L-inf budget in raw input units (0: nothing is replaced).
        steps: PGD steps.
        clamp: the valid input range ``(low, high)``, None for no clamp, or ``"batch"``
            for the min and max of the whole micro-batch (as the reference code does).
    """

    def __init__(
        self,
        attack: str = "fgsm",
        eps: float = 0.005,
        steps: int = 3,
        clamp: tuple[float, float] | str | None = None,
    ) -> None:
        if attack not in ("fgsm", "pgd"):
            raise InvalidValueError(f"AdversarialShare: attack must be fgsm or pgd, not {attack!r}")
        self.attack, self.clamp = attack, clamp
        self.eps = checks.number(eps, "AdversarialShare", "eps", low=0.0)
        self.steps = checks.integer(steps, "AdversarialShare", "steps", minimum=1)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        ratio: float,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            if ratio > 0 and self.eps > 0:
                raise UsageError(NOT_ONE_TENSOR)
            return x
        count = round(ratio * len(x))
        if ratio * len(x) < 1 or count < 1 or self.eps == 0:
            return x
        # The reference clamps to the min and max of the whole batch, not of the attacked part.
        clamp = (x.min().item(), x.max().item()) if self.clamp == "batch" else self.clamp
        head_x, head_y = x[:count], y[:count]
        if self.attack == "pgd":
            attacked = pgd(
                model,
                head_x,
                head_y,
                self.eps,
                2.5 * self.eps / self.steps,
                self.steps,
                loss_fn=loss_fn,
                clamp=clamp,
            )
        else:
            attacked = fgsm(model, head_x, head_y, self.eps, loss_fn, clamp=clamp)
        return torch.cat([attacked, x[count:]])
