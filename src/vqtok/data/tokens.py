"""Token shards: what `vqtok encode` writes and what generators train on.

A folder holds `index.json` and, per shard, `tokens-XXXXX.npy` and `labels-XXXXX.npy`. Tokens are (n, h, w), or
(n, A, h, w) when the training set was encoded with A augmentations of each image (`vqtok encode --augment`: the image
and its horizontal flip, or LlamaGen's ten crops); int16 when the codebook fits (K <= 32,768), else int32. Labels are
(n,) int64.

`TokenShards` reads the shards memory-mapped (a 1.28M-image ImageNet at 16 x 16 is 650 MB of int16 per augmentation:
nothing is loaded until an item is read) and serves (ids (h * w,) int64, label) items; with augmentations, each item
picks one of its A views at random per epoch, from a generator seeded by (seed, epoch, index), as the image sources do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

INDEX_FILE = "index.json"
AUGMENTATIONS = {"none": 1, "flip": 2, "ten-crop": 10}  # views per image: LlamaGen's ten-crop is 5 crops x 2 flips


def token_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.int16) if codebook_size <= 2**15 else np.dtype(np.int32)


def read_index(folder: str | Path) -> dict[str, Any]:
    """index.json of a token folder, with a one-line error when the folder is not one."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write tokens with `vqtok encode RUN --data SOURCE --split train "
                                f"--out {folder}`")
    try:
        index = json.loads(path.read_text())
        for key in ("codebook_size", "grid", "shards", "count"):
            index[key]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a vqtok token index ({error}); encode again with `vqtok encode`") from None
    return index


class TokenShards(Dataset):
    """The token maps of a folder written by `vqtok encode`: items (ids (h * w,) int64, label int64)."""

    def __init__(self, folder: str | Path, seed: int = 0) -> None:
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.seed = int(seed)
        self.epoch = 0
        self.codebook_size = int(self.index["codebook_size"])
        self.grid = tuple(int(g) for g in self.index["grid"])
        self.tokens, self.labels = [], []
        for shard in self.index["shards"]:
            tokens_path, labels_path = self.folder / shard["tokens"], self.folder / shard["labels"]
            for path in (tokens_path, labels_path):
                if not path.is_file():
                    raise FileNotFoundError(f"{path} (listed in {self.folder / INDEX_FILE}) is missing; encode again")
            tokens = np.load(tokens_path, mmap_mode="r")
            if tokens.ndim == 3:  # (n, h, w): one view
                tokens = tokens[:, None]
            if tokens.ndim != 4 or tuple(tokens.shape[2:]) != self.grid:
                raise ValueError(f"{tokens_path} holds an array of shape {tokens.shape}, not (n, [views,] "
                                 f"{self.grid[0]}, {self.grid[1]}); encode again")
            self.tokens.append(tokens)
            self.labels.append(np.load(labels_path))
        self.views = self.tokens[0].shape[1] if self.tokens else 1
        self.starts = np.cumsum([0] + [len(t) for t in self.tokens])
        self.num_classes = int(max((int(lab.max()) for lab in self.labels if len(lab)), default=-1)) + 1

    def __len__(self) -> int:
        return int(self.starts[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def locate(self, index: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return shard, index - int(self.starts[shard])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        shard, row = self.locate(int(index))
        view = 0
        if self.views > 1:
            view = int(np.random.default_rng([self.seed, self.epoch, int(index)]).integers(self.views))
        ids = torch.from_numpy(np.asarray(self.tokens[shard][row, view], dtype=np.int64).reshape(-1))
        return ids, torch.tensor(int(self.labels[shard][row]), dtype=torch.int64)

    def all_tokens(self, view: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Every token map of one view and every label, in memory: (n, h, w) int64, (n,) int64."""
        tokens = np.concatenate([np.asarray(t[:, view], dtype=np.int64) for t in self.tokens])
        return tokens, np.concatenate(self.labels).astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {"source": "tokens", "folder": str(self.folder.resolve()), "count": len(self), "views": self.views,
                "augment": self.index.get("augment", "none"), "codebook_size": self.codebook_size,
                "grid": list(self.grid), "tokenizer": self.index.get("run"), "data": self.index.get("data"),
                "seed": self.seed}
