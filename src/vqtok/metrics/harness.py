"""The evaluation loop: stream the evaluation set once through a tokenizer and compute every metric one way.

    metrics = evaluate(tokenizer, build_dataset("photos", "val"), out="runs/x/metrics.json")
    print(format_table(metrics))

`model` is anything with encode(x (B, 3, H, W) in [0, 1]) -> ids (B, h, w) int64, decode(ids) -> (B, 3, H, W) in
[0, 1], and .codebook_size. Per batch: reconstruct, count codes (CodeUsage over the WHOLE set), PSNR / SSIM /
LPIPS per image, Inception features of reconstructions (and of originals, cached per dataset for later calls in the
same process). At the end: rFID and rKID between reconstruction and original features. Runs in one process (call it
on rank 0); nothing here is collective.

`recon_images` splits the two costs: code usage needs only encode(), and a 100,000-code codebook needs millions of
tokens before its usage means much (the LC eval script counts 12.8M), while PSNR/SSIM settle within a few thousand
images. With recon_images=M, the first M images are reconstructed and scored; the rest are encoded and counted only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..backbones import InceptionFeatures, file_sha256
from ..core.packages import vqtok_version
from ..data import describe_dataset
from ..quantize import CodeUsage
from .fid import KID_SUBSET_SIZE, KID_SUBSETS, fid_from_features, kid
from .image import PSNR_PROTOCOL, SSIM_PROTOCOL, psnr, ssim
from .lpips import NOT_FOUND, load_lpips

PSNR_CAP_MSE = 1e-10  # an exact reconstruction scores 100 dB, keeping the mean finite
_REFERENCE_CACHE: dict[str, Tensor] = {}  # dataset fingerprint -> Inception features of its originals
_REFERENCE_CACHE_SIZE = 4


class TokenizerLike(Protocol):
    codebook_size: int

    def encode(self, x: Tensor) -> Tensor: ...

    def decode(self, ids: Tensor) -> Tensor: ...


class _Totals:
    """Running sums over the evaluation set (float64 Python numbers) and the feature lists."""

    def __init__(self, codebook_size: int) -> None:
        self.usage = CodeUsage(codebook_size)
        self.images = 0  # images whose codes were counted
        self.recon = 0  # of those, images reconstructed and scored
        self.psnr = self.ssim = self.lpips = 0.0
        self.real: list[Tensor] = []
        self.fake: list[Tensor] = []

    def count(self, ids: Tensor) -> None:
        self.usage.update(ids)
        self.images += ids.shape[0]

    def add(self, x: Tensor, x_hat: Tensor, lpips: nn.Module | None) -> None:
        self.recon += x.shape[0]
        self.psnr += float(psnr(x, x_hat, mse_floor=PSNR_CAP_MSE).sum())
        self.ssim += float(ssim(x, x_hat).sum())
        if lpips is not None:
            self.lpips += float(lpips.distance(x, x_hat).double().sum())


def evaluate(model: TokenizerLike, dataset: Dataset | str, *, batch_size: int = 32,
             device: str | torch.device = "cpu", num_workers: int = 0, fid: bool = True, max_images: int | None = None,
             usage_train: CodeUsage | None = None, out: str | Path | None = None, progress: bool = True,
             lpips_weights: str | Path | None = None, fid_images: int | None = None,
             recon_images: int | None = None) -> dict[str, Any]:
    """Evaluate `model` on `dataset` (a Dataset of (image, label), or a source name: its "val" split) and return
    the metrics.json dict; written to `out` (atomically) when given. `usage_train`: the training histogram, already
    all-reduced, for utilization_train. fid=False skips rFID/rKID (the slow part on a CPU); fid_images computes them
    on the first fid_images images only; recon_images computes PSNR, SSIM, LPIPS (and rFID) on the first
    recon_images only, while code usage still covers every image (module docstring)."""
    _check_model(model)
    device = torch.device(device)
    data = _as_dataset(dataset)
    count = len(data) if max_images is None else min(len(data), int(max_images))
    if count < 1:
        raise ValueError(f"nothing to evaluate: the dataset holds {len(data)} images (max_images={max_images})")
    view = data if count == len(data) else Subset(data, range(count))
    loader = DataLoader(view, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    inception = InceptionFeatures(device=device) if fid else None
    lpips = load_lpips(lpips_weights, device)
    if recon_images is not None and int(recon_images) < 1:
        raise ValueError(f"recon_images must be a positive number of images (or None: all), got {recon_images}")
    recon_count = count if recon_images is None else min(count, int(recon_images))
    fid_count = recon_count if fid_images is None else max(0, min(recon_count, int(fid_images)))
    fingerprint = _fingerprint(data, fid_count, inception)
    cached = _REFERENCE_CACHE.get(fingerprint) if fingerprint else None
    totals = _stream(model, loader, device, inception, lpips, need_real=inception is not None and cached is None,
                     progress=progress, fid_count=fid_count, recon_count=recon_count)
    real = cached if cached is not None else (torch.cat(totals.real) if totals.real else None)
    if fingerprint and real is not None:
        _remember(fingerprint, real)
    metrics = _summarise(totals, real, usage_train, lpips)
    metrics["protocol"] = _protocol(data, totals.images, inception, lpips, fid_count, totals.recon)
    if out is not None:
        write_metrics(metrics, out)
    return metrics


def _check_model(model: Any) -> None:
    missing = [name for name in ("encode", "decode", "codebook_size") if not hasattr(model, name)]
    if missing:
        raise TypeError(f"evaluate needs a tokenizer with encode(x) -> ids, decode(ids) -> images and .codebook_size; "
                        f"{type(model).__name__} lacks {', '.join(missing)}")


def _as_dataset(dataset: Dataset | str) -> Dataset:
    if isinstance(dataset, (str, Path)):
        from ..data import build_dataset

        return build_dataset(str(dataset), "val")
    return dataset


def _stream(model: TokenizerLike, loader: DataLoader, device: torch.device, inception: InceptionFeatures | None,
            lpips: nn.Module | None, need_real: bool, progress: bool, fid_count: int, recon_count: int) -> _Totals:
    """One pass over the evaluation set; the model is put in eval mode (and on `device`) for the pass. Images past
    the first recon_count are encoded and counted only."""
    from tqdm.auto import tqdm

    totals = _Totals(model.codebook_size)
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.to(device).eval()
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, dynamic_ncols=True):
                x = (batch[0] if isinstance(batch, (list, tuple)) else batch).to(device).float()  # (B, 3, H, W)
                ids = model.encode(x)  # (B, h, w) int64
                scored = min(x.shape[0], recon_count - totals.images)  # images of this batch to reconstruct
                wanted = fid_count - totals.images  # Inception features still to compute
                totals.count(ids)
                if scored <= 0:
                    continue
                x, ids = x[:scored], ids[:scored]
                x_hat = model.decode(ids).float().clamp(0.0, 1.0)  # (B, 3, H, W)
                if x_hat.shape != x.shape:
                    raise ValueError(f"decode(encode(x)) has shape {tuple(x_hat.shape)}, x has {tuple(x.shape)}: the "
                                     "image size must be a multiple of the tokenizer's downsampling factor")
                totals.add(x, x_hat, lpips)
                if inception is not None and wanted > 0:
                    totals.fake.append(inception(x_hat[:wanted]).cpu())
                    if need_real:
                        totals.real.append(inception(x[:wanted]).cpu())
    finally:
        if was_training:
            model.train()
    return totals


def _summarise(totals: _Totals, real: Tensor | None, usage_train: CodeUsage | None,
               lpips: nn.Module | None) -> dict[str, Any]:
    n = totals.recon
    metrics: dict[str, Any] = {"images": totals.images, **totals.usage.summary(), "recon_images": n}
    metrics["utilization_train"] = usage_train.utilization() if usage_train is not None else None
    metrics["tokens_train"] = usage_train.tokens if usage_train is not None else None
    metrics["psnr"] = totals.psnr / n
    metrics["ssim"] = totals.ssim / n
    metrics["lpips"] = totals.lpips / n if lpips is not None else None
    metrics["rfid"] = metrics["rkid"] = metrics["rkid_std"] = None
    fake = torch.cat(totals.fake) if totals.fake else None
    metrics["fid_images"] = len(fake) if fake is not None else 0
    if real is not None and fake is not None and len(fake) >= 2:
        metrics["rfid"] = fid_from_features(fake, real)
        metrics["rkid"], metrics["rkid_std"] = kid(fake, real, subsets=KID_SUBSETS,
                                                   subset_size=kid_subset_size(len(fake)))
    return metrics


def kid_subset_size(images: int) -> int:
    """KID subset size: 1000 (the usual) or half the set when smaller, so subsets differ and the std means something."""
    return min(KID_SUBSET_SIZE, max(2, images // 2))


def _protocol(data: Dataset, n: int, inception: InceptionFeatures | None, lpips: nn.Module | None,
              fid_count: int, recon: int) -> dict[str, Any]:
    """How every number was computed: written next to the numbers (metrics.json["protocol"])."""
    described = describe_dataset(data)
    fid_note = None
    if inception is not None:
        fid_note = ("Frechet distance of Inception pool3 mean/covariance, float64, exact trace of the matrix square "
                    "root; biased upwards when images < 2048: compare rFID only at equal image counts")
    return {
        "data": described,
        "images": n,
        "resize": described.get("resize"),
        "crop": described.get("crop"),
        "reference_set": f"the first {fid_count} of the {n} evaluation images before tokenization (rFID/rKID: "
                         "reconstructions vs their originals)",
        "reconstruction": "decode(encode(x)) clamped to [0, 1], as float (not quantised) for PSNR, SSIM and LPIPS, "
                          f"on the first {recon} of the {n} images",
        "psnr": f"{PSNR_PROTOCOL}; per-image MSE floored at {PSNR_CAP_MSE:g} (100 dB)",
        "ssim": SSIM_PROTOCOL,
        "lpips": lpips.describe() if lpips is not None else NOT_FOUND,
        "feature_extractor": inception.protocol() if inception is not None else None,
        "fid_images": fid_count if inception is not None else 0,
        "rfid": fid_note if fid_count >= 2 else None,
        "rkid": None if inception is None or fid_count < 2 else {
            "estimator": "unbiased MMD^2, polynomial kernel (x.y/2048 + 1)^3 (Binkowski et al. 2018)",
            "subsets": KID_SUBSETS, "subset_size": kid_subset_size(fid_count), "seed": 0},
        "usage": "CodeUsage histogram over every token of the evaluation set (one process)",
        "vqtok_version": vqtok_version(),
    }


def _fingerprint(data: Dataset, count: int, inception: InceptionFeatures | None) -> str | None:
    """A key identifying the reference images and features (None: not cacheable)."""
    if inception is None or not hasattr(data, "describe"):
        return None
    description = {k: v for k, v in data.describe().items() if k not in ("skipped", "skipped_files")}
    key = {"data": description, "count": count, "weights": file_sha256(inception.weights),
           "device": inception.device.type}
    return json.dumps(key, sort_keys=True, default=str)


def _remember(fingerprint: str, features: Tensor) -> None:
    _REFERENCE_CACHE[fingerprint] = features
    while len(_REFERENCE_CACHE) > _REFERENCE_CACHE_SIZE:
        _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))


def write_metrics(metrics: dict[str, Any], path: str | Path) -> Path:
    """Write metrics.json atomically (temporary file, then rename); non-finite numbers become null."""
    from ..core.io import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def format_table(metrics: dict[str, Any]) -> str:
    """The table `vqtok eval` prints: one metric per line, with units and the data it was measured on."""
    rows = [
        ("images", _number(metrics.get("images"), "{:,}")),
        ("psnr", _number(metrics.get("psnr"), "{:.2f} dB")),
        ("ssim", _number(metrics.get("ssim"), "{:.4f}")),
        ("lpips", _number(metrics.get("lpips"), "{:.4f}", "n/a (LPIPS-VGG weights not installed)")),
        ("rfid", _number(metrics.get("rfid"), "{:.3f}", "not computed")),
        ("rkid", _kid(metrics)),
        ("utilization", _utilization(metrics.get("utilization"), metrics.get("codebook_size"))),
        ("utilization_train", _utilization(metrics.get("utilization_train"), metrics.get("codebook_size"),
                                           metrics.get("tokens_train"))),
        ("perplexity", _number(metrics.get("perplexity"), "{:,.1f}")),
        ("tokens", _tokens(metrics)),
        ("data", _data(metrics.get("protocol", {}).get("data", {}))),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _number(value: Any, pattern: str, missing: str = "n/a") -> str:
    return missing if value is None else pattern.format(value)


def _kid(metrics: dict[str, Any]) -> str:
    if metrics.get("rkid") is None:
        return "not computed"
    return f"{metrics['rkid']:.5f} ± {metrics.get('rkid_std') or 0.0:.5f}"


def _utilization(value: float | None, codebook_size: int | None, tokens: int | None = None) -> str:
    if value is None:
        return "n/a"
    text = f"{100 * value:.2f} % of {codebook_size:,} codes" if codebook_size else f"{100 * value:.2f} %"
    return text + (f" ({tokens:,} tokens)" if tokens is not None else "")


def _tokens(metrics: dict[str, Any]) -> str:
    if metrics.get("tokens") is None:
        return "n/a"
    return f"{metrics['tokens']:,} ({metrics.get('tokens_per_code', 0.0):.2f} per code)"


def _data(described: dict[str, Any]) -> str:
    if not described:
        return "n/a"
    parts = [str(described.get("source", "?")), str(described.get("split", "")),
             f"{described.get('size')} px" if described.get("size") else ""]
    skipped = described.get("skipped")
    return " ".join(p for p in parts if p) + (f", {skipped} unreadable files skipped" if skipped else "")

