import pytest
import torch

from largebatch.checkpoint import load_checkpoint, save_checkpoint
from largebatch.errors import CheckpointError
from largebatch.io import append_jsonl, atomic_write, atomic_write_text, read_jsonl


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "good")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_checkpoint_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "run": {"epoch": 2, "history": [{"a": None}]}}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    assert loaded["run"] == {"epoch": 2, "history": [{"a": None}]}


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(1000)}})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_foreign_and_future_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a largebatch checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": "largebatch-checkpoint", "version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "new.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_jsonl_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"epoch": 1})
    append_jsonl(path, {"epoch": 2})
    with open(path, "a") as f:
        f.write('{"epoch": 3, "te')
    assert read_jsonl(path) == [{"epoch": 1}, {"epoch": 2}]
