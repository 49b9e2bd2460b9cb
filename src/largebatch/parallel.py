"""How the gradients of the ranks meet: one owner, a strategy object.

Under torchrun each rank runs its contiguous slice of every global batch as micro-batches,
each weighted by its share of the *global* batch (:func:`largebatch.accumulate.backward_share`),
so the update's gradient is the *sum* of the ranks' gradients. A :class:`Parallel` says how
that sum is made, and :class:`~largebatch.accumulate.GlobalBatch` asks it at three points
of an update, so the loop never branches on which one runs:

- :meth:`Parallel.prepare`: the module the forward passes run through (the model itself,
  or a wrapper that synchronises in the backward pass);
- :meth:`Parallel.micro_batch`: a context around one micro-batch's forward and backward,
  told whether this backward may synchronise (the update's last micro-batch, when the
  update can synchronise in the backward at all, see :meth:`Parallel.sync_in_backward`);
- :meth:`Parallel.finish`: once the micro-batches are done, what is left to reduce: the
  gradients unless the backward already did, and the extras, which are the batch-norm
  running statistics moved once per update (averaged over the ranks) and the stop flag
  (summed, so every rank learns that one rank was asked to stop);
- :meth:`Parallel.local_sq_norms`: for an update begun with ``measure``, the squared
  norm of this rank's gradient taken before the gradients met (what the noise meter
  reads of each rank's slice, :meth:`largebatch.meters.Meter.at_slice`).

Kinds (config ``parallel``):

- ``ddp`` (the default): torch's ``DistributedDataParallel``. Every micro-batch but an
  update's last runs under ``no_sync()``; the last one's backward all-reduces the
  gradients bucket by bucket while the backward pass goes on. DDP averages over the
  ranks; here the ranks' gradients are shares of the global batch already, so a
  communication hook sums them instead (:func:`sum_hook`). ``broadcast_buffers`` is off:
  the running statistics move once per update and are averaged with the stop flag in
  one small all-reduce after the backward. An update in which some rank has no sample
  (a global batch smaller than the world), or in which a meter reads each micro-batch's
  own gradient, runs every micro-batch under ``no_sync()`` and reduces as ``flat``. The
  noise meter's reading of a rank's whole gradient needs neither: the hook adds each
  bucket's squared norm before its all-reduce (:class:`SquaredNorms`); on a wrapper of
  the user's, which has its own hook, a measured update reduces as ``flat``.
  The first update of a run (or of a resumed run) is a probe: it runs as ``flat`` and
  counts, for each parameter, the micro-batches whose backward reached it; the model is
  wrapped after it, with ``find_unused_parameters`` only when some micro-batch on some
  rank left a parameter out (that option costs a walk of the graph in every update).
- ``flat``: every gradient copied into one flat tensor, all-reduced once per update
  after the backward passes and copied back (nothing overlaps the backward pass); the
  squared norm of a measured update is taken just before.
- ``fsdp``: torch's FSDP2, ``fully_shard`` on every
  child module that holds at least :data:`SHARD_SHARE` of the parameters (searched from
  the root down: a larger child is split further when its own children qualify), then
  on the root, before the optimizer is made (the optimizer must be built over the
  sharded parameters: a factory or the built-in one). Parameters, gradients and the
  optimizer's state live sharded over the ranks; each micro-batch but an update's last
  runs with ``set_requires_gradient_sync(False)`` (its gradient accumulates unsharded,
  the memory of one full gradient per rank, until the last backward reduce-scatters the
  sum, ``set_gradient_divide_factor(1)``: the ranks' gradients are shares of the global
  batch already; ``fsdp_sync_each_micro_batch`` reduce-scatters after every micro-batch
  instead, trading that memory for one reduce-scatter per micro-batch). Every rank must
  run as many forward passes as every other, so each rank's slice is cut into the same
  number of micro-batches (:func:`equal_cuts`). Checkpoints are written sharded
  through DCP (:mod:`largebatch.checkpoint`; ``fsdp_checkpoint: sharded``) or, with
  ``full``, whole in the layout of one process (:meth:`FSDP.stateful`); either resumes
  at another world size or kind. The noise meter's reading of each rank's gradient is
  taken in the reduce-scatter (:class:`_MeasuredReduceScatter`). Hessian-vector
  products, adversarial examples and the stability gauge run on a whole copy of the
  model on each rank (:meth:`FSDP.keep_whole`, :meth:`Parallel.whole`; the gauge with
  the optimizer's state whole, :meth:`Parallel.whole_optimizer`). ``precision: bf16`` shards with
  FSDP's ``MixedPrecisionPolicy`` (bf16 parameters in the forward and backward passes,
  fp32 reduce-scatter into fp32 shards). Not under ``fsdp``: meters that read each
  micro-batch's own gradient (``gns_micro_batch``): refused before the run.
  A model the user sharded with ``fully_shard`` picks this kind whatever ``parallel``
  says, and is used as it is (:class:`FSDP` ``users``).

In a single process every kind is the same: nothing to reduce.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
from torch.nn.parallel import DistributedDataParallel

from largebatch.distributed import World, all_reduce_, all_reduce_gradients
from largebatch.errors import ConfigError, InvalidValueError, UsageError

__all__ = [
    "PARALLEL_KINDS",
    "Parallel",
    "Flat",
    "DDP",
    "FSDP",
    "equal_cuts",
    "longest_slice",
    "make_parallel",
    "unwrapped",
    "sum_hook",
    "SquaredNorms",
    "resharded",
]

#: the values of config ``parallel`` (the first is the default)
PARALLEL_KINDS = ("ddp", "flat", "fsdp")

#: ``fsdp`` shards each child module holding at least this share of the parameters
SHARD_SHARE = 0.1


class Parallel:
    """One process: the gradients are complete after the backward passes. Subclasses
    reduce them over the ranks of ``world``."""

    name = "single"
    #: every rank must run the same number of forward passes (FSDP's collectives)
    equal_passes = False
    #: checkpoints written sharded, each rank its part (:mod:`largebatch.checkpoint`)
    sharded_checkpoints = False

    def __init__(self, world: World | None = None) -> None:
        self.world = world or World()
        self._measure = False  # take this update's local squared norm (sync_in_backward)
        self._local_sq: torch.Tensor | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        """Take ``model`` for the run; returns the module that runs its forward passes
        now (the model itself here; see :meth:`micro_batch`)."""
        self.model = model
        return model

    def sync_in_backward(self, batch_samples: int, unsynced: bool, measure: bool = False) -> bool:
        """Begin an update: whether its gradients may meet during its last backward pass.
        ``batch_samples``: the update's global batch; ``unsynced``: they must meet after
        the backward passes (a meter reads each micro-batch's gradient on this rank, or
        some rank has no sample); ``measure``: take the squared norm of this rank's
        gradient before the gradients meet (:meth:`local_sq_norms`). Every rank must
        answer the same."""
        self._begin(measure)
        return False

    def _begin(self, measure: bool) -> None:
        self._measure, self._local_sq = measure, None

    def local_sq_norms(self) -> torch.Tensor | None:
        """After :meth:`finish` of an update begun with ``measure``: the squared 2-norm
        of this rank's gradient (the sum of its micro-batches' weighted gradients)
        before the ranks' gradients met, a float64 tensor; otherwise None."""
        return self._local_sq

    def _take_summed(self, norms: SquaredNorms) -> None:
        """This update's squared norm from what a communication hook summed in ``norms``
        (zero when it was given nothing), and the hook off again."""
        total = norms.total
        self._local_sq = total if total is not None else torch.zeros((), dtype=torch.float64)
        norms.start(False)

    def _take_local(self, params: Sequence[nn.Parameter]) -> None:
        """The squared norm of ``params``' gradients now, when this update measures it."""
        if self._measure:
            grads = [p.grad for p in params if p.grad is not None]
            self._local_sq = _sq_norm(grads) if grads else torch.zeros((), dtype=torch.float64)

    @contextlib.contextmanager
    def micro_batch(self, sync: bool) -> Iterator[nn.Module]:
        """The context of one micro-batch's forward and backward, giving the module to
        run the forward pass with; ``sync``: this backward is the one in which the
        gradients meet."""
        yield self.model

    def finish(
        self,
        params: Sequence[nn.Parameter],
        buffers: Sequence[torch.Tensor],
        flag: float,
        synced: bool,
    ) -> float:
        """Reduce what is left of an update: the gradients of ``params`` unless
        ``synced`` (the backward pass reduced them), the batch-norm running statistics
        ``buffers`` (averaged) and ``flag`` (summed; returned)."""
        self._take_local(params)
        return flag

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (a loss-term count, say)."""
        return all_reduce_(tensor, self.world)

    def shard(self, model: nn.Module, policy: Any = None) -> None:
        """Before the optimizer is made: split ``model``'s parameters over the ranks
        (nothing here; see :class:`FSDP`). ``policy(model)``: the blocks to shard before
        the root, in place of the rule by parameter share."""

    def stateful(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """What a checkpoint saves and loads for the model and the optimizer: themselves
        here (see :class:`FSDP`)."""
        return model, optimizer

    def whole(self, model: nn.Module) -> nn.Module:
        """``model`` whole on this rank, at its current weights, for what runs on the model
        outside the update (Hessian-vector products, adversarial examples): the model
        itself here (a collective under :class:`FSDP`, where it is a copy)."""
        return model

    def whole_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> torch.optim.Optimizer:
        """``optimizer`` over the parameters of :meth:`whole` ``(model)``, with its state
        whole (the stability gauge's direction and preconditioner): ``optimizer`` itself
        here (under :class:`FSDP` a copy over the whole copy's parameters, its state
        gathered: a collective; call it after :meth:`whole`)."""
        return optimizer

    def close(self) -> None:
        """Let go of what :meth:`prepare` set up (the run is over)."""


class Flat(Parallel):
    """All gradients, the running statistics and the flag in one flat all-reduce after
    the backward passes (:func:`largebatch.distributed.all_reduce_gradients`)."""

    name = "flat"

    def finish(
        self,
        params: Sequence[nn.Parameter],
        buffers: Sequence[torch.Tensor],
        flag: float,
        synced: bool,
    ) -> float:
        self._take_local(params)
        return all_reduce_gradients(list(params), self.world, flag, buffers)


def _sq_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The squared 2-norm of ``tensors`` together, as float64 (summed in at least float32,
    without concatenating them)."""
    if any(t.dtype not in (torch.float32, torch.float64) for t in tensors):
        tensors = [t.float() for t in tensors]
    return torch.nn.utils.get_total_norm(tensors).double().square()


class SquaredNorms:
    """The state of :func:`sum_hook`: when ``on``, the sum of the squared norms of the
    buckets it was given, each taken before its all-reduce (so, over one backward pass,
    the squared norm of this rank's gradient)."""

    def __init__(self) -> None:
        self.on = False
        self.total: torch.Tensor | None = None

    def start(self, on: bool) -> None:
        self.on, self.total = on, None

    def add(self, tensor: torch.Tensor) -> None:
        sq = _sq_norm([tensor])
        self.total = sq if self.total is None else self.total + sq


def sum_hook(state, bucket):  # type: ignore[no-untyped-def]
    """A DDP communication hook that sums a bucket (a ``dist.GradBucket``) over the
    ranks, returning a future of the summed tensor (DDP's own hook divides by the world
    size): each rank's gradient is already weighted by its slice's share of the global
    batch, so their sum is the global batch's gradient. With a :class:`SquaredNorms`
    ``state`` that is on, the bucket's squared norm is added to it first: the noise
    meter's reading of this rank's gradient, at no extra pass over the gradients. (No
    annotations: DDP checks them as objects, and this module's are strings.)"""
    if state is not None and state.on:
        state.add(bucket.buffer())
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda done: done.value()[0])


class DDP(Flat):
    """torch's ``DistributedDataParallel`` (see the module's docstring); updates that
    cannot synchronise in the backward pass reduce as :class:`Flat`."""

    name = "ddp"

    def __init__(
        self, world: World | None = None, wrapper: DistributedDataParallel | None = None
    ) -> None:
        super().__init__(world)
        #: the user's own wrapper, used as it is (its gradients averaged over the ranks)
        self.users = wrapper
        self.ddp: DistributedDataParallel | None = None
        self.find_unused: bool | None = None  # decided by the probe update
        self._probe: _Probe | None = None
        self._norms = SquaredNorms()  # our hook's state

    def prepare(self, model: nn.Module) -> nn.Module:
        self.close()
        if self.users is not None:
            if self.users.module is not model:
                raise InvalidValueError("DDP.prepare: model is not the wrapper's module")
            self.ddp, self.find_unused = self.users, bool(self.users.find_unused_parameters)
        return super().prepare(model)

    def close(self) -> None:
        # DDP's hooks on the parameters go with our wrapper: the model is the user's,
        # and a backward pass of theirs after the run must not call into a dead reducer
        if self._probe is not None:
            self._probe.finish(None)
        ours = self.ddp is not None and self.ddp is not self.users
        self.ddp, self._probe, self.find_unused = None, None, None
        if ours:  # DDP holds reference cycles: free it (and its hooks) now
            gc.collect()

    def sync_in_backward(self, batch_samples: int, unsynced: bool, measure: bool = False) -> bool:
        self._begin(measure)
        if self.ddp is None:  # the probe update: flat, counting who reaches what
            if self._probe is not None:  # a probe update that did not finish (diverged)
                self._probe.finish(None)
            self._probe = _Probe(self.model)
            return False
        # the user's wrapper has its own hook: a measured update reduces as flat there
        sync = not unsynced and not (measure and self.ddp is self.users)
        self._norms.start(sync and measure)
        return sync

    @contextlib.contextmanager
    def micro_batch(self, sync: bool) -> Iterator[nn.Module]:
        if self.ddp is None:
            if self._probe is not None:
                self._probe.micro_batches += 1
            yield self.model
        elif sync:
            yield self.ddp
        else:
            with self.ddp.no_sync():
                yield self.ddp

    def finish(
        self,
        params: Sequence[nn.Parameter],
        buffers: Sequence[torch.Tensor],
        flag: float,
        synced: bool,
    ) -> float:
        if not synced:
            stopping = super().finish(params, buffers, flag, synced)
        else:
            if self._measure:  # our hook summed the buckets' squared norms
                self._take_summed(self._norms)
            device = params[0].device  # the extras alone:
            stopping = all_reduce_gradients([], self.world, flag, buffers, device)
            if self.ddp is self.users:  # it averaged over the ranks; the update is the sum
                for param in params:
                    if param.grad is not None:
                        param.grad.mul_(self.world.size)
        if self._probe is not None:
            probe, self._probe = self._probe, None
            self.find_unused = probe.finish(self.world)
            self.ddp = DistributedDataParallel(
                self.model,
                device_ids=None if params[0].device.type == "cpu" else [params[0].device],
                forward_sync_buffers=False,  # the running statistics are averaged per update
                find_unused_parameters=self.find_unused,
                static_graph=False,  # with no_sync, a static graph stopped all-reducing
            )
            self.ddp.register_comm_hook(self._norms, sum_hook)
        return stopping


class _Probe:
    """Counts, for each trainable parameter, the micro-batches whose backward reached it
    (a hook after its gradient accumulates)."""

    def __init__(self, model: nn.Module) -> None:
        self.micro_batches = 0
        params = [p for p in model.parameters() if p.requires_grad]
        self.reached = [0] * len(params)
        self.hooks = [
            param.register_post_accumulate_grad_hook(self._counter(index))
            for index, param in enumerate(params)
        ]

    def _counter(self, index: int) -> Any:
        def count(_param: torch.Tensor) -> None:
            self.reached[index] += 1

        return count

    def finish(self, world: World | None) -> bool:
        """Remove the hooks; whether some micro-batch of some rank left a parameter out
        (all ranks agree; ``world`` None: this rank's answer, no collective)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        missed = any(n < self.micro_batches for n in self.reached)
        flag = torch.tensor([1.0 if missed else 0.0])
        if world is not None and world.enabled:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)


def equal_cuts(length: int, longest: int, size: int) -> list[slice]:
    """``length`` samples cut into as many micro-batches as the ``longest`` slice of any
    rank needs at ``size`` (``ceil(longest / size)``), near-equal and in order, so that
    every rank runs the same number of passes (slices differ by at most one sample; a
    piece is empty only when ``length`` is below that number)."""
    count = max(1, -(-longest // size))
    bounds = [length * i // count for i in range(count + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def longest_slice(total: int, world: World) -> int:
    """The longest rank slice of ``total`` items (:func:`largebatch.distributed.shard`)."""
    return -(-total // world.size) if world.enabled else total


def _shard_targets(model: nn.Module, share: float) -> list[nn.Module]:
    """The modules that ``fsdp`` wraps before the root: from the root down, each child
    holding at least ``share`` of the parameters, split further when its own children
    qualify."""
    total = sum(p.numel() for p in model.parameters())
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            size = sum(p.numel() for p in child.parameters())
            if total and size >= share * total:
                inner = [c for c in child.children()
                         if sum(p.numel() for p in c.parameters()) >= share * total]  # fmt: skip
                if inner:
                    visit(child)
                else:
                    found.append(child)

    visit(model)
    return found


def _full(value: Any) -> Any:
    """A sharded tensor (a DTensor) whole, on the CPU (a collective); anything else as it is."""
    if hasattr(value, "full_tensor"):
        return value.full_tensor().cpu()
    return value


def _like(value: Any, reference: Any) -> Any:
    """``value`` (whole, as saved) sharded as ``reference`` (a DTensor) is: this rank's
    part, cut locally (every rank holds the whole); anything else as it is."""
    if hasattr(reference, "device_mesh") and isinstance(value, torch.Tensor):
        from torch.distributed.tensor import distribute_tensor

        value = value.to(device=reference.device, dtype=reference.dtype)
        return distribute_tensor(
            value, reference.device_mesh, reference.placements, src_data_rank=None
        )
    return value


class _FullState:
    """A sharded model's (or its optimizer's) state as one process holds it, for a
    checkpoint: :meth:`gather` (a collective: every rank calls it) makes every sharded
    tensor whole on the CPU, in the order of the state, so the ranks agree;
    :meth:`state_dict` gives what was gathered; :meth:`load_state_dict` cuts each rank's
    part from a whole state (every rank reads the file). The optimizer's state keeps its
    own layout (parameters by index), the model's its names: a checkpoint of one process
    loads here, and this one there."""

    collective = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self._gathered: dict[str, Any] | None = None

    def gather(self) -> None:
        if self.optimizer is None:
            state = resharded(self.model).state_dict()
            self._gathered = {k: _full(v) for k, v in state.items()}
            return
        state = self.optimizer.state_dict()
        self._gathered = {
            "state": {
                index: {key: _full(value) for key, value in entry.items()}
                for index, entry in sorted(state["state"].items())
            },
            "param_groups": state["param_groups"],
        }

    def state_dict(self) -> dict[str, Any]:
        if self._gathered is None:
            self.gather()
        assert self._gathered is not None
        return self._gathered

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._gathered = None
        if self.optimizer is None:
            own = resharded(self.model).state_dict()
            self.model.load_state_dict({k: _like(v, own.get(k)) for k, v in state.items()})
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        entries = state.get("state", {})
        sharded = {
            index: {
                key: _like(value, params[int(index)]) if key != "step" else value
                for key, value in entry.items()
            }
            for index, entry in entries.items()
            if 0 <= int(index) < len(params)
        }
        extra = set(map(int, entries)) - set(range(len(params)))
        if extra:
            raise KeyError(f"state for parameter {min(extra)}, of {len(params)}")
        self.optimizer.load_state_dict({**state, "state": sharded})


def _policy(model: nn.Module, policy: Any) -> list[nn.Module]:
    """``policy(model)``, checked: distinct submodules of ``model``, not the root."""
    try:
        blocks = list(policy(model))
    except TypeError as exc:
        raise UsageError(f"shard_policy(model) must give a list of submodules ({exc})") from None
    inside = {id(m) for m in model.modules() if m is not model}
    for block in blocks:
        if not isinstance(block, nn.Module) or id(block) not in inside:
            raise UsageError(
                f"shard_policy gave {type(block).__name__}, not a submodule of the model "
                "(the root is sharded last anyway)"
            )
    if len({id(b) for b in blocks}) != len(blocks):
        raise UsageError("shard_policy gave a submodule twice")
    return blocks


class _MeasuredReduceScatter(ReduceScatter):
    """FSDP's reduce-scatter of one sharded block, as it was (``inner``), adding the
    squared norm of its input to ``norms`` first when that is on: the input holds this
    rank's unsharded gradients of the block's parameters (zero-padded, not divided:
    our blocks divide by 1, and a user's block divides its float32 or bfloat16
    gradients after the reduce-scatter), so over an update's last backward pass the
    sum is the squared norm of this rank's whole gradient, as :func:`sum_hook` takes
    it under DDP."""

    def __init__(self, inner: ReduceScatter, norms: SquaredNorms, users: bool = False) -> None:
        self.inner, self.norms, self.users = inner, norms, users
        self.divided = False  # a float16 input of a user's block: FSDP divided it first

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(  # type: ignore[override]
        self,
        output_tensor: torch.Tensor,
        input_tensor: torch.Tensor,
        group: dist.ProcessGroup,
        op: Any,
        async_op: bool = False,
    ) -> Any:
        if self.norms.on:
            self.divided |= self.users and input_tensor.dtype == torch.float16
            self.norms.add(input_tensor)
        return self.inner(
            output_tensor=output_tensor,
            input_tensor=input_tensor,
            group=group,
            op=op,
            async_op=async_op,
        )


def resharded(model: nn.Module) -> nn.Module:
    """``model`` with every sharded block's parameters sharded again (``reshard``): FSDP
    keeps the root's gathered parameters after a forward pass without a backward one
    (an evaluation, a check), and the module then names those, not the shards that the
    optimizer and the state hold."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _check_copy_fits(model: nn.Module, device: torch.device | None) -> None:
    """A whole copy of ``model`` and what Hessian-vector products take besides (about
    three times its parameters again) fit in the memory free on ``device`` (a CUDA
    device; elsewhere, the memory the system has available), or a UsageError."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    need = 4 * size
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_memory()
    if free is not None and need > free:
        raise UsageError(
            f"under parallel: fsdp, Hessian-vector products and adversarial examples run on "
            f"a whole copy of the model on each rank, about {need / 2**30:.2f} GiB with "
            f"their work, and {free / 2**30:.2f} GiB is free: it does not fit; use method "
            "gns (no curvature), or set curvature_guard: false and adversarial: false"
        )


def _available_memory() -> int | None:
    """The memory the system has available, in bytes (Linux; None elsewhere)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _param_groups(model: nn.Module) -> list[Any]:
    """FSDP's parameter groups of every sharded block of ``model`` (the objects that hold
    each block's reduce-scatter)."""
    return [
        group
        for module in model.modules()
        if isinstance(module, FSDPModule)
        for group in module._get_fsdp_state()._fsdp_param_groups
    ]


class FSDP(Parallel):
    """torch's FSDP2 (``fully_shard``; see the module's docstring). ``users``: the model
    came sharded by the user's own ``fully_shard``: used as it is (its reduce-scatter
    averages over the ranks, FSDP's default, so the gradients are scaled back by the world
    size to the sum the global batch needs).

    The noise meter's reading of this rank's gradient is taken in the reduce-scatter of
    each sharded block (:class:`_MeasuredReduceScatter`, set on every block by
    :meth:`prepare` and put back by :meth:`close`), before the gradients meet: a measured
    update reduce-scatters once, in its last backward pass, even under ``sync_each``."""

    name = "fsdp"
    equal_passes = True

    def __init__(
        self,
        world: World | None = None,
        users: bool = False,
        sync_each: bool = False,
        checkpoint: str = "sharded",
        precision: str = "fp32",
    ) -> None:
        super().__init__(world)
        self.users = users
        #: config precision: bf16 shards with FSDP's mixed-precision policy
        self.precision = precision
        #: config fsdp_checkpoint: "sharded" (through DCP) or "full" (gathered on rank 0)
        self.sharded_checkpoints = checkpoint == "sharded"
        #: reduce-scatter after every micro-batch (config fsdp_sync_each_micro_batch)
        self.sync_each = sync_each
        self._norms = SquaredNorms()
        self._comms: list[tuple[Any, Any]] = []  # (param group, its own reduce-scatter)

    def shard(self, model: nn.Module, policy: Any = None) -> None:
        blocks = _shard_targets(model, SHARD_SHARE) if policy is None else _policy(model, policy)
        mixed = None
        if self.precision == "bf16":  # gathered and computed in bf16, reduced in fp32
            mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for module in blocks:
            fully_shard(module, mp_policy=mixed or MixedPrecisionPolicy())
        fully_shard(model, mp_policy=mixed or MixedPrecisionPolicy())
        for module in model.modules():  # each sharded block: its gradients summed
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(1.0)
                # a plain sum (gloo has no pre-multiplied one)
                module.set_force_sum_reduction_for_comms(True)
        self.sharded = model

    def prepare(self, model: nn.Module) -> nn.Module:
        self.close()
        resharded(model)  # the parameters the update holds are the shards
        for group in _param_groups(model):
            own = group._reduce_scatter_comm
            group._reduce_scatter_comm = _MeasuredReduceScatter(own, self._norms, self.users)
            self._comms.append((group, own))
        return super().prepare(model)

    def close(self) -> None:
        for group, own in self._comms:  # the model's own reduce-scatters back
            group._reduce_scatter_comm = own
        self._comms = []

    def sync_in_backward(self, batch_samples: int, unsynced: bool, measure: bool = False) -> bool:
        if unsynced:
            raise ConfigError(
                "under parallel: fsdp an update's gradients meet in its backward passes: a "
                "meter that reads each micro-batch's own gradient (gns_micro_batch below a "
                "rank's slice, or a meter of your own), or a rank without any loss term in "
                "an update, cannot run; use parallel: ddp"
            )
        self._begin(measure)
        self._norms.start(measure)
        return True

    @contextlib.contextmanager
    def micro_batch(self, sync: bool) -> Iterator[nn.Module]:
        each = self.sync_each and not self._measure  # a measured update: once, at its end
        self.model.set_requires_gradient_sync(sync or each)  # type: ignore[operator]
        yield self.model

    def finish(
        self,
        params: Sequence[nn.Parameter],
        buffers: Sequence[torch.Tensor],
        flag: float,
        synced: bool,
    ) -> float:
        if self._measure:  # the reduce-scatters summed this rank's squared norms
            self._take_summed(self._norms)
            if any(group._reduce_scatter_comm.divided for group, _ in self._comms):
                raise UsageError(
                    "the noise meter cannot read a float16 reduce-scatter (your "
                    "MixedPrecisionPolicy's reduce_dtype): use float32 or bfloat16"
                )
        if self.users:  # their reduce-scatter averaged; the update is the sum
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(self.world.size)
        local = [b.to_local() if hasattr(b, "to_local") else b for b in buffers]
        return all_reduce_gradients([], self.world, flag, local, params[0].device)

    def stateful(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        return _FullState(model), _FullState(model, optimizer)

    def keep_whole(self, model: nn.Module, device: torch.device | None = None) -> None:
        """Before :meth:`shard`: keep a whole copy of ``model`` on this rank, which
        :meth:`whole` brings to the current weights, for Hessian-vector products and
        adversarial examples (FSDP's sharded model takes neither). Refused, with the
        settings to change, when the copy does not fit ``device``."""
        _check_copy_fits(model, device)
        self.copy = copy.deepcopy(model)  # the same parameters (requires_grad too)

    def whole(self, model: nn.Module) -> nn.Module:
        whole = getattr(self, "copy", None)
        if whole is None:
            raise UsageError(
                "under parallel: fsdp this needs a whole copy of the model, which was not "
                "kept (FSDP.keep_whole before the sharding)"
            )
        state = resharded(model).state_dict()
        with torch.no_grad():  # each sharded tensor gathered whole (a collective)
            for name, value in whole.state_dict().items():
                part = state[name]
                value.copy_(part.full_tensor() if hasattr(part, "full_tensor") else part)
        whole.train(model.training)
        return whole

    def whole_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> torch.optim.Optimizer:
        whole = getattr(self, "copy", None)
        if whole is None:
            return self.whole(model)  # (raises: no copy was kept)
        state = _FullState(model, optimizer)
        state.gather()  # every sharded tensor of the state whole, by parameter index
        gathered = state.state_dict()
        copies = dict(zip(map(id, model.parameters()), whole.parameters(), strict=True))
        groups = [
            {**{k: v for k, v in group.items() if k != "params"},
             "params": [copies[id(p)] for p in group["params"]]}
            for group in optimizer.param_groups
        ]  # fmt: skip
        try:  # each group carries its own hyper-parameters
            mirror = type(optimizer)(groups)
        except TypeError as exc:
            raise UsageError(
                f"under parallel: fsdp the stability gauge copies the optimizer over the "
                f"whole model, and {type(optimizer).__name__}(param_groups) failed ({exc}); "
                "set safeguard: false"
            ) from None
        mirror.load_state_dict(gathered)
        return mirror


def make_parallel(
    kind: str,
    world: World,
    model: nn.Module | None = None,
    sync_each: bool = False,
    checkpoint: str = "sharded",
    precision: str = "fp32",
) -> Parallel:
    """The strategy that config ``parallel: kind`` names, for ``world``; for a ``model``
    the user wrapped in ``DistributedDataParallel`` (or sharded with ``fully_shard``)
    already, that as it is (train :func:`unwrapped` ``model``). Under ``fsdp``:
    ``sync_each``, a reduce-scatter after every micro-batch; ``checkpoint``, config
    ``fsdp_checkpoint``; ``precision``, config ``precision`` (``bf16``: FSDP's
    mixed-precision policy)."""
    if kind not in PARALLEL_KINDS:
        raise InvalidValueError(
            f"parallel must be one of {', '.join(PARALLEL_KINDS)}, got {kind!r}"
        )
    if isinstance(model, FSDPModule):
        if not world.enabled:
            raise UsageError(
                "the model is sharded with fully_shard but this is one process; launch with "
                "torchrun, or pass the model unsharded"
            )
        return FSDP(world, users=True, sync_each=sync_each, checkpoint=checkpoint)
    if model is not None and _is_sharded(model):
        raise UsageError(
            f"the model is wrapped in {type(model).__name__} (FSDP1), which largebatch does "
            "not take; shard it with fully_shard (FSDP2), or pass it unwrapped with "
            "parallel: fsdp (it shards it)"
        )
    if isinstance(model, DistributedDataParallel):
        if not world.enabled:
            raise UsageError(
                "the model is wrapped in DistributedDataParallel but this is one process; "
                "launch with torchrun, or pass the model unwrapped"
            )
        if getattr(model, "static_graph", False):
            # with no_sync accumulation it hung here (2 gloo ranks, torch 2.13), and a
            # torch regression made it skip the all-reduce silently
            raise UsageError(
                "the model's DistributedDataParallel wrapper has static_graph=True, which "
                "does not work with accumulation under no_sync(); wrap it without "
                "static_graph, or pass the model unwrapped"
            )
        return DDP(world, wrapper=model)
    if not world.enabled:
        return Parallel(world)
    if kind == "fsdp":
        return FSDP(world, sync_each=sync_each, checkpoint=checkpoint, precision=precision)
    return DDP(world) if kind == "ddp" else Flat(world)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``model`` itself
    otherwise): what checkpoints, the Hessian and the attacks use."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _is_sharded(model: nn.Module) -> bool:
    """Wrapped by FSDP (``FullyShardedDataParallel``, or ``fully_shard``'s FSDPModule)."""
    return any(cls.__module__.startswith("torch.distributed.fsdp") for cls in type(model).__mro__)
