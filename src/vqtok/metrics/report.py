"""A run's human-readable report: report.md (metrics and what they mean), reconstructions.png, usage.png."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.io import atomic_write_bytes, write_text
from ..core.rundir import RunDir
from ..quantize import CodeUsage


def save_reconstruction_grid(model: Any, dataset: Dataset, path: Path, count: int = 8) -> None:
    """Originals on the top row, their reconstructions below (evenly spaced images of `dataset`)."""
    from PIL import Image

    picks = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).round().astype(int)
    images = torch.stack([dataset[int(i)][0] for i in picks])  # (n, 3, H, W) in [0, 1]
    device = next(model.parameters()).device
    recon = model.decode(model.encode(images.to(device))).cpu()
    grid = torch.cat([torch.cat(list(images), dim=2), torch.cat(list(recon), dim=2)], dim=1)  # (3, 2H, nW)
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    scale = max(1, 128 // images.shape[-1])  # small crops are enlarged so a person can see them
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def save_usage_plot(usage: CodeUsage, path: Path, title: str) -> None:
    """Code counts sorted from most to least used (log scale): a flat curve is a fully used codebook."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.sort(usage.counts.cpu().numpy())[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    left.plot(np.arange(1, len(counts) + 1), np.maximum(counts, 0.8), lw=1)
    left.set(xscale="log", yscale="log", xlabel="code rank", ylabel="tokens (0 drawn at 0.8)",
             title=f"{title}: {usage.utilization():.2%} of {usage.codebook_size:,} codes used")
    right.hist(counts, bins=50, log=True)
    right.set(xlabel="tokens per code", ylabel="codes", title=f"{usage.tokens:,} tokens, perplexity "
                                                              f"{usage.perplexity():,.0f}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    plt.close(fig)


METRIC_MEANING = [
    ("utilization", "share of the codebook's codes used at least once on the evaluation set"),
    ("utilization_train", "the same over the last complete training epoch (VQGAN-LC's protocol)"),
    ("perplexity", "exp(entropy) of code usage on the evaluation set: the number of equally used codes it equals"),
    ("tokens_per_code", "evaluation tokens per code: below ~10, utilization is limited by the token count"),
    ("images", "evaluation images whose codes were counted"),
    ("recon_images", "of those, the first ones reconstructed for PSNR, SSIM and LPIPS"),
    ("psnr", "peak signal-to-noise ratio, RGB in [0, 1] (dB, higher is better)"),
    ("ssim", "structural similarity, Gaussian window 11 / 1.5, RGB in [0, 1] (higher is better)"),
    ("rfid", "Frechet Inception distance, reconstructions vs originals (lower is better; biased at few images)"),
    ("rkid", "kernel Inception distance, unbiased (lower is better)"),
    ("rkid_std", "standard deviation of rKID over its subsets"),
    ("fid_images", "images rFID and rKID were computed on"),
    ("lpips", "LPIPS-VGG distance (null: its weights are not installed)"),
]


def write_run_report(run: RunDir | str | Path, model: Any, dataset: Dataset, metrics: dict[str, Any],
                     usage: CodeUsage | None) -> Path:
    """report.md with reconstructions.png and (given the training histogram) usage.png, in the run directory."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    save_reconstruction_grid(model, dataset, run.reconstructions)
    if usage is not None and usage.tokens:
        save_usage_plot(usage, run.usage_plot, "last training epoch")
    return write_report(run, metrics, usage)


def write_report(run: RunDir | str | Path, metrics: dict[str, Any], usage: CodeUsage | None = None) -> Path:
    """report.md: what was trained, the metrics with their meaning and protocol, and links to the pictures."""
    run = run if isinstance(run, RunDir) else RunDir(run)
    config = run.read_config()
    model = config["model"]
    lines = [
        f"# vqtok run `{run.path.name}`", "",
        f"Tokenizer: preset `{model['preset']}` at {model['image_size']} px, quantizer `{model['quantizer']}` with "
        f"{model['codebook_size']:,} codes of dimension {model['dim']}; trained {config.get('steps', '?')} steps on "
        f"`{config.get('data', {}).get('source', '?')}`.", "",
        "| metric | value | meaning |", "|---|---|---|",
    ]
    for key, meaning in METRIC_MEANING:
        if key in metrics:
            lines.append(f"| {key} | {_fmt(metrics[key])} | {meaning} |")
    tokens = [f"{metrics[k]:,} {label}" for k, label in (("tokens", "evaluation tokens"),
                                                        ("tokens_train", "training tokens")) if metrics.get(k) is not None]
    if tokens:
        lines += ["", "Token counts: " + ", ".join(tokens) + "."]
    protocol = metrics.get("protocol")
    if protocol:
        lines += ["", "## Protocol", "", "```json", json.dumps(protocol, indent=2), "```"]
    lines += ["", "## Pictures", "", f"![reconstructions]({RunDir.RECONSTRUCTIONS})", "",
              "Top row: validation crops; bottom row: their reconstructions from the tokens.", ""]
    if usage is not None:
        lines += [f"![code usage]({RunDir.USAGE_PLOT})", "", "Code usage over the last training epoch, most used code first.", ""]
    write_text(run.report, "\n".join(lines))
    return run.report


def _fmt(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
