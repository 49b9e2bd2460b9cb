"""Stress check: 2-rank gloo training runs, repeated, counting workers that die at exit.

A process group that outlives ``teardown()`` keeps its gloo threads running while the
interpreter exits; one that then releases a finished collective's tensors aborts the
process ("terminate called without an active exception"), now and then. Before the fix in
``largebatch.distributed.setup`` this loop hit it about once in 30 runs.

    python benchmarks/stress_teardown.py --runs 60
    python benchmarks/stress_teardown.py --runs 30 --parallel fsdp

Prints a JSON object: runs, aborted runs, and the seconds taken.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

from largebatch.config import TrainConfig
from largebatch.distributed import teardown
from largebatch.train import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, parallel: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    config = TrainConfig(
        dataset="synthetic",
        model="mlp",
        epochs=3,
        batch_size=32,
        max_batch_size=128,
        micro_batch_size=16,
        lr=0.02,
        out=out,
        device="cpu",
        limit_train=192,
        limit_test=64,
        parallel=parallel,
    )
    try:
        train(config, echo=None, show_progress=False)
    finally:
        teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--parallel", default="ddp", help="ddp (default), flat or fsdp")
    args = parser.parse_args()
    started, aborted = time.perf_counter(), 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                mp.spawn(
                    _worker, args=(_free_port(), f"{tmp}/run", args.parallel), nprocs=2, join=True
                )
            except mp.ProcessExitedException as exc:
                aborted += 1
                print(f"run {run}: {exc}", file=sys.stderr)
    result = {
        "runs": args.runs,
        "parallel": args.parallel,
        "aborted": aborted,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
