"""vqtok.data: the shipped photos, Fashion-MNIST idx files, image folders with odd and broken files."""

from __future__ import annotations

import gzip
import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from vqtok.data import VAL_PHOTOS, build_dataset, list_photos
from vqtok.data import photos as photos_module
from vqtok.data.images import shorter_side_box
from vqtok.core.packages import package_dir
from vqtok.data.photos import random_square


# -- photos ---------------------------------------------------------------------------------------------------------
def test_photos_are_shipped_files_inside_their_packages():
    photos = list_photos()
    assert len(photos) == 32  # 9 scikit-image + 2 scikit-learn + 1 matplotlib + 20 foolbox ImageNet samples
    for photo in photos:
        root = package_dir(photo.package)
        assert photo.path.is_file() and photo.path.is_relative_to(root) and photo.path.stat().st_size > 0
    assert {p.name for p in photos if p.split == "val"} == set(VAL_PHOTOS)
    assert len({p.path for p in photos}) == len(photos)


def test_photos_not_inside_the_package_are_left_out(monkeypatch):
    # scikit-image downloads lily.png at run time: it is not part of the wheel, so it must not be used.
    catalogue = dict(photos_module.CATALOGUE, skimage=photos_module.CATALOGUE["skimage"] + ("data/lily.png",))
    monkeypatch.setattr(photos_module, "CATALOGUE", catalogue)
    assert "skimage/lily" not in {p.name for p in list_photos()}
    assert photos_module.missing_photos() == ["skimage/lily"]
    assert len(list_photos()) == 32


def test_photo_crops_are_deterministic_per_seed_and_index():
    a = build_dataset("photos", "train", length=16, seed=3)
    b = build_dataset("photos", "train", length=16, seed=3)
    c = build_dataset("photos", "train", length=16, seed=4)
    for i in (0, 7, 15):
        x, label = a[i]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        y, label_b = b[i]
        assert torch.equal(x, y) and label == label_b
    differing = sum(not torch.equal(a[i][0], c[i][0]) for i in range(16))
    assert differing == 16
    with pytest.raises(IndexError):
        a[16]


def test_train_and_val_crops_come_from_different_photos():
    photos = list_photos()
    train = build_dataset("photos", "train", length=64)
    val = build_dataset("photos", "val", length=12)
    train_labels = {train[i][1] for i in range(64)}
    val_labels = [val[i][1] for i in range(12)]
    assert all(photos[label].split == "train" for label in train_labels)
    assert all(photos[label].split == "val" for label in val_labels)
    # eval crops visit the validation photos in turn: each of the 6 appears exactly twice in 12 crops
    assert sorted(np.bincount(val_labels)[np.bincount(val_labels) > 0].tolist()) == [2] * 6
    assert val.describe()["photos"] == [p.name for p in photos if p.split == "val"]
    assert len(train) == 64 and build_dataset("photos", "val").describe()["count"] == 512


def test_photo_crop_size_and_epoch():
    small = build_dataset("photos", "val", size=32, length=4)
    assert small[0][0].shape == (3, 32, 32)
    train = build_dataset("photos", "train", length=4)
    before = train[1][0]
    train.set_epoch(1)
    assert not torch.equal(before, train[1][0])  # train crops change between epochs
    val = build_dataset("photos", "val", length=4)
    first = val[1][0]
    val.set_epoch(5)
    assert torch.equal(first, val[1][0])  # eval crops never do


def test_random_square_scale_is_log_uniform_between_crop_and_shorter_side():
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(2000):
        left, top, right, bottom = random_square((512, 300), 64, rng)
        assert right - left == bottom - top and 0 <= left and right <= 512 and 0 <= top and bottom <= 300
        sides.append(right - left)
    sides = np.array(sides)
    assert sides.min() >= 64 and sides.max() <= 300
    assert abs(np.median(sides) - math.sqrt(64 * 300)) < 10  # log-uniform: the median is the geometric mean
    tiny = random_square((40, 30), 64, np.random.default_rng(1))  # smaller than the crop: the whole short side
    assert tiny[2] - tiny[0] == 30


def test_photos_work_with_dataloader_workers_and_distributed_sampler():
    dataset = build_dataset("photos", "val", length=8)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    batches = torch.cat([x for x, _ in loader])
    assert torch.equal(batches, torch.stack([dataset[i][0] for i in range(8)]))
    seen = []
    for rank in range(2):  # each rank reads a shuffled half; an item is the same whoever reads it, in any order
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        order = list(sampler)
        images = torch.cat([x for x, _ in DataLoader(dataset, batch_size=2, sampler=sampler)])
        assert torch.equal(images, batches[order])
        seen += order
    assert sorted(seen) == list(range(8))


# -- fashion-mnist --------------------------------------------------------------------------------------------------
def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
    test = rng.integers(0, 256, (3, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", train, compress=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([9, 0, 3, 1, 2]), compress=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", test, compress=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([4, 5, 6]), compress=False)
    return tmp_path, train, test


def test_fashion_mnist_idx_files_gzip_and_plain(fashion_dir):
    folder, train_images, test_images = fashion_dir
    train = build_dataset(str(folder), "train")
    assert len(train) == 5 and train.describe()["source"] == str(folder)
    x, label = train[0]
    assert x.shape == (3, 32, 32) and label == 9
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray served as 3 channels
    assert float(x[:, :2].abs().sum()) == 0.0 and float(x[:, :, -2:].abs().sum()) == 0.0  # zero padding
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(train_images[0]).float() / 255)
    test = build_dataset(str(folder), "test")  # "test" is the published t10k split
    assert len(test) == 3 and test.split == "val" and test[2][1] == 6
    assert torch.allclose(test[1][0][0, 2:30, 2:30], torch.from_numpy(test_images[1]).float() / 255)
    assert build_dataset(str(folder), "train", size=64)[0][0].shape == (3, 64, 64)
    assert len(build_dataset(str(folder), "train", length=2)) == 2


def test_fashion_mnist_source_name_reads_the_configured_folder(fashion_dir, monkeypatch):
    folder, _, _ = fashion_dir
    monkeypatch.setenv("VQTOK_FASHION_MNIST", str(folder))
    dataset = build_dataset("fashion-mnist", "val")
    assert len(dataset) == 3 and dataset.describe()["source"] == "fashion-mnist"


def test_fashion_mnist_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("VQTOK_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        build_dataset("fashion-mnist")
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 5, 1, 2]))  # says 5, holds 2
    with pytest.raises(ValueError, match="truncated"):
        build_dataset(str(tmp_path))


# -- folders --------------------------------------------------------------------------------------------------------
@pytest.fixture
def odd_folder(tmp_path):
    """Class folders holding every kind of odd image, plus broken files."""
    cat, dog = tmp_path / "cat", tmp_path / "dog"
    cat.mkdir()
    (dog / "nested").mkdir(parents=True)
    halves = np.zeros((32, 64, 3), np.uint8)
    halves[:, :32] = (255, 0, 0)
    halves[:, 32:] = (0, 0, 255)
    Image.fromarray(halves).save(cat / "a_halves.png")  # 64 wide, 32 high
    Image.fromarray(np.full((40, 50), 100, np.uint8), "L").save(cat / "b_gray.jpg", quality=100)
    rgba = np.zeros((40, 40, 4), np.uint8)  # fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(cat / "c_rgba.png")
    Image.fromarray(np.full((40, 40), 7, np.uint8), "L").convert("P").save(dog / "d_palette.bmp")
    deep = np.full((40, 40), 65535, np.uint16)
    deep[:, 20:] = 32896  # 32896 / 257 = 128
    Image.fromarray(deep).save(dog / "e_16bit.png")  # mode I;16
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(dog / "nested" / "f_tiny.webp", lossless=True)
    (dog / "g_empty.png").write_bytes(b"")
    Image.fromarray(np.full((64, 64, 3), 50, np.uint8)).save(dog / "h_truncated.jpg")
    data = (dog / "h_truncated.jpg").read_bytes()
    (dog / "h_truncated.jpg").write_bytes(data[: len(data) // 2])
    (dog / "notes.txt").write_text("not an image")
    (dog / ".hidden.png").write_bytes(b"")
    return tmp_path


def test_folder_converts_odd_images_and_skips_broken_ones(odd_folder, caplog):
    dataset = build_dataset(str(odd_folder), "val", size=32)
    assert len(dataset) == 8  # six good images, the empty and the truncated file (notes.txt, .hidden ignored)
    with caplog.at_level(logging.WARNING, logger="vqtok.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x, _ in items)
    assert [label for _, label in items] == [0, 0, 0, 1, 1, 1, 1, 1]
    description = dataset.describe()
    assert description["skipped"] == 2 and description["classes"] == 2
    assert "empty file" in description["skipped_files"][str(odd_folder / "dog" / "g_empty.png")]
    assert "skipping unreadable image" in caplog.text
    # sorted paths: cat/a..c, dog/d, dog/e, dog/g_empty, dog/h_truncated, dog/nested/f_tiny
    halves, gray, rgba, palette, deep, tiny = (items[i][0] for i in (0, 1, 2, 3, 4, 7))
    # centre crop of the 64 x 32 image: columns 16..48, red on the left half, blue on the right
    assert torch.allclose(halves[:, :, :14].mean(dim=(1, 2)), torch.tensor([1.0, 0.0, 0.0]), atol=1e-3)
    assert torch.allclose(halves[:, :, 18:].mean(dim=(1, 2)), torch.tensor([0.0, 0.0, 1.0]), atol=1e-3)
    assert torch.allclose(gray, torch.full_like(gray, 100 / 255), atol=2 / 255)
    assert torch.equal(rgba, torch.ones_like(rgba))
    assert torch.allclose(palette, torch.full_like(palette, 7 / 255))
    assert float(deep[0, 0, 0]) == 1.0 and float(deep[0, 0, 31]) == pytest.approx(128 / 255)
    assert torch.allclose(tiny, torch.full_like(tiny, 200 / 255), atol=1 / 255)  # 8 px resized up to 32
    # the broken files are replaced by the next readable image
    assert torch.equal(items[5][0], tiny) and torch.equal(items[6][0], tiny)


def test_folder_train_crops_are_random_but_reproducible(tmp_path):
    image = np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (50, 1, 3))  # horizontal ramp, 200 x 50
    Image.fromarray(image).save(tmp_path / "ramp.png")
    train = build_dataset(str(tmp_path), "train", size=50, length=None, seed=0)
    assert train.describe()["split_folder"] is False and train.targets == [0]
    offsets = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        x = train[0][0]
        again = train[0][0]
        assert torch.equal(x, again)
        offsets.add(round(float(x[0, 0, 0]) * 255))  # the ramp value at the left edge = the crop offset
    assert len(offsets) > 1 and all(0 <= o <= 150 for o in offsets)
    centre = build_dataset(str(tmp_path), "val", size=50)[0][0]
    assert round(float(centre[0, 0, 0]) * 255) == 75  # (200 - 50) / 2


def test_folder_uses_split_subfolders(tmp_path):
    for split, value in (("train", 10), ("val", 200)):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(tmp_path / split / "only" / "x.png")
    assert round(float(build_dataset(str(tmp_path), "train", size=16)[0][0].mean()) * 255) == 10
    val = build_dataset(str(tmp_path), "test", size=16)
    assert round(float(val[0][0].mean()) * 255) == 200 and val.describe()["split_folder"] is True


def test_shorter_side_box_matches_resize_then_crop():
    assert shorter_side_box(400, 200, 100) == (100.0, 0.0, 300.0, 200.0)  # centre
    assert shorter_side_box(400, 200, 100, offset=100) == (200.0, 0.0, 400.0, 200.0)  # 400 -> 200 wide, last offset
    assert shorter_side_box(100, 300, 50, offset=0) == (0.0, 0.0, 100.0, 100.0)  # portrait
    with pytest.raises(ValueError):
        shorter_side_box(400, 200, 100, offset=101)


def test_bad_arguments_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data source"):
        build_dataset("imagenet-please")
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("photos", "holdout")
    with pytest.raises(ValueError, match="crop size"):
        build_dataset("photos", size=-1)
    with pytest.raises(ValueError, match="length"):
        build_dataset("photos", length=0)
    with pytest.raises(FileNotFoundError, match="no images"):
        build_dataset(str(tmp_path))
