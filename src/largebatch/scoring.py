"""Loss and accuracy: does the model fit the data, the running sums of an epoch, and the
evaluation pass.

- :func:`check_parameters` and :func:`check_fits` run before any work: what would crash
  or go wrong later (a model with nothing to train, outputs that are not one tensor,
  labels beyond the output width, non-finite outputs, a detached loss) is one line here.
- :class:`RunningScore` keeps an epoch's loss and correct-prediction sums on the device
  (no synchronisation per update).
- :func:`score` is the evaluation pass: mean loss and accuracy in eval mode, sums
  all-reduced under torchrun.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from largebatch import inputs
from largebatch.accumulate import to_device
from largebatch.distributed import World, all_reduce_
from largebatch.errors import UsageError
from largebatch.feed import Feed, loaded
from largebatch.inputs import Inputs
from largebatch.precision import autocast
from largebatch.source import DataSource, is_classification

__all__ = ["LossFn", "Fit", "check_parameters", "check_fits", "RunningScore", "score"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_parameters(model: nn.Module) -> None:
    """Something to train, and not on the meta device (before any work)."""
    params = list(model.parameters())
    if not params:
        raise UsageError(f"the model ({type(model).__name__}) has no parameters: nothing to train")
    if not any(p.requires_grad for p in params):
        raise UsageError(
            "every parameter of the model is frozen (requires_grad=False): nothing to train"
        )
    if any(t.is_meta for t in (*params, *model.buffers())):
        raise UsageError(
            "the model is on the meta device (no values yet); materialize it first, e.g. "
            "model.to_empty(device='cpu') and initialise its weights"
        )
    state = model.state_dict().values()
    if not all(bool(torch.isfinite(t).all()) for t in state if t.is_floating_point()):
        raise UsageError(
            "the model's weights or buffers hold NaN or infinity before training; check "
            "its initialisation"
        )


class Fit(NamedTuple):
    """What :func:`check_fits` found out about a model on its data."""

    accuracy: bool  # integer labels and (batch, classes) logits: accuracy applies
    needs_pairs: bool  # a batch norm sees one value per channel and sample
    tensor_inputs: bool = True  # one tensor of inputs (not a dict): what the attacks take


def check_fits(model: nn.Module, loss_fn: LossFn, data: DataSource, device: torch.device) -> Fit:
    """Run the model and the loss on a few training samples (eval mode): the first two and
    those with the extreme labels, then one test sample. What would crash or go wrong
    later fails here with one line: a model or loss that does not fit the data, labels
    beyond the output width, outputs that the loss cannot take, non-finite outputs or
    loss, a loss that no parameter's gradient reaches. Outputs that are not one tensor (a
    dict, a tuple, a Hugging Face ``ModelOutput``) reach ``loss_fn`` as they are.

    Returns whether accuracy applies (integer labels and ``(batch, classes)`` logits with
    an output for every label), and whether a batch-norm layer sees one value per channel
    and sample (``BatchNorm1d`` on ``(batch, features)``): in training mode that layer
    fails on a batch of one sample."""
    rows = _check_rows(data.train_y)
    x, y = loaded(data.train_x[rows], data.train_y[rows])
    x, y = to_device(x, device), y.to(device)
    classes = is_classification(data.train_y)
    was_training = model.training
    model.eval()
    single_values: list[bool] = []
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, inputs: single_values.append(inputs[0].shape[2:].numel() == 1)
        )
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    try:
        outputs, loss = _run_user_model(model, loss_fn, x, y, grad=True)
        for hook in hooks:
            hook.remove()
        _check_outputs(outputs, loss)
        if not loss.requires_grad:
            raise UsageError(
                "the loss does not depend on the model's parameters (detached, or computed "
                "under torch.no_grad?); nothing would be trained"
            )
        trainable = [p for p in model.parameters() if p.requires_grad]
        # a sharded model's parameters (DTensors) are not in the graph that autograd.grad
        # walks (FSDP reduce-scatters into them after a backward): not checked there
        sharded = any(hasattr(p, "device_mesh") for p in trainable)
        grads = [] if sharded else torch.autograd.grad(loss, trainable, allow_unused=True)
        if not sharded and all(g is None for g in grads):
            raise UsageError("no parameter of the model gets a gradient from the loss")
        if len(data.test_y):
            test_rows = _check_rows(data.test_y)[-1:]
            x_test, y_test = loaded(data.test_x[test_rows], data.test_y[test_rows])
            x_test, y_test = to_device(x_test, device), y_test.to(device)
            _check_outputs(*_run_user_model(model, loss_fn, x_test, y_test, False, "test"), "test")
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    accuracy = (
        classes
        and isinstance(outputs, torch.Tensor)
        and outputs.ndim == 2
        and len(outputs) == len(y)
        and data.num_classes <= outputs.shape[1]
    )
    return Fit(accuracy, any(single_values), isinstance(x, torch.Tensor))


def _check_rows(labels: Any) -> torch.Tensor:
    """The first two samples, and for class labels in memory those with the smallest and
    largest (a Dataset's labels are not known before its items are read)."""
    rows = list(range(min(2, len(labels))))
    if isinstance(labels, torch.Tensor) and is_classification(labels) and len(labels) > 2:
        rows += [int(labels.argmin()), int(labels.argmax())]
    return torch.tensor(rows)


def _run_user_model(
    model: nn.Module,
    loss_fn: LossFn,
    x: Inputs,
    y: torch.Tensor,
    grad: bool,
    split: str = "training",
) -> tuple[torch.Tensor, Any]:
    """``model(x)`` and ``loss_fn(outputs, y)``; what fails in them is one line."""
    with torch.set_grad_enabled(grad):
        outputs = _user_call(lambda: inputs.run(model, x), x, y, split)
        if not isinstance(outputs, torch.Tensor) and loss_fn is F.cross_entropy:
            raise UsageError(
                f"the model returns a {type(outputs).__name__}, not one tensor, and the "
                "default loss (cross-entropy) takes logits; pass a loss_fn that takes what "
                "it returns (e.g. lambda out, y: F.cross_entropy(out['logits'], y))"
            )
        logits = isinstance(outputs, torch.Tensor) and outputs.ndim == 2
        if logits and loss_fn is F.cross_entropy and is_classification(y):
            top = int(y.max())  # cross-entropy reads an output per class
            if top >= outputs.shape[1]:
                raise UsageError(
                    f"the labels go up to {top}, but the model gives {outputs.shape[1]} outputs "
                    f"per sample; it needs at least {top + 1} (one per class)"
                )
        return outputs, _user_call(lambda: loss_fn(outputs, y), x, y, split)


def _user_call(call: Callable[[], Any], x: Inputs, y: torch.Tensor, split: str) -> Any:
    try:
        return call()
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(
            f"the model or loss_fn fails on {split} samples of shape {inputs.describe(x)} "
            f"with targets {tuple(y.shape[1:])} {y.dtype}: {type(exc).__name__}: "
            + " ".join(str(exc).split())[:300]
        ) from None


def _check_outputs(outputs: Any, loss: Any, split: str = "training") -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError(
            "loss_fn(outputs, targets) must return the batch's mean loss, one number; got "
            + (
                f"shape {tuple(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else type(loss).__name__
            )
        )
    if not all(bool(torch.isfinite(t.detach()).all()) for t in _float_tensors(outputs)):
        raise UsageError(
            f"the model's outputs on the first {split} samples are not finite (NaN or "
            "infinity); check its initialisation and the inputs"
        )
    if not bool(torch.isfinite(loss.detach())):
        raise UsageError(f"the loss on the first {split} samples is {float(loss):g}, not finite")


def _float_tensors(outputs: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model's outputs: the tensor, or those a dict, a
    tuple or a ``ModelOutput`` holds (one level down)."""
    if isinstance(outputs, torch.Tensor):
        parts = [outputs]
    elif isinstance(outputs, Mapping):
        parts = list(outputs.values())
    elif isinstance(outputs, (tuple, list)):
        parts = list(outputs)
    else:
        parts = []
    return [t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point()]


class RunningScore:
    """The epoch's loss and correct-prediction sums, on the device (no sync per update)."""

    def __init__(
        self,
        world: World,
        device: torch.device,
        accuracy: bool,
        loss: float = 0.0,
        correct: int = 0,
    ) -> None:
        """``accuracy``: count correct predictions. ``loss``, ``correct``: the sums of a
        resumed epoch (global sums: rank 0 carries them)."""
        self.world, self.accuracy = world, accuracy
        self.loss = torch.tensor(loss if world.is_main else 0.0, device=device)
        self.correct = torch.tensor(
            correct if world.is_main else 0, device=device, dtype=torch.long
        )

    def add(self, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach().float() * len(y)
        if self.accuracy:
            self.correct += (out.argmax(1) == y).sum()

    def totals(self) -> tuple[float, int]:
        """Summed over the ranks (a collective: every rank calls it)."""
        loss = all_reduce_(self.loss.clone(), self.world)
        correct = all_reduce_(self.correct.clone(), self.world)
        return loss.item(), int(correct.item())


@torch.no_grad()
def score(
    model: nn.Module,
    feed: Feed,
    batch_size: int,
    device: torch.device,
    split: str = "test",
    precision: str = "fp32",
    channels_last: bool = False,
    loss_fn: LossFn | None = None,
    accuracy: bool = True,
) -> tuple[float | None, float | None]:
    """Mean loss and accuracy (fraction) of ``model`` in eval mode on a split.

    ``loss_fn`` defaults to cross-entropy; accuracy is None when ``accuracy`` is False,
    and both are None for an empty split. Under torchrun each rank evaluates its slice
    and the sums are all-reduced.
    """
    loss_fn = loss_fn or F.cross_entropy
    total = len(getattr(feed.data, f"{split}_y"))
    if total == 0:
        return None, None
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, samples
    for xb, yb in feed.eval_batches(split, batch_size):
        xb, yb = to_device(xb, device, channels_last), yb.to(device, non_blocking=True)
        with autocast(device, precision):
            out = inputs.run(model, xb)
        if isinstance(out, torch.Tensor):
            out = out.float()
        sums[0] += loss_fn(out, yb).double() * len(yb)
        if accuracy:
            sums[1] += (out.argmax(1) == yb).sum()
        sums[2] += len(yb)
    model.train(was_training)
    loss_sum, correct, seen = all_reduce_(sums, feed.world).tolist()
    seen = seen or total
    return loss_sum / seen, (correct / seen if accuracy else None)
