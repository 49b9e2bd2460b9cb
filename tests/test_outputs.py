"""The run folder under races: real processes, and race points made deterministic.

A race point is forced by starting a process whose ``fcntl.flock`` first waits for a file
to appear: it has made (or found) the folder and opened it, and takes the lock only when
the test says so.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from largebatch.errors import UsageError
from largebatch.outputs import CONFIG_HEADER, RunFolder, foreign_files

# A process that claims ``out``; while it holds the folder it notes that in ``held``,
# waits for ``release`` (if given), writes a file named by its pid (a folder deleted
# under it fails that write: exit 1), checks that no other holder's file is there
# (exit 3), removes its file and leaves. ``gate``: its flock waits for
# that file first (the race point). It exits 0 when it held the folder, 2 when refused.
_CLAIM = r"""
import fcntl, os, sys, time
from pathlib import Path
out, gate, release, held = (None if a == "-" else Path(a) for a in sys.argv[1:5])
if gate is not None:
    real = fcntl.flock
    def slow(fd, op):
        gate.with_name(gate.name + ".waiting").write_text("")  # it has opened the folder
        while not gate.exists():
            time.sleep(0.005)
        return real(fd, op)
    fcntl.flock = slow
from largebatch.errors import UsageError
from largebatch.outputs import RunFolder
try:
    with RunFolder(out):
        if held is not None:
            held.write_text(str(os.getpid()))
        while release is not None and not release.exists():
            time.sleep(0.005)
        mine = out / str(os.getpid())
        mine.write_text("held")
        others = [p for p in out.iterdir() if p.name.isdigit() and p != mine]
        if not mine.exists() or others:  # two holders at once
            sys.exit(3)
        mine.unlink()
except UsageError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


_SPAWNED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap():
    """No claimant outlives its test, even one whose assertion failed while it waited."""
    yield
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _claim(out: Path, gate=None, release=None, held=None) -> subprocess.Popen:
    args = [str(p) if p is not None else "-" for p in (out, gate, release, held)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CLAIM, *args], stderr=subprocess.PIPE, text=True, env=env
    )
    _SPAWNED.append(proc)
    return proc


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_many_processes_at_once_one_holds_the_folder_at_a_time(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    release = tmp_path / "release"
    procs = [_claim(out, release=release, held=tmp_path / f"held{i}") for i in range(8)]
    time.sleep(2.0)  # every process has made or found the folder, one holds it
    release.write_text("go")
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    codes = [code for code, _ in results]
    assert codes.count(0) >= 1 and set(codes) <= {0, 2}, results
    for code, err in results:
        if code == 2:
            assert "in use by another largebatch process" in err, err
    # every holder wrote into the real folder (exit 3 otherwise), and the last one to
    # leave removed what was made for it: nothing is left
    assert not (tmp_path / "a").exists()


def test_the_loser_of_the_creation_race_removes_nothing(tmp_path):
    """The loser made the folder, the winner locked it first: the loser used to remove
    it as its own empty folder, and the winner then wrote into a deleted folder."""
    out = tmp_path / "run"
    gate, release, held = tmp_path / "gate", tmp_path / "release", tmp_path / "held"
    loser = _claim(out, gate=gate)  # makes the folder, then waits before locking
    _wait_for(tmp_path / "gate.waiting")
    winner = _claim(out, release=release, held=held)  # finds it and locks it at once
    _wait_for(held)
    gate.write_text("go")  # the loser tries to lock now, fails
    assert loser.wait(timeout=60) == 2
    assert "in use" in loser.stderr.read()
    assert out.is_dir()  # still there for the winner
    release.write_text("go")
    assert winner.wait(timeout=60) == 0, winner.stderr.read()  # 1: its folder was deleted


def test_a_process_that_locks_a_folder_removed_under_it_starts_over(tmp_path):
    """The first holder leaves an empty folder and removes it; a process that had opened
    it before must not write into the deleted folder: it makes the folder again."""
    out = tmp_path / "run"
    gate, release, held = tmp_path / "gate", tmp_path / "release", tmp_path / "held"
    first = _claim(out, release=release, held=held)
    _wait_for(held)
    late = _claim(out, gate=gate)  # opens the folder, then waits before locking
    _wait_for(tmp_path / "gate.waiting")
    release.write_text("go")
    assert first.wait(timeout=60) == 0
    assert not out.exists()  # removed by its holder on leaving
    gate.write_text("go")  # the late process locks the deleted folder, sees it, retries
    assert late.wait(timeout=60) == 0, late.stderr.read()  # 3: it wrote into a deleted one
    assert not out.exists()


def test_leaving_removes_only_what_this_process_made(tmp_path):
    (tmp_path / "mine").mkdir()
    with RunFolder(tmp_path / "mine" / "x" / "run"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert list((tmp_path / "mine").iterdir()) == []


def test_foreign_files_are_all_but_our_own(tmp_path):
    assert foreign_files(tmp_path) == []
    (tmp_path / "error.txt").write_text("DataError: ...")  # compare: failed before writing
    assert foreign_files(tmp_path) == []  # so the grid point is retried
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "config.yaml").write_text("lr: 0.1\n")  # a user's own: no header
    (tmp_path / ".checkpoint.pt.abcd1234.tmp").write_text("ours, cut short")
    assert foreign_files(tmp_path) == ["config.yaml", "metrics.jsonl"]
    (tmp_path / "config.yaml").write_text(f"{CONFIG_HEADER}\nlr: 0.1\n")
    (tmp_path / "notes.txt").write_text("a user's")
    assert foreign_files(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("path", ["", "  "])
def test_an_empty_folder_name_is_refused(path):
    with pytest.raises(UsageError, match="empty"):
        RunFolder(path).__enter__()
