"""Small datasets made in memory: scikit-learn's digits, MNIST-1D (generated locally and
cached) and the synthetic images of the tests."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from largebatch.data.files import channel_stats, label_tensor, write_atomically
from largebatch.source import UNIT_RANGE, DataSource

__all__ = ["load_digits", "load_mnist1d", "load_synthetic"]


# --------------------------------------------------------------------------- digits


def load_digits(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    """scikit-learn's 1797 8x8 digits, values 0..16 scaled to [0, 1]; fixed 80/20 split."""
    from sklearn.datasets import load_digits as sklearn_digits  # slow import, only here

    bunch = sklearn_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None] / 16.0
    # A fixed permutation, independent of `seed`, so every run tests on the same samples.
    order = np.random.RandomState(0).permutation(len(images))
    n_train = round(0.8 * len(images))
    train, test = order[:n_train], order[n_train:]
    train_x = torch.from_numpy(images[train])
    mean, std = channel_stats(train_x)
    return DataSource(
        "digits",
        train_x,
        label_tensor(bunch.target[train]),
        torch.from_numpy(images[test]),
        label_tensor(bunch.target[test]),
        (1, 8, 8),
        10,
        UNIT_RANGE,
        mean,
        std,
    )


# --------------------------------------------------------------------------- mnist1d

_MNIST1D_FILE = "mnist1d.npz"
_MNIST1D_KEYS = ("x", "y", "x_test", "y_test")
_MNIST1D_LENGTH = 40


def _mnist1d_cache_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    root = os.environ.get("LARGEBATCH_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "largebatch"
    return base / "mnist1d"


def _generate_mnist1d() -> dict[str, np.ndarray]:
    """The standard MNIST-1D (4000 train, 1000 test, length 40), generated locally.

    Uses ``make_dataset`` directly: ``mnist1d.data.get_dataset`` tries a download first.
    """
    import mnist1d.data  # imports matplotlib; only needed when the cache is cold

    # make_dataset reseeds the global numpy and python RNGs; restore them for the caller.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        made = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    return {
        "x": np.asarray(made["x"], dtype=np.float32),
        "y": np.asarray(made["y"], dtype=np.int64),
        "x_test": np.asarray(made["x_test"], dtype=np.float32),
        "y_test": np.asarray(made["y_test"], dtype=np.int64),
    }


def _valid_mnist1d(arrays: dict[str, np.ndarray]) -> bool:
    for x_key, y_key in (("x", "y"), ("x_test", "y_test")):
        x, y = arrays[x_key], arrays[y_key]
        if x.ndim != 2 or x.shape[1] != _MNIST1D_LENGTH or y.shape != (len(x),) or len(x) == 0:
            return False
        if x.dtype != np.float32 or y.dtype != np.int64 or not np.isfinite(x).all():
            return False
        if y.min() < 0 or y.max() > 9:
            return False
    return True


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the cache is absent or unusable."""
    if not path.is_file():
        return None
    try:
        # Open the file ourselves: np.load leaks its handle when the zip is corrupt.
        with path.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _MNIST1D_KEYS}
    except Exception:  # truncated zip, foreign file, missing key: regenerate instead
        arrays = None
    if arrays is None or not _valid_mnist1d(arrays):
        warnings.warn(f"MNIST-1D cache {path} is corrupt; regenerating it", stacklevel=4)
        return None
    return arrays


def load_mnist1d(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    """MNIST-1D: (N, 40) float32 signals, already standardized by the generator (about mean 0,
    std 1) and unbounded, so ``input_range`` is None; mean/std are computed on train."""
    path = _mnist1d_cache_dir(data_dir) / _MNIST1D_FILE
    arrays = _read_mnist1d_cache(path)
    if arrays is None:
        arrays = _generate_mnist1d()
        write_atomically(path, arrays)
    train_x = torch.from_numpy(arrays["x"])
    mean, std = channel_stats(train_x)
    return DataSource(
        "mnist1d",
        train_x,
        torch.from_numpy(arrays["y"]),
        torch.from_numpy(arrays["x_test"]),
        torch.from_numpy(arrays["y_test"]),
        (_MNIST1D_LENGTH,),
        10,
        None,
        mean,
        std,
    )


# --------------------------------------------------------------------------- synthetic

_SYNTHETIC_SHAPE = (1, 16, 16)
_SYNTHETIC_TRAIN, _SYNTHETIC_TEST = 512, 256
_SYNTHETIC_NOISE = 0.3


def _synthetic_split(templates: torch.Tensor, n: int, generator: torch.Generator):
    """``n`` noisy copies of the class templates, classes balanced and shuffled."""
    labels = (torch.arange(n) % len(templates))[torch.randperm(n, generator=generator)]
    noise = _SYNTHETIC_NOISE * torch.randn((n, *templates.shape[1:]), generator=generator)
    return (templates[labels] + noise).clamp_(0.0, 1.0), labels


def load_synthetic(data_dir: str | os.PathLike[str] | None, seed: int) -> DataSource:
    """10 classes of (1, 16, 16) images in [0, 1], 512 train / 256 test, a function of seed.

    Each class has a random binary template (pixels 0.2 or 0.8); samples add Gaussian noise
    (std 0.3) and clip, so a small MLP learns it in an epoch or two.
    """
    generator = torch.Generator().manual_seed(seed)
    templates = 0.2 + 0.6 * (torch.rand((10, *_SYNTHETIC_SHAPE), generator=generator) < 0.5)
    train_x, train_y = _synthetic_split(templates, _SYNTHETIC_TRAIN, generator)
    test_x, test_y = _synthetic_split(templates, _SYNTHETIC_TEST, generator)
    mean, std = channel_stats(train_x)
    return DataSource(
        "synthetic", train_x, train_y, test_x, test_y, _SYNTHETIC_SHAPE, 10, UNIT_RANGE, mean, std
    )
