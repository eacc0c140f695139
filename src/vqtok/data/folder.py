"""A folder of images (ImageNet layout): files found recursively, class subfolders give integer labels.

Split: ROOT/train for "train" and ROOT/val (or validation, test) for "val" when those folders exist; otherwise the
whole folder serves both splits (describe() says so). Labels: the sorted top-level subfolders of the split folder
are classes 0..C-1; images lying directly in it get label 0 when there are no classes and -1 otherwise.
Each image: shorter side resized to `size`, then a centre crop (eval) or a random crop (train, position drawn per
(seed, epoch, index)), as taming, VQGAN-LC and IBQ prepare ImageNet (no flips). Unreadable files are logged, counted in describe()["skipped"], and the
next readable file in sorted order is served in their place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from .base import ImageSource, evenly_spaced
from .images import IMAGE_EXTENSIONS, RESAMPLE_NAME, UnreadableImage, crop_box, max_offset, open_rgb, shorter_side_box

SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "validation", "test")}


def split_folder(root: Path, split: str) -> Path | None:
    """root/<split name> when it exists (see SPLIT_FOLDERS), else None (the whole folder is used)."""
    for name in SPLIT_FOLDERS[split]:
        if (root / name).is_dir():
            return root / name
    return None


def find_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders are ignored."""
    found = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        found += [Path(directory) / f for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def class_labels(files: list[Path], folder: Path) -> tuple[list[str], list[int]]:
    """(class names, one label per file): classes are the sorted top-level subfolders holding images; files lying
    directly in `folder` get -1 when classes exist, else 0."""
    tops = [f.relative_to(folder).parts[0] if len(f.relative_to(folder).parts) > 1 else None for f in files]
    classes = sorted({top for top in tops if top is not None})
    index = {name: i for i, name in enumerate(classes)}
    unlabelled = -1 if classes else 0
    return classes, [index[top] if top is not None else unlabelled for top in tops]


class ImageFolder(ImageSource):
    """Images under a folder, cropped to size x size; label from the class subfolder."""

    def __init__(self, root: str | Path, split: str = "train", size: int = 256, length: int | None = None,
                 seed: int = 0, train_crops: bool | None = None) -> None:
        self.root = Path(root)
        super().__init__(str(self.root), split, size, seed, train_crops)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder {self.root} does not exist; pass 'photos', 'fashion-mnist' or a "
                                    "folder of images")
        self.split_dir = split_folder(self.root, self.split)
        folder = self.split_dir or self.root
        self.files = find_images(folder)
        if not self.files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
        self.classes, self.targets = class_labels(self.files, folder)
        self.index = evenly_spaced(len(self.files), length)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        first = int(self.index[index])
        for step in range(len(self.files)):  # an unreadable file is replaced by the next readable one
            item = (first + step) % len(self.files)
            path = self.files[item]
            if str(path) in self.skipped:
                continue
            try:
                image = open_rgb(path)
            except UnreadableImage as error:
                self.skip(str(path), str(error))
                continue
            return self._crop(image, index), self.targets[item]
        raise RuntimeError(f"none of the {len(self.files)} images under {self.root} could be read "
                           f"(e.g. {next(iter(self.skipped.values()))})")

    def _crop(self, image: Any, index: int) -> Tensor:
        width, height = image.size
        offset = None
        if self.train_crops:
            offset = int(self.rng(index).integers(0, max_offset(width, height, self.size) + 1))
        return crop_box(image, shorter_side_box(width, height, self.size, offset), self.size)

    def details(self) -> dict[str, Any]:
        return {
            "folder": str(self.split_dir or self.root),
            "split_folder": self.split_dir is not None,
            "files": len(self.files),
            "classes": len(self.classes),
            "crop": "random" if self.train_crops else "centre",
            "resize": f"shorter side to {self.size}, {RESAMPLE_NAME}",
        }
