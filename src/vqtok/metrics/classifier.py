"""The class-accuracy judge of generated samples: a small CNN trained on the real training split of a labelled
dataset, tested on its validation split, cached per dataset (DESIGN.md "Generators": `class_accuracy`).

    model, info = load_or_train_classifier("fashion-mnist", size=32)
    info["test_accuracy"]                       # its own accuracy on the real validation split (0.91 on Fashion-MNIST)
    class_accuracy(model, samples, labels)      # share of samples it assigns to the class they were drawn for

Network: three 3x3 stride-2 convolutions (32, 64, 64 channels, batch norm, ReLU), adaptive average pooling to 4x4
(an identity at 32 px), then Linear(1024, 256), ReLU, Linear(256, classes). Strided convolutions rather than
max pooling: max_pool2d is the slowest op of such a net on a CPU. Recipe: AdamW (weight decay 1e-4), one-cycle
learning rate peaking at 3e-3, batch 128, 2 epochs, no augmentation, seeded (initialisation and batch order).
Measured on Fashion-MNIST 32 px, 2-core CPU: test accuracy 0.9117 with 2 threads (19 s of training when the CPU
was free, 760 s when other jobs contended for it) and 0.9129 with one thread (35 s; `OMP_NUM_THREADS=1` is the better
choice on a shared CPU). Results are bit-identical between runs with the same thread count.

Cache: CACHE_DIR/<key>.safetensors (weights) + <key>.json (test accuracy, classes, recipe, data), the key a hash of
both splits' describe() and the recipe; files are written atomically and loaded weights-only. A cache entry that
cannot be read is retrained over, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.io import load_state_dict, save_state_dict, write_json

log = logging.getLogger("vqtok.metrics")

CACHE_DIR = Path(".cache/classifiers")
RECIPE: dict[str, Any] = {
    "architecture": "conv3x3/2 (3->32, 32->64, 64->64) + BN + ReLU, adaptive avg pool 4x4, Linear(1024, 256), ReLU, "
                    "Linear(256, classes)",
    "optimizer": "AdamW, weight decay 1e-4",
    "schedule": "one-cycle, peak lr 3e-3, 15% warm-up",
    "batch_size": 128,
    "epochs": 2,
    "augmentation": None,
    "seed": 0,
    "version": 1,  # bump when the network or recipe changes: old cache entries are then ignored
}
ImagesLike = Tensor | np.ndarray | Iterable[Any]


class SmallCNN(nn.Module):
    """(B, 3, H, W) in [0, 1] -> (B, classes) logits; see the module docstring."""

    def __init__(self, classes: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.classes = classes
        self.features = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 256), nn.ReLU(inplace=True), nn.Linear(256, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # faster convolutions on a CPU
        return self.head(self.features(x))  # (B, 3, H, W) -> (B, 64, 4, 4) -> (B, classes)


# -- input forms ---------------------------------------------------------------------------------------------------

def as_float_images(x: Tensor | np.ndarray) -> Tensor:
    """A batch of images -> float32 (B, 3, H, W) in [0, 1]: float tensors as given (clamped), uint8 tensors
    (B, 3, H, W) or uint8 arrays (B, H, W, 3) (ADM's .npz layout) divided by 255."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"numpy images must be uint8 (N, H, W, 3) as in ADM's .npz, got {x.dtype} {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected RGB images (N, 3, H, W) float in [0, 1] or uint8, got {x.dtype} "
                         f"{tuple(x.shape)}")
    return x.float().clamp(0.0, 1.0)


def image_batches(images: ImagesLike, labels: Any = None,
                  batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Every input form the metrics accept, as (float (B, 3, H, W) in [0, 1], int64 (B,) labels or None) batches:
    a tensor or uint8 array holding all images (split into batch_size), or an iterable of batches (tensors, arrays
    or (images, labels) pairs, e.g. a DataLoader). `labels` (N,), when given, overrides labels carried by the
    batches."""
    given = None if labels is None else torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if isinstance(images, (Tensor, np.ndarray)):
        source: Iterable[Any] = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        source = images
    offset = 0
    for batch in source:
        x, y = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
        x = as_float_images(x)
        n = x.shape[0]
        if given is not None:
            if offset + n > len(given):
                raise ValueError(f"{len(given)} labels for more images than that")
            y = given[offset:offset + n]
        elif y is not None:
            y = torch.as_tensor(np.asarray(y)).long().reshape(-1)
        offset += n
        yield x, y
    if given is not None and offset != len(given):
        raise ValueError(f"{len(given)} labels for {offset} images")


# -- use -----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, images: ImagesLike, batch_size: int = 256,
            device: str | torch.device | None = None) -> Tensor:
    """Predicted classes (N,) int64 of any input form of `image_batches`."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval().to(device)
    out = [model(x.to(device)).argmax(dim=1).cpu() for x, _ in image_batches(images, None, batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def class_accuracy(model: nn.Module, images: ImagesLike, labels: Any, batch_size: int = 256,
                   device: str | torch.device | None = None) -> float:
    """Share of `images` the classifier assigns to their `labels` (the class each sample was generated for)."""
    labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    predicted = predict(model, images, batch_size, device)
    if len(predicted) != len(labels) or len(labels) == 0:
        raise ValueError(f"class_accuracy needs one label per image, got {len(labels)} labels for "
                         f"{len(predicted)} images")
    return float((predicted == labels).double().mean())


# -- training and the cache ----------------------------------------------------------------------------------------

def load_split(dataset: Any, limit: int | None = None, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """A labelled dataset of (image, label) items -> uint8 (N, 3, H, W) images and int64 (N,) labels in memory
    (Fashion-MNIST's 60,000 training images at 32 px: 184 MB)."""
    from torch.utils.data import DataLoader, Subset

    view = dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(int(limit)))
    images, labels = [], []
    for x, y in DataLoader(view, batch_size=batch_size, shuffle=False):
        images.append(x.mul(255.0).round_().to(torch.uint8))
        labels.append(torch.as_tensor(y).long())
    if not images:
        raise ValueError(f"the dataset {getattr(dataset, 'source', '')!r} holds no images")
    return torch.cat(images), torch.cat(labels)


def require_shared_classes(source: str) -> None:
    """Refuse, before any work, a source whose splits cannot share classes: `photos` labels a crop by its photo, and
    its val photos are not among its train photos (DESIGN.md "Data sources")."""
    if source == "photos":
        raise ValueError("data source 'photos' has no classes shared by its splits (a crop's label is its photo, and "
                         "val photos differ from train photos); use fashion-mnist or a folder with class subfolders")


def check_shared_classes(train_labels: Tensor, val_labels: Tensor, source: str) -> int:
    """The number of classes (max label + 1) of a labelled train/val pair, or a ValueError saying why the source
    cannot be used for classification (fewer than 2 classes, unlabelled images, val classes absent from train: the
    `photos` source labels a crop by its photo, and its val photos are not among the train photos)."""
    if (train_labels < 0).any() or (val_labels < 0).any():
        raise ValueError(f"data source {source!r} has unlabelled images (label -1: files outside class subfolders)")
    train_classes = set(torch.unique(train_labels).tolist())
    if len(train_classes) < 2:
        raise ValueError(f"data source {source!r} has {len(train_classes)} class in its train split; classification "
                         "needs labelled images of 2 or more classes (fashion-mnist, or a folder with class "
                         "subfolders)")
    unseen = sorted(set(torch.unique(val_labels).tolist()) - train_classes)
    if unseen:
        raise ValueError(f"data source {source!r}: val labels {unseen[:5]} never occur in its train split, so "
                         "classes are not shared between the splits (photos label crops by photo, and val photos "
                         "differ from train photos); use fashion-mnist or a folder with class subfolders")
    return int(max(train_classes)) + 1


def train_classifier(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], classes: int,
                     device: str | torch.device = "cpu", recipe: dict[str, Any] | None = None,
                     progress: bool = False) -> tuple[SmallCNN, dict[str, Any]]:
    """Train SmallCNN on uint8 (N, 3, H, W) images and labels with RECIPE (seeded), then test it on `val`."""
    from tqdm.auto import tqdm

    recipe = {**RECIPE, **(recipe or {})}
    device = torch.device(device)
    torch.manual_seed(recipe["seed"])
    model = SmallCNN(classes).to(device)
    images, labels = train
    batch, epochs = int(recipe["batch_size"]), int(recipe["epochs"])
    steps_per_epoch = max(1, len(images) // batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15)
    order = torch.Generator().manual_seed(recipe["seed"])
    start = time.perf_counter()
    model.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", unit="step", disable=not progress)
    for _ in range(epochs):
        permutation = torch.randperm(len(images), generator=order)
        for step in range(steps_per_epoch):
            index = permutation[step * batch:(step + 1) * batch]
            x = images[index].to(device).float().div_(255.0)  # (B, 3, H, W)
            loss = F.cross_entropy(model(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    accuracy = class_accuracy(model, val[0], val[1], device=device)
    info = {"test_accuracy": accuracy, "train_images": len(images), "test_images": len(val[0]), "classes": classes,
            "train_seconds": round(seconds, 1), "final_loss": float(loss.detach()), "recipe": recipe}
    return model.eval(), info


def cache_key(train_description: dict[str, Any], val_description: dict[str, Any],
              recipe: dict[str, Any] = RECIPE) -> str:
    """16 hex digits identifying (train data, val data, recipe)."""
    def clean(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in ("skipped", "skipped_files", "epoch")}

    text = json.dumps({"train": clean(train_description), "val": clean(val_description), "recipe": recipe},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_or_train_classifier(source: str, size: int | None = None, cache_dir: str | Path | None = None,
                             device: str | torch.device = "cpu", train_limit: int | None = None,
                             progress: bool = False) -> tuple[SmallCNN, dict[str, Any]]:
    """The classifier of data source `source` at `size` px: loaded from the cache (cache_dir, default
    .cache/classifiers) when trained before, else trained on the train split, tested on the val split and cached.
    info: test_accuracy, classes, recipe, data, cache file, and whether it was loaded (`cached`)."""
    from ..data import build_dataset

    require_shared_classes(source)
    train_set = build_dataset(source, "train", size=size, length=train_limit, train_crops=False)
    val_set = build_dataset(source, "val", size=size, train_crops=False)
    key = cache_key(train_set.describe(), val_set.describe())
    cache = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    weights, meta = cache / f"{key}.safetensors", cache / f"{key}.json"
    if weights.is_file() and meta.is_file():
        from safetensors import SafetensorError

        try:
            return _load_cached(weights, meta, device)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as error:  # corrupt: retrain
            log.warning("classifier cache %s cannot be read (%s: %s); training it again", weights,
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    train, val = load_split(train_set), load_split(val_set)
    classes = check_shared_classes(train[1], val[1], source)
    model, info = train_classifier(train, val, classes, device=device, progress=progress)
    info["data"] = {"train": train_set.describe(), "val": val_set.describe()}
    cache.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), weights)
    write_json(meta, info)
    log.info("classifier for %s: test accuracy %.4f after %.1f s of training; cached in %s", source,
             info["test_accuracy"], info["train_seconds"], weights)
    return model, {**info, "file": str(weights), "cached": False}


def _load_cached(weights: Path, meta: Path, device: str | torch.device) -> tuple[SmallCNN, dict[str, Any]]:
    info = json.loads(meta.read_text())
    model = SmallCNN(int(info["classes"]))
    model.load_state_dict(load_state_dict(weights), strict=True)
    return model.to(device).eval(), {**info, "file": str(weights), "cached": True}
