"""Fuzzing of everything that reads user input: arbitrary bytes or values give either a
result or our one-line error, never another exception."""

import gzip
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from largebatch.checkpoint import load_checkpoint, save_checkpoint
from largebatch.compare import load_experiment
from largebatch.config import TrainConfig, apply_overrides, load_config
from largebatch.data import DataSource, load_dataset
from largebatch.errors import CheckpointError, ConfigError, DataError, UsageError
from test_data import CIFAR10_FILES, write_cifar, write_idx_set, write_svhn

# `make test` replays the same examples every run, so CI is never red by luck;
# `make fuzz` (LARGEBATCH_FUZZ=N) draws N fresh examples per reader.
_FRESH = int(os.environ.get("LARGEBATCH_FUZZ", "0"))
FUZZ = settings(
    max_examples=_FRESH or 60,
    derandomize=not _FRESH,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _mutations(valid: bytes):
    """Arbitrary bytes, and a valid file truncated, extended or with bytes overwritten."""
    edits = st.lists(
        st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(0, 255)), max_size=8
    )

    def overwrite(pairs):
        data = bytearray(valid)
        for at, value in pairs:
            data[at] = value
        return bytes(data)

    return st.one_of(
        st.binary(max_size=300),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.binary(min_size=1, max_size=40).map(lambda tail: valid + tail),
        edits.map(overwrite),
    )


def _load_or_clean_error(name: str, folder: Path) -> None:
    try:
        source = load_dataset(name, folder)
    except DataError as exc:
        assert "\n" not in str(exc) and str(exc)
        return
    assert isinstance(source, DataSource)
    assert int(source.train_y.max()) < source.num_classes


def _valid_bytes(write, name: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        return (Path(tmp) / name).read_bytes()


IDX_LABELS = gzip.decompress(_valid_bytes(lambda d: write_idx_set(d), "train-labels-idx1-ubyte.gz"))
CIFAR_BATCH = _valid_bytes(lambda d: write_cifar(d, CIFAR10_FILES, b"labels", 10), "test_batch")
SVHN_MAT = _valid_bytes(lambda d: write_svhn(d), "test_32x32.mat")


@FUZZ
@given(content=_mutations(IDX_LABELS))
def test_idx_reader(content):
    with tempfile.TemporaryDirectory() as tmp:
        write_idx_set(Path(tmp), compress=False)
        (Path(tmp) / "train-labels-idx1-ubyte").write_bytes(content)
        _load_or_clean_error("mnist", Path(tmp))


@FUZZ
@given(content=_mutations(gzip.compress(IDX_LABELS)))
def test_gzipped_idx_reader(content):
    with tempfile.TemporaryDirectory() as tmp:
        write_idx_set(Path(tmp), compress=True)
        (Path(tmp) / "t10k-labels-idx1-ubyte.gz").write_bytes(content)
        _load_or_clean_error("mnist", Path(tmp))


@FUZZ
@given(content=_mutations(CIFAR_BATCH))
def test_cifar_reader(content):
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar(Path(tmp), CIFAR10_FILES, b"labels", 10)
        (Path(tmp) / "test_batch").write_bytes(content)
        _load_or_clean_error("cifar10", Path(tmp))


@FUZZ
@given(content=_mutations(SVHN_MAT))
def test_svhn_reader(content):
    with tempfile.TemporaryDirectory() as tmp:
        write_svhn(Path(tmp))
        (Path(tmp) / "test_32x32.mat").write_bytes(content)
        _load_or_clean_error("svhn", Path(tmp))


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=6,
)
_KEYS = st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()]) | st.text(
    max_size=10
)


@FUZZ
@given(values=st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_config_values(values):
    try:
        config = apply_overrides(TrainConfig(), values).validate()
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(config, TrainConfig)


@FUZZ
@given(text=st.text(max_size=200))
def test_config_and_experiment_files(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text)
        for read in (load_config, load_experiment):
            try:
                read(path)
            except UsageError as exc:
                assert str(exc)


def _checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "c.pt", {"model": {"w": torch.arange(4.0)}, "run": {"e": 1}})
        return (Path(tmp) / "c.pt").read_bytes()


@FUZZ
@given(content=_mutations(_checkpoint_bytes()))
def test_checkpoint_reader(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pt"
        path.write_bytes(content)
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return
        assert state["format"] == "largebatch-checkpoint"


def test_a_mat_file_that_crashes_scipys_reader_is_a_clean_error(tmp_path):
    # Found by test_svhn_reader: scipy.io.loadmat dies with SIGSEGV on this file.
    crash = Path(__file__).parent / "fixtures" / "svhn-loadmat-segfault.mat"
    write_svhn(tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(crash.read_bytes())
    try:
        load_dataset("svhn", tmp_path)
    except DataError as exc:
        assert "test_32x32.mat" in str(exc)
    else:
        raise AssertionError("a corrupt file was read without error")
