"""Tests for largebatch.data.imagefolder and .imagenet: tiny Tiny-ImageNet and ImageNet trees of
real JPEG files."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from helpers import (
    COLOURS,
    IMAGENET_CLASSES,
    TINY_WNIDS,
    write_imagenet,
    write_jpeg,
    write_tiny,
)
from largebatch.data import DataSource, load_dataset
from largebatch.data.imagefolder import LazyImages
from largebatch.data.imagenet import IMAGENET_MEAN, IMAGENET_STD
from largebatch.errors import DataError, UsageError


@pytest.fixture
def tiny(tmp_path) -> Path:
    return write_tiny(tmp_path / "tiny-imagenet-200")


@pytest.fixture
def imagenet(tmp_path) -> Path:
    return write_imagenet(tmp_path / "imagenet")


def mean_colours(x: torch.Tensor) -> torch.Tensor:
    """(B, 3) mean colour of each image, in 0..255."""
    return x.mean(dim=(2, 3)) * 255


def assert_colours_match_labels(x: torch.Tensor, y: torch.Tensor, tolerance: float = 12.0):
    expected = torch.tensor(COLOURS, dtype=torch.float32)[y]
    assert (mean_colours(x) - expected).abs().max() < tolerance


def raises_data_error(path: Path, *args, match: str | None = None, **kwargs) -> str:
    """Call load_dataset expecting a one-line DataError that names ``path``."""
    with pytest.raises(DataError, match=match) as info:
        load_dataset(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message, message
    return message


# --------------------------------------------------------------------------- loading


def test_tinyimagenet_loads(tiny):
    source = load_dataset("tinyimagenet", tiny)
    assert isinstance(source, DataSource) and source.name == "tinyimagenet"
    assert isinstance(source.train_x, LazyImages) and isinstance(source.test_x, LazyImages)
    assert source.train_x.shape == (12, 3, 64, 64) and source.test_x.shape == (6, 3, 64, 64)
    assert source.input_shape == (3, 64, 64) and source.num_classes == 3
    assert source.input_range == (0.0, 1.0) and source.augment is None
    assert source.mean == IMAGENET_MEAN and source.std == IMAGENET_STD
    assert source.train_y.dtype == torch.int64 and source.test_y.dtype == torch.int64
    # classes interleaved: the first file of every class, then the second, ...
    assert source.train_y.tolist() == [0, 1, 2] * 4
    assert source.test_y.tolist() == [0, 1, 2] * 2
    for split in ("train", "test"):
        x, y = getattr(source, f"{split}_x"), getattr(source, f"{split}_y")
        images = x.load()
        assert images.shape == x.shape and images.dtype == torch.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert_colours_match_labels(images, y)
    # class order is wnids.txt order, and each label belongs to its file's folder
    for i, label in enumerate(source.train_y.tolist()):
        assert source.train_x.path(i).parts[-3] == TINY_WNIDS[label]


def test_tinyimagenet_eval_is_identity_and_gray_becomes_rgb(tiny):
    source = load_dataset("tinyimagenet", tiny)
    images = source.train_x.load()
    for i in range(len(source.train_x)):
        with Image.open(source.train_x.path(i)) as raw:
            expected = np.asarray(raw.convert("RGB"), dtype=np.float32) / 255
        torch.testing.assert_close(images[i], torch.from_numpy(expected).permute(2, 0, 1))
    gray = [i for i in range(12) if source.train_x.path(i).name == "n02_1.JPEG"]
    assert torch.equal(images[gray[0], 0], images[gray[0], 1])


def test_imagenet_loads_sorted_classes_and_extensions(imagenet):
    source = load_dataset("imagenet", imagenet, image_size=32)
    assert source.input_shape == (3, 32, 32) and source.num_classes == 3
    assert source.train_x.shape == (12, 3, 32, 32) and source.test_x.shape == (6, 3, 32, 32)
    assert source.train_y.tolist() == [0, 1, 2] * 4
    assert source.mean == IMAGENET_MEAN and source.std == IMAGENET_STD
    names = {source.train_x.path(i).name for i in range(12)}
    assert "apple_3.png" in names and "banana_1.jpg" in names and "cherry_2.jpeg" in names
    for i, label in enumerate(source.train_y.tolist()):
        assert source.train_x.path(i).parent.name == IMAGENET_CLASSES[label]
    for x, y in ((source.train_x, source.train_y), (source.test_x, source.test_y)):
        images = x.load()
        assert 0.0 <= images.min() and images.max() <= 1.0
        assert_colours_match_labels(images, y)


def test_image_size_defaults_and_option(imagenet, tiny):
    source = load_dataset("imagenet", imagenet)
    assert source.input_shape == (3, 224, 224) and source.train_x.shape[1:] == (3, 224, 224)
    assert source.train_x[:2].load().shape == (2, 3, 224, 224)
    assert source.train_x.decode([0], augment_seed=1).shape == (1, 3, 224, 224)
    small = load_dataset("tinyimagenet", tiny, image_size=32)
    assert small.input_shape == (3, 32, 32) and small.test_x.load().shape == (6, 3, 32, 32)
    assert_colours_match_labels(small.test_x.load(), small.test_y)
    # other datasets ignore image_size; a bad value is refused
    assert load_dataset("synthetic", image_size=7, limit_train=2).input_shape == (1, 16, 16)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UsageError, match="image_size"):
            load_dataset("imagenet", imagenet, image_size=bad)


def test_limits_cover_all_classes(tiny, imagenet):
    source = load_dataset("tinyimagenet", tiny, limit_train=4, limit_test=3)
    assert isinstance(source.train_x, LazyImages) and len(source.train_x) == 4
    assert source.train_y.tolist() == [0, 1, 2, 0] and source.test_y.tolist() == [0, 1, 2]
    assert source.train_x.root_indices().tolist() == [0, 1, 2, 3]
    assert_colours_match_labels(source.train_x.load(), source.train_y)
    source = load_dataset("imagenet", imagenet, image_size=16, limit_test=100)
    assert len(source.test_x) == len(source.test_y) == 6


# --------------------------------------------------------------------------- subsets


def test_subsets_map_to_root_indices(tiny):
    x = load_dataset("tinyimagenet", tiny).train_x
    assert x.root_indices().tolist() == list(range(12))
    sub = x[2:10]
    assert isinstance(sub, LazyImages) and len(sub) == 8 and sub.shape == (8, 3, 64, 64)
    subsub = sub[1::3]
    assert subsub.root_indices().tolist() == [3, 6, 9]
    assert subsub[torch.tensor([2, 0])].root_indices().tolist() == [9, 3]
    assert subsub[[-1]].root_indices().tolist() == [9]
    assert subsub[1].root_indices().tolist() == [6] and len(subsub[1]) == 1
    assert subsub[torch.tensor(-1)].root_indices().tolist() == [9]
    assert subsub[np.array([True, False, True])].root_indices().tolist() == [3, 9]
    assert len(x[:0]) == 0 and x[:0].load().shape == (0, 3, 64, 64)
    assert x[torch.tensor([], dtype=torch.int64)].root_indices().tolist() == []
    assert x[5:1].root_indices().dtype == torch.int64
    # subsets share the file list, decode only on request, and decode the right samples
    assert subsub._files is x._files
    torch.testing.assert_close(subsub.load(), x.load()[[3, 6, 9]])
    torch.testing.assert_close(subsub.load(augment_seed=4), x.decode([3, 6, 9], augment_seed=4))
    with pytest.raises(IndexError):
        subsub[3]
    with pytest.raises(IndexError):
        x[torch.tensor([[0, 1]])]
    with pytest.raises(TypeError):
        x[[0.5, 1.5]]
    with pytest.raises(IndexError):
        x.decode([12])


def test_pickle_round_trip(tiny):
    x = load_dataset("tinyimagenet", tiny).train_x[1::2]
    copy = pickle.loads(pickle.dumps(x))
    assert isinstance(copy, LazyImages) and len(copy) == len(x) and copy.shape == x.shape
    assert torch.equal(copy.root_indices(), x.root_indices())
    assert torch.equal(copy.load(), x.load())
    assert torch.equal(copy.decode([0, 7], augment_seed=3), x.decode([0, 7], augment_seed=3))


# --------------------------------------------------------------------------- augmentation


def test_augmentation_is_deterministic_per_sample(imagenet):
    x = load_dataset("imagenet", imagenet, image_size=24).train_x
    batch = x.decode([0, 5, 3, 11], augment_seed=7)
    assert batch.shape == (4, 3, 24, 24) and batch.dtype == torch.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0
    torch.testing.assert_close(x.decode([0, 5, 3, 11], augment_seed=7), batch, rtol=0, atol=0)
    # the same sample in another batch, at another place, decodes to the same tensor
    torch.testing.assert_close(x.decode([5], augment_seed=7)[0], batch[1], rtol=0, atol=0)
    torch.testing.assert_close(x.decode([11, 2, 0], augment_seed=7)[2], batch[0], rtol=0, atol=0)
    torch.testing.assert_close(x[[3]].load(augment_seed=7)[0], batch[2], rtol=0, atol=0)
    # another seed gives other crops; negative seeds work and differ from positive ones
    assert not torch.equal(x.decode([0, 5, 3, 11], augment_seed=8), batch)
    assert not torch.equal(x.decode([0, 5, 3, 11], augment_seed=-7), batch)
    assert not torch.equal(x.decode([0, 5, 3, 11]), batch)
    # the crop keeps the class colour
    assert_colours_match_labels(batch, load_dataset("imagenet", imagenet).train_y[[0, 5, 3, 11]])


def test_augmentation_same_in_worker_processes(tiny):
    x = load_dataset("tinyimagenet", tiny).train_x
    requests = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9, 10, 11]]

    class Decode(torch.utils.data.Dataset):
        def __getitem__(self, i):
            return x.decode(requests[i], augment_seed=11)

        def __len__(self):
            return len(requests)

    loader = DataLoader(Decode(), batch_size=None, num_workers=2)
    decoded = torch.cat(list(loader))
    assert torch.equal(decoded, x.decode(range(12), augment_seed=11))
    assert torch.equal(decoded, x[::-1].load(augment_seed=11).flip(0))


def test_random_resized_crop_flips_and_crops(tiny):
    # Over many seeds a horizontally flipped crop must appear, and crops smaller than the
    # image (so the result is not the image itself nor its mirror).
    x = load_dataset("tinyimagenet", tiny).train_x
    original = x.decode([0])[0]
    mirrored = original.flip(2)
    outcomes = [x.decode([0], augment_seed=s)[0] for s in range(40)]
    assert not any(torch.equal(o, original) or torch.equal(o, mirrored) for o in outcomes)
    # with an image of one colour per half, the flip shows as the colour's side
    half = Image.new("RGB", (64, 64), (255, 0, 0))
    half.paste((0, 0, 255), (32, 0, 64, 64))
    half.save(x.path(0), format="PNG")  # a PNG behind a .JPEG name is still readable
    sides = [x.decode([0], augment_seed=s)[0, 0, :, :2].mean().item() for s in range(40)]
    assert any(v > 0.9 for v in sides) and any(v < 0.1 for v in sides)


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_corrupt_image_raises_at_decode(tiny, damage):
    source = load_dataset("tinyimagenet", tiny)
    x = source.train_x
    path = x.path(4)
    if damage == "garbage":
        path.write_bytes(b"this is not an image at all" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.unlink()
    assert x.decode([0, 1]).shape == (2, 3, 64, 64)  # other files still decode
    for seed in (None, 5):
        with pytest.raises(DataError, match="cannot decode image") as info:
            x[3:6].load(augment_seed=seed)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and "remove or replace the file" in message
        assert "\n" not in message


# --------------------------------------------------------------------------- layout errors


def test_data_dir_required(tmp_path):
    for name in ("tinyimagenet", "imagenet"):
        with pytest.raises(DataError, match="no default folder.*--data-dir"):
            load_dataset(name)
    message = raises_data_error(tmp_path / "nope", "tinyimagenet", tmp_path / "nope")
    assert "wnids.txt" in message and "not found" in message
    raises_data_error(tmp_path / "nope", "imagenet", tmp_path / "nope", match="train/<class>")


def _drop_annotation_lines(root: Path, keep) -> None:
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines if keep(line)))


def _append_annotation(root: Path, line: str) -> None:
    with (root / "val" / "val_annotations.txt").open("a") as f:
        f.write(line + "\n")


TINY_BREAKAGES = {
    "no wnids.txt": (lambda r: (r / "wnids.txt").unlink(), "wnids.txt", "not found"),
    "empty wnids.txt": (lambda r: (r / "wnids.txt").write_text("\n  \n"), "wnids.txt", "no class"),
    "binary wnids.txt": (
        lambda r: (r / "wnids.txt").write_bytes(b"\xff\xfe\x00bad"),
        "wnids.txt",
        "cannot be read",
    ),
    "duplicate wnid": (
        lambda r: (r / "wnids.txt").write_text("n03\nn01\nn03\n"),
        "wnids.txt",
        "twice",
    ),
    "wnid without folder": (
        lambda r: (r / "wnids.txt").write_text("n03\nn01\nn02\nn99\n"),
        "train/n99/images",
        "not found.*class n99",
    ),
    "no train": (lambda r: shutil.rmtree(r / "train"), "train", "not found"),
    "empty class": (
        lambda r: [p.unlink() for p in (r / "train" / "n01" / "images").iterdir()],
        "train/n01/images",
        "holds no",
    ),
    "no val": (lambda r: shutil.rmtree(r / "val"), "val", "not found"),
    "no val images folder": (
        lambda r: shutil.rmtree(r / "val" / "images"),
        "val/images",
        "not found",
    ),
    "no annotations": (
        lambda r: (r / "val" / "val_annotations.txt").unlink(),
        "val/val_annotations.txt",
        "not found",
    ),
    "malformed line": (
        lambda r: _append_annotation(r, "val_0.JPEG n01 0 0 63 63"),
        "val/val_annotations.txt",
        "line 7 is malformed",
    ),
    "unknown wnid": (
        lambda r: _append_annotation(r, "val_0.JPEG\tn77\t0\t0\t1\t1"),
        "val/val_annotations.txt",
        "line 7 names class id 'n77'",
    ),
    "missing image": (
        lambda r: _append_annotation(r, "val_99.JPEG\tn01\t0\t0\t1\t1"),
        "val/images/val_99.JPEG",
        "line 7 .*not found",
    ),
    "duplicate image": (
        lambda r: _append_annotation(r, "val_0.JPEG\tn01\t0\t0\t1\t1"),
        "val/val_annotations.txt",
        "val_0.JPEG twice",
    ),
    "no annotations at all": (
        lambda r: _drop_annotation_lines(r, lambda line: False),
        "val/val_annotations.txt",
        "lists no images",
    ),
}


@pytest.mark.parametrize("breakage", list(TINY_BREAKAGES))
def test_tinyimagenet_layout_errors(tiny, breakage):
    damage, named, pattern = TINY_BREAKAGES[breakage]
    damage(tiny)
    message = raises_data_error(tiny / named, "tinyimagenet", tiny, match=pattern)
    assert message.startswith("Tiny ImageNet ") and "--data-dir" in message


def test_tinyimagenet_tolerated_oddities(tiny):
    # A val image without annotation is ignored; so are unlisted train folders, extra
    # annotation fields, blank lines and a byte-order mark.
    write_jpeg(tiny / "val" / "images" / "val_extra.JPEG", (64, 64), COLOURS[0], seed=1)
    write_jpeg(tiny / "train" / "n55" / "images" / "n55_0.JPEG", (64, 64), COLOURS[0], seed=2)
    _append_annotation(tiny, "")
    wnids = tiny / "wnids.txt"
    wnids.write_bytes(b"\xef\xbb\xbf" + wnids.read_bytes())
    source = load_dataset("tinyimagenet", tiny)
    assert len(source.test_x) == 6 and len(source.train_x) == 12 and source.num_classes == 3


def _flatten(split: Path) -> None:
    """Replace the class folders of ``split`` by one image lying directly in it."""
    for folder in split.iterdir():
        shutil.rmtree(folder)
    write_jpeg(split / "x.JPEG", (8, 8), COLOURS[0], seed=0)


IMAGENET_BREAKAGES = {
    "no train": (lambda r: shutil.rmtree(r / "train"), "train", "not found"),
    "no val": (lambda r: shutil.rmtree(r / "val"), "val", "not found"),
    "flat train": (
        lambda r: _flatten(r / "train"),
        "train",
        "no class folders \\(it holds images directly\\)",
    ),
    "empty class": (
        lambda r: [p.unlink() for p in (r / "train" / "banana").iterdir()],
        "train/banana",
        "holds no",
    ),
    "val class not in train": (
        lambda r: write_jpeg(r / "val" / "durian" / "d.JPEG", (8, 8), COLOURS[0], seed=0),
        "val/durian",
        "no class folder",
    ),
    "flat val": (
        lambda r: _flatten(r / "val"),
        "val",
        "no class folders \\(it holds images directly\\)",
    ),
    "no val images": (
        lambda r: [p.unlink() for p in (r / "val").glob("*/*")],
        "val",
        "holds no images",
    ),
}


@pytest.mark.parametrize("breakage", list(IMAGENET_BREAKAGES))
def test_imagenet_layout_errors(imagenet, breakage):
    damage, named, pattern = IMAGENET_BREAKAGES[breakage]
    damage(imagenet)
    message = raises_data_error(imagenet / named, "imagenet", imagenet, match=pattern)
    assert message.startswith("ImageNet ") and "--data-dir" in message


def test_imagenet_class_without_val_folder(imagenet):
    shutil.rmtree(imagenet / "val" / "banana")
    (imagenet / "val" / "cherry" / "empty").mkdir()  # nested folders are not read
    source = load_dataset("imagenet", imagenet, image_size=16)
    assert source.num_classes == 3 and sorted(source.test_y.tolist()) == [0, 0, 2, 2]
    assert source.test_y.tolist() == [0, 2, 0, 2]


def test_imagenet_eval_resizes_shorter_side_then_crops_centre(imagenet):
    x = load_dataset("imagenet", imagenet, image_size=32).train_x
    index = next(i for i in range(len(x)) if x.path(i).name == "apple_0.JPEG")  # 40 x 50
    with Image.open(x.path(index)) as raw:
        # shorter side 40 -> round(32 / 0.875) = 37, longer side 50 -> 46; centre 32 x 32
        resized = raw.convert("RGB").resize((37, 46), Image.Resampling.BILINEAR)
        expected = np.asarray(resized.crop((2, 7, 34, 39)), dtype=np.float32) / 255
    torch.testing.assert_close(x.decode([index])[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_random_resized_crop_falls_back_to_centre_crop(imagenet):
    # In a 200 x 10 image no crop of area >= 8% and ratio <= 4/3 fits, so every seed takes
    # the fallback: the centre 13 x 10 box (ratio clamped to 4/3), maybe mirrored.
    x = load_dataset("imagenet", imagenet, image_size=16).train_x
    write_jpeg(x.path(0), (200, 10), COLOURS[0], seed=3)
    with Image.open(x.path(0)) as raw:
        box = raw.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR, box=(93, 0, 106, 10))
        expected = torch.from_numpy(np.asarray(box, dtype=np.float32) / 255).permute(2, 0, 1)
    outcomes = [x.decode([0], augment_seed=s)[0] for s in range(12)]
    assert all(torch.equal(o, expected) or torch.equal(o, expected.flip(2)) for o in outcomes)
    assert any(torch.equal(o, expected) for o in outcomes)
    assert any(torch.equal(o, expected.flip(2)) for o in outcomes)


def test_non_ascii_file_names(imagenet):
    (imagenet / "train" / "apple" / "apple_0.JPEG").rename(
        imagenet / "train" / "apple" / "äpfel.JPEG"
    )
    x = load_dataset("imagenet", imagenet, image_size=16).train_x
    names = [x.path(i).name for i in range(len(x))]
    assert "äpfel.JPEG" in names
    decoded = x.decode([names.index("äpfel.JPEG")])
    assert_colours_match_labels(decoded, torch.tensor([0]))
    assert pickle.loads(pickle.dumps(x)).path(names.index("äpfel.JPEG")).name == "äpfel.JPEG"
