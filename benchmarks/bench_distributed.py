"""Benchmark: the cost of data parallelism per optimizer update on CPU with gloo.

Trains the same global batch for a few updates with 1 process and with ``--ranks``
processes (torch.multiprocessing, gloo on localhost), one thread each, and reports the
median seconds per update side by side, plus the median time of the one gradient
all-reduce per update alone. On 2 CPU cores this measures overhead, not speed-up.

    python benchmarks/bench_distributed.py [--model c1] [--batch 256] [--updates 12]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from largebatch.distributed import World, _import_group_holders, all_reduce_gradients, shard
from largebatch.models import build_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world_size: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        _import_group_holders()  # else the group outlives teardown (see there)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank, world_size, rank)
    torch.manual_seed(0)
    model = build_model(args.model, (1, 28, 28), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (args.batch,), generator=generator)
    step_times, reduce_times = [], []
    for _ in range(args.updates):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        xs, ys = shard(x, world), shard(y, world)
        for begin in range(0, len(ys), args.micro):
            xb, yb = xs[begin : begin + args.micro], ys[begin : begin + args.micro]
            (F.cross_entropy(model(xb), yb) * len(yb) / args.batch).backward()
        reduce_started = time.perf_counter()
        all_reduce_gradients(params, world)
        reduce_times.append(time.perf_counter() - reduce_started)
        optimizer.step()
        step_times.append(time.perf_counter() - started)
    if rank == 0:
        warm = args.updates // 4  # first updates include allocation and connection set-up
        results.put(
            {
                "ranks": world_size,
                "update_s": statistics.median(step_times[warm:]),
                "all_reduce_s": statistics.median(reduce_times[warm:]),
            }
        )
    if world_size > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="c1")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--micro", type=int, default=128, help="micro-batch per rank")
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    queue = mp.get_context("spawn").SimpleQueue()
    rows = []
    for world_size in (1, args.ranks):
        mp.spawn(_run, args=(world_size, _free_port(), args, queue), nprocs=world_size)
        rows.append(queue.get())
    parameters = sum(p.numel() for p in build_model(args.model, (1, 28, 28), 10).parameters())
    one, many = rows
    print(
        json.dumps(
            {
                "model": args.model,
                "parameters": parameters,
                "global_batch": args.batch,
                "micro_batch": args.micro,
                "rows": rows,
                "update_time_ratio": many["update_s"] / one["update_s"],
                "all_reduce_share_of_update": many["all_reduce_s"] / many["update_s"],
                "threads_per_rank": 1,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
