"""Data-parallel training helpers, thin and explicit.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set) :func:`setup` starts the
process group: NCCL on CUDA, gloo on CPU. Each global batch is split over the ranks in
contiguous slices; every rank accumulates the gradients of its slice (weighted by the
slice's share of the global batch) without any communication, and one all-reduce (sum)
per optimizer update gives every rank the gradient of the whole global batch. So the
global batch is independent of the world size, and a slice may even be empty.
Only rank 0 writes files and shows progress.

Elastic restarts (``torchrun --max-restarts=K``): torchrun's agent keeps one key-value
store for the whole job and points every round of workers at it, under the same keys.
The keys the previous round's workers published (their gloo addresses, NCCL's unique id)
are still there when the restarted workers meet, and a rank that reads one before its
peer has replaced it connects to a dead process (gloo: "connection refused"). So
:func:`setup` has the ranks of each round agree on a fresh random namespace in that
store before the process group starts (see :func:`_round_namespace`).
"""

from __future__ import annotations

import gc
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from largebatch.errors import UsageError

__all__ = [
    "threads_for",
    "thread_count",
    "usable_cores",
    "World",
    "setup",
    "shard",
    "all_reduce_",
    "all_reduce_gradients",
    "broadcast_object",
    "teardown",
    "resolve_device",
]


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def threads_for(
    threads: int | None,
    environ: Mapping[str, str] | None = None,
    cores: int | None = None,
) -> int | None:
    """The torch threads this process should use (None: leave torch's choice).

    ``threads`` when given. Otherwise, when ``OMP_NUM_THREADS`` is set, torch already
    follows it (torchrun sets it to 1 when it starts several processes on a machine);
    when it is not and ``LOCAL_WORLD_SIZE`` says this is one of several processes on the
    machine, the usable cores divided among them (at least 1), since processes at full
    thread count each on shared cores run many times slower.
    """
    if threads is not None:
        return threads
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS"):
        return None
    local = int(environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local <= 1:
        return None
    return max(1, (cores or usable_cores()) // local)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def thread_count(threads: int | None) -> Iterator[None]:
    """Run with :func:`threads_for`'s threads, and put torch's count back afterwards."""
    wanted, before = threads_for(threads), torch.get_num_threads()
    if wanted is not None and wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def setup(device: str) -> tuple[World, str]:
    """Start the process group if launched by torchrun; return the world and the device.

    ``device`` is the config's (``auto|cpu|cuda``); under torchrun on CUDA each process
    takes GPU ``LOCAL_RANK``.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    if not dist.is_initialized():
        _import_group_holders()
        _init_process_group("nccl" if use_cuda else "gloo", rank, size)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return World(rank, size, local_rank), f"cuda:{local_rank}"
    return World(rank, size, local_rank), "cpu"


def _import_group_holders() -> None:
    """Import, before the process group exists, the torch modules that would keep it alive.

    ``torch.distributed.fsdp`` evaluates ``dist.group.WORLD`` in function defaults when it
    is imported, and the first ``torch.optim`` optimizer imports it (through
    ``torch._dynamo``). Imported after ``init_process_group`` it holds the default group
    for good: ``destroy_process_group`` can then not free it, its gloo worker threads still
    run while the interpreter exits, and one that releases a finished collective's tensors
    then aborts the process ("terminate called without an active exception"), now and
    then, after a run that succeeded. Imported first, the defaults are ``None``.
    """
    import torch.distributed.fsdp  # noqa: F401


def _init_process_group(backend: str, rank: int, size: int) -> None:
    """``init_process_group`` from the environment, in a namespace private to this round."""
    timeout = default_pg_timeout
    store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=timeout))
    store.set_timeout(timeout)
    namespace = _round_namespace(store, rank, size, timeout)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"largebatch/{namespace}/", store),
        rank=rank,
        world_size=size,
    )


def _round_namespace(store: dist.Store, rank: int, size: int, timeout: timedelta) -> str:
    """A name that the ranks of this round, and no earlier round, share: rank 0's nonce.

    The store may hold keys of any earlier round whose workers died at any point, so no
    fixed key can be trusted to be fresh. Each rank ``r > 0`` posts a fresh nonce under
    ``hello/r`` and waits for ``welcome/<its nonce>``, a key nobody wrote before; rank 0
    answers whatever ``hello/r`` holds (first perhaps a stale nonce, then the fresh one)
    until ``r`` confirms under a key named after rank 0's own fresh nonce. Restart counters
    are not used: torchrun's agents count restarts each on their own (a restart for a node
    that joined or left is not counted), so they can differ between nodes.
    """
    mine = uuid.uuid4().hex
    if rank != 0:
        store.set(f"largebatch/hello/{rank}", mine)
        namespace = store.get(f"largebatch/welcome/{mine}").decode()  # waits up to timeout
        store.set(f"largebatch/joined/{namespace}/{rank}", "1")
        return namespace
    answered: dict[int, str] = {}
    waiting = set(range(1, size))
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        for other in sorted(waiting):
            if store.check([f"largebatch/joined/{mine}/{other}"]):
                waiting.discard(other)
            elif store.check([f"largebatch/hello/{other}"]):
                nonce = store.get(f"largebatch/hello/{other}").decode()
                if answered.get(other) != nonce:
                    store.set(f"largebatch/welcome/{nonce}", mine)
                    answered[other] = nonce
        if not waiting:
            return mine
        if time.monotonic() > deadline:
            missing = ", ".join(str(r) for r in sorted(waiting))
            raise RuntimeError(f"ranks {missing} did not join the process group in {timeout}")
        time.sleep(0.005)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # what holds the group in reference cycles (a sharded model's state)
        dist.destroy_process_group()


def shard(items: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's contiguous slice of ``items`` (slices differ in size by at most one)."""
    if not world.enabled:
        return items
    return torch.tensor_split(items, world.size)[world.rank]


def all_reduce_(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a no-op in a single process)."""
    if world.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(
    params: list[torch.nn.Parameter],
    world: World,
    flag: float = 0.0,
    buffers: list[torch.Tensor] | tuple[torch.Tensor, ...] = (),
    device: torch.device | None = None,
) -> float:
    """Sum the parameters' gradients over the ranks in one flat all-reduce (``params``
    may be empty: the extras alone, on ``device`` when there is no buffer either).

    A rank whose slice was empty, or whose micro-batches left a parameter out, contributes
    zeros for it; a parameter that no rank has a gradient for keeps none (so an optimizer
    leaves it alone, momentum included, as in one process). ``buffers`` (batch-norm
    running statistics, floating point) ride along and are averaged, so every rank keeps
    the same statistics, drawn from the whole global batch. ``flag`` rides along too, so
    ranks agree on it without another collective (used for "stop requested"); its sum is
    returned.
    """
    if not world.enabled:
        return flag
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    pieces = [g.reshape(-1) for g in grads] + [b.reshape(-1) for b in buffers]
    has = [0.0 if p.grad is None else 1.0 for p in params]  # which ranks have a gradient
    like = next(iter(grads), next(iter(buffers), torch.zeros((), device=device)))
    flat = torch.cat([*pieces, like.new_tensor([*has, flag]).reshape(-1)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    used = flat[-1 - len(params) : -1].tolist()
    for param, grad, ranks in zip(params, grads, used, strict=True):
        count = grad.numel()
        param.grad = flat[offset : offset + count].view_as(param).clone() if ranks else None
        offset += count
    for buffer in buffers:
        count = buffer.numel()
        buffer.copy_(flat[offset : offset + count].view_as(buffer) / world.size)
        offset += count
    return float(flat[-1])


def broadcast_object(obj: Any, world: World) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not world.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (picklable objects)."""
    if not world.enabled:
        return [obj]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)
