"""Images decoded from their files on demand: the inputs of the image-folder datasets.

Tiny ImageNet and ImageNet (see :mod:`largebatch.data.imagenet`) do not fit in memory, so
their :class:`~largebatch.data.DataSource` holds a :class:`LazyImages` as ``train_x`` /
``test_x``: a list of image files that is indexed like a tensor (indexing gives a smaller
:class:`LazyImages`, nothing is read) and decoded with Pillow by :meth:`LazyImages.decode`
into float32 ``(B, 3, S, S)`` batches in [0, 1]. Labels are ordinary int64 tensors in memory.
It is a :class:`largebatch.source.LazySplit`, what the feed decodes in its workers.

Transforms (plain Pillow, bilinear resampling):

- evaluation (``augment_seed=None``): resize the shorter side to ``round(S / crop_fraction)``,
  then take the centre ``S x S``. ``crop_fraction`` is 0.875 for ImageNet (256 then 224) and
  1.0 for Tiny ImageNet (64x64 images stay as they are).
- training: random resized crop (area fraction in [0.08, 1], aspect ratio in [3/4, 4/3], 10
  attempts, then a centre crop of the whole image with the aspect ratio clamped into that
  range) resized to ``S x S``, then a horizontal flip with probability 1/2. Sample ``i``'s
  randomness comes only from a generator seeded by ``(augment_seed, i)`` (``i`` its position
  in the full file list), so a sample's crop does not depend on the batch it is in, the worker
  process that decodes it or the order of decoding.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from largebatch.data.files import describe
from largebatch.errors import DataError
from largebatch.source import IndexedSplit, positions

__all__ = ["LazyImages"]

# Random resized crop: range of the crop's area (fraction of the image) and aspect ratio,
# and how many draws to try before falling back to a centre crop.
_CROP_AREA = (0.08, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10
_FLIP_PROBABILITY = 0.5

_BILINEAR = Image.Resampling.BILINEAR

Indices = torch.Tensor | np.ndarray | Sequence[int] | range


# --------------------------------------------------------------------------- lazy images


class _FileList:
    """Paths relative to one root folder, stored as one bytes blob of NUL-separated paths (NUL
    cannot occur in a file name) plus end offsets, so that a list of a million files is built
    and pickled to a DataLoader worker in a fraction of a second."""

    __slots__ = ("root", "_blob", "_ends")

    def __init__(self, root: str | os.PathLike[str], relative: Sequence[str]) -> None:
        self.root = os.fspath(root)
        self._blob = os.fsencode("\0".join(relative))
        if relative:
            separators = np.flatnonzero(np.frombuffer(self._blob, dtype=np.uint8) == 0)
            self._ends = np.append(separators, len(self._blob)).astype(np.int64)
        else:
            self._ends = np.zeros(0, dtype=np.int64)
        if len(self._ends) != len(relative):
            raise ValueError("a relative path contains a NUL character")

    def __len__(self) -> int:
        return len(self._ends)

    def path(self, index: int) -> str:
        start = int(self._ends[index - 1]) + 1 if index > 0 else 0
        relative = os.fsdecode(self._blob[start : int(self._ends[index])])
        return os.path.join(self.root, relative)

    def __getstate__(self) -> tuple[str, bytes, np.ndarray]:
        return self.root, self._blob, self._ends

    def __setstate__(self, state: tuple[str, bytes, np.ndarray]) -> None:
        self.root, self._blob, self._ends = state


class LazyImages(IndexedSplit):
    """Images on disk, decoded on demand to float32 ``(B, 3, S, S)`` in [0, 1].

    Indexing (a slice, a 1-D integer tensor or array, a sequence of ints, or an int, which
    gives a length-1 subset) returns a *subset*: another :class:`LazyImages` that shares this
    one's file list and decodes nothing. :meth:`root_indices` says where a subset's samples
    sit in the full file list; :meth:`decode` takes such root positions.

    Args:
        root: folder the relative paths start from.
        relative_paths: one path per sample, relative to ``root``.
        image_size: side ``S`` of the square output.
        crop_fraction: the evaluation transform resizes the shorter side to
            ``round(S / crop_fraction)`` and keeps the centre ``S x S``; in (0, 1].
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        relative_paths: Sequence[str],
        image_size: int,
        *,
        crop_fraction: float = 1.0,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
            raise TypeError(f"image_size must be an int, got {image_size!r}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        self._files = _FileList(root, relative_paths)
        self._size = int(image_size)
        self._eval_resize = round(image_size / crop_fraction)

    # ------------------------------------------------------------------ indexing

    def _root_count(self) -> int:
        return len(self._files)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(len(self), 3, S, S)``, the shape :meth:`load` returns."""
        return (len(self), 3, self._size, self._size)

    @property
    def image_size(self) -> int:
        """Side ``S`` of the decoded square images."""
        return self._size

    def path(self, root_index: int) -> Path:
        """The file of the sample at position ``root_index`` of the full file list."""
        return Path(self._files.path(int(positions([root_index], len(self._files))[0])))

    def __repr__(self) -> str:
        size = self._size
        return f"LazyImages({len(self)} images -> 3x{size}x{size}, root {self._files.root})"

    # ------------------------------------------------------------------ decoding

    def decode(self, root_indices: Indices, augment_seed: int | None = None) -> torch.Tensor:
        """Decode the samples at positions ``root_indices`` of the full file list.

        Args:
            root_indices: 1-D integer positions (tensor, array, sequence or range), e.g. a part
                of :meth:`root_indices`.
            augment_seed: ``None`` for the evaluation transform; otherwise the training
                augmentation, sample ``i`` drawing from a generator seeded by
                ``(augment_seed, i)``. Use a different seed for every epoch.

        Returns:
            float32 ``(len(root_indices), 3, S, S)`` in [0, 1], RGB, channels first.

        Raises:
            DataError: an image file that is missing, unreadable or corrupt.
        """
        if augment_seed is not None and (
            isinstance(augment_seed, bool) or not isinstance(augment_seed, numbers.Integral)
        ):
            raise TypeError(f"augment_seed must be an int or None, got {augment_seed!r}")
        rows = positions(root_indices, len(self._files))
        out = torch.empty((len(rows), 3, self._size, self._size), dtype=torch.float32)
        for row, index in enumerate(rows.tolist()):
            out[row] = self._decode_one(index, augment_seed)  # uint8 -> float32
        return out.div_(255.0)

    def load(self, augment_seed: int | None = None) -> torch.Tensor:
        """Decode every sample of this subset: ``decode(self.root_indices(), augment_seed)``."""
        return self.decode(self.root_indices(), augment_seed)

    def _decode_one(self, index: int, augment_seed: int | None) -> torch.Tensor:
        """uint8 ``(3, S, S)`` for the file at root position ``index``."""
        path = self._files.path(index)
        try:
            with Image.open(path) as image:
                rgb = _to_rgb(image)
            if augment_seed is None:
                rgb, flip = _resize_center_crop(rgb, self._size, self._eval_resize), False
            else:
                rng = _sample_generator(int(augment_seed), index)
                rgb = _random_resized_crop(rgb, self._size, rng)
                flip = bool(rng.random() < _FLIP_PROBABILITY)
            pixels = np.array(rgb, dtype=np.uint8)
        except Exception as exc:  # Pillow raises many types for damaged files
            reason = " ".join(describe(exc).splitlines())
            raise DataError(
                f"{path}: cannot decode image ({reason}); remove or replace the file"
            ) from exc
        chw = torch.from_numpy(pixels).permute(2, 0, 1)
        return chw.flip(2) if flip else chw


def _sample_generator(seed: int, index: int) -> np.random.Generator:
    """Generator of sample ``index`` for ``seed``: SeedSequence hashes both numbers together.
    Negative seeds are folded in by the zigzag map (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)."""
    word = 2 * seed if seed >= 0 else -2 * seed - 1
    return np.random.default_rng([word, index])


def _to_rgb(image: Image.Image) -> Image.Image:
    """A decoded RGB copy (grayscale, palette, CMYK and alpha images included)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency must go through RGBA
    return image.convert("RGB")


def _resize_center_crop(image: Image.Image, size: int, resize: int) -> Image.Image:
    """Shorter side to ``resize`` (aspect ratio kept), then the centre ``size x size``."""
    width, height = image.size
    if min(width, height) != resize:
        scale = resize / min(width, height)
        if width <= height:
            new_size = (resize, max(resize, round(height * scale)))
        else:
            new_size = (max(resize, round(width * scale)), resize)
        image = image.resize(new_size, _BILINEAR)
        width, height = new_size
    left, top = (width - size) // 2, (height - size) // 2
    if (left, top, width, height) == (0, 0, size, size):
        return image
    return image.crop((left, top, left + size, top + size))


def _random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A random box of random area and aspect ratio, resized to ``size x size``."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(*_CROP_AREA)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * ratio))
        crop_h = round(math.sqrt(target_area / ratio))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            break
    else:  # no draw fitted: centre crop with the aspect ratio clamped into range
        ratio = width / height
        crop_w, crop_h = width, height
        if ratio < _CROP_RATIO[0]:
            crop_h = round(width / _CROP_RATIO[0])
        elif ratio > _CROP_RATIO[1]:
            crop_w = round(height * _CROP_RATIO[1])
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
    box = (left, top, left + crop_w, top + crop_h)
    return image.resize((size, size), _BILINEAR, box=box)
