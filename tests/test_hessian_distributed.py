"""Hessian products over a probe set sharded across two real gloo processes."""

import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.distributed import _import_group_holders
from largebatch.hessian import (
    EigenTracker,
    HessianOperator,
    hessian_trace,
    shard_batch,
    top_eigenvalues,
)

WORLD = 2


def problem():
    """Model, 11 probe samples (shards of 6 and 5) and a fixed vector to multiply."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    vector = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    return model, x, y, vector


def measure(model, data, vector):
    # No seeds: each solver must agree on rank 0's random probes.
    with HessianOperator(model, F.cross_entropy, data) as op:
        result = {
            "distributed": op.distributed,
            "product": op.matvec(vector),
            "eigen": top_eigenvalues(op, k=2, tol=1e-8).values,
            "trace": hessian_trace(op, probes=5).estimate,
            "tracker": EigenTracker(F.cross_entropy, data, tol=1e-8).estimate(model).values,
        }
    # Streamed: each rank goes through its own batches in every product.
    with HessianOperator(model, F.cross_entropy, data, stream=True) as op:
        result["streamed_product"] = op.matvec(vector)
        result["streamed_eigen"] = top_eigenvalues(op, k=2, tol=1e-8).values
    return result


def worker(rank, init_file, out_dir):
    torch.manual_seed(1000 + rank)  # different global RNG streams on purpose
    _import_group_holders()  # torch modules that would keep the group alive (see there)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    group = weakref.ref(dist.distributed_c10d._get_default_group())
    try:
        measure_on_rank(rank, out_dir)
    finally:
        dist.destroy_process_group()
    # nothing may keep the group (and its threads) alive until the interpreter exits
    assert group() is None, "the process group outlived destroy_process_group"


def measure_on_rank(rank, out_dir):
    model, x, y, vector = problem()
    xs, ys = shard_batch(x, y, rank, WORLD)
    local = [(xs[:2], ys[:2]), (xs[2:], ys[2:])]  # unequal local batches as well
    # As in training: the model is wrapped in DDP, which the Hessian code unwraps.
    wrapped = DistributedDataParallel(model)
    torch.save(measure(wrapped, local, vector), f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_reproduce_the_single_process_answer(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, x, y, vector = problem()
    single = measure(model, (x, y), vector)
    assert not single["distributed"]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for result in ranks:
        assert result["distributed"]
        torch.testing.assert_close(result["product"], single["product"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(
            result["streamed_product"], single["product"], rtol=1e-5, atol=1e-12
        )
        for key in ("eigen", "tracker", "streamed_eigen"):
            torch.testing.assert_close(result[key], single[key], rtol=1e-5, atol=0)
    assert ranks[0]["trace"] == ranks[1]["trace"]
    torch.testing.assert_close(ranks[0]["eigen"], ranks[1]["eigen"], rtol=0, atol=0)


def test_shard_batch_splits_contiguously():
    x, y = torch.arange(11.0)[:, None], torch.arange(11)
    shards = [shard_batch(x, y, rank, 3) for rank in range(3)]
    assert [len(s[1]) for s in shards] == [4, 4, 3]
    assert torch.equal(torch.cat([s[1] for s in shards]), y)
    assert len(shard_batch(x[:1], y[:1], 1, 2)[1]) == 0
    with pytest.raises(ValueError):
        shard_batch(x, y, 3, 3)
