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
