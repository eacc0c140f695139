"""Data and metrics throughput: photo crops per second, Inception images per second, and the rFID / rKID of the photos
validation crops against themselves after a JPEG round trip (a sanity figure for the evaluation protocol).

    .venv/bin/python benchmarks/bench_data_metrics.py [--crops 2000] [--quality 75] [--val-length 512]
"""

from __future__ import annotations

import argparse
import io
import os
import time

import torch
from PIL import Image

from vqtok.backbones import InceptionFeatures
from vqtok.data import build_dataset
from vqtok.data.images import to_tensor
from vqtok.metrics import fid_from_features, kid, psnr, ssim
from vqtok.metrics.harness import KID_SUBSETS, kid_subset_size


def crops_per_second(count: int, size: int) -> float:
    dataset = build_dataset("photos", "train", size=size, length=count)
    dataset[0]  # photos are decoded at construction; this warms the allocator
    start = time.perf_counter()
    for i in range(count):
        dataset[i]
    return count / (time.perf_counter() - start)


def inception_images_per_second(inception: InceptionFeatures, batches: int, batch_size: int = 32) -> float:
    x = torch.rand(batch_size, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    inception(x[:2])  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        inception(x, batch_size=batch_size)
    return batches * batch_size / (time.perf_counter() - start)


def jpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> the same images after 8-bit JPEG encoding at `quality` (Pillow, 4:2:0)."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        array = image.mul(255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        out.append(to_tensor(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=2000, help="crops to time")
    parser.add_argument("--batches", type=int, default=4, help="Inception batches of 32 to time")
    parser.add_argument("--val-length", type=int, default=512, help="validation crops for the JPEG figure")
    parser.add_argument("--quality", type=int, default=75)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other processes share them)")
    for size in (64, 256):
        print(f"photos crops/s at {size} px (one process): {crops_per_second(args.crops, size):,.0f}")
    inception = InceptionFeatures()
    print(f"Inception images/s (batch 32, 299 px, CPU): {inception_images_per_second(inception, args.batches):.1f}")

    val = build_dataset("photos", "val", length=args.val_length)
    originals = torch.stack([val[i][0] for i in range(len(val))])
    compressed = jpeg_round_trip(originals, args.quality)
    start = time.perf_counter()
    real, fake = inception(originals), inception(compressed)
    seconds = time.perf_counter() - start
    subset = kid_subset_size(len(val))
    kid_mean, kid_std = kid(fake, real, subsets=KID_SUBSETS, subset_size=subset)
    print(f"photos val: {len(val)} crops of 64 px from {len(val.describe()['photos'])} photos; JPEG quality "
          f"{args.quality}: PSNR {float(psnr(originals, compressed).mean()):.2f} dB, SSIM "
          f"{float(ssim(originals, compressed).mean()):.4f}")
    print(f"rFID {fid_from_features(fake, real):.3f}   rKID {kid_mean:.5f} ± {kid_std:.5f} "
          f"({KID_SUBSETS} subsets of {subset})   features: {2 * len(val)} images in {seconds:.0f} s")
    print(f"rFID of the originals against themselves: {fid_from_features(real, real):.2e}; "
          f"load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
