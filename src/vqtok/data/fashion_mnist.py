"""`fashion-mnist`: the 70,000 labelled 28x28 images of Fashion-MNIST, read from its four idx files.

Where: Debian's dataset-fashion-mnist package (`apt install dataset-fashion-mnist`, files under
/usr/share/datasets/fashion-mnist), $VQTOK_FASHION_MNIST, or any folder holding the idx files (plain or .gz).
Splits as published: train = 60,000, val (alias test) = the 10,000 t10k images. Grayscale is served as 3 equal
channels, zero-padded (the background is black) from 28 to 32 px; any other `size` resizes the padded 32 px image.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from .base import ImageSource, evenly_spaced
from .images import RESAMPLE, RESAMPLE_NAME, to_tensor

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_DIR = "VQTOK_FASHION_MNIST"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
PADDED = 32
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def default_dir() -> Path:
    return Path(os.environ.get(ENV_DIR, DEFAULT_DIR))


def find_idx(folder: Path, name: str) -> Path | None:
    """folder/name or folder/name.gz, also one directory further down (packages differ in layout)."""
    if not folder.is_dir():
        return None
    for directory in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def has_idx_files(folder: str | Path) -> bool:
    """Whether `folder` holds Fashion-MNIST (or MNIST-format) image idx files."""
    folder = Path(folder)
    return any(find_idx(folder, images) is not None for images, _ in FILES.values())


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file of unsigned bytes (magic 0x0000_08_NN, big-endian dims) into an array of those dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic {data[:4].hex()}); "
                         "expected the Fashion-MNIST files train-images-idx3-ubyte etc.")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but the file holds "
                         f"{len(data) - header}; the file is truncated or corrupt, fetch it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


class FashionMNIST(ImageSource):
    """Fashion-MNIST from idx files; label = the published class (0..9, see CLASSES)."""

    def __init__(self, folder: str | Path | None = None, split: str = "train", size: int = PADDED,
                 length: int | None = None, seed: int = 0, train_crops: bool | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_dir()
        super().__init__("fashion-mnist" if folder is None else str(self.folder), split, size, seed, train_crops)
        images_name, labels_name = FILES[self.split]
        images_path, labels_path = find_idx(self.folder, images_name), find_idx(self.folder, labels_name)
        if images_path is None or labels_path is None:
            raise FileNotFoundError(
                f"Fashion-MNIST {self.split} files ({images_name}[.gz], {labels_name}[.gz]) not found in "
                f"{self.folder}; install Debian's package (apt install dataset-fashion-mnist), or set ${ENV_DIR} "
                "or pass a folder holding the four idx files")
        self.images = read_idx(images_path)  # (N, 28, 28) uint8
        self.labels = read_idx(labels_path)  # (N,) uint8
        if self.images.ndim != 3 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(f"{images_path} holds {self.images.shape} and {labels_path} {self.labels.shape}: "
                             "expected (N, H, W) images and N labels")
        self.index = evenly_spaced(len(self.images), length)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        item = int(self.index[index])
        image = self.images[item]  # (h, w) uint8
        pad_h, pad_w = max(0, PADDED - image.shape[0]), max(0, PADDED - image.shape[1])
        padded = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))
        picture = Image.fromarray(padded, "L")
        if picture.size != (self.size, self.size):
            picture = picture.resize((self.size, self.size), RESAMPLE)
        return to_tensor(picture), int(self.labels[item])  # (3, size, size): gray in all 3 channels

    def details(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "images_total": int(len(self.images)),
                "crop": f"zero-pad to {PADDED} px" + ("" if self.size == PADDED else f", resize to {self.size}"),
                "resize": RESAMPLE_NAME if self.size != PADDED else None}

