"""Sampling a generator run and scoring it: `vqtok gen sample`, `vqtok gen eval` and the end of `vqtok gen train`.

The protocol (every number in metrics.json is measured this way, with the same N):
- samples: N = per_class x classes class-balanced samples (not LlamaGen's random labels), decoded by the tokenizer;
- reference: N real held-out images (the val split of the tokens' source, evenly spaced), the set every gFID, IS,
  precision and recall below is measured against;
- floor_real: N real TRAINING images (evenly spaced) scored the same way: what a perfect generator of the training
  distribution would get at this N;
- floor_recon: the tokenizer's reconstructions of those training images: a perfect generator of the token maps;
- ceiling_unigram: token maps drawn position by position from each class's code frequencies in the training tokens
  (metrics/generation.py `unigram_tokens`), decoded: what a generator that learned no dependencies would get;
- no_cfg: the same samples drawn at cfg 1 (when the run samples with guidance).
"""

from __future__ import annotations

import io
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.io import atomic_write_bytes, write_json, write_text
from ..core.rundir import RunDir
from ..data import build_dataset
from ..data.tokens import INDEX_FILE, TokenShards, read_index
from ..models import Tokenizer
from .ar import GPT
from .sample import balanced_labels, sample
from .config import GenTrainConfig, SampleConfig, load_generator

SAMPLES_NPZ = "samples.npz"
SAMPLES_PNG = "samples.png"


def load_for_sampling(run_dir: str | Path, sample_overrides: dict[str, Any] | None = None, ema: bool = True,
                      device: torch.device | str = "cpu",
                      model: GPT | None = None) -> tuple[GPT, Tokenizer, SampleConfig, GenTrainConfig]:
    """The run's GPT (its weight EMA when it has one and ema is set), its tokenizer, and the sampling settings."""
    loaded, config = load_generator(run_dir, ema=None if ema else False, device=device)
    model = (model or loaded).to(device).eval()
    if not config.tokenizer:
        raise ValueError(f"{run_dir}'s config names no tokenizer; set it with --set tokenizer=RUN when training")
    tokenizer = Tokenizer.from_pretrained(config.tokenizer, ema=tokenizer_ema(config)).to(device).eval()
    if tokenizer.codebook_size != model.config.vocab_size:
        raise ValueError(f"the tokenizer {config.tokenizer} has {tokenizer.codebook_size} codes but the generator "
                         f"predicts {model.config.vocab_size}; point `tokenizer` at the run that encoded its tokens")
    sampling = replace(config.sample, **(sample_overrides or {})).check().for_model(model.config)
    return model, tokenizer, sampling, config


def tokenizer_ema(config: GenTrainConfig) -> bool:
    """Whether the tokens were encoded with the tokenizer's weight EMA: the run's tokenizer_ema, else (runs made
    before it was recorded) their index.json where the folder still exists, else the live weights."""
    if config.tokenizer_ema is not None:
        return config.tokenizer_ema
    if config.data.tokens and (Path(config.data.tokens) / INDEX_FILE).is_file():
        return bool(read_index(config.data.tokens).get("ema", False))
    return False


def sample_images(model: GPT, tokenizer: Tokenizer, sampling: SampleConfig, device: torch.device | str,
                  labels: Tensor | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Class-balanced samples decoded to uint8 (N, H, W, 3) images (ADM's layout), and their labels (N,)."""
    if labels is None:
        labels = balanced_labels(model.config.num_classes, sampling.per_class)
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    ids = sample(model, labels.to(device), cfg_scale=sampling.cfg_scale, cfg_schedule=sampling.cfg_schedule,
                 temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, generator=generator,
                 batch_size=sampling.batch_size)  # (N, h, w)
    return decode_to_uint8(tokenizer, ids, sampling.batch_size), labels.cpu()


@torch.no_grad()
def decode_to_uint8(tokenizer: Tokenizer, ids: Tensor, batch_size: int) -> Tensor:
    """Token maps (N, h, w) -> uint8 images (N, H, W, 3)."""
    device = next(tokenizer.parameters()).device
    out = [to_uint8(tokenizer.decode(ids[i : i + batch_size].to(device))).cpu()
           for i in range(0, len(ids), batch_size)]
    return torch.cat(out)


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8, rounded as PNG writers do."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def write_samples(images: Tensor, labels: Tensor, out: str | Path, per_row: int | None = None) -> Path:
    """ADM-format .npz (arr_0 uint8 (N, H, W, 3), arr_1 int64 labels) at `out`, and a PNG grid beside it: one row per
    class (its first samples), at most 16 columns."""
    from PIL import Image

    out = Path(out)
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images.numpy(), arr_1=labels.numpy().astype(np.int64))
    atomic_write_bytes(out, buffer.getvalue())
    classes = sorted(set(labels.tolist()))
    per_row = per_row or min(16, min(int((labels == c).sum()) for c in classes))
    rows = [images[labels == c][:per_row] for c in classes]
    grid = torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)  # (classes * H, per_row * W, 3)
    png = out.with_suffix(".png")
    buffer = io.BytesIO()
    Image.fromarray(grid.numpy()).save(buffer, format="PNG")
    atomic_write_bytes(png, buffer.getvalue())
    return png


def real_images(source: str, split: str, size: int, count: int) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """`count` evenly spaced real images of a split as uint8 (N, H, W, 3), their labels, and the dataset's
    description (the protocol records it)."""
    dataset = build_dataset(source, split, size=size, length=count, train_crops=False)
    if len(dataset) < count:
        raise ValueError(f"{source} {split} has {len(dataset)} images, fewer than the N = {count} samples; lower "
                         "--per-class")
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
    images, labels = zip(*[(to_uint8(x), y) for x, y in loader])
    return torch.cat(images), torch.cat(labels).long(), dataset.describe()


def evaluate_generator(run_dir: str | Path, *, model: GPT | None = None, device: torch.device | str = "cpu",
                       sample_overrides: dict[str, Any] | None = None, ema: bool = True, references: bool | None = None,
                       no_cfg: bool | None = None, progress: bool = False) -> dict[str, Any]:
    """Sample the run (class-balanced, N = per_class x classes), score the samples and the reference points against
    N real held-out images, write samples.npz / samples.png, metrics.json and report.md into the run directory.
    `model` (the trainer's evaluation weights) replaces the saved ones."""
    from ..metrics.classifier import image_batches, load_or_train_classifier
    from ..metrics.generation import generation_metrics, inception_outputs, unigram_tokens

    run = RunDir(run_dir)
    device = torch.device(device)
    model, tokenizer, sampling, config = load_for_sampling(run_dir, sample_overrides, ema=ema, device=device,
                                                           model=model)
    references = config.eval.references if references is None else references
    no_cfg = config.eval.no_cfg if no_cfg is None else no_cfg
    tokens = TokenShards(config.data.tokens)
    source = config.eval.data or (tokens.index.get("data") or {}).get("source")
    if not source:
        raise ValueError(f"the tokens in {config.data.tokens} do not record their image source; set eval.data")
    size = int(tokens.index.get("image_size") or tokenizer.config.image_size)
    batch = config.eval.batch_for(device)

    labels = balanced_labels(model.config.num_classes, sampling.per_class)
    count = len(labels)
    real, real_labels, real_description = real_images(source, "val", size, count)
    classifier, classifier_info = load_or_train_classifier(source, size, cache_dir=config.eval.classifier_cache,
                                                           device=device, progress=progress)
    real_features, _ = inception_outputs(real.numpy(), batch_size=batch, device=device, progress=progress)
    reference = f"{count} real {source} val images (evenly spaced), {size} px"

    def score(images: Tensor, image_labels: Tensor) -> dict[str, Any]:
        return generation_metrics(images.numpy(), image_labels, real_features=real_features,
                                  classifier=classifier, classifier_info=classifier_info, reference=reference,
                                  batch_size=batch, device=device, progress=progress)

    images, _ = sample_images(model, tokenizer, sampling, device, labels=labels, progress=progress)
    write_samples(images, labels, run.path / SAMPLES_NPZ)
    metrics = score(images, labels)
    protocol = metrics.pop("protocol")
    protocol.update(sampling=asdict(sampling), reference_data=real_description,
                    classifier_test_accuracy=classifier_info.get("test_accuracy"), tokens=tokens.describe())
    metrics.update(cfg=sampling.cfg_scale, temperature=sampling.temperature, top_k=sampling.top_k,
                   top_p=sampling.top_p, classifier_test_accuracy=classifier_info.get("test_accuracy"))
    if no_cfg and sampling.cfg_scale != 1.0:
        plain, _ = sample_images(model, tokenizer, replace(sampling, cfg_scale=1.0), device, labels=labels)
        metrics["no_cfg"] = _without_protocol(score(plain, labels))
    if references:
        train, train_labels, train_description = real_images(source, "train", size, count)
        metrics["floor_real"] = _without_protocol(score(train, train_labels))
        with torch.no_grad():
            recon = torch.cat([to_uint8(tokenizer.decode(tokenizer.encode(x.to(device)))).cpu()
                               for x, _ in image_batches(train.numpy(), batch_size=batch)])
        metrics["floor_recon"] = _without_protocol(score(recon, train_labels))
        all_tokens, all_labels = tokens.all_tokens()
        drawn = unigram_tokens(torch.from_numpy(all_tokens), all_labels, labels,
                               generator=torch.Generator().manual_seed(sampling.seed))
        metrics["ceiling_unigram"] = _without_protocol(score(decode_to_uint8(tokenizer, drawn, batch), labels))
        protocol["reference_points"] = {
            "floor_real": f"{count} real {source} TRAIN images (evenly spaced) against the reference",
            "floor_recon": "the tokenizer's reconstructions of those training images",
            "ceiling_unigram": "token maps drawn from each class's per-position code frequencies in the training "
                               "tokens (view 0), decoded",
            "train_data": train_description}
    metrics["protocol"] = protocol
    write_json(run.metrics, metrics)
    write_generation_report(run, metrics)
    return metrics


def _without_protocol(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in ("protocol", "class_accuracy_real")}


ROWS = (("gfid", "gFID vs the reference (lower is better)"), ("precision", "k-NN precision (k = 3)"),
        ("recall", "k-NN recall (k = 3)"), ("class_accuracy", "samples the classifier puts in their class"),
        ("inception_score", "Inception Score (null: the shipped Inception has no logits)"))
COLUMNS = ("samples", "no_cfg", "floor_real", "floor_recon", "ceiling_unigram")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_generation_table(metrics: dict[str, Any]) -> str:
    """A plain-text table: each metric for the samples and for each reference point measured."""
    columns = [c for c in COLUMNS if c == "samples" or c in metrics]
    sets = {c: (metrics if c == "samples" else metrics[c]) for c in columns}
    head = f"{'N = ' + str(metrics['samples']):<18}" + "".join(f"{c:>17}" for c in columns)
    lines = [head, f"{'cfg ' + _fmt(metrics.get('cfg')):<18}" + "".join(
        f"{(_fmt(metrics.get('cfg')) if c == 'samples' else ('1.0' if c == 'no_cfg' else '-')):>17}" for c in columns)]
    for key, _ in ROWS:
        lines.append(f"{key:<18}" + "".join(f"{_fmt(sets[c].get(key)):>17}" for c in columns))
    lines.append(f"classifier test accuracy {_fmt(metrics.get('classifier_test_accuracy'))}")
    return "\n".join(lines)


def write_generation_report(run: RunDir, metrics: dict[str, Any]) -> Path:
    """report.md of a generator run: the samples grid and the metrics table with the reference points."""
    columns = [c for c in COLUMNS if c == "samples" or c in metrics]
    sets = {c: (metrics if c == "samples" else metrics[c]) for c in columns}
    protocol = metrics.get("protocol", {})
    lines = [f"# Generator run {run.path.name}", "",
             f"![samples]({SAMPLES_PNG}) (one row per class)", "",
             f"N = {metrics['samples']} class-balanced samples at cfg {metrics.get('cfg')}, temperature "
             f"{metrics.get('temperature')}, top-k {metrics.get('top_k')}, top-p {metrics.get('top_p')}; every "
             f"column is measured against the same reference: {protocol.get('reference_set')}.", "",
             "| metric | " + " | ".join(columns) + " | meaning |", "|---" * (len(columns) + 2) + "|"]
    for key, meaning in ROWS:
        lines.append(f"| {key} | " + " | ".join(_fmt(sets[c].get(key)) for c in columns) + f" | {meaning} |")
    lines += ["", f"Classifier (trained on the real training split): test accuracy "
                  f"{_fmt(metrics.get('classifier_test_accuracy'))}."]
    points = protocol.get("reference_points")
    if points:
        lines += ["", "Reference points: " + "; ".join(f"**{k}**: {v}" for k, v in points.items()
                                                     if isinstance(v, str)) + "."]
    probe = _tokenizer_probe(metrics)
    if probe:
        lines += ["", "Linear probe of the tokenizer (metrics/probe.py): " + probe + "."]
    lines += ["", "The full protocol is in metrics.json."]
    path = run.path / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


def _tokenizer_probe(metrics: dict[str, Any]) -> str:
    """The tokenizer run's probe.json, when `vqtok probe` wrote one, in a sentence."""
    import json

    tokens = metrics.get("protocol", {}).get("tokens", {})
    run = tokens.get("tokenizer")
    path = Path(run) / "probe.json" if run else None
    if path is None or not path.is_file():
        return ""
    entries = json.loads(path.read_text())
    entries = entries.values() if isinstance(entries, dict) else entries
    parts = [f"{e.get('features')} top-1 {_fmt(e.get('top1'))}" for e in entries if isinstance(e, dict)]
    return ", ".join(parts)
