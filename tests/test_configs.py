"""Every experiment file shipped in configs/ is valid: every run of its grid validates."""

from pathlib import Path

import pytest

from largebatch.compare import load_experiment

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_experiment_is_valid(path):
    experiment = load_experiment(path, {"data_dir": "/data"})
    assert experiment.base and experiment.grid
