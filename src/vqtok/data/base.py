"""What every image source shares: split names, seeded per-item randomness, skipped-file bookkeeping, describe()."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .images import log

SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "val"}
_SPLIT_CODE = {"train": 0, "val": 1}
MAX_LISTED_SKIPS = 50  # describe() names at most this many skipped files (the count is always exact)


def normalize_split(split: str) -> str:
    """"train" | "val" (aliases "validation", "test") -> "train" | "val"."""
    if split not in SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val' ('test' and 'validation' mean 'val')")
    return SPLIT_ALIASES[split]


def evenly_spaced(total: int, length: int | None) -> np.ndarray:
    """Indices of `length` items spread evenly over `total` (all of them when length is None or >= total)."""
    if length is None or length >= total:
        return np.arange(total)
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    return np.linspace(0, total - 1, int(length)).round().astype(np.int64)


class ImageSource(Dataset):
    """Base of the sources: items are (float32 (3, size, size) in [0, 1], int label).

    Randomness is drawn per item from a generator seeded by (seed, split, epoch, index), so an item is the same in
    any process, worker or order (DataLoader workers and DistributedSampler need nothing special). `set_epoch`
    changes train crops between epochs (eval crops ignore it); call it before the DataLoader iterator is created,
    as workers receive a copy of the dataset then.
    """

    def __init__(self, source: str, split: str, size: int, seed: int, train_crops: bool | None) -> None:
        if int(size) < 1:
            raise ValueError(f"crop size must be a positive number of pixels, got {size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.source = source
        self.split = normalize_split(split)
        self.size = int(size)
        self.seed = int(seed)
        self.train_crops = self.split == "train" if train_crops is None else bool(train_crops)
        self.epoch = 0
        self.skipped: dict[str, str] = {}  # path -> reason, for the files this process could not use

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator for item `index`: a function of (seed, split, epoch if train crops, index) only."""
        epoch = self.epoch if self.train_crops else 0
        return np.random.default_rng([self.seed, _SPLIT_CODE[self.split], epoch, int(index)])

    def skip(self, path: str, reason: str) -> None:
        """Record an unusable file once and log it; runs go on without it."""
        if path not in self.skipped:
            self.skipped[path] = reason
            log.warning("skipping unreadable image (%d skipped so far): %s", len(self.skipped), reason)

    def describe(self) -> dict[str, Any]:
        """What the data was: the eval protocol block and the training log record this."""
        listed = sorted(self.skipped)[:MAX_LISTED_SKIPS]
        return {
            "source": self.source,
            "split": self.split,
            "size": self.size,
            "count": len(self),
            "train_crops": self.train_crops,
            "seed": self.seed,
            "epoch": self.epoch if self.train_crops else None,
            **self.details(),
            "skipped": len(self.skipped),
            "skipped_files": {path: self.skipped[path] for path in listed},
        }

    def details(self) -> dict[str, Any]:
        """Source-specific entries of describe()."""
        return {}

    def __len__(self) -> int:
        raise NotImplementedError


def describe_dataset(dataset: Dataset) -> dict[str, Any]:
    """What identifies a dataset in a log, a manifest or a protocol block: its own `describe()` when it has one (every
    vqtok source does), else its class; always with its length."""
    describe = getattr(dataset, "describe", None)
    info = describe() if callable(describe) else {"type": type(dataset).__name__}
    return {**info, "count": len(dataset)}
