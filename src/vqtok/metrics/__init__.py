"""Evaluation metrics, each computed one documented way (stated in metrics.json's protocol block beside every
number), and the loop that writes metrics.json.

    from vqtok.metrics import evaluate, format_table
    metrics = evaluate(tokenizer, build_dataset("photos", "val"), out="runs/x/metrics.json")

- psnr, ssim: RGB in [0, 1], per image (SSIM: Gaussian 11 / 1.5, data_range 1).
- InceptionFeatures, frechet_distance, fid_from_features, kid: rFID / rKID on the TF-FID Inception pool features.
- LPIPS, load_lpips: LPIPS-VGG16 where its weights are present, else None (metrics.json: "lpips": null).
"""

from __future__ import annotations

from typing import Any

from ..backbones import InceptionFeatures, file_sha256, inception_weights_path
from .harness import evaluate, format_table, write_metrics
from .fid import feature_statistics, fid_from_features, frechet_distance, kid
from .image import psnr, ssim
from .lpips import load_lpips

__all__ = [
    "psnr", "ssim", "InceptionFeatures", "inception_weights_path", "file_sha256", "feature_statistics",
    "frechet_distance", "fid_from_features", "kid", "LPIPS", "load_lpips", "evaluate", "format_table", "write_metrics",
]


def __getattr__(name: str) -> Any:
    if name == "LPIPS":  # defined once, in vqtok.models.perceptual; imported on use (it pulls in the models)
        from ..models.perceptual import LPIPS

        return LPIPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
