"""Elastic runs: torchrun restarts a worker group whose worker died, and the run resumes.

The test launches a real ``torchrun --max-restarts=1`` with 2 gloo workers. This file is
also the workers' entry point (see ``__main__`` at the bottom): it runs largebatch's own
command line, and in the first round rank 1 kills itself with SIGKILL in epoch 2, after
the checkpoint of epoch 1 was written. torchrun then restarts both workers with the same
command line; ``--resume`` makes them continue from that checkpoint.

torchrun's agent keeps one key-value store for all rounds, so the restarted workers find
the dead workers' gloo addresses in it; a rank that dials one fails with "connection
refused". Whether a given run dials the stale address depends on timing and on which side
of a gloo pair connects, so the end-to-end test only makes it likely (rank 0 of the second
round starts late); the namespace test below checks the remedy deterministically.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from helpers import assert_runs_close, at_training_forward, free_port, threads_like_a_rank
from largebatch.checkpoint import load_checkpoint
from largebatch.config import TrainConfig
from largebatch.distributed import _round_namespace
from largebatch.io import read_jsonl
from largebatch.train import train

pytestmark = pytest.mark.slow

# Test-only: the training forward (counted from 1) at which rank 1 of the first round dies.
KILL_AT = "LARGEBATCH_TEST_KILL_AT"
# Test-only: the file where the workers note what happened.
EVENTS = "LARGEBATCH_TEST_EVENTS"
# Test-only: seconds by which rank 0 of the restarted round starts after rank 1.
LAG = "LARGEBATCH_TEST_LAG"
# Test-only: seconds each training forward sleeps (a run long enough for a node to join).
SLOW = "LARGEBATCH_TEST_SLOW"


def _values() -> dict:
    # 192 samples, global batch 32 = 2 ranks x 1 micro-batch of 16: 6 updates in epoch 1;
    # ABS doubles the batch to 64 for epoch 2 (2 forwards per rank and update), so rank 1's
    # 9th training forward is in epoch 2's second update, after the epoch-1 checkpoint.
    return dict(
        dataset="synthetic",
        model="mlp",
        method="abs",
        epochs=3,
        batch_size=32,
        max_batch_size=128,
        micro_batch_size=16,
        lr=0.02,
        lr_decay_epochs=[2],
        device="cpu",
        limit_train=192,
        limit_test=64,
        abs_duration=1,
        hessian_samples=32,
    )


LAUNCHERS = {
    # elastic rendezvous, as on a cluster (1 to 2 nodes; this machine is one of them)
    "c10d-elastic": lambda port: [
        "--nnodes=1:2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-conf=last_call_timeout=1",
    ],
    # torchrun's default static rendezvous on one machine
    "static": lambda port: [f"--master-port={port}"],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run, uninterrupted, in this process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with threads_like_a_rank():  # the workers run one thread each
        train(TrainConfig(**_values(), out=str(out)), echo=None, show_progress=False)
    return out


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_exactly(
    tmp_path, launcher, reference
):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_values()))
    out = tmp_path / "elastic"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--max-restarts=1",
        *LAUNCHERS[launcher](free_port()),
        __file__,
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--resume",
        "--quiet",
    ]
    events = tmp_path / "events.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AT: "9", EVENTS: str(events), LAG: "2"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    # round 0 started fresh, rank 1 died in epoch 2, and round 1 resumed after epoch 1
    assert sorted(events.read_text().splitlines()) == [
        "rank 1 killed itself in round 0, checkpoint at epoch 1",
        "round 0 rank 0 starts at epoch None",
        "round 0 rank 1 starts at epoch None",
        "round 1 rank 0 starts at epoch 1",
        "round 1 rank 1 starts at epoch 1",
    ], log[-4000:]

    _assert_same_run(reference, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
    ]


def _node(config: Path, out: Path, port: int, host: bool, env: dict) -> subprocess.Popen:
    """One torchrun "node" of one worker, in an elastic job of 1 to 2 nodes on 127.0.0.1."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
        "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=late", f"--rdzv-conf=is_host={str(host).lower()},last_call_timeout=1",
        __file__, "train", "--config", str(config), "--out", str(out), "--resume", "--quiet",
    ]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_a_node_that_joins_late_is_used_from_the_next_round_and_the_run_stays_the_same(
    tmp_path, reference
):
    # node A trains alone (each training forward sleeps 0.5 s while it is alone: 6 s to
    # its epoch-1 checkpoint, 12 s more of training after it, for node B to start in);
    # once that checkpoint is written, node B arrives: A's agent stops
    # its worker (SIGTERM: it saves after the update in progress) and both rendezvous as a
    # world of 2, which resumes there. The schedule and the weights are one process's.
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_values()))
    out, events = tmp_path / "elastic", tmp_path / "events.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", EVENTS: str(events), SLOW: "0.5",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # fmt: skip
    port = free_port()
    nodes = [_node(config, out, port, True, env)]
    try:
        deadline = time.monotonic() + 120
        while (_checkpoint_epoch_safe(out) or 0) < 1:  # A alone through epoch 1
            assert nodes[0].poll() is None, nodes[0].communicate()[0][-4000:]
            assert time.monotonic() < deadline, "node A did not finish epoch 1"
            time.sleep(0.2)
        nodes.append(_node(config, out, port, False, env))
        logs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-4000:]
    seen = events.read_text().splitlines()
    assert "world 1 rank 0 starts at epoch None" in seen  # A alone, from the start
    joined = [line for line in seen if line.startswith("world 2 rank 1 starts at epoch")]
    assert joined and all(int(line.rsplit(" ", 1)[1]) >= 1 for line in joined), seen
    _assert_same_run(reference, out)


def _checkpoint_epoch_safe(out: Path) -> int | None:
    """The checkpoint's epoch, or None while there is none (or it is being replaced)."""
    try:
        return _checkpoint_epoch(out)
    except Exception:
        return None


def test_a_ddp_run_killed_by_sigkill_resumes_in_one_process(tmp_path, reference):
    # 2 ranks under parallel: ddp (the default) and no restart: rank 1 dies by SIGKILL in
    # epoch 2, the job fails; one process then resumes from the epoch-1 checkpoint
    values = {**_values(), "parallel": "ddp"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
        "--max-restarts=0", f"--master-port={free_port()}", __file__, "train",
        "--config", str(config), "--out", str(out), "--resume", "--quiet",
    ]  # fmt: skip
    events = tmp_path / "events.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", KILL_AT: "9", EVENTS: str(events)}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0  # the job failed: no restart was allowed
    assert "rank 1 killed itself in round 0, checkpoint at epoch 1" in events.read_text()
    assert _checkpoint_epoch(out) == 1
    with threads_like_a_rank():
        train(TrainConfig(**values, out=str(out), resume=True), echo=None, show_progress=False)
    _assert_same_run(reference, out)


@pytest.mark.parametrize("late", [0, 1, 2])
def test_each_round_agrees_on_a_fresh_namespace_despite_a_dead_rounds_keys(late):
    # torchrun's agent keeps one store for every round; the workers of round k must not
    # read what the workers of earlier rounds wrote, whichever rank comes last.
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    seen = []
    for round_ in range(3):
        names = [None] * 3

        def join(rank, names=names, round_=round_):
            if rank == late and round_ > 0:
                time.sleep(0.3)
            client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
            names[rank] = _round_namespace(client, rank, 3, timedelta(seconds=30))

        threads = [threading.Thread(target=join, args=(r,), daemon=True) for r in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(set(names)) == 1 and names[0] is not None, names
        seen.append(names[0])
    assert len(set(seen)) == 3


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [1, 2, 3]  # every epoch once
    schedule = ("epoch", "batch_size", "lr", "updates", "samples", "adv_ratio")
    assert [[r[k] for k in schedule] for r in rb] == [[r[k] for k in schedule] for r in ra]
    assert len({r["batch_size"] for r in ra}) > 1  # the schedule did change the batch
    assert_runs_close(a, b)


def _checkpoint_epoch(out: Path) -> int | None:
    path = out / "checkpoint.pt"
    return load_checkpoint(path)["run"]["epoch"] if path.exists() else None


def _say(text: str) -> None:
    """Append one line to the test's log of events, in one write (workers never interleave)."""
    fd = os.open(os.environ[EVENTS], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def _dies_at(build, count: int, out: Path):
    """Wrap a model builder: the process SIGKILLs itself at its ``count``-th training forward."""

    def die() -> None:
        _say(f"rank 1 killed itself in round 0, checkpoint at epoch {_checkpoint_epoch(out)}")
        os.kill(os.getpid(), signal.SIGKILL)

    return at_training_forward(build, count, die)


def _slowed(build, seconds: float):
    """Wrap a model builder: every training forward of the model sleeps ``seconds``."""

    def build_and_slow(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda m, i, o: time.sleep(seconds) if m.training else None)
        return model

    return build_and_slow


def _worker_main(argv: list[str]) -> int:
    """A torchrun worker: ``largebatch`` itself, with a fault in round 0 on rank 1."""
    import largebatch.train as train_module
    from largebatch.cli import main

    round_ = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    out = Path(argv[argv.index("--out") + 1])
    if os.environ.get(SLOW):  # the late-joining node's test: which world, from where
        size = os.environ.get("WORLD_SIZE", "1")
        _say(f"world {size} rank {rank} starts at epoch {_checkpoint_epoch(out)}")
        if size == "1":  # alone: slow, waiting for the other node; together: at speed
            pause = float(os.environ[SLOW])
            train_module.build_model = _slowed(train_module.build_model, pause)
    else:
        _say(f"round {round_} rank {rank} starts at epoch {_checkpoint_epoch(out)}")
    if round_ > 0 and rank == 0:
        # Rank 0 of the restarted round comes late, as on a slow node: rank 1 is then
        # first in the store, where the dead rank 0's gloo address still is.
        time.sleep(float(os.environ.get(LAG, "0")))
    if round_ == 0 and rank == 1 and os.environ.get(KILL_AT):
        train_module.build_model = _dies_at(train_module.build_model, int(os.environ[KILL_AT]), out)
    torch.set_num_threads(1)
    return main(argv)


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
