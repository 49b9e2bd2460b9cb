"""How gradients meet (largebatch.parallel), with real gloo processes on CPU: DDP and
the flat all-reduce give one process's update, whatever the slices."""

import gc
import os
import weakref
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp  # noqa: F401  (imported after the group exists, it holds it)
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import largebatch
import largebatch.parallel as parallel_module
from helpers import assert_runs_close, free_port, threads_like_a_rank
from largebatch.accumulate import GlobalBatch, micro_batches
from largebatch.checkpoint import load_checkpoint
from largebatch.distributed import World, shard
from largebatch.errors import UsageError
from largebatch.parallel import DDP, Flat, Parallel, make_parallel, sum_hook

pytestmark = pytest.mark.slow

STEPS = 4


class Branchy(nn.Module):
    """An MLP with a branch that only samples with a positive first feature use (so a
    micro-batch without one leaves the branch's parameters out), and a batch norm."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.norm = nn.BatchNorm1d(16) if norm else nn.Identity()
        self.branch = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.norm(self.body(x))
        if bool((x[:, 0] > 0).all()):
            h = h + self.branch(h)
        return self.head(h)


def _data(branch="mixed"):
    """24 samples. ``mixed``: in rows 0-7 and 16-23, pairs of rows take the branch in
    turn (a micro-batch of 2 either takes it or leaves it out), and no row of 8-15
    does (an update of 8 there leaves it out on every rank). ``always``: every row."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 6, generator=g)
    rows = torch.arange(24)
    takes = ((rows // 2) % 2 == 0) & ((rows < 8) | (rows >= 16))
    if branch == "always":
        takes = torch.ones(24, dtype=torch.bool)
    x[:, 0] = torch.where(takes, x[:, 0].abs() + 0.1, -x[:, 0].abs() - 0.1)
    return x, torch.randint(0, 3, (24,), generator=g)


def _train(kind, world, batch, micro, norm=False, momentum=0.9, branch="mixed"):
    """STEPS updates of ``batch`` samples (this rank's slice, in micro-batches of
    ``micro``); returns the weights, the running statistics and the strategy."""
    model = Branchy(norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    parallel = make_parallel(kind, world)
    update = GlobalBatch(
        model, optimizer, nn.functional.cross_entropy, world, torch.device("cpu"),
        parallel=parallel,
    )  # fmt: skip
    x, y = _data(branch)
    for step in range(STEPS):
        rows = torch.arange(step * batch, (step + 1) * batch) % len(y)
        mine = shard(rows, world)
        pieces = list(micro_batches(x[mine], y[mine], micro)) if len(mine) else []
        update.step(pieces, len(rows))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, parallel


def _worker(rank, world_size, port, kind, batch, micro, norm, momentum, branch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    buckets = []  # the buckets that DDP's communication hook summed

    def counting_hook(state, bucket):
        buckets.append(bucket.index())
        return sum_hook(state, bucket)

    parallel_module.sum_hook = counting_hook
    try:
        world = World(rank=rank, size=world_size, local_rank=rank)
        state, parallel = _train(kind, world, batch, micro, norm, momentum, branch)
        wrapped = getattr(parallel, "ddp", None) is not None
        find_unused = getattr(parallel, "find_unused", None)
        parallel.close()  # the wrapper must not outlive the group (its reducer holds it)
        if rank == 0:  # the model is plain again: a backward of one rank alone syncs nothing
            x, _ = _data()
            parallel.model(x).sum().backward()
        if rank == 0:
            torch.save(
                {
                    "state": state,
                    "wrapped": wrapped,
                    "find_unused": find_unused,
                    "buckets": len(buckets),
                },
                out,
            )
    finally:
        group = weakref.ref(dist.distributed_c10d._get_default_group())
        dist.destroy_process_group()
    # a group kept alive by a wrapper's reducer aborts the process as it exits
    assert group() is None, "the process group outlived the run"


def _on_ranks(tmp_path, kind, world_size, batch, micro, norm=False, momentum=0.9, branch="mixed"):
    out = tmp_path / f"{kind}-{world_size}.pt"
    args = (world_size, free_port(), kind, batch, micro, norm, momentum, branch, str(out))
    mp.spawn(_worker, args=args, nprocs=world_size, join=True)
    return torch.load(out)


def _assert_same(one, many):
    for name, value in one.items():
        if value.is_floating_point():
            torch.testing.assert_close(many[name], value, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(many[name], value), name


@pytest.mark.parametrize("kind", ["ddp", "flat"])
def test_two_ranks_equal_one_process_with_twice_the_accumulation(tmp_path, kind):
    # batch 8: each rank runs 4 samples as 2 micro-batches of 2; one process runs 4 of 2.
    # The branch is left out by some micro-batches, and by all of the second update
    # (then, with momentum 0.9, it must not move at all); batch norm moves per update.
    one, _ = _train("flat", World(), batch=8, micro=2, norm=True)
    two = _on_ranks(tmp_path, kind, 2, batch=8, micro=2, norm=True)
    _assert_same(one, two["state"])
    assert two["wrapped"] == (kind == "ddp")
    if kind == "ddp":  # the probe saw micro-batches that left the branch out
        assert two["find_unused"] is True
        assert two["buckets"] >= STEPS - 1  # every update after the probe met in backward


def test_ddp_without_unused_parameters_wraps_without_the_graph_walk(tmp_path):
    one, _ = _train("flat", World(), batch=8, micro=2, branch="always")
    two = _on_ranks(tmp_path, "ddp", 2, batch=8, micro=2, branch="always")
    _assert_same(one, two["state"])
    assert two["wrapped"] is True and two["find_unused"] is False
    assert two["buckets"] >= STEPS - 1


def test_a_rank_with_an_empty_slice_does_not_hang(tmp_path):
    # a global batch of 1 on 2 ranks: rank 1 has nothing, every update reduces by hand
    one, _ = _train("flat", World(), batch=1, micro=1)
    two = _on_ranks(tmp_path, "ddp", 2, batch=1, micro=1)
    _assert_same(one, two["state"])
    assert two["buckets"] == 0


def test_one_process_needs_no_strategy_and_refuses_unknown_kinds():
    assert type(make_parallel("ddp", World())) is Parallel
    assert type(make_parallel("flat", World(0, 2, 0))) is Flat
    assert type(make_parallel("ddp", World(0, 2, 0))) is DDP
    with pytest.raises(ValueError, match="parallel must be one of ddp, flat"):
        make_parallel("fsdp2", World())


def _fit_worker(rank, world_size, port, out):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        # the user's own wrapper: DDP's defaults but for the branch some samples skip
        wrapper = DistributedDataParallel(Branchy(norm=True), find_unused_parameters=True)
        flat = []  # gradients reduced by hand: none, the wrapper's backward does it
        by_hand = parallel_module.all_reduce_gradients

        def counting(params, *args):
            flat.append(len(params))
            return by_hand(params, *args)

        parallel_module.all_reduce_gradients = counting
        largebatch.fit(wrapper, _data(), out=out, **FIT)
        assert flat and set(flat) == {0}  # only the extras (running statistics, flag)
        # with no_sync accumulation a static graph hung (torch 2.13): refused before work
        static = DistributedDataParallel(Branchy(), static_graph=True)
        with pytest.raises(UsageError, match="static_graph=True"):
            largebatch.fit(static, _data(), **FIT)
        del wrapper, static
        gc.collect()
    finally:
        dist.destroy_process_group()


FIT = dict(epochs=2, batch_size=8, micro_batch_size=2, device="cpu", verbose=False)


def test_a_model_the_user_wrapped_in_ddp_is_used_as_it_is(tmp_path):
    # the wrapper's own no_sync and all-reduce (an average, scaled back to the sum), no
    # second synchronisation; checkpoints of the inner module: as one process
    args = (2, free_port(), str(tmp_path / "two"))
    mp.spawn(_fit_worker, args=args, nprocs=2, join=True)
    with threads_like_a_rank():
        largebatch.fit(Branchy(norm=True), _data(), out=tmp_path / "one", **FIT)
    assert_runs_close(tmp_path / "one", tmp_path / "two")
    saved = load_checkpoint(tmp_path / "two" / "checkpoint.pt")["model"]
    assert "branch.weight" in saved  # the inner module's names, no "module." prefix
