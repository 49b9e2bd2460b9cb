"""A run whose batch outgrows its processes (config ``max_accumulation``): under
``on_outgrown: stop`` it saves at that decision point, writes ``world.json`` and ends
(``fit`` returns the request, the command line exits with status 3); a run resumed on
the processes it asked for goes on as if it had used them from that point; under
``continue`` it says so once and goes on."""

import json
import subprocess
import sys

import pytest
import yaml

import largebatch
from helpers import assert_runs_close
from largebatch.checkpoint import load_checkpoint
from largebatch.errors import UsageError
from largebatch.io import read_jsonl
from test_fsdp import FIT, Net, _adamw, _data, _one, _two

pytestmark = pytest.mark.slow

# a batch of 7 in micro-batches of 3 (3 per update) grows to 14 at sample 28, mid-epoch:
# 5 micro-batches on one process, 3 per process on two
GROWS = dict(FIT, batch_schedule="0:7 28:14", max_accumulation=3, parallel="ddp")


def test_a_run_asks_for_processes_and_resumes_on_them_as_if_it_had_them(tmp_path):
    out = tmp_path / "asks"
    lines = []
    result = largebatch.fit(
        Net(), _data(), eval_data=_data(9), out=out, optimizer=_adamw, echo=lines.append,
        **{**GROWS, "on_outgrown": "stop", "verbose": True},
    )  # fmt: skip
    asked = result["outgrown"]
    assert asked == json.loads((out / "world.json").read_text())
    assert (asked["processes"], asked["processes_now"], asked["batch_size"]) == (2, 1, 14)
    assert (asked["accumulation"], asked["max_accumulation"], asked["samples"]) == (5, 3, 28)
    assert [line for line in lines if line.startswith("outgrown:")] == [
        f"outgrown: {asked['reason']}; saved, asking for 2 processes"
    ]
    saved = load_checkpoint(out / "checkpoint.pt")["run"]
    assert (saved["epoch"], saved["position"]) == (0, 28)  # at the decision point
    assert not (out / "summary.json").exists()  # not finished
    # resumed on the same single process: it asks again at once, nothing trained
    again = largebatch.fit(
        Net(), _data(), eval_data=_data(9), out=out, optimizer=_adamw, resume=True,
        **{**GROWS, "on_outgrown": "stop"},
    )  # fmt: skip
    assert again["outgrown"] == asked
    assert load_checkpoint(out / "checkpoint.pt")["run"]["position"] == 28
    # on the 2 processes it asked for: to the end, equal to a run that never stopped
    _two(out, resume=True, fit={**GROWS, "on_outgrown": "stop"})
    assert not (out / "world.json").exists()  # answered: removed when the round started
    assert (out / "summary.json").exists()
    # the reference goes on at 5 micro-batches (on_outgrown: continue): one line, no file
    lines = []
    reference = tmp_path / "reference"
    _one(reference, fit={**GROWS, "verbose": True}, echo=lines.append)
    assert len([line for line in lines if line.startswith("outgrown:")]) == 1
    assert "going on" in next(line for line in lines if line.startswith("outgrown:"))
    assert not (reference / "world.json").exists()
    assert_runs_close(reference, out)


def test_the_command_line_exits_with_status_3_and_without_a_limit_never_asks(tmp_path):
    values = dict(
        dataset="digits", model="mlp", method="schedule", batch_schedule="0:32 640:64",
        batch_size=32, max_batch_size=64, micro_batch_size=32, epochs=2, threads=1,
        safeguard=False, on_outgrown="stop",
    )  # fmt: skip

    def train(name, **more):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump({**values, **more}))
        return subprocess.run(
            [sys.executable, "-m", "largebatch", "train", "--config", str(config),
             "--out", str(tmp_path / name), "--quiet"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    done = train("asks", max_accumulation=1)
    assert done.returncode == 3, done.stderr[-2000:]
    assert done.stderr.startswith("outgrown: a batch of 64 needs 2 micro-batches")
    asked = json.loads((tmp_path / "asks" / "world.json").read_text())
    assert asked["processes"] == 2 and asked["samples"] == 640
    never = train("never")  # max_accumulation null (the default): never asks
    assert never.returncode == 0, never.stderr[-2000:]
    assert not (tmp_path / "never" / "world.json").exists()


def _config(tmp_path, **more):
    """gns on digits from a batch of 32 in micro-batches of 32: it doubles to 64 at
    sample 1470 (epoch 2), where one process would need 2 micro-batches per update."""
    values = dict(
        dataset="digits", model="mlp", method="gns", batch_size=32, max_batch_size=128,
        micro_batch_size=32, gns_every=0.25, epochs=3, threads=1, safeguard=False,
        max_accumulation=1,
    )  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**values, **more}))
    return path


def test_the_launcher_relaunches_on_the_processes_asked_for_and_ends_as_if_it_had_them(tmp_path):
    config = _config(tmp_path)
    launched = subprocess.run(
        [sys.executable, "-m", "largebatch", "launch", "--nproc-max", "2", "--",
         "--config", str(config), "--out", str(tmp_path / "launched"), "--quiet"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stdout[-2000:] + launched.stderr[-2000:]
    rounds = [line for line in launched.stdout.splitlines() if line.startswith("launch:")]
    assert "round 1 on 1 process(es)" in rounds[0] and "on_outgrown=stop" in rounds[0]
    assert "asked for 2 processes at sample 1470" in rounds[1]
    assert "round 2 on 2 process(es)" in rounds[2] and "on_outgrown=continue" in rounds[2]
    assert rounds[3] == "launch: the run ended after 2 round(s) on 2 process(es)"
    # the reference: one process throughout, never asking. The same batches, losses and
    # weights; not the same noise readings after the growth: each epoch's short last
    # batch (1437 = 44 x 32 + 29) gives one process a short part that it does not read,
    # and two processes two slices that they do (GradientNoiseMeter's documented rule)
    reference = subprocess.run(
        [sys.executable, "-m", "largebatch", "train", "--config", str(config),
         "--out", str(tmp_path / "one"), "--quiet", "--set", "max_accumulation=null"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert reference.returncode == 0, reference.stderr[-2000:]
    records = read_jsonl(tmp_path / "launched" / "metrics.jsonl")
    assert [r["batch_size"] for r in records] == [32, 64, 64]
    noise = ("gns", "gns_grad_sq", "gns_trace", "gns_updates")
    assert_runs_close(tmp_path / "one", tmp_path / "launched", skip=noise)


def test_the_launchers_rounds(tmp_path):
    from largebatch.launch import launch, torchrun_command

    asks = iter([{"processes": 3, "samples": 10}, {"processes": 16, "samples": 20}, None])
    commands = []

    def run(command):  # a round: leaves the next request, as the run would
        commands.append(command)
        request = next(asks)
        if request is not None:
            (tmp_path / "world.json").write_text(json.dumps({**request, "reason": "r"}))
        return subprocess.CompletedProcess(command, 0)

    lines = []
    status = launch(["--out", str(tmp_path), "--resume"], tmp_path, 4, echo=lines.append,
                    run=run, torchrun=["torchrun"])  # fmt: skip
    assert status == 0 and len(commands) == 3
    assert [c[2] for c in commands] == [
        "--nproc-per-node=1",
        "--nproc-per-node=3",
        "--nproc-per-node=4",  # capped at 4
    ]
    assert commands[0] == torchrun_command(["--out", str(tmp_path)], 1, False, ["torchrun"])
    assert commands[0].count("--resume") == 1 and commands[2][-1] == "on_outgrown=continue"
    assert "next round on 4 (--nproc-max 4)" in lines[3]
    # a round that fails without a request ends the launch with its status
    failing = launch(["--out", str(tmp_path)], tmp_path, 2, echo=lines.append,
                     run=lambda c: subprocess.CompletedProcess(c, 7))  # fmt: skip
    assert failing == 7 and "failed with exit status 7" in lines[-1]
    with pytest.raises(UsageError, match="--nproc-start"):
        launch([], tmp_path, 2, nproc_start=3)


def _slurm_round(tmp_path, nodes, ask, nodes_max=4):
    """scripts/slurm-grow.sh as one job on ``nodes`` nodes of 4 GPUs, with srun, sbatch and
    scontrol replaced by stubs that log their arguments (srun's run asks for ``ask``
    processes, or finishes when None). Returns the script's result and the logged calls."""
    stubs, log, out = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "out"
    stubs.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    request = "" if ask is None else json.dumps({"processes": ask, "reason": "r"})
    for name, action in (
        ("srun", f"[ -z '{request}' ] || echo '{request}' > {out}/world.json; exit 0"),
        ("sbatch", "exit 0"),
        ("scontrol", "printf 'node1\\nnode2\\n'"),
    ):
        (stubs / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n{action}\n')
        (stubs / name).chmod(0o755)
    env = {
        "PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "77",
        "PYTHON": sys.executable,
    }  # fmt: skip
    log.unlink(missing_ok=True)
    done = subprocess.run(
        ["bash", "scripts/slurm-grow.sh", "run.yaml", str(out), str(nodes_max)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return done, log.read_text().splitlines()


def test_the_slurm_script_asks_slurm_for_the_nodes_the_run_wants(tmp_path):
    done, calls = _slurm_round(tmp_path, nodes=1, ask=8)  # 8 processes: 2 nodes of 4
    assert done.returncode == 0, done.stderr
    srun, sbatch = calls[1], calls[2]  # (scontrol first)
    assert srun.startswith("srun torchrun --nnodes=1 --nproc_per_node=4 --rdzv_id=77")
    assert "--rdzv_endpoint=node1:29500" in srun
    assert srun.endswith("--resume --set on_outgrown=stop")
    script = f"scripts/slurm-grow.sh run.yaml {tmp_path / 'out'} 4"
    assert sbatch == f"sbatch --nodes=2 --gpus-per-node=4 {script}"
    assert "next round on 2 node(s)" in done.stdout
    _, calls = _slurm_round(tmp_path, nodes=2, ask=40)  # capped at 4 nodes
    assert calls[-1].startswith("sbatch --nodes=4 ")
    done, calls = _slurm_round(tmp_path, nodes=4, ask=None)  # the last round goes on, ends
    assert calls[1].endswith("--set on_outgrown=continue") and len(calls) == 2
    assert "ended with status 0" in done.stdout


def test_a_growth_at_the_last_epochs_end_asks_for_nothing(tmp_path):
    # the schedule grows the batch at sample 112, the end of the last epoch: nothing is
    # left to train on more processes, so the run finishes instead of asking
    result = largebatch.fit(
        Net(), _data(), eval_data=_data(9), out=tmp_path / "run", optimizer=_adamw,
        **{**GROWS, "batch_schedule": "0:7 112:14", "epochs": 2, "on_outgrown": "stop"},
    )  # fmt: skip
    assert "outgrown" not in result and result["final_batch_size"] == 7
    assert (tmp_path / "run" / "summary.json").exists()
    assert not (tmp_path / "run" / "world.json").exists()
