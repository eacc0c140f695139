"""Image sources for training and evaluation.

    ds = build_dataset("photos", "val")          # 512 deterministic 64 px crops of the validation photos
    image, label = ds[0]                          # float32 (3, 64, 64) in [0, 1], int
    ds.describe()                                 # what the eval protocol block and the training log record

Sources: "photos" (default; photographs shipped inside pip packages), "fashion-mnist", or a folder path (a folder
holding Fashion-MNIST idx files is read as Fashion-MNIST, any other as a folder of images). Items are map-style and
deterministic per index, so DataLoader workers and DistributedSampler need nothing special.
"""

from __future__ import annotations

from pathlib import Path

from .base import ImageSource, describe_dataset, normalize_split
from .fashion_mnist import FashionMNIST, has_idx_files
from .folder import ImageFolder
from .images import IMAGE_EXTENSIONS, UnreadableImage, open_rgb
from .photos import VAL_PHOTOS, PhotoCrops, PhotoInfo, list_photos

DEFAULT_SIZE = {"photos": 64, "fashion-mnist": 32, "folder": 256}
VAL_SEED = 0  # validation crops are the same whatever the training seed, so runs compare on the same images

__all__ = [
    "build_dataset", "describe_dataset", "VAL_SEED", "list_photos", "PhotoInfo", "VAL_PHOTOS", "ImageSource", "PhotoCrops", "FashionMNIST",
    "ImageFolder", "UnreadableImage", "open_rgb", "IMAGE_EXTENSIONS", "DEFAULT_SIZE",
]


def build_dataset(source: str = "photos", split: str = "train", *, size: int | None = None, length: int | None = None,
                  seed: int = 0, train_crops: bool | None = None) -> ImageSource:
    """The dataset for `source` ("photos" | "fashion-mnist" | a folder path) and `split` ("train" | "val"; "test" is
    an alias of "val"). size: crop size (defaults: photos 64, fashion-mnist 32, folder 256). length: the number of
    photo crops (defaults 4096 train / 512 val); for the other sources, a cap (evenly spaced items).
    train_crops: random (train) or fixed (eval) crops, by default according to the split."""
    split = normalize_split(split)
    options = dict(split=split, length=length, seed=seed, train_crops=train_crops)
    if source == "photos":
        return PhotoCrops(size=size or DEFAULT_SIZE["photos"], **options)
    if source == "fashion-mnist":
        return FashionMNIST(None, size=size or DEFAULT_SIZE["fashion-mnist"], **options)
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(f"unknown data source {source!r}: use 'photos', 'fashion-mnist' or an existing folder of "
                         f"images ({' '.join(IMAGE_EXTENSIONS)}), with class subfolders for labels")
    if has_idx_files(path):
        return FashionMNIST(path, size=size or DEFAULT_SIZE["fashion-mnist"], **options)
    return ImageFolder(path, size=size or DEFAULT_SIZE["folder"], **options)
