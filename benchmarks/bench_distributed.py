"""Benchmark: how the ranks' gradients meet, per optimizer update, on CPU with gloo.

For each global batch, three set-ups run the same updates through
:class:`largebatch.accumulate.GlobalBatch` (the loop's own update): one process doing
the whole global batch, and 2 gloo processes (one thread each, torch.multiprocessing on
localhost) with ``parallel: flat`` and with ``parallel: ddp``. Every process cuts its
share into micro-batches of ``--micro`` samples (accumulation). Reported per set-up: the
median seconds per update (the first updates left out: connection set-up, allocation,
and under ``ddp`` the probe update, which reduces as ``flat``), and the peak resident
memory of each rank. One JSON line per finished set-up goes to ``--out`` as it ends.

    python benchmarks/bench_distributed.py --model resnet18 --batches 64 256 --micro 32 \\
        --updates 8 --repeats 3 --out docs/results/distributed/bench_distributed.jsonl

With ``--meter``, one set-up instead: 2 ``ddp`` processes whose updates cycle through
three variants, interleaved so that the machine's drift falls on each alike: no meter;
the gradient-noise meter reading parts inside each rank's slice (``slices=False``, as
before the slices were read in DDP's communication hook: a gradient copy, and the
update's gradients meet after its backward passes); and the meter reading each rank's
slice before the all-reduce (the default). Reported: the median over the cycles of each
variant's extra seconds over the no-meter update of the same cycle, and that as a share
of a measured update.

    python benchmarks/bench_distributed.py --meter --batches 64 256 --micro 32 \\
        --updates 24 --repeats 1 --out docs/results/distributed/bench_meter.jsonl

With ``--fsdp``, 2 processes under ``parallel: ddp`` and under ``parallel: fsdp``, both
with AdamW; each row adds, per rank, the bytes it holds after the last update of
parameters, gradients and optimizer state (a sharded tensor counts its own shard).

    python benchmarks/bench_distributed.py --fsdp --batches 64 --micro 32 --updates 8 \\
        --repeats 3 --out docs/results/distributed/bench_fsdp.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from largebatch.accumulate import GlobalBatch, micro_batches
from largebatch.distributed import World, _import_group_holders, shard
from largebatch.meters import GradientNoiseMeter, Point
from largebatch.models import build_model
from largebatch.parallel import make_parallel

#: (name, processes, parallel, meter variants): a variant None (no meter), "parts" (inside
#: each rank's slice) or "slices" (each rank's slice, read before the gradients meet)
SETUPS = (
    ("one process", 1, "flat", (None,)),
    ("flat", 2, "flat", (None,)),
    ("ddp", 2, "ddp", (None,)),
)
METER_SETUPS = (("ddp, meter variants interleaved", 2, "ddp", (None, "parts", "slices")),)
FSDP_SETUPS = (("ddp", 2, "ddp", (None,)), ("fsdp", 2, "fsdp", (None,)))


def _bytes(tensors) -> int:
    """Bytes of ``tensors`` held by this process (a sharded tensor: its own shard)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _held(model, optimizer) -> dict:
    params = list(model.parameters())
    state = [v for entry in optimizer.state.values() for v in entry.values()]
    return {
        "parameters": _bytes(params),
        "gradients": _bytes(p.grad for p in params),
        "optimizer_state": _bytes(state),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    rank: int, world_size: int, port: int, kind: str, variants, batch: int, args, queue
) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        _import_group_holders()  # else the group outlives teardown (see there)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    world = World(rank, world_size, rank)
    torch.manual_seed(0)
    shape = (3, args.image, args.image)
    model = build_model(args.model, shape, 10)
    parallel = make_parallel(kind, world)
    parallel.shard(model)  # fsdp: before the optimizer (nothing for the others)
    if args.fsdp:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    update = GlobalBatch(
        model, optimizer, F.cross_entropy, world, torch.device("cpu"), parallel=parallel
    )
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *shape, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)
    mine = shard(torch.arange(batch), world)
    pieces = list(micro_batches(x[mine], y[mine], args.micro))
    meters = {
        None: [],
        "parts": [GradientNoiseMeter(world=world, slices=False, per_window=None)],
        "slices": [GradientNoiseMeter(world=world, per_window=None)],
    }
    for variant in variants:  # the meters cut nothing here (checked): the same pieces
        for meter in meters[variant]:
            assert meter.plan(batch, args.micro, None)[0] == args.micro
    times: dict = {str(v): [] for v in variants}
    for _ in range(args.updates):
        for variant in variants:
            started = time.perf_counter()
            update.step(pieces, batch, meters=meters[variant], point=Point(0, batch, False))
            times[str(variant)].append(time.perf_counter() - started)
    held = _held(model, optimizer)
    update.parallel.close()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"rank": rank, "times": times, "peak_rss_mib": peak_mib, "held_bytes": held})
    if world_size > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image", type=int, default=32, help="side of the inputs")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--micro", type=int, default=32, help="micro-batch per process")
    parser.add_argument("--updates", type=int, default=8)
    parser.add_argument("--warm", type=int, default=2, help="first updates left out")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="rounds of the set-ups, one after the other (the machine's drift then falls "
        "on every set-up alike; medians over all rounds in summarize)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="JSON lines, appended")
    parser.add_argument(
        "--meter", action="store_true",
        help="ddp without and with the gradient-noise meter (parts, slices) instead",
    )  # fmt: skip
    parser.add_argument(
        "--fsdp", action="store_true", help="ddp against fsdp, AdamW, with the bytes held"
    )
    args = parser.parse_args()
    setups = METER_SETUPS if args.meter else FSDP_SETUPS if args.fsdp else SETUPS
    parameters = sum(
        p.numel() for p in build_model(args.model, (3, args.image, args.image), 10).parameters()
    )
    queue = mp.get_context("spawn").SimpleQueue()
    table = []
    runs = [(b, r, setup) for b in args.batches for r in range(args.repeats) for setup in setups]
    for batch, repeat, (name, world_size, kind, variants) in runs:
        spawn_args = (world_size, _free_port(), kind, variants, batch, args, queue)
        mp.spawn(_run, args=spawn_args, nprocs=world_size)
        ranks = sorted((queue.get() for _ in range(world_size)), key=lambda r: r["rank"])
        row = {
            "setup": name,
            "repeat": repeat,
            "processes": world_size,
            "parallel": kind if world_size > 1 else None,
            "model": args.model,
            "parameters": parameters,
            "global_batch": batch,
            "micro_batch": args.micro,
            "threads_per_process": 1,
            "update_s": statistics.median(ranks[0]["times"]["None"][args.warm :]),
            "update_times_s": ranks[0]["times"]["None"],
            "warm": args.warm,
            "peak_rss_mib": [r["peak_rss_mib"] for r in ranks],
            "held_bytes": [r["held_bytes"] for r in ranks],
            "optimizer": "AdamW" if args.fsdp else "SGD",
        }
        if args.meter:
            row["variant_times_s"] = ranks[0]["times"]
        table.append(row)
        if args.out is not None:
            with args.out.open("a") as out:
                out.write(json.dumps(row) + "\n")
                out.flush()
        print(
            f"batch {batch:5d}  {name:12s} {row['update_s']:.3f} s/update  "
            f"peak RSS {', '.join(f'{m:.0f}' for m in row['peak_rss_mib'])} MiB",
            flush=True,
        )
    how = summarize_meter if args.meter else summarize_fsdp if args.fsdp else summarize
    print(json.dumps(how(table), indent=2))


def summarize_meter(rows: list[dict]) -> list[dict]:
    """Per global batch and meter variant: the median over the cycles (after the first
    ``warm``) of the variant's update time less the same cycle's update without a meter,
    and that as a share of the variant's median update."""
    out = []
    for batch in sorted({r["global_batch"] for r in rows}):
        mine = [r for r in rows if r["global_batch"] == batch]
        plain = [t for r in mine for t in r["variant_times_s"]["None"][r["warm"] :]]
        for variant in ("parts", "slices"):
            timed = [t for r in mine for t in r["variant_times_s"][variant][r["warm"] :]]
            extra = statistics.median(t - p for t, p in zip(timed, plain, strict=True))
            out.append(
                {
                    "global_batch": batch,
                    "variant": variant,
                    "cycles": len(timed),
                    "update_s": statistics.median(timed),
                    "without_meter_s": statistics.median(plain),
                    "meter_extra_s": extra,
                    "meter_share": extra / statistics.median(timed),
                }
            )
    return out


def summarize_fsdp(rows: list[dict]) -> list[dict]:
    """Per global batch, ``fsdp`` against ``ddp``: the median seconds per update over every
    round, the largest rank's bytes of parameters, gradients and optimizer state and its
    peak RSS, and fsdp's ratios to ddp's."""
    out = []
    for batch in sorted({r["global_batch"] for r in rows}):
        found = {}
        for name, *_ in FSDP_SETUPS:
            mine = [r for r in rows if r["global_batch"] == batch and r["setup"] == name]
            times = [t for r in mine for t in r["update_times_s"][r["warm"] :]]
            held = max(sum(h.values()) for r in mine for h in r["held_bytes"])
            found[name] = {
                "global_batch": batch, "setup": name, "rounds": len(mine),
                "update_s": statistics.median(times), "held_bytes_per_rank": held,
                "peak_rss_mib": max(m for r in mine for m in r["peak_rss_mib"]),
            }  # fmt: skip
        for key in ("update_s", "held_bytes_per_rank", "peak_rss_mib"):
            found["fsdp"][f"{key}_vs_ddp"] = found["fsdp"][key] / found["ddp"][key]
        out += list(found.values())
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per global batch and set-up: the median over every measured update of every round,
    the largest peak RSS of a rank, the ratios to flat's and to half of one process's."""
    setups = SETUPS
    out = []
    for batch in sorted({r["global_batch"] for r in rows}):
        medians = {}
        for name, *_ in setups:
            mine = [r for r in rows if r["global_batch"] == batch and r["setup"] == name]
            times = [t for r in mine for t in r["update_times_s"][r["warm"] :]]
            medians[name] = statistics.median(times)
            out.append(
                {
                    "global_batch": batch,
                    "setup": name,
                    "rounds": len(mine),
                    "update_s": medians[name],
                    "peak_rss_mib": max(m for r in mine for m in r["peak_rss_mib"]),
                }
            )
        for row in out[-len(setups) :]:
            row["vs_flat"] = row["update_s"] / medians["flat"]
            row["vs_half_of_one_process"] = row["update_s"] / (medians["one process"] / 2)
    return out


if __name__ == "__main__":
    main()
