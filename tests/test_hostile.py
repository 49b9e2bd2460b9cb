"""Hostile input, one row per class of case, as a new user would try it.

Each row must end with exit status 2 and exactly one ``error:`` line, no traceback, and
leave every file in its folder as it was (nothing written, nothing deleted): all of these
are found before any work starts. The cases that need a real process (a closed pipe, a
full disk, Ctrl-C, a crashed run's lock) follow the table.
"""

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import cli_train
from largebatch.checkpoint import load_checkpoint, save_checkpoint
from largebatch.cli import main
from largebatch.outputs import RUN_FILES, RunFolder

TINY = [
    "--dataset",
    "synthetic",
    "--model",
    "mlp",
    "--device",
    "cpu",
    "--quiet",
    "--set",
    "limit_train=64",
    "--set",
    "limit_test=32",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-epoch run: its checkpoint feeds the evaluate and hessian rows."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def _forged(work: Path, finished: Path, change) -> str:
    """A copy of the finished checkpoint with ``change(state)`` applied."""
    state = load_checkpoint(finished / "checkpoint.pt")
    for key in ("format", "version"):
        state.pop(key)
    change(state)
    save_checkpoint(work / "forged.pt", state)
    return str(work / "forged.pt")


def _experiment(work: Path, **sections) -> str:
    base = {"dataset": "synthetic", "model": "mlp", "epochs": 1, "limit_train": 64}
    text = yaml.safe_dump({"base": base, "grid": {"seed": [0]}, **sections})
    (work / "exp.yaml").write_text(text)
    return str(work / "exp.yaml")


def _run_folder(work: Path, finished: Path, summary=None, record=None) -> str:
    """A folder of one run copied from ``finished``, its summary or an epoch replaced."""
    run = work / "study" / "run"
    run.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copy(finished / name, run / name)
    if summary is not None:
        (run / "summary.json").write_text(summary)
    if record is not None:
        (run / "metrics.jsonl").write_text(record + "\n")
    return str(work / "study")


def _compare(work: Path, **sections):
    return ["compare", "--config", _experiment(work, **sections), "--out", str(work / "c")]


def _with_file(path: Path, text: str, argv: list[str]) -> list[str]:
    path.write_text(text)
    return argv


def _resumed_copy(work: Path, finished: Path, *flags: str) -> list[str]:
    shutil.copytree(finished, work / "run")
    return ["train", *TINY, "--out", str(work / "run"), "--resume", *flags]


def _evaluate(ckpt, *flags):
    return ["evaluate", "--checkpoint", str(ckpt), "--device", "cpu", *flags]


def _hessian(ckpt, *flags):
    return ["hessian", "--checkpoint", str(ckpt), "--device", "cpu", "--samples", "8", *flags]


def _train(work, *flags):
    return ["train", *TINY, "--epochs", "1", "--out", str(work / "run"), *flags]


# id: (argv from (work folder, finished run), fragment of the error line)
CASES = {
    # output paths
    "out-is-a-file": (
        lambda w, f: _with_file(w / "taken", "mine", _train(w)[:-1] + [str(w / "taken")]),
        "is a file",
    ),
    "out-under-proc": (lambda w, f: _train(w)[:-1] + ["/proc/largebatch-test/run"], "/proc"),
    "out-under-sys": (lambda w, f: _train(w)[:-1] + ["/sys/largebatch-test"], "/sys"),
    "out-empty": (lambda w, f: _train(w)[:-1] + [""], "empty"),
    "evaluate-out-is-a-folder": (
        lambda w, f: _evaluate(f / "checkpoint.pt", "--out", str(w)),
        "is a folder",
    ),
    "hessian-out-is-a-folder": (
        lambda w, f: _hessian(f / "checkpoint.pt", "--out", str(w)),
        "is a folder",
    ),
    "evaluate-out-under-proc": (
        lambda w, f: _evaluate(f / "checkpoint.pt", "--out", "/proc/x/result.json"),
        "/proc",
    ),
    # NaN, infinity, seeds beyond range
    "lr-inf": (lambda w, f: _train(w, "--lr", "inf"), "lr must be a finite number"),
    "weight-decay-nan": (lambda w, f: _train(w, "--weight-decay", "nan"), "weight_decay"),
    "adv-eps-nan": (lambda w, f: _train(w, "--set", "adv_eps=.nan"), "adv_eps"),
    "adv-eps-inf": (lambda w, f: _train(w, "--set", "adv_eps=.inf"), "adv_eps"),
    "lr-nan-in-config-file": (
        lambda w, f: _with_file(
            w / "c.yaml", "lr: .nan\n", _train(w, "--config", str(w / "c.yaml"))
        ),
        "lr must be a finite number",
    ),
    "seed-beyond-64-bits": (lambda w, f: _train(w, "--seed", str(2**70)), "seed must be"),
    "seed-negative": (lambda w, f: _train(w, "--seed", "-1"), "seed must be"),
    "evaluate-eps-nan": (lambda w, f: _evaluate(f / "checkpoint.pt", "--eps", "nan"), "eps"),
    "evaluate-alpha-negative": (
        lambda w, f: _evaluate(f / "checkpoint.pt", "--attack", "pgd", "--alpha", "-5"),
        "alpha must be > 0",
    ),
    "evaluate-seed-beyond-64-bits": (
        lambda w, f: _evaluate(f / "checkpoint.pt", "--seed", str(2**65)),
        "seed must be",
    ),
    # hessian options
    "hessian-top-k-beyond-the-parameters": (
        lambda w, f: _hessian(f / "checkpoint.pt", "--top-k", "100000000"),
        "exceeds the model's",
    ),
    "hessian-top-k-beyond-the-lanczos-steps": (
        lambda w, f: _hessian(f / "checkpoint.pt", "--top-k", "100000"),
        "exceeds the 300 Lanczos steps",
    ),
    "hessian-trace-probes-beyond-memory": (
        lambda w, f: _hessian(f / "checkpoint.pt", "--trace", "--trace-probes", str(10**9)),
        "GiB of memory",
    ),
    "hessian-negative-tol": (lambda w, f: _hessian(f / "checkpoint.pt", "--tol", "-1"), "tol"),
    "hessian-zero-trace-probes": (
        lambda w, f: _hessian(f / "checkpoint.pt", "--trace", "--trace-probes", "0"),
        "trace_probes",
    ),
    "hessian-zero-density-probes": (
        lambda w, f: _hessian(f / "checkpoint.pt", "--density", "--density-probes", "0"),
        "density_probes",
    ),
    "hessian-zero-lanczos-steps": (
        lambda w, f: _hessian(f / "checkpoint.pt", "--density", "--lanczos-steps", "0"),
        "lanczos_steps",
    ),
    # compare files
    "compare-attacks-a-string": (
        lambda w, f: _compare(w, evaluate={"attacks": "fgsm"}),
        "must be a list",
    ),
    "compare-eps-nan": (
        lambda w, f: _compare(w, evaluate={"eps": float("nan")}),
        "eps must be a finite number",
    ),
    "compare-eps-a-string": (
        lambda w, f: _compare(w, evaluate={"eps": "small"}),
        "eps must be a number",
    ),
    "compare-hessian-samples-zero": (
        lambda w, f: _compare(w, hessian={"samples": 0}),
        "samples must be >= 1",
    ),
    "compare-base-not-a-mapping": (
        lambda w, f: _with_file(
            w / "e.yaml",
            "base: [1, 2]\ngrid: {seed: [0]}\n",
            ["compare", "--config", str(w / "e.yaml"), "--out", str(w / "c")],
        ),
        "base must be a mapping",
    ),
    "compare-out-is-a-training-run": (
        lambda w, f: ["compare", "--config", _experiment(w), "--out", str(f)],
        "is the folder of a training run",
    ),
    "compare-grid-key-not-a-string": (
        lambda w, f: _with_file(
            w / "e.yaml",
            "base: {dataset: synthetic}\ngrid: {1: [0]}\n",
            ["compare", "--config", str(w / "e.yaml"), "--out", str(w / "c")],
        ),
        "grid must map config keys",
    ),
    "compare-base-sets-out": (
        lambda w, f: _with_file(
            w / "e.yaml",
            "base: {dataset: synthetic, out: elsewhere}\ngrid: {seed: [0]}\n",
            ["compare", "--config", str(w / "e.yaml"), "--out", str(w / "c")],
        ),
        "compare sets out itself",
    ),
    "compare-set-resume": (
        lambda w, f: _compare(w) + ["--set", "resume=false"],
        "compare sets resume itself",
    ),
    # readers
    "report-dir-empty": (lambda w, f: ["report", ""], "empty string"),
    "report-hessian-eigenvalues-a-list": (
        lambda w, f: _with_file(
            w / "study" / "run" / "hessian.json",
            '{"eigenvalues": [1.5]}',
            ["report", _run_folder(w, f)],
        ),
        "has no list of eigenvalues",
    ),
    "report-summary-a-list": (
        lambda w, f: ["report", _run_folder(w, f, summary="[1, 2]")],
        "not a mapping",
    ),
    "report-summary-field-a-string": (
        lambda w, f: ["report", _run_folder(w, f, summary='{"final_test_acc": "high"}')],
        "summary",
    ),
    "report-epoch-record-of-the-wrong-shape": (
        lambda w, f: ["report", _run_folder(w, f, record='{"epoch": "one"}')],
        "metrics.jsonl",
    ),
    "checkpoint-without-model-spec": (
        lambda w, f: _evaluate(_forged(w, f, lambda s: s.pop("model_spec"))),
        "model_spec",
    ),
    "checkpoint-spec-of-another-shape": (
        lambda w, f: _evaluate(_forged(w, f, lambda s: s["model_spec"].update(num_classes=3))),
        "does not fit",
    ),
    "checkpoint-spec-of-the-wrong-type": (
        lambda w, f: _evaluate(_forged(w, f, lambda s: s["model_spec"].update(input_shape="x"))),
        "invalid model spec",
    ),
    "checkpoint-weights-of-another-model": (
        lambda w, f: _evaluate(_forged(w, f, lambda s: s.update(model={"w": torch.zeros(2)}))),
        "does not fit",
    ),
    # a finished run resumed with fewer epochs
    "resume-with-fewer-epochs": (
        lambda w, f: _resumed_copy(w, f, "--epochs", "1"),
        "finished 2 epochs already",
    ),
    # a folder of the user's own files, some named like ours
    "out-holds-the-users-config-and-metrics": (
        lambda w, f: _users_folder(w, "config.yaml", "metrics.jsonl"),
        "no largebatch run wrote (config.yaml, metrics.jsonl)",
    ),
    "out-holds-the-users-notes": (
        lambda w, f: _users_folder(w, "notes.txt"),
        "no largebatch run wrote (notes.txt)",
    ),
    "out-holds-a-finished-run-without-resume": (
        lambda w, f: _train(w)[:-1] + [str(f)],
        "already holds a run",
    ),
}


def _users_folder(work: Path, *names: str) -> list[str]:
    """``--out`` names a folder that holds the user's own files."""
    (work / "run").mkdir()
    for name in names:
        (work / "run" / name).write_text(f"the user's own {name}\n")
    return _train(work)


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) under ``folder``."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _assert_one_error_line(err: str, fragment: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and fragment in lines[0], err


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_one_error_line_before_any_work(case, tmp_path, finished, capfd):
    build, fragment = CASES[case]
    argv = build(tmp_path, finished)
    before, finished_before = _tree(tmp_path), _tree(finished)
    capfd.readouterr()
    assert main(argv) == 2
    _assert_one_error_line(capfd.readouterr().err, fragment)
    assert _tree(tmp_path) == before  # nothing written, changed or deleted
    assert _tree(finished) == finished_before


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path, capfd):
    out = tmp_path / "run"
    with RunFolder(out):  # as a running `largebatch train --out run` holds it
        before = _tree(tmp_path)
        assert main(_train(tmp_path)) == 2
        assert main(_train(tmp_path, "--resume")) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all("in use by another largebatch process" in e for e in err)
        assert _tree(tmp_path) == before
    assert main(_train(tmp_path)) == 0  # free again once the holder is gone


def test_a_crashed_run_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "run"
    code = (
        "import os, signal; from largebatch.outputs import RunFolder\n"
        f"RunFolder({str(out)!r}).__enter__()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -signal.SIGKILL
    assert main(_train(tmp_path)) == 0


def test_start_up_removes_only_its_own_temporaries(tmp_path, finished):
    # resumed: a new folder holding a user's files is refused (see test_hostile_api.py)
    argv = _resumed_copy(tmp_path, finished, "--epochs", "3")
    out = tmp_path / "run"
    (out / ".notes.tmp").write_text("a user's own file")
    (out / ".my.checkpoint.pt.tmp").write_text("also the user's")
    (out / ".checkpoint.pt.k2j4h5g6.tmp").write_bytes(b"left by a save a crash cut short")
    assert main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {".notes.tmp", ".my.checkpoint.pt.tmp"} <= names
    assert ".checkpoint.pt.k2j4h5g6.tmp" not in names


def test_a_grid_value_with_a_path_stays_inside_the_output_folder(tmp_path):
    from largebatch.compare import Experiment, expand_grid

    grid = {"data_dir": ["../../outside", "/abs/path"], "seed": [0]}
    runs = expand_grid(Experiment(base={"dataset": "synthetic"}, grid=grid), tmp_path)
    for _, config in runs:
        path = Path(config.out).resolve()
        assert path.parent == (tmp_path / "runs").resolve(), path


def _cli(out: Path, *flags: str) -> list[str]:
    flags = ("--set", "limit_test=32", *flags)
    return cli_train(out, "--dataset", "synthetic", "--model", "mlp", *flags)


def test_a_closed_output_pipe_is_one_error_line_and_the_run_still_finishes(tmp_path):
    out = tmp_path / "run"
    flags = ("--epochs", "3", "--set", "limit_train=512")
    proc = subprocess.Popen(_cli(out, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # `largebatch train ... | head -1`
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert first.startswith(b"training mlp on synthetic")
    assert proc.returncode == 2
    _assert_one_error_line(err.decode(), "broken pipe")
    assert (out / "summary.json").exists()  # the work went on without its reader


def test_a_full_disk_is_one_error_line_and_leaves_no_partial_file(tmp_path):
    out = tmp_path / "run"

    def small_files_only():  # the checkpoint (about 3 MB) cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run(
        _cli(out, "--epochs", "1", "--quiet", "--set", "limit_train=64"),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files_only,
    )
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, "checkpoint.pt")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "metrics.jsonl"]


def test_a_density_too_large_for_the_memory_is_one_error_line(
    tmp_path, finished, capfd, monkeypatch
):
    import largebatch.analysis

    monkeypatch.setattr(largebatch.analysis, "_total_memory", lambda device: 2**30)
    before = _tree(tmp_path)
    capfd.readouterr()
    argv = _hessian(finished / "checkpoint.pt", "--density", "--lanczos-steps", "2000")
    assert main([*argv, "--out", str(tmp_path / "h.json")]) == 2
    _assert_one_error_line(capfd.readouterr().err, "lanczos_steps (2000) needs 2.0 GiB")
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("blocker", ["a-file", "a-link-into-proc"])
def test_an_unwritable_tensorboard_folder_is_one_error_line(tmp_path, finished, blocker):
    shutil.copytree(finished, tmp_path / "run")
    tensorboard = tmp_path / "run" / "tensorboard"
    if blocker == "a-file":
        tensorboard.write_text("mine")
    else:
        tensorboard.symlink_to("/proc/1")  # a folder that not even root can write into
    argv = ["train", *TINY, "--out", str(tmp_path / "run"), "--resume", "--epochs", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "largebatch", *argv, "--tensorboard"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, f"tensorboard folder {tensorboard}")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["run"]["epoch"] == 2


def test_ctrl_c_during_start_up_is_one_line_and_exit_status_130(tmp_path):
    proc = subprocess.Popen(
        _cli(tmp_path / "run", "--epochs", "50"), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(0.5)  # importing torch, parsing, loading data
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err.decode()
    assert len(err.decode().strip().splitlines()) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only folder")
def test_an_unwritable_output_folder_is_one_error_line(tmp_path, capfd):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(_train(locked)) == 2
        _assert_one_error_line(capfd.readouterr().err, str(locked))
    finally:
        locked.chmod(0o755)


def test_several_train_processes_on_one_new_folder_give_one_whole_run(tmp_path):
    """Started together on a folder that does not exist yet: exactly one run is made, and
    it finishes; every other process exits 2 with one line and takes nothing away."""
    out = tmp_path / "new" / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ("--epochs", "2", "--quiet", "--set", "limit_train=256")
    procs = [
        subprocess.Popen(_cli(out, *flags), stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2, 2, 2], results
    for code, err in results:
        if code == 2:
            _assert_one_error_line(err, "")
            assert "in use by another largebatch process" in err or "already holds a run" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


_SLOW_DATA = """
import time
from pathlib import Path
import torch
from torch.utils.data import TensorDataset

def data():  # the run holds its folder while it reads its data
    Path("held").write_text("reading")
    while not Path("release").exists():
        time.sleep(0.01)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
    return TensorDataset(x, y), TensorDataset(x[:16], y[:16])
"""

# `largebatch train` whose flock first waits for the file ./gate: it has made the folder
# and opened it, and locks it only when the test says so
_GATED_TRAIN = """
import fcntl, sys, time
from pathlib import Path
real = fcntl.flock
def gated(fd, op):
    while not Path("gate").exists():
        time.sleep(0.01)
    return real(fd, op)
fcntl.flock = gated
from largebatch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_loser_of_a_folder_race_leaves_the_winners_run_alone(tmp_path):
    """The race the CLI lost runs to before: the loser made the folder, the winner locked
    it first; the loser then removed the (still empty) folder as its own, so a third
    process got a folder of its own at the same path while the winner read its data, and
    two runs finished into one folder."""
    (tmp_path / "slowdata.py").write_text(_SLOW_DATA)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["train", "--device", "cpu", "--quiet", "--epochs", "1", "--out", "run"]
    tiny = [*args, "--dataset", "synthetic", "--model", "mlp"]
    slow = [*args, "--dataset", "slowdata:data", "--model", "mlp"]
    options = dict(cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    procs = [subprocess.Popen([sys.executable, "-c", _GATED_TRAIN, *tiny], **options)]
    try:
        loser = procs[0]
        while not (tmp_path / "run").exists():  # the loser has made the folder
            assert time.monotonic() < deadline and loser.poll() is None
            time.sleep(0.01)
        procs.append(subprocess.Popen([sys.executable, "-m", "largebatch", *slow], **options))
        winner = procs[1]
        while not (tmp_path / "held").exists():  # the winner holds the folder, reads its data
            assert time.monotonic() < deadline and winner.poll() is None
            time.sleep(0.01)
        (tmp_path / "gate").write_text("")
        assert loser.wait(timeout=120) == 2
        _assert_one_error_line(loser.stderr.read(), "in use by another largebatch process")
        assert (tmp_path / "run").is_dir()  # still the winner's, and still held:
        third = subprocess.run(
            [sys.executable, "-m", "largebatch", *tiny],
            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert third.returncode == 2, third.stderr  # a third run would have got its own folder
        _assert_one_error_line(third.stderr, "in use by another largebatch process")
        (tmp_path / "release").write_text("")
        assert winner.wait(timeout=300) == 0, winner.stderr.read()
        assert (tmp_path / "run" / "summary.json").exists()
    finally:
        for proc in procs:
            proc.kill()
