"""Tests for largebatch.data: tiny files in the real formats, error messages, generators."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from largebatch import data
from largebatch.data import DATASETS, DataSource, load_dataset, random_crop_flip, small
from largebatch.errors import DataError, UsageError

FASHION_DIR = Path(data.DEFAULT_DATA_DIRS["fashion-mnist"])

# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, one uint32 per dimension, then the uint8 payload."""
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 3, n_test: int = 2, compress: bool = True):
    """Write the four MNIST IDX files; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {}
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for kind, array, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            payload = idx_bytes(array, magic)
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar(folder: Path, files: dict[str, int], label_key: bytes, num_classes: int):
    """CIFAR pickle batches: {file name: sample count}; returns {file name: (data, labels)}."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in files.items():
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
        batch = {b"batch_label": b"test", b"data": images, label_key: labels}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = (images, labels)
    return written


CIFAR10_FILES = {**{f"data_batch_{i}": 2 for i in range(1, 6)}, "test_batch": 3}


def write_svhn(folder: Path, n_train: int = 4, n_test: int = 3):
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [5]][:n], dtype=np.uint8)
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


def raises_data_error(path: Path, *args, **kwargs) -> str:
    """Call load_dataset expecting a one-line DataError that names ``path``."""
    with pytest.raises(DataError) as info:
        load_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message, message
    return message


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_roundtrip(tmp_path, name, compress):
    arrays = write_idx_set(tmp_path, compress=compress)
    source = load_dataset(name, tmp_path)
    assert isinstance(source, DataSource) and source.name == name
    assert source.train_x.shape == (3, 1, 28, 28) and source.test_x.shape == (2, 1, 28, 28)
    assert source.train_x.dtype == torch.float32 and source.train_y.dtype == torch.int64
    images, labels = arrays["train"]
    torch.testing.assert_close(source.train_x[:, 0], torch.from_numpy(images / 255.0).float())
    assert source.train_y.tolist() == labels.tolist()
    assert source.test_y.tolist() == arrays["t10k"][1].tolist()
    assert source.input_shape == (1, 28, 28) and source.num_classes == 10
    assert source.input_range == (0.0, 1.0) and len(source.mean) == len(source.std) == 1
    assert source.augment is None


def test_idx_gzip_detected_by_content(tmp_path):
    # A gzipped file without the .gz suffix is still read.
    write_idx_set(tmp_path, compress=True)
    for gz in tmp_path.glob("*.gz"):
        gz.rename(gz.with_suffix(""))
    assert load_dataset("mnist", tmp_path).train_x.shape[0] == 3


def test_limits_take_first_samples(tmp_path):
    write_idx_set(tmp_path, n_train=5, n_test=4)
    full = load_dataset("mnist", tmp_path)
    small = load_dataset("mnist", tmp_path, limit_train=2, limit_test=10)
    assert torch.equal(small.train_x, full.train_x[:2]) and torch.equal(small.test_y, full.test_y)
    assert small.mean == full.mean
    with pytest.raises(UsageError, match="limit_train"):
        load_dataset("mnist", tmp_path, limit_train=0)


def test_missing_folder_and_default(tmp_path):
    message = raises_data_error(tmp_path / "nope", "fashion-mnist", tmp_path / "nope")
    assert "dataset-fashion-mnist" in message
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist")  # MNIST has no default folder


def test_missing_idx_file(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    message = raises_data_error(tmp_path / "t10k-labels-idx1-ubyte.gz", "fashion-mnist", tmp_path)
    assert "not found" in message and "dataset-fashion-mnist" in message


def _rewrite(path: Path, transform) -> None:
    path.write_bytes(transform(path.read_bytes()))


@pytest.mark.parametrize(
    ("file", "transform", "expected"),
    [
        ("train-images-idx3-ubyte", lambda b: struct.pack(">I", 2049) + b[4:], "magic number"),
        ("train-labels-idx1-ubyte", lambda b: b[:-1], "truncated"),
        ("train-images-idx3-ubyte", lambda b: b + b"\0", "truncated or corrupt"),
        ("train-images-idx3-ubyte", lambda b: b[:10], "too short"),
        ("t10k-labels-idx1-ubyte", lambda b: b[:8] + bytes([10]) + b[9:], "labels in"),
        ("t10k-images-idx3-ubyte", lambda b: idx_bytes(np.zeros((2, 27, 28)), 2051), "shape"),
    ],
)
def test_bad_idx_contents(tmp_path, file, transform, expected):
    write_idx_set(tmp_path, compress=False)
    _rewrite(tmp_path / file, transform)
    assert expected in raises_data_error(tmp_path / file, "mnist", tmp_path)


def test_truncated_gzip(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _rewrite(path, lambda b: b[: len(b) // 2])
    raises_data_error(path, "mnist", tmp_path)


def test_corrupt_gzip_stream(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    _rewrite(path, lambda b: b[:10] + b"\xff" * (len(b) - 10))
    raises_data_error(path, "mnist", tmp_path)


def test_image_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path, compress=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.zeros(2, dtype=np.uint8), 2049))
    message = raises_data_error(labels, "mnist", tmp_path)
    assert "2 labels" in message and "3 images" in message


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Fashion-MNIST package not installed")
def test_real_fashion_mnist():
    source = load_dataset("fashion-mnist")
    assert source.train_x.shape == (60000, 1, 28, 28) and source.test_x.shape == (10000, 1, 28, 28)
    assert source.train_y.shape == (60000,) and source.test_y.shape == (10000,)
    assert 0.0 <= source.train_x.min() and source.train_x.max() <= 1.0
    assert torch.bincount(source.train_y).tolist() == [6000] * 10
    assert abs(source.train_x.mean().item() - source.mean[0]) < 1e-3


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("nested", [False, True])
def test_cifar10_roundtrip(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    written = write_cifar(folder, CIFAR10_FILES, b"labels", 10)
    source = load_dataset("cifar10", tmp_path, augment=True)
    assert source.train_x.shape == (10, 3, 32, 32) and source.test_x.shape == (3, 3, 32, 32)
    assert source.train_x.dtype == torch.float32 and source.train_y.dtype == torch.int64
    first_data, first_labels = written["data_batch_1"]
    expected = torch.from_numpy(first_data.reshape(-1, 3, 32, 32) / 255.0).float()
    torch.testing.assert_close(source.train_x[:2], expected)
    assert source.train_y[:2].tolist() == first_labels
    assert source.test_y.tolist() == written["test_batch"][1]
    assert source.num_classes == 10 and len(source.mean) == 3 and source.augment is not None


def test_cifar100_roundtrip(tmp_path):
    written = write_cifar(
        tmp_path / "cifar-100-python", {"train": 4, "test": 2}, b"fine_labels", 100
    )
    source = load_dataset("cifar100", tmp_path)
    assert source.train_x.shape == (4, 3, 32, 32) and source.num_classes == 100
    assert source.train_y.tolist() == written["train"][1]
    assert source.augment is None  # augment defaults to False


def test_cifar_str_keys_and_protocol5(tmp_path):
    # Pickles written by python-3 tools may have str keys and newer protocols.
    write_cifar(tmp_path, {"train": 2, "test": 2}, b"fine_labels", 100)
    batch = {"data": np.zeros((2, 3072), np.uint8), "fine_labels": np.array([99, 0])}
    with open(tmp_path / "test", "wb") as f:
        pickle.dump(batch, f, protocol=5)
    assert load_dataset("cifar100", tmp_path).test_y.tolist() == [99, 0]


def test_cifar_old_numpy_module_names(tmp_path):
    # The official files were pickled by numpy 1 under python 2: they name numpy.core.
    written = write_cifar(tmp_path, {"train": 2, "test": 2}, b"fine_labels", 100)
    path = tmp_path / "test"
    _rewrite(path, lambda b: b.replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core.multiarray" in path.read_bytes()
    assert load_dataset("cifar100", tmp_path).test_y.tolist() == written["test"][1]


def test_cifar_missing_batch(tmp_path):
    write_cifar(tmp_path, CIFAR10_FILES, b"labels", 10)
    (tmp_path / "data_batch_3").unlink()
    assert "cifar-10-python" in raises_data_error(tmp_path / "data_batch_3", "cifar10", tmp_path)


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


class _Boom:
    """Unpickling this would run os.system: the loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8)}, "lacks the keys"),
        ({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, "3072"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, "3 labels"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "labels in"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "non-integer"),
        ([1, 2, 3], "expected a dict"),
        (_Boom(), "not a numpy array"),
    ],
)
def test_cifar_bad_contents(tmp_path, content, expected):
    write_cifar(tmp_path, CIFAR10_FILES, b"labels", 10)
    _write_pickle(tmp_path / "test_batch", content)
    assert expected in raises_data_error(tmp_path / "test_batch", "cifar10", tmp_path)


@pytest.mark.parametrize("garbage", [b"", b"\x80\x04garbage bytes", b"not a pickle at all"])
def test_cifar_garbage_pickle(tmp_path, garbage):
    write_cifar(tmp_path, CIFAR10_FILES, b"labels", 10)
    (tmp_path / "data_batch_2").write_bytes(garbage)
    raises_data_error(tmp_path / "data_batch_2", "cifar10", tmp_path)


def test_cifar_truncated_pickle(tmp_path):
    write_cifar(tmp_path, CIFAR10_FILES, b"labels", 10)
    _rewrite(tmp_path / "data_batch_5", lambda b: b[: len(b) // 2])
    raises_data_error(tmp_path / "data_batch_5", "cifar10", tmp_path)


# --------------------------------------------------------------------------- SVHN


def test_svhn_roundtrip(tmp_path):
    written = write_svhn(tmp_path)
    source = load_dataset("svhn", tmp_path, augment=True)
    assert source.train_x.shape == (4, 3, 32, 32) and source.test_x.shape == (3, 3, 32, 32)
    assert source.train_y.tolist() == [0, 1, 9, 5]  # label 10 means digit 0
    x = written["train"][0]
    # Pixel (row 5, column 7), channel 2, of sample 1.
    assert source.train_x[1, 2, 5, 7].item() == pytest.approx(x[5, 7, 2, 1] / 255.0)
    # SVHN augmentation crops but never flips.
    batch = source.train_x
    got = source.augment(batch, torch.Generator().manual_seed(3))
    want = random_crop_flip(batch, torch.Generator().manual_seed(3), padding=4, flip=False)
    assert torch.equal(got, want)


def test_svhn_mat_without_x(tmp_path):
    write_svhn(tmp_path)
    path = tmp_path / "test_32x32.mat"
    scipy.io.savemat(path, {"y": np.ones((3, 1), np.uint8)})
    assert "X" in raises_data_error(path, "svhn", tmp_path)


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({"X": np.zeros((32, 32, 3, 2), np.float64), "y": np.ones((2, 1))}, "uint8"),
        ({"X": np.zeros((28, 28, 3, 2), np.uint8), "y": np.ones((2, 1))}, "(32, 32, 3, N)"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))}, "expected (2, 1)"),
        ({"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.full((2, 1), 11)}, "labels in"),
    ],
)
def test_svhn_bad_variables(tmp_path, variables, expected):
    write_svhn(tmp_path)
    path = tmp_path / "train_32x32.mat"
    scipy.io.savemat(path, variables)
    assert expected in raises_data_error(path, "svhn", tmp_path)


def test_svhn_garbage_and_missing(tmp_path):
    write_svhn(tmp_path)
    path = tmp_path / "train_32x32.mat"
    path.write_bytes(b"MATLAB garbage" * 20)
    raises_data_error(path, "svhn", tmp_path)
    path.unlink()
    assert "not found" in raises_data_error(path, "svhn", tmp_path)


# --------------------------------------------------------------------------- generated data


def test_digits_split():
    source = load_dataset("digits")
    again = load_dataset("digits", seed=5)  # the split does not depend on seed
    assert source.train_x.shape == (1438, 1, 8, 8) and source.test_x.shape == (359, 1, 8, 8)
    assert torch.equal(source.test_x, again.test_x)
    assert 0.0 <= source.train_x.min() and source.train_x.max() == 1.0
    assert set(source.train_y.tolist()) == set(range(10))
    assert source.input_range == (0.0, 1.0) and source.augment is None


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to reach the network."""
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_mnist1d_generate_cache_and_reuse(tmp_path, monkeypatch, no_network):
    np.random.seed(123)
    random.seed(123)
    before = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    source = load_dataset("mnist1d", tmp_path)
    # The generator reseeds the global RNGs; the loader must restore them.
    assert (np.random.random(), random.random()) == before
    assert source.train_x.shape == (4000, 40) and source.test_x.shape == (1000, 40)
    assert source.train_x.dtype == torch.float32 and source.train_y.dtype == torch.int64
    assert source.input_shape == (40,) and source.input_range is None and source.num_classes == 10
    assert (tmp_path / "mnist1d.npz").is_file()
    assert not list(tmp_path.glob("*.tmp"))

    # Second load comes from the cache: the generator must not run.
    import mnist1d.data

    def refuse(*args, **kwargs):
        raise AssertionError("regenerated although the cache is valid")

    with monkeypatch.context() as patch:
        patch.setattr(mnist1d.data, "make_dataset", refuse)
        cached = load_dataset("mnist1d", tmp_path, limit_train=10)
    assert torch.equal(cached.train_x, source.train_x[:10])

    # A corrupt cache is regenerated (with a warning) and rewritten.
    _rewrite(tmp_path / "mnist1d.npz", lambda b: b[: len(b) // 3])
    with pytest.warns(UserWarning, match="corrupt"):
        regenerated = load_dataset("mnist1d", tmp_path)
    assert torch.equal(regenerated.test_x, source.test_x)
    assert torch.equal(load_dataset("mnist1d", tmp_path).train_y, source.train_y)


def test_mnist1d_cache_env(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("LARGEBATCH_CACHE", str(tmp_path))
    monkeypatch.setattr(small, "_generate_mnist1d", lambda: _fake_mnist1d())
    source = load_dataset("mnist1d")
    assert (tmp_path / "mnist1d" / "mnist1d.npz").is_file()
    assert source.train_x.shape == (8, 40)


def _fake_mnist1d() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.normal(size=(8, 40)).astype(np.float32),
        "y": np.arange(8, dtype=np.int64) % 10,
        "x_test": rng.normal(size=(4, 40)).astype(np.float32),
        "y_test": np.arange(4, dtype=np.int64),
    }


def test_synthetic_deterministic_and_shaped():
    a, b, c = (load_dataset("synthetic", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (512, 1, 16, 16) and a.test_x.shape == (256, 1, 16, 16)
    assert 0.0 <= a.train_x.min() and a.train_x.max() <= 1.0
    assert torch.bincount(a.train_y).min() >= 50


def test_synthetic_learnable_by_mlp():
    source = load_dataset("synthetic", seed=0)
    torch.manual_seed(0)
    mean, std = source.mean[0], source.std[0]
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _epoch in range(2):
        for start in range(0, 512, 32):
            x = (source.train_x[start : start + 32] - mean) / std
            loss = torch.nn.functional.cross_entropy(model(x), source.train_y[start : start + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        predictions = model((source.test_x - mean) / std).argmax(dim=1)
    assert (predictions == source.test_y).float().mean() > 0.6


# --------------------------------------------------------------------------- augmentation


def _reference_crop_flip(x, shifts, flips, padding):
    """Loop version of random_crop_flip for given offsets and flip decisions."""
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    out = []
    height, width = x.shape[2:]
    for sample, (row, col), flip in zip(padded, shifts.tolist(), flips.tolist(), strict=True):
        crop = sample[:, row : row + height, col : col + width]
        out.append(crop.flip(2) if flip else crop)
    return torch.stack(out)


def test_random_crop_flip_matches_loop():
    x = torch.rand(6, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    got = random_crop_flip(x, torch.Generator().manual_seed(7), padding=2)
    draws = torch.Generator().manual_seed(7)
    shifts = torch.randint(0, 5, (6, 2), generator=draws)
    flips = torch.rand(6, generator=draws) < 0.5
    assert torch.equal(got, _reference_crop_flip(x, shifts, flips, 2))


def test_random_crop_flip_determinism_and_identity():
    x = torch.rand(16, 3, 32, 32)
    first = random_crop_flip(x, torch.Generator().manual_seed(1))
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, random_crop_flip(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, random_crop_flip(x, torch.Generator().manual_seed(2)))
    assert torch.equal(random_crop_flip(x, torch.Generator(), padding=0, flip=False), x)
    with pytest.raises(ValueError):
        random_crop_flip(x[0], torch.Generator())


# --------------------------------------------------------------------------- names


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError) as info:
        load_dataset("imagenet-21k")
    assert not isinstance(info.value, DataError)
    for name in DATASETS:
        assert name in str(info.value)


def test_name_normalization():
    assert load_dataset("Synthetic", limit_train=4).train_x.shape[0] == 4
    assert set(data.__all__) >= {"DataSource", "DATASETS", "DEFAULT_DATA_DIRS", "load_dataset"}
