"""``largebatch launch``: a training run on as many processes as its batch needs.

The launcher starts ``largebatch train`` under torchrun on one machine (``--standalone``)
with ``--resume`` and ``--set on_outgrown=stop``. When the run's batch outgrows its
processes (config ``max_accumulation``), the run saves at that decision point, writes
``world.json`` (:mod:`largebatch.engine`, ``WorldOutgrown``) and ends; the launcher reads
the request and starts the next round on the processes asked for (at most
``--nproc-max``), which resumes where the run stopped. A round on ``--nproc-max``
processes runs with ``on_outgrown=continue``: it goes on at the higher accumulation
instead of asking again. Every round is logged as one line. The launcher ends with the
run's exit status: 0 when it finished, the round's status when a round failed without a
request (an error, an interrupt).

:func:`torchrun_command` builds one round's command, so a scheduler's script can run the
same rounds (``scripts/slurm-grow.sh`` asks Slurm for the nodes instead).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from largebatch.errors import UsageError
from largebatch.outputs import WORLD_FILE

__all__ = ["launch", "torchrun_command", "read_request"]


def torchrun_command(
    train_args: Sequence[str], processes: int, last: bool, torchrun: Sequence[str] = ()
) -> list[str]:
    """One round: torchrun on this machine with ``processes`` workers, each running
    ``largebatch train`` on ``train_args`` with ``--resume``; ``last``: the world cannot
    grow further, so the run goes on when its batch outgrows it."""
    runner = list(torchrun) or [sys.executable, "-m", "torch.distributed.run"]
    outgrown = "continue" if last else "stop"
    return [
        *runner, "--standalone", f"--nproc-per-node={processes}",
        "-m", "largebatch", "train", *train_args,
        "--resume", "--set", f"on_outgrown={outgrown}",
    ]  # fmt: skip


def read_request(folder: Path) -> dict[str, Any] | None:
    """The request a round left in ``folder`` (``world.json``), or None."""
    path = folder / WORLD_FILE
    if not path.exists():
        return None
    try:
        request = json.loads(path.read_text())
        processes = int(request["processes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"launch: {path} is not a request of a largebatch run ({exc})") from None
    if processes < 1:
        raise UsageError(f"launch: {path} asks for {processes} processes")
    return request


def launch(
    train_args: Sequence[str],
    folder: Path,
    nproc_max: int,
    nproc_start: int = 1,
    echo: Callable[[str], None] = print,
    run: Callable[..., Any] = subprocess.run,
    torchrun: Sequence[str] = (),
) -> int:
    """Run ``largebatch train train_args``, whose run folder is ``folder``, in rounds on
    a growing number of processes (see the module's docstring); returns the exit status.
    ``run``: how a round's command runs (``subprocess.run``'s signature)."""
    if not 1 <= nproc_start <= nproc_max:
        raise UsageError(
            f"launch: need 1 <= --nproc-start ({nproc_start}) <= --nproc-max ({nproc_max})"
        )
    train_args = [a for a in train_args if a != "--resume"]  # every round adds it
    processes, round_ = nproc_start, 0
    while True:
        round_ += 1
        last = processes >= nproc_max
        command = torchrun_command(train_args, processes, last, torchrun)
        echo(f"launch: round {round_} on {processes} process(es): {' '.join(command)}")
        (folder / WORLD_FILE).unlink(missing_ok=True)  # this round's answer only
        status = run(command).returncode
        request = read_request(folder)
        if request is None:
            if status == 0:
                echo(f"launch: the run ended after {round_} round(s) on {processes} process(es)")
            else:
                echo(f"launch: round {round_} failed with exit status {status}; stopping")
            return int(status)
        wanted = min(int(request["processes"]), nproc_max)
        echo(
            f"launch: the run asked for {request['processes']} processes at sample "
            f"{request.get('samples')} ({request.get('reason', '')}); next round on {wanted}"
            + (f" (--nproc-max {nproc_max})" if wanted < int(request["processes"]) else "")
        )
        if wanted <= processes and last:  # cannot happen: the last round goes on
            echo("launch: the run asked again on the most processes allowed; stopping")
            return 1
        processes = max(wanted, processes)
