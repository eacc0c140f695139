"""`photos`: real photographs that ship inside installable Python packages, cut into deterministic random crops.

The catalogue lists only files that are part of the installed wheels (scikit-image's sample directory also names
images it downloads at run time: those are left out, and every listed file is checked to exist inside its package).
Chosen: colour photographs. Left out: scikit-image's grayscale photos (camera, coins, moon, ...), synthetic images
(color wheel, phantom, logos), matplotlib's clip-art present, and foolbox's CIFAR/MNIST samples (32 and 28 px: a 64 px
crop would be a 2x upscale, blurrier than everything else, and the set would stop being "photographs at their
native resolution").

Split (fixed): the photos in `VAL_PHOTOS` are validation, every other photo is train, so train and validation crops
never share a photograph. The two motorcycle stereo views are both train (they show the same scene).

Crops: for item i, a generator seeded by (seed, split, epoch, i) picks the photo (train: uniformly at random; eval:
photo i mod n, so every validation photo contributes equally), a square side log-uniform in [size, shorter side] (a
random scale: from full-resolution detail to the whole photo), a uniform position, and resizes that square to
size x size (Pillow bicubic, antialiased). Photos whose shorter side is below `size` are resized up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from ..core.packages import package_dir
from .base import ImageSource
from .images import RESAMPLE_NAME, UnreadableImage, crop_box, open_rgb

_FOOLBOX_IMAGENET = (
    "imagenet_00_243.jpg", "imagenet_01_559.jpg", "imagenet_02_438.jpg", "imagenet_03_990.jpg",
    "imagenet_04_949.jpg", "imagenet_05_853.jpg", "imagenet_06_609.jpg", "imagenet_07_609.jpg",
    "imagenet_08_915.jpg", "imagenet_09_455.jpg", "imagenet_10_541.jpg", "imagenet_11_630.jpg",
    "imagenet_12_741.jpg", "imagenet_13_471.jpg", "imagenet_14_129.jpg", "imagenet_15_99.jpg",
    "imagenet_16_251.jpg", "imagenet_17_22.jpg", "imagenet_18_317.jpg", "imagenet_19_305.jpg",
)

# importable package -> files inside it (relative to the package directory)
CATALOGUE: dict[str, tuple[str, ...]] = {
    "skimage": tuple(f"data/{name}" for name in (
        "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
        "hubble_deep_field.jpg", "ihc.png", "retina.jpg")),
    "sklearn": ("datasets/images/china.jpg", "datasets/images/flower.jpg"),
    "matplotlib": ("mpl-data/sample_data/grace_hopper.jpg",),
    "foolbox": tuple(f"data/{name}" for name in _FOOLBOX_IMAGENET),
}

# The fixed validation photos (6 of 32): a cup, a flower, a cottage, a bottle cap, a cannon, an eagle.
VAL_PHOTOS = frozenset({
    "skimage/coffee", "sklearn/flower", "foolbox/imagenet_05_853", "foolbox/imagenet_09_455",
    "foolbox/imagenet_13_471", "foolbox/imagenet_17_22",
})

DEFAULT_LENGTH = {"train": 4096, "val": 512}
CROP_PROTOCOL = ("square of side log-uniform in [size, shorter side] at a uniform position, resized to size; "
                 "train: random photo per crop; eval: photo = index mod photos; deterministic per (seed, split, index)")

_INSTALL_HINT = ("pip install scikit-image scikit-learn matplotlib; pip install --no-deps foolbox==3.3.4 "
                 "(foolbox is only read for its sample photos)")


@dataclass(frozen=True)
class PhotoInfo:
    """One shipped photograph: `name` is "package/stem", `split` is "train" or "val"."""

    name: str
    package: str
    path: Path
    split: str


def _shipped_file(root: Path, relative: str) -> Path | None:
    """root/relative if it is a non-empty regular file that really lies inside root, else None."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or not path.is_file() or path.stat().st_size == 0:
        return None
    return path


def _catalogue_names() -> list[tuple[str, str, str]]:
    """(name, package, relative path) for every catalogue entry, in catalogue order."""
    return [(f"{package}/{Path(rel).stem}", package, rel) for package, files in CATALOGUE.items() for rel in files]


def list_photos() -> list[PhotoInfo]:
    """Every catalogued photo present inside its installed package, with its split."""
    photos = []
    for name, package, relative in _catalogue_names():
        root = package_dir(package)
        path = _shipped_file(root, relative) if root is not None else None
        if path is not None:
            photos.append(PhotoInfo(name, package, path, "val" if name in VAL_PHOTOS else "train"))
    return photos


def missing_photos() -> list[str]:
    """Catalogued photos not found (package not installed, or the file is not part of it)."""
    found = {photo.name for photo in list_photos()}
    return [name for name, _, _ in _catalogue_names() if name not in found]


class PhotoCrops(ImageSource):
    """Deterministic crops of the shipped photos of one split; label = the photo's index in `list_photos()`."""

    def __init__(self, split: str = "train", size: int = 64, length: int | None = None, seed: int = 0,
                 train_crops: bool | None = None) -> None:
        super().__init__("photos", split, size, seed, train_crops)
        self.length = DEFAULT_LENGTH[self.split] if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length (number of crops) must be positive, got {length}")
        self.photos: list[PhotoInfo] = []
        self.images: list[Image.Image] = []  # decoded once: crops then cost one resize each
        self.labels: list[int] = []
        for label, photo in enumerate(list_photos()):
            if photo.split == self.split:
                self._add(photo, label)
        if not self.images:
            raise RuntimeError(f"no {self.split} photos found (missing: {', '.join(missing_photos()) or 'none'}; "
                               f"unreadable: {len(self.skipped)}); install them with: {_INSTALL_HINT}")

    def _add(self, photo: PhotoInfo, label: int) -> None:
        try:
            image = open_rgb(photo.path)
        except UnreadableImage as error:
            self.skip(str(photo.path), str(error))
            return
        self.photos.append(photo)
        self.images.append(image)
        self.labels.append(label)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"crop index {index} out of range for {self.length} crops")
        rng = self.rng(index)
        which = int(rng.integers(len(self.images))) if self.train_crops else index % len(self.images)
        image = self.images[which]
        return crop_box(image, random_square(image.size, self.size, rng), self.size), self.labels[which]

    def details(self) -> dict[str, Any]:
        return {
            "photos": [photo.name for photo in self.photos],
            "missing_photos": missing_photos(),
            "crop": CROP_PROTOCOL,
            "resize": RESAMPLE_NAME,
        }


def random_square(image_size: tuple[int, int], size: int, rng: Any) -> tuple[float, float, float, float]:
    """A square box with side log-uniform in [min(size, short), short] at a uniform integer position."""
    width, height = image_size
    short = min(width, height)
    low = min(size, short)
    side = min(short, max(1, round(low * math.exp(rng.random() * math.log(short / low)))))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return (float(left), float(top), float(left + side), float(top + side))

