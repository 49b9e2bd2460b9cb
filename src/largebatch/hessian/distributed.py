"""Hessian products over a probe set sharded across torch.distributed ranks.

Each rank holds its own shard of the probe samples. A product is the sample-weighted sum
of the local products, all-reduced (SUM) and divided by the global sample count, so every
rank gets exactly the single-process answer for the union of the shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from largebatch.inputs import count as sample_count
from largebatch.inputs import rows

__all__ = ["all_reduce_sum", "broadcast_seed", "distributed_enabled", "shard_batch"]


def distributed_enabled(flag: bool | None) -> bool:
    """Whether to all-reduce: ``None`` means "if a process group is initialized".

    Raises:
        RuntimeError: ``flag`` is True but no process group is initialized.
    """
    ready = dist.is_available() and dist.is_initialized()
    if flag is None:
        return ready
    if flag and not ready:
        raise RuntimeError("distributed=True needs torch.distributed.init_process_group first")
    return bool(flag)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_seed(seed: int, device: torch.device) -> int:
    """Rank 0's ``seed`` on every rank, so all ranks draw the same random probes."""
    holder = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(holder, src=0)
    return int(holder.item())


def shard_batch(
    inputs: torch.Tensor, targets: torch.Tensor, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s contiguous share of a probe set of N samples split over ``world``.

    Shares differ in size by at most one sample (the first ``N % world`` ranks get one
    more); a rank may get an empty share when N < world.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    count = sample_count(inputs)
    if int(targets.shape[0]) != count:
        raise ValueError("inputs and targets hold different numbers of samples")
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return rows(inputs, slice(start, stop)), targets[start:stop]
