"""Datasets, read from standard file formats in a local folder; nothing is ever downloaded.

The package face: one module per file format (``idx``, ``cifar``, ``svhn``, ``small``,
``imagefolder`` and ``imagenet``, sharing ``files``) and ``registry``, which maps names to them.

:func:`load_dataset` returns a :class:`DataSource`: float32 inputs in their raw range (images
scaled to [0, 1]), int64 labels, and the per-channel normalization statistics that the
*model* applies as its first layer. Keeping the data un-normalized means adversarial
perturbations (FGSM eps) and their clamping are expressed in raw input units.

Every problem with a user's files (missing folder or file, wrong magic number, truncated
payload or gzip stream, bad pickle, wrong shapes, labels out of range) raises
:class:`largebatch.errors.DataError` with a single-line message that names the file and says
how to get a good one. The command line prints it as ``error: ...`` and exits with status 2.

Supported names (:data:`DATASETS`):

- ``fashion-mnist``, ``mnist``: IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, gzipped
  (``.gz``) or plain. Fashion-MNIST defaults to the Debian package's folder.
- ``cifar10``, ``cifar100``: the python pickle batches, in the given folder or in its
  ``cifar-10-batches-py`` / ``cifar-100-python`` subfolder.
- ``svhn``: ``train_32x32.mat`` and ``test_32x32.mat`` (cropped digits, label 10 means 0).
- ``digits``: scikit-learn's 8x8 digits, fixed 80/20 split.
- ``mnist1d``: generated locally by the ``mnist1d`` package and cached as ``.npz``.
- ``synthetic``: small learnable images generated from ``seed``, for tests.
- ``tinyimagenet``, ``imagenet``: image files in their usual folder layouts, too large for
  memory: ``train_x`` / ``test_x`` are :class:`largebatch.data.imagefolder.LazyImages`,
  decoded (and augmented) on demand; see :mod:`largebatch.data.imagenet`.
"""

from largebatch.data.files import DEFAULT_DATA_DIRS
from largebatch.data.registry import DATASETS, load_dataset, random_crop_flip
from largebatch.source import UNIT_RANGE, DataSource

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "UNIT_RANGE",
    "DataSource",
    "load_dataset",
    "random_crop_flip",
]
