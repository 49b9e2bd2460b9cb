"""Tiny ImageNet and ImageNet: their folder layouts, read into a :class:`DataSource` whose
inputs are :class:`~largebatch.data.imagefolder.LazyImages`.

Layouts (any Pillow-readable ``.jpeg``, ``.jpg`` or ``.png`` file, any case; other files and
names starting with ``.``, such as macOS ``._*`` files, are ignored):

- ``tinyimagenet`` (the official ``tiny-imagenet-200`` folder): ``wnids.txt`` lists the class
  ids, one per line, in class-index order; training images are ``train/<wnid>/images/*``;
  the test split is the validation set, ``val/images/*``, labelled by
  ``val/val_annotations.txt`` (tab-separated: file name, wnid, then a bounding box, which is
  ignored). Images in ``val/images`` without an annotation line have no label and are
  ignored; folders in ``train/`` that ``wnids.txt`` does not list are ignored too.
- ``imagenet``: ``train/<class>/*`` and ``val/<class>/*`` (the validation images sorted into
  class folders). The classes are the sorted names of the folders in ``train/``; every
  folder in ``val/`` must be one of them, but a class may lack a ``val/`` folder. Images are
  read from the class folders themselves, not from subfolders.

Sample order: the files of each class are sorted by name, then the classes are interleaved
(the first file of every class in class order, then the second of every class, ...). So the
first N samples, which ``limit_train`` / ``limit_test`` keep, cover all classes.

A problem with the folder layout raises :class:`~largebatch.errors.DataError` when the dataset
is loaded; an unreadable or corrupt image only when it is decoded.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np
import torch

from largebatch.data.files import Where, data_folder, describe, require_file
from largebatch.data.imagefolder import LazyImages
from largebatch.errors import UsageError
from largebatch.source import UNIT_RANGE, DataSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_imagenet",
    "load_tinyimagenet",
]


#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png")

#: The usual ImageNet per-channel statistics, used for both datasets.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- folder scans

_TINY_WHERE = Where(
    "Tiny ImageNet",
    "pass --data-dir with the folder tiny-imagenet-200 extracted from tiny-imagenet-200.zip "
    "(wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt)",
)
_IMAGENET_WHERE = Where(
    "ImageNet",
    "pass --data-dir with a folder holding train/<class>/*.JPEG and val/<class>/*.JPEG "
    "(the validation images sorted into the class folders used in train/)",
)


def _check_image_size(image_size: int | None, default: int) -> int:
    if image_size is None:
        return default
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral):
        raise UsageError(f"image_size must be a positive integer or None, got {image_size!r}")
    if image_size < 1:
        raise UsageError(f"image_size must be a positive integer or None, got {image_size!r}")
    return int(image_size)


def _require_folder(path: Path, where: Where, note: str = "") -> Path:
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "not found"
        raise where.error(f"folder {path} {state}{note}")
    return path


def _scan(folder: Path, where: Where) -> list[os.DirEntry[str]]:
    """The visible entries of ``folder`` (names starting with ``.`` are skipped)."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as exc:
        raise where.error(f"folder {folder} cannot be read ({describe(exc)})") from exc


def _is_image(entry: os.DirEntry[str]) -> bool:
    return entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file()


def _image_names(folder: Path, where: Where) -> list[str]:
    """Sorted names of the image files directly inside ``folder``."""
    return sorted(e.name for e in _scan(folder, where) if _is_image(e))


def _class_folders(folder: Path, where: Where) -> list[str]:
    """Sorted names of the folders directly inside ``folder``."""
    return sorted(e.name for e in _scan(folder, where) if e.is_dir())


def _no_images(folder: Path) -> str:
    kinds = "/".join(IMAGE_EXTENSIONS)
    return f"folder {folder} holds no {kinds} images (restore its images or remove the folder)"


def _read_lines(path: Path, where: Where) -> list[str]:
    try:
        return require_file(path, where).read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise where.error(f"file {path} cannot be read ({describe(exc)})") from exc


def _interleave(per_class: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """Flatten per-class path lists as rank 0 of every class, then rank 1, ...; with labels."""
    counts = [len(paths) for paths in per_class]
    flat = [p for paths in per_class for p in paths]
    if not flat:
        return [], torch.zeros(0, dtype=torch.int64)
    labels = np.repeat(np.arange(len(per_class), dtype=np.int64), counts)
    ranks = np.concatenate([np.arange(c, dtype=np.int64) for c in counts])
    order = np.lexsort((labels, ranks))  # by rank, then by class
    return [flat[i] for i in order], torch.from_numpy(labels[order])


def _source(
    name: str,
    root: Path,
    train: tuple[list[str], torch.Tensor],
    test: tuple[list[str], torch.Tensor],
    num_classes: int,
    size: int,
    crop_fraction: float,
) -> DataSource:
    train_x = LazyImages(root, train[0], size, crop_fraction=crop_fraction)
    test_x = LazyImages(root, test[0], size, crop_fraction=crop_fraction)
    return DataSource(
        name,
        train_x,
        train[1],
        test_x,
        test[1],
        (3, size, size),
        num_classes,
        UNIT_RANGE,
        IMAGENET_MEAN,
        IMAGENET_STD,
    )


# --------------------------------------------------------------------------- Tiny ImageNet


def _read_wnids(path: Path, where: Where) -> list[str]:
    wnids: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path, where), start=1):
        wnid = line.strip()
        if not wnid:
            continue
        if any(c.isspace() for c in wnid) or "/" in wnid or wnid in (".", ".."):
            raise where.error(f"file {path} line {number} is not a class id: {wnid[:40]!r}")
        if wnid in seen:
            raise where.error(
                f"file {path} lists class id {wnid} twice (lines {seen[wnid]} and {number})"
            )
        seen[wnid] = number
        wnids.append(wnid)
    if not wnids:
        raise where.error(f"file {path} lists no class ids (expected one wnid per line)")
    return wnids


def _tiny_train(root: Path, wnids: list[str], where: Where) -> list[list[str]]:
    train = _require_folder(root / "train", where)
    per_class = []
    for wnid in wnids:
        folder = _require_folder(
            train / wnid / "images", where, f" (class {wnid} is listed in {root / 'wnids.txt'})"
        )
        names = _image_names(folder, where)
        if not names:
            raise where.error(_no_images(folder))
        per_class.append([f"train/{wnid}/images/{n}" for n in names])
    return per_class


def _tiny_val(root: Path, wnids: list[str], where: Where) -> list[list[str]]:
    val = _require_folder(root / "val", where)
    images = _require_folder(val / "images", where)
    annotations = val / "val_annotations.txt"
    lines = _read_lines(annotations, where)
    present = {e.name for e in _scan(images, where) if e.is_file()}
    class_of = {wnid: c for c, wnid in enumerate(wnids)}
    per_class: list[list[str]] = [[] for _ in wnids]
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise where.error(
                f"file {annotations} line {number} is malformed: {line[:60]!r} "
                "(expected file name<TAB>wnid<TAB>bounding box)"
            )
        name, wnid = fields[0], fields[1]
        if wnid not in class_of:
            raise where.error(
                f"file {annotations} line {number} names class id {wnid[:40]!r}, "
                f"which {root / 'wnids.txt'} does not list"
            )
        if name not in present:
            raise where.error(
                f"file {annotations} line {number} names image {images / name}, which is not found"
            )
        if name in first_line:
            raise where.error(
                f"file {annotations} names image {name} twice "
                f"(lines {first_line[name]} and {number})"
            )
        first_line[name] = number
        per_class[class_of[wnid]].append(name)
    if not first_line:
        raise where.error(f"file {annotations} lists no images")
    return [[f"val/images/{n}" for n in sorted(names)] for names in per_class]


def load_tinyimagenet(
    data_dir: str | os.PathLike[str] | None, *, image_size: int | None = None
) -> DataSource:
    """Tiny ImageNet from the official folder layout; the test split is the validation set.

    Args:
        data_dir: the ``tiny-imagenet-200`` folder (required; there is no default).
        image_size: side ``S`` of the decoded images; ``None`` means 64, the native size.

    Returns:
        A :class:`DataSource` whose ``train_x`` / ``test_x`` are :class:`LazyImages` of shape
        ``(N, 3, S, S)``, ``num_classes`` the number of wnids (200), ImageNet mean and std,
        ``augment`` None (augmentation happens in :meth:`LazyImages.decode`).

    Raises:
        DataError: a missing folder or file, a malformed ``wnids.txt`` or annotation line, a
            class without images.
        UsageError: an ``image_size`` that is not a positive integer.
    """
    where = _TINY_WHERE
    size = _check_image_size(image_size, 64)
    root = data_folder("tinyimagenet", data_dir, where)
    wnids = _read_wnids(root / "wnids.txt", where)
    train = _interleave(_tiny_train(root, wnids, where))
    test = _interleave(_tiny_val(root, wnids, where))
    return _source("tinyimagenet", root, train, test, len(wnids), size, 1.0)


# --------------------------------------------------------------------------- ImageNet


def _imagenet_classes(train: Path, where: Where) -> list[str]:
    classes = _class_folders(train, where)
    if not classes:
        loose = " (it holds images directly)" if _image_names(train, where) else ""
        raise where.error(f"folder {train} holds no class folders{loose}")
    return classes


def load_imagenet(
    data_dir: str | os.PathLike[str] | None, *, image_size: int | None = None
) -> DataSource:
    """ImageNet (or any dataset in that layout) from ``train/<class>/`` and ``val/<class>/``.

    Args:
        data_dir: folder holding ``train/`` and ``val/`` (required; there is no default).
        image_size: side ``S`` of the decoded images; ``None`` means 224. Evaluation resizes
            the shorter side to ``round(S / 0.875)`` (256 for 224) and crops the centre.

    Returns:
        A :class:`DataSource` with :class:`LazyImages` inputs of shape ``(N, 3, S, S)``, one
        class per folder of ``train/`` (sorted by name), ImageNet mean and std, ``augment``
        None (augmentation happens in :meth:`LazyImages.decode`).

    Raises:
        DataError: a missing ``train/`` or ``val/`` folder, a class folder of ``train/``
            without images, a ``val/`` folder that is not a class of ``train/``, no
            validation images at all.
        UsageError: an ``image_size`` that is not a positive integer.
    """
    where = _IMAGENET_WHERE
    size = _check_image_size(image_size, 224)
    root = data_folder("imagenet", data_dir, where)
    train_dir = _require_folder(root / "train", where)
    val_dir = _require_folder(root / "val", where)
    classes = _imagenet_classes(train_dir, where)
    class_of = {name: c for c, name in enumerate(classes)}
    train_lists = []
    for name in classes:
        images = _image_names(train_dir / name, where)
        if not images:
            raise where.error(_no_images(train_dir / name))
        train_lists.append([f"train/{name}/{n}" for n in images])
    val_lists: list[list[str]] = [[] for _ in classes]
    val_classes = _class_folders(val_dir, where)
    if not val_classes:
        loose = " (it holds images directly)" if _image_names(val_dir, where) else ""
        raise where.error(f"folder {val_dir} holds no class folders{loose}")
    for name in val_classes:
        if name not in class_of:
            raise where.error(
                f"folder {val_dir / name} has no class folder {train_dir / name} "
                "(the classes of val/ must be classes of train/)"
            )
        val_lists[class_of[name]] = [f"val/{name}/{n}" for n in _image_names(val_dir / name, where)]
    if not any(val_lists):
        raise where.error(f"folder {val_dir} holds no images in its class folders")
    train = _interleave(train_lists)
    test = _interleave(val_lists)
    return _source("imagenet", root, train, test, len(classes), size, 0.875)
