"""Linear probe (VQGAN-LC's image-classification task, METHODS.md 6 "Classification"): multinomial logistic
regression on a tokenizer's quantized features, fitted on the train split, top-1 reported on the val split.

    result = fit_linear_probe(train_x, train_y, val_x, val_y)      # {"top1": ..., "train_top1": ..., ...}
    vqtok probe runs/demo --data fashion-mnist [--features pooled flat pixels]

Features (z_q = q.embed(encode(x)), the (B, D, h, w) codes that decode uses):
- pooled: z_q averaged over the h x w positions, (B, D): the codes of each token, pooled (the standard protocol);
- flat: z_q flattened, (B, D h w);
- pixels: the raw (3, H, W) pixels, the reference a tokenizer's features are read against.
Fit: each feature standardised with the train split's mean and std (constant features stay 0), then
mean cross-entropy + weight_decay / 2 ||W||^2 (bias not decayed) minimised by full-batch L-BFGS with a strong-Wolfe
line search from W = 0: deterministic, no learning rate to tune. Results go to RUN/probe.json, one entry per feature
kind.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.io import write_json
from .classifier import check_shared_classes, require_shared_classes

log = logging.getLogger("vqtok.metrics")

FEATURES = ("pooled", "flat", "pixels")
PROBE_FILE = "probe.json"
WEIGHT_DECAY = 1e-4
MAX_ITER = 500
FEATURE_PROTOCOL = {
    "pooled": "quantized features z_q = q.embed(encode(x)) (B, D, h, w) averaged over positions -> (B, D) "
              "(VQGAN-LC's classification task: the codes of each token, pooled)",
    "flat": "quantized features z_q = q.embed(encode(x)) (B, D, h, w) flattened -> (B, D*h*w)",
    "pixels": "raw RGB pixels in [0, 1] flattened -> (B, 3*H*W): the reference, no tokenizer",
}


def fit_linear_probe(train_x: Tensor | np.ndarray, train_y: Any, val_x: Tensor | np.ndarray, val_y: Any, *,
                     weight_decay: float = WEIGHT_DECAY, max_iter: int = MAX_ITER,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Fit multinomial logistic regression on (train_x (N, F), train_y (N,)) and score it on the val split.
    Returns top1 (val), train_top1, train_loss, classes, dims, train_images, val_images, iterations, seconds and
    the fit's protocol."""
    if weight_decay < 0 or max_iter < 1:
        raise ValueError(f"weight_decay must be >= 0 and max_iter >= 1, got {weight_decay} and {max_iter}")
    device = torch.device(device)
    x, y = _as_features(train_x, device), _as_labels(train_y, device)
    vx, vy = _as_features(val_x, device), _as_labels(val_y, device)
    if len(x) != len(y) or len(vx) != len(vy) or x.shape[1] != vx.shape[1] or len(x) == 0 or len(vx) == 0:
        raise ValueError(f"expected train (N, F) with N labels and val (M, F) with M labels, got "
                         f"{tuple(x.shape)}/{len(y)} and {tuple(vx.shape)}/{len(vy)}")
    classes = check_shared_classes(y.cpu(), vy.cpu(), "the probe's data")
    start = time.perf_counter()
    mean, std = x.mean(dim=0), x.std(dim=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature (e.g. a black border) stays 0
    x = x.sub_(mean).div_(std)  # in place: the train features can be large (60,000 x 3,072 pixels: 737 MB)
    vx = vx.sub_(mean).div_(std)
    weight = torch.zeros(x.shape[1], classes, device=device, requires_grad=True)
    bias = torch.zeros(classes, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_logits, val_logits = x @ weight + bias, vx @ weight + bias
        loss = float(F.cross_entropy(train_logits, y) + 0.5 * weight_decay * weight.square().sum())
        top1 = float((val_logits.argmax(dim=1) == vy).double().mean())
        train_top1 = float((train_logits.argmax(dim=1) == y).double().mean())
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return {
        "top1": top1, "train_top1": train_top1, "train_loss": loss, "classes": classes, "dims": int(x.shape[1]),
        "train_images": len(x), "val_images": len(vx), "iterations": iterations,
        "seconds": round(time.perf_counter() - start, 2), "chance": float(torch.bincount(vy).max()) / len(vy),
        "fit": {"model": "multinomial logistic regression (linear layer + softmax cross-entropy)",
                "standardise": "per feature, train mean and std", "weight_decay": weight_decay,
                "objective": "mean cross-entropy + weight_decay/2 ||W||^2", "optimizer":
                f"full-batch L-BFGS, strong-Wolfe line search, at most {max_iter} iterations, from zeros"},
    }


def _as_features(x: Tensor | np.ndarray, device: torch.device) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if x.dim() != 2:
        raise ValueError(f"features must be (N, F), got shape {tuple(x.shape)}")
    return x.to(device, torch.float32, copy=True)  # a copy: standardised in place


def _as_labels(y: Any, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(y)).long().reshape(-1).to(device)


def _check_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [kind for kind in kinds if kind not in FEATURES]
    if unknown or not kinds:
        raise ValueError(f"unknown feature kind {unknown[0]!r}; use one of {', '.join(FEATURES)}" if unknown else
                         f"no feature kind given; use one or more of {', '.join(FEATURES)}")
    return kinds


def extract_features(tokenizer: Any, dataset: Any, kind: str = "pooled", batch_size: int = 64,
                     device: str | torch.device = "cpu", progress: bool = False) -> tuple[Tensor, Tensor]:
    """(features (N, F) float32 on the CPU, labels (N,) int64) of a labelled dataset; see FEATURE_PROTOCOL."""
    features, labels = extract_feature_sets(tokenizer, dataset, (kind,), batch_size, device, progress)
    return features[kind], labels


@torch.no_grad()
def extract_feature_sets(tokenizer: Any, dataset: Any, kinds: tuple[str, ...], batch_size: int = 64,
                         device: str | torch.device = "cpu",
                         progress: bool = False) -> tuple[dict[str, Tensor], Tensor]:
    """Several feature kinds of a labelled dataset in one pass (the images are encoded once): ({kind: (N, F)
    float32 on the CPU}, labels (N,) int64)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    _check_kinds(kinds)
    device = torch.device(device)
    if tokenizer is not None:
        tokenizer.to(device).eval()
    features: dict[str, list[Tensor]] = {kind: [] for kind in kinds}
    labels = []
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False), desc=f"features ({', '.join(kinds)})",
                     unit="batch", disable=not progress, dynamic_ncols=True):
        x = x.to(device).float()  # (B, 3, H, W) in [0, 1]
        z_q = None
        if "pooled" in kinds or "flat" in kinds:
            z_q = tokenizer.quantizer.embed(tokenizer.encode(x)).float()  # (B, D, h, w)
        for kind in kinds:
            f = (x.reshape(len(x), -1) if kind == "pixels" else
                 z_q.mean(dim=(2, 3)) if kind == "pooled" else z_q.reshape(len(x), -1))
            features[kind].append(f.cpu())
        labels.append(torch.as_tensor(y).long())
    if not labels:
        raise ValueError("the probe's dataset holds no images")
    return {kind: torch.cat(parts) for kind, parts in features.items()}, torch.cat(labels)


def run_probe(run_dir: str | Path, data: str | None = None, features: str = "pooled", **options: Any) -> dict[str, Any]:
    """Probe one feature kind (run_probes' options); returns its entry."""
    return run_probes(run_dir, data, (features,), **options)[features]


def run_probes(run_dir: str | Path, data: str | None = None, features: tuple[str, ...] = ("pooled",), *,
               ema: bool = False, size: int | None = None, train_limit: int | None = None,
               val_limit: int | None = None, batch_size: int = 64, device: str | torch.device = "cpu",
               weight_decay: float = WEIGHT_DECAY, max_iter: int = MAX_ITER, out: str | Path | None = None,
               progress: bool = False) -> dict[str, dict[str, Any]]:
    """Probe a run's tokenizer on `data` (default: the run's data source) with each feature kind (the images are
    encoded once for all of them) and record each result in RUN/probe.json (or `out`) under its kind; returns
    {kind: entry}."""
    from ..core.rundir import RunDir
    from ..data import build_dataset
    from ..models import Tokenizer

    features = _check_kinds(tuple(dict.fromkeys(features)))  # in order, once each; checked before any loading
    for name, limit in (("train_limit", train_limit), ("val_limit", val_limit)):
        if limit is not None and int(limit) < 1:
            raise ValueError(f"{name} must be a positive number of images, got {limit}")
    run = RunDir(run_dir)
    config = run.read_config()
    source = data or (config.get("data") or {}).get("source") or "fashion-mnist"
    require_shared_classes(source)
    size = size or (config.get("data") or {}).get("size") or (config.get("model") or {}).get("image_size")
    needs_model = any(kind != "pixels" for kind in features)
    tokenizer = _load_tokenizer(Tokenizer, run.path, ema, device) if needs_model else None
    splits = {}
    for split, limit in (("train", train_limit), ("val", val_limit)):
        dataset = build_dataset(source, split, size=size, length=limit, train_crops=False)
        splits[split] = (dataset, *extract_feature_sets(tokenizer, dataset, features, batch_size, device, progress))
    (train_set, train_x, train_y), (val_set, val_x, val_y) = splits["train"], splits["val"]
    check_shared_classes(train_y, val_y, source)
    results = {}
    for kind in features:
        result = fit_linear_probe(train_x[kind], train_y, val_x[kind], val_y, weight_decay=weight_decay,
                                  max_iter=max_iter, device=device)
        result["features"] = kind
        result["protocol"] = {
            "features": FEATURE_PROTOCOL[kind], "fit": result.pop("fit"),
            "data": {"train": train_set.describe(), "val": val_set.describe()},
            "model": None if kind == "pixels" else {"run_dir": str(run.path),
                                                    "weights": RunDir.EMA if ema else RunDir.MODEL},
            "metric": "top-1 accuracy on the val split",
        }
        results[kind] = result
    path = Path(out) if out is not None else run.path / PROBE_FILE
    write_json(path, {**_read_entries(path), **results})
    return results


def _load_tokenizer(cls: Any, path: Path, ema: bool, device: str | torch.device) -> Any:
    """Tokenizer.from_pretrained, with unreadable or mismatched weights reported as a ValueError (a user's file)."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(path, ema=ema, device=device)
    except (SafetensorError, RuntimeError) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"the tokenizer weights in {path} cannot be loaded ({first}); is the run complete?") from None


def _read_entries(path: Path) -> dict[str, Any]:
    """probe.json's entries, or {} when it is missing or unreadable (it is then rewritten)."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("%s cannot be read (%s); rewriting it", path, error)
        return {}
    return entries if isinstance(entries, dict) else {}


def format_probe(result: dict[str, Any]) -> str:
    """One line: feature kind and size, val top-1, train top-1, data."""
    data = result.get("protocol", {}).get("data", {}).get("val", {})
    return (f"probe {result['features']} ({result['dims']:,}-d): top-1 {result['top1']:.4f} on "
            f"{result['val_images']:,} val images (train {result['train_top1']:.4f} on {result['train_images']:,}; "
            f"chance {result['chance']:.3f}), {data.get('source', '?')} {data.get('size', '?')} px, "
            f"fit {result['seconds']:.1f} s")
