"""Evaluation metrics, each computed one documented way (stated in metrics.json's protocol block beside every
number), and the loop that writes metrics.json.

    from vqtok.metrics import evaluate, format_table
    metrics = evaluate(tokenizer, build_dataset("photos", "val"), out="runs/x/metrics.json")

- psnr, ssim: RGB in [0, 1], per image (SSIM: Gaussian 11 / 1.5, data_range 1).
- InceptionFeatures, frechet_distance, fid_from_features, kid: rFID / rKID on the TF-FID Inception pool features.
- LPIPS, load_lpips: LPIPS-VGG16 where its weights are present, else None (metrics.json: "lpips": null).
- generation_metrics, inception_outputs, inception_score, precision_recall, unigram_tokens: a generator's samples
  against real images (gFID, k-NN precision/recall, IS where logits exist, class accuracy); the unigram ceiling.
- load_or_train_classifier, class_accuracy: the cached small CNN that judges the class of samples.
- fit_linear_probe, run_probe(s): the linear probe on a tokenizer's quantized features (`vqtok probe`).
"""

from __future__ import annotations

from typing import Any

from ..backbones import InceptionFeatures, file_sha256, inception_weights_path
from .harness import evaluate, format_table, write_metrics
from .fid import feature_statistics, fid_from_features, frechet_distance, kid
from .classifier import class_accuracy, load_or_train_classifier
from .generation import generation_metrics, inception_outputs, inception_score, precision_recall, unigram_tokens
from .image import psnr, ssim
from .probe import fit_linear_probe, run_probe, run_probes
from .lpips import load_lpips

__all__ = [
    "psnr", "ssim", "InceptionFeatures", "inception_weights_path", "file_sha256", "feature_statistics",
    "frechet_distance", "fid_from_features", "kid", "LPIPS", "load_lpips", "evaluate", "format_table", "write_metrics",
    "generation_metrics", "inception_outputs", "inception_score", "precision_recall", "unigram_tokens",
    "load_or_train_classifier", "class_accuracy", "fit_linear_probe", "run_probe", "run_probes",
]


def __getattr__(name: str) -> Any:
    if name == "LPIPS":  # defined once, in vqtok.models.perceptual; imported on use (it pulls in the models)
        from ..models.perceptual import LPIPS

        return LPIPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
