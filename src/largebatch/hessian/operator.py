"""Hessian-vector products of a model's loss over a fixed probe set."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from largebatch.errors import InvalidValueError
from largebatch.hessian.batches import (
    Batch,
    Data,
    as_batches,
    check_pair,
    is_pair,
    sample_count,
)
from largebatch.hessian.distributed import all_reduce_sum, broadcast_seed, distributed_enabled
from largebatch.hessian.fast_graph import fast_double_backward
from largebatch.hessian.model_state import preserved_model_state
from largebatch.hessian.params import ParamSpec, flatten, select_parameters, unflatten
from largebatch.inputs import run

__all__ = [
    "HVP_METHODS",
    "HessianOperator",
    "HessianOperatorError",
    "LossFn",
    "NondeterministicHessianError",
]

#: ``loss_fn(outputs, targets)`` returning the mean loss over the batch (a scalar).
LossFn = Callable[[Any, Any], torch.Tensor]
HVP_METHODS = ("double_backward", "forward_over_reverse")


class HessianOperatorError(RuntimeError):
    """The operator was used in a way that would give wrong products."""


class NoSecondDerivativeError(HessianOperatorError):
    """The model runs an op whose derivative torch cannot differentiate again."""


def math_attention() -> Any:
    """A context where ``scaled_dot_product_attention`` runs torch's math kernel: the
    fused kernels (flash, memory-efficient, the CPU flash kernel) have no second
    derivative, the math one is made of ops that have. Curvature builds its graphs here."""
    return sdpa_kernel([SDPBackend.MATH])


_NO_DOUBLE_BACKWARD = re.compile(r"derivative for (\S+) is not implemented")


@contextmanager
def second_derivatives() -> Iterator[None]:
    """A second derivative that torch does not have becomes one line naming the op."""
    try:
        yield
    except RuntimeError as exc:
        found = _NO_DOUBLE_BACKWARD.search(str(exc))
        if found is None:
            raise
        raise NoSecondDerivativeError(
            f"the model runs {found.group(1)}, whose derivative torch cannot differentiate "
            "again, so its Hessian-vector products cannot be taken (curvature: abs, absa, "
            "the curvature guard, largebatch hessian); use an op with a double backward "
            "there, or a method without curvature"
        ) from None


class NondeterministicHessianError(HessianOperatorError):
    """The loss over the probe data changed between products (data, dropout, ...)."""


class HessianOperator:
    """The Hessian of a model's mean loss over fixed data, as a linear operator.

    The loss is the sample-weighted mean over all batches of ``data``,
    ``L = sum_b n_b * loss_fn(model(x_b), y_b) / N``, differentiated twice with respect to
    the selected parameters. Vectors are flat 1-D tensors of length :attr:`dim` in the
    parameters' order (see :meth:`flatten` / :meth:`unflatten`).

    Use it as a context manager (``with HessianOperator(...) as op:``) or call
    :meth:`open` and :meth:`close`. While open the model is in eval mode (if
    ``eval_mode``) and the parameters must not change; :meth:`close` frees the cached
    graphs and puts back the model's train/eval mode, every buffer (batch-norm running
    statistics) and each parameter's ``.grad``. A closed operator can be opened again,
    for instance after a training step.

    Args:
        model: the network; a DistributedDataParallel wrapper is unwrapped.
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss of a batch.
        data: one ``(inputs, targets)`` pair or an iterable of pairs: read once and kept
            in memory, or streamed (see ``stream``).
        params: which parameters (see :func:`select_parameters`); default all trainable.
        eval_mode: run the model in eval mode during products (default True).
        method: ``"double_backward"`` (default; builds each batch's gradient graph once
            and differentiates it again per product, the fastest on CPU) or
            ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``; needs
            batch-norm in eval mode).
        check_determinism: before every product recompute each batch's loss without
            gradients and raise :class:`NondeterministicHessianError` if it moved (costs
            one forward pass per batch per product).
        distributed: all-reduce products over the default process group; ``None`` means
            "if one is initialized". Each rank passes its own shard of the probe data.
        cache_graph: keep every batch's gradient graph between products (double backward
            only). False rebuilds it per product: less memory, one more backward.
        fast_graph: build the gradient graph (double backward only) with layers rewritten
            into the same functions with cheaper second derivatives: eval-mode batch-norm
            as a per-channel affine map, a convolution whose input needs no gradient
            without the unused input-gradient term, ReLU and 2-d max-pooling without
            their all-zero second derivative (see
            :func:`~largebatch.hessian.fast_graph.fast_double_backward`). The products
            are the same up to rounding.
        stream: iterate over ``data`` afresh in every product, one batch in memory at a
            time, so memory does not grow with the number of samples (whole-dataset
            curvature). ``None`` (default): stream a ``DataLoader``, keep anything else.
            ``data`` must then be re-iterable (a DataLoader, a list; not a generator) and
            give the same samples on every pass, in any order and batching: with
            batch-norm in eval mode the mean loss does not depend on either, so a
            shuffling DataLoader is fine, random augmentation is not. Each product
            rebuilds every batch's gradient graph (double backward: one more forward and
            backward per batch than the cached graphs of the in-memory mode).
        on_batch: called with the sample count of each batch as a product goes through it
            (progress reporting).

    Attributes:
        dim: number of selected scalars. dtype, device: those of the parameters.
        matvecs: products computed so far. param_names: names of the selected parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Data,
        params: ParamSpec | None = None,
        eval_mode: bool = True,
        method: str = "double_backward",
        check_determinism: bool = False,
        distributed: bool | None = None,
        cache_graph: bool = True,
        fast_graph: bool = True,
        stream: bool | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {HVP_METHODS}")
        if isinstance(model, DistributedDataParallel):
            # Its forward would expect a matching backward all-reduce; products use
            # autograd.grad, which never fires DDP's hooks.
            model = model.module
        self.model = model
        self.loss_fn = loss_fn
        self.method = method
        self.eval_mode = eval_mode
        self.check_determinism = check_determinism
        self.cache_graph = cache_graph
        self.fast_graph = fast_graph
        named = select_parameters(model, params)
        self.param_names = [name for name, _ in named]
        self.params = [p for _, p in named]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"selected parameters mix dtypes {sorted(map(str, dtypes))}")
        self.dtype: torch.dtype = self.params[0].dtype
        self.device: torch.device = self.params[0].device
        self.dim = sum(p.numel() for p in self.params)
        for name, param in zip(self.param_names, self.params, strict=True):
            if not bool(torch.isfinite(param).all()):
                raise InvalidValueError(
                    f"{type(self).__name__}: the model's parameter {name!r} holds NaN or "
                    "infinity; curvature needs finite weights"
                )
        self.distributed = distributed_enabled(distributed)
        self.stream = isinstance(data, DataLoader) if stream is None else bool(stream)
        self.on_batch = on_batch
        self.source: Iterable[Batch] | None = None
        self.batches: list[Batch] = []
        if self.stream:
            if _is_one_pass(data):
                raise ValueError(
                    "stream=True needs data that can be iterated over again in every "
                    "product (a DataLoader, a list), not a one-pass iterator or generator"
                )
            self.source = [data] if is_pair(data) else data  # type: ignore[assignment,list-item]
        else:
            pairs = as_batches(data, self.device, who=type(self).__name__)
            self.batches = [b for b in pairs if sample_count(b) > 0]
        self.matvecs = 0
        self._pass_totals: tuple[float, float] | None = None
        self._stack: ExitStack | None = None
        self._weights: list[float] = []
        self._graphs: list[tuple[torch.Tensor, ...] | None] = []
        self._versions: list[int] = []
        self._reference_losses: list[float] | None = None

    # ----------------------------------------------------------------- lifecycle
    @property
    def is_open(self) -> bool:
        """Whether products may be taken now."""
        return self._stack is not None

    def open(self) -> HessianOperator:
        """Snapshot the model's state, switch to eval mode if asked; returns self."""
        if self._stack is not None:
            return self
        stack = ExitStack()
        stack.enter_context(preserved_model_state(self.model, self.eval_mode))
        self._stack = stack
        try:
            self._check_functional_compatible()
            if self.stream:
                self._pass_totals = None
                self._versions = self._param_versions()
                return self
            counts = [sample_count(b) for b in self.batches]
            total = torch.tensor(float(sum(counts)), dtype=torch.float64, device=self.device)
            if self.distributed:
                all_reduce_sum(total)
            if total.item() <= 0:
                raise ValueError("the probe data holds no samples")
            self._weights = [n / total.item() for n in counts]
        except BaseException:
            self.close()
            raise
        self._graphs = [None] * len(self.batches)
        self._versions = self._param_versions()
        self._reference_losses = None
        return self

    def close(self) -> None:
        """Free cached graphs and restore the model's mode, buffers and ``.grad``."""
        self._graphs = []
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> HessianOperator:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ products
    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """``H @ vector`` for a flat vector of shape ``(dim,)``; returns shape ``(dim,)``."""
        self._check_usable()
        vector = vector.to(dtype=self.dtype, device=self.device)
        if vector.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(vector.shape)}")
        pieces = unflatten(vector.detach(), self.params)
        if self.stream:
            product = self._streamed_product(pieces)
            self.matvecs += 1
            return product
        if self.check_determinism:
            self._check_losses()
        batch_product = (
            self._double_backward_product
            if self.method == "double_backward"
            else self._forward_over_reverse_product
        )
        if not self.batches:  # an empty shard of the probe set on this rank
            product = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for index in range(len(self.batches)):
            part = batch_product(index, pieces)
            product = part if index == 0 else product.add_(part)
            if self.on_batch is not None:
                self.on_batch(sample_count(self.batches[index]))
        if self.distributed:
            all_reduce_sum(product)
        self.matvecs += 1
        return product

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for ``v`` of shape ``(dim,)`` or column by column for ``(dim, m)``."""
        if other.dim() == 2:
            return torch.stack([self.matvec(column) for column in other.T], dim=1)
        return self.matvec(other)

    def dense(self) -> torch.Tensor:
        """The full ``(dim, dim)`` Hessian from ``dim`` products (tiny models only)."""
        return self @ torch.eye(self.dim, dtype=self.dtype, device=self.device)

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One tensor per selected parameter -> flat vector of shape ``(dim,)``."""
        return flatten(tensors)

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Flat vector of shape ``(dim,)`` -> views shaped like the selected parameters."""
        return unflatten(vector, self.params)

    def synchronize_seed(self, seed: int) -> int:
        """The seed every rank should use for random probes (rank 0's when distributed)."""
        return broadcast_seed(seed, self.device) if self.distributed else seed

    # ------------------------------------------------------------------ internals
    def _check_usable(self) -> None:
        if self._stack is None:
            raise HessianOperatorError(
                "HessianOperator is closed: use `with HessianOperator(...) as op:` "
                "or call op.open() first"
            )
        if self._param_versions() != self._versions:
            raise HessianOperatorError(
                "parameters changed while the HessianOperator was open; close() it and "
                "open() it again to take the Hessian at the new parameters"
            )

    def _check_functional_compatible(self) -> None:
        if self.method != "forward_over_reverse":
            return
        updating = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.training
            and module.track_running_stats
        ]
        if updating:
            raise ValueError(
                "method='forward_over_reverse' cannot run batch-norm in train mode "
                f"({', '.join(updating)} would update running statistics inside "
                "torch.func); use eval_mode=True or method='double_backward'"
            )

    def _param_versions(self) -> list[int]:
        return [p._version for p in self.params]

    def _loss(self, batch: Batch) -> torch.Tensor:
        inputs, targets = batch
        with math_attention():
            return self.loss_fn(run(self.model, inputs), targets)

    def _gradient_graph(self, index: int) -> tuple[torch.Tensor, ...]:
        cached = self._graphs[index]
        if cached is not None:
            return cached
        graph, _ = self._build_graph(self.batches[index], self._weights[index])
        if self.cache_graph:
            self._graphs[index] = graph
        return graph

    def _build_graph(
        self, batch: Batch, weight: float
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The gradient of ``weight * loss(batch)`` with its graph, and the batch's loss
        (detached, on the device: no synchronization here)."""
        rewrite = fast_double_backward(self.model) if self.fast_graph else nullcontext()
        with torch.enable_grad(), rewrite:
            loss = self._loss(batch)
            grads = torch.autograd.grad(
                loss * weight, self.params, create_graph=True, allow_unused=True
            )
        graph = tuple(_zeros_if_none(g, p) for g, p in zip(grads, self.params, strict=True))
        return graph, loss.detach()

    def _double_backward_product(self, index: int, pieces: list[torch.Tensor]) -> torch.Tensor:
        return self._second_derivative(self._gradient_graph(index), pieces, self.cache_graph)

    def _second_derivative(
        self, grads: tuple[torch.Tensor, ...], pieces: list[torch.Tensor], retain: bool
    ) -> torch.Tensor:
        # A gradient entry that does not depend on any parameter has a zero Hessian row.
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        with torch.enable_grad(), second_derivatives():
            second = torch.autograd.grad(
                [grads[i] for i in live],
                self.params,
                grad_outputs=[pieces[i] for i in live],
                retain_graph=retain,
                allow_unused=True,
            )
        return flatten([_zeros_if_none(s, p) for s, p in zip(second, self.params, strict=True)])

    def _forward_over_reverse_product(self, index: int, pieces: list[torch.Tensor]) -> torch.Tensor:
        return self._forward_over_reverse(self.batches[index], self._weights[index], pieces)

    def _forward_over_reverse(
        self, batch: Batch, weight: float, pieces: list[torch.Tensor]
    ) -> torch.Tensor:
        inputs, targets = batch

        def weighted_loss(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            replaced = dict(zip(self.param_names, values, strict=True))
            args, kwargs = ((), inputs) if isinstance(inputs, Mapping) else ((inputs,), None)
            with math_attention():
                outputs = torch.func.functional_call(self.model, replaced, args, kwargs)
                return self.loss_fn(outputs, targets) * weight

        primals = tuple(p.detach() for p in self.params)
        with second_derivatives():
            _, product = torch.func.jvp(
                torch.func.grad(weighted_loss), (primals,), (tuple(pieces),)
            )
        return flatten([t.detach() for t in product])

    def _streamed_product(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """One pass over the data: ``sum_b n_b H_b v / N``, each batch's graph freed as soon
        as its product is taken. Also checks the pass saw the samples of the first one."""
        product = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        # float64 totals: [samples, loss sum], all-reduced with the product under torchrun
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        assert self.source is not None
        for index, raw in enumerate(self.source):
            batch = check_pair(raw, index, self.device, who=type(self).__name__)
            count = sample_count(batch)
            if count == 0:
                continue
            part, loss = self._batch_product_and_loss(batch, float(count), pieces)
            product.add_(part)
            totals[0] += count
            totals[1] += loss.to(torch.float64) * count
            if self.on_batch is not None:
                self.on_batch(count)
        if self.distributed:
            all_reduce_sum(product)
            all_reduce_sum(totals)
        samples, loss_sum = float(totals[0]), float(totals[1])
        if samples <= 0:
            raise ValueError("the probe data holds no samples")
        self._check_pass(samples, loss_sum)
        return product.div_(samples)

    def _batch_product_and_loss(
        self, batch: Batch, weight: float, pieces: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight * H_batch v`` and the batch's mean loss, through a graph built here."""
        if self.method == "forward_over_reverse":
            with torch.no_grad():
                loss = self._loss(batch).detach()
            return self._forward_over_reverse(batch, weight, pieces), loss
        graph, loss = self._build_graph(batch, weight)
        return self._second_derivative(graph, pieces, retain=False), loss

    def _check_pass(self, samples: float, loss_sum: float) -> None:
        """A streamed pass must see the samples of the first (same count, same loss)."""
        if self._pass_totals is None:
            self._pass_totals = (samples, loss_sum)
            return
        then_samples, then_loss = self._pass_totals
        # Summation order may differ between passes (shuffling): allow float32 rounding.
        slack = 1e-4 if self.dtype != torch.float64 else 1e-10
        if samples != then_samples or not abs(loss_sum - then_loss) <= slack * max(
            1.0, abs(then_loss)
        ):
            raise NondeterministicHessianError(
                f"a pass over the streamed data saw {samples:.0f} samples with total loss "
                f"{loss_sum!r}, the first saw {then_samples:.0f} with {then_loss!r}: the "
                "data must give the same samples on every pass (no random augmentation, "
                "no dropout with eval_mode=False)"
            )

    def _check_losses(self) -> None:
        with torch.no_grad():
            losses = [float(self._loss(batch)) for batch in self.batches]
        if self._reference_losses is None:
            self._reference_losses = losses
            return
        slack = 1e3 * torch.finfo(self.dtype).eps
        for index, (now, then) in enumerate(zip(losses, self._reference_losses, strict=True)):
            if not abs(now - then) <= slack * max(1.0, abs(then)):
                raise NondeterministicHessianError(
                    f"loss of probe batch {index} changed between products ({then!r} -> "
                    f"{now!r}): the data, the parameters or a random layer (dropout with "
                    "eval_mode=False) changed, so the products are not of one Hessian"
                )

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        batches = "streamed" if self.stream else len(self.batches)
        return (
            f"HessianOperator(dim={self.dim}, method={self.method!r}, "
            f"batches={batches}, {state}, matvecs={self.matvecs})"
        )


def _is_one_pass(data: object) -> bool:
    """An iterator (or generator): iterating over it again gives nothing."""
    try:
        return iter(data) is data  # type: ignore[call-overload]
    except TypeError:
        return False


def _zeros_if_none(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if value is None else value
