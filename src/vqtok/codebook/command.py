"""`vqtok codebook build`: an LC codebook from a pre-trained encoder's features of an image source."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EPILOG = """examples:
  vqtok codebook build --encoder efficientnet-lite0 --data photos --size 100000 --out codebook.safetensors
  vqtok codebook build --encoder mobilenetv2 --data fashion-mnist --size 10000 --method per-class --out fm.safetensors
  vqtok codebook build --encoder clip-vit-l-14 --weights ~/models/clip-vit-large-patch14 --data /data/imagenet \\
      --size 100000 --method per-class --out imagenet-lc.safetensors
  torchrun --nproc_per_node 4 -m vqtok.cli codebook build --data /data/ffhq --size 100000 --out ffhq.safetensors

Methods: two-level (default: coarse k-means to sqrt(K) clusters, then centres inside each in proportion to its size;
needs no labels), per-class (K / classes centres per label, as VQGAN-LC on ImageNet), kmeans (flat), random
(K random features). The same request again reuses the file at --out; extracted features are cached under
--cache-dir, so another --size/--method/--seed on the same data skips the encoder and a killed run resumes.
Use the result with build_quantizer("lc", codebook_size=K, dim=8, codebook="codebook.safetensors")."""


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    codebook = subparsers.add_parser("codebook", help="build LC codebooks (k-means of pre-trained encoder features)",
                                     description="LC codebooks for the lc quantizer (VQGAN-LC).")
    actions = codebook.add_subparsers(dest="codebook_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "build", help="extract encoder features of a data source and cluster them to K centres",
        description="Extract pre-trained encoder features (pooled to a grid) from an image source and cluster them "
                    "into a (K, F) codebook saved as .safetensors.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="efficientnet-lite0",
                   help="efficientnet-lite0 (default), mobilenetv2, clip-vit-b-16 or clip-vit-l-14")
    p.add_argument("--data", default="photos", help="photos (default), fashion-mnist or a folder of images")
    p.add_argument("--size", type=int, default=100_000, help="number of codes K (default 100000)")
    p.add_argument("--method", default="two-level", help="two-level (default), per-class, kmeans or random")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--seed", type=int, default=0, help="seed for crops and k-means (default 0)")
    p.add_argument("--grid", type=int, default=4, help="average-pool each feature map to GRID x GRID vectors (4)")
    p.add_argument("--crops", type=int, help="training images/crops (default photos: 4*K/GRID^2; others: all)")
    p.add_argument("--crop-size", type=int, help="crop side in pixels (default: 128 for CNNs, CLIP's input size)")
    p.add_argument("--layer", help="encoder layer (default: CNNs' last block, CLIP's projected patch tokens)")
    p.add_argument("--weights", help="local weights replacing the packaged ones (a CLIP model directory)")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (default 20)")
    p.add_argument("--batch-size", type=int, help="images per encoder batch (default 16 on a CPU, fastest there; "
                                                  "128 on a GPU)")
    p.add_argument("--workers", type=int, help="DataLoader processes cutting crops beside the encoder (default: the "
                                               "CPUs less one, at most 8, shared by torchrun's processes; 0: none; "
                                               "the features do not depend on it)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the encoder's: auto (default: bf16 autocast on CUDA, fp32 on a CPU), fp32 or bf16; bf16 "
                        "gives another codebook (its own cache key)")
    p.add_argument("--threads", type=int, help="torch/faiss threads (default: all cores; on a busy shared CPU "
                                                "--threads 1 can be 2-3x faster)")
    p.add_argument("--device", default="auto", help="where the encoder runs: cpu, cuda, cuda:1 (default auto: "
                                                     "this rank's GPU when there is one)")
    p.add_argument("--cache-dir", type=Path, help="feature cache (default $VQTOK_CACHE/codebook or "
                                                  "~/.cache/vqtok/codebook)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from .build import build_codebook
    from ..core.codebook_file import read_metadata

    started = time.perf_counter()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    try:
        path = build_codebook(encoder=args.encoder, source=args.data, size=args.size, method=args.method,
                              out=args.out, seed=args.seed, grid=args.grid, crops=args.crops,
                              crop_size=args.crop_size, layer=args.layer, weights=args.weights,
                              cache_dir=args.cache_dir, batch_size=args.batch_size, niter=args.niter,
                              num_workers=args.workers, precision=args.precision, threads=args.threads,
                              device=args.device, rank=rank,
                              world_size=world_size, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, RuntimeError, ImportError) as error:
        print(f"vqtok codebook build: error: {error}", file=sys.stderr)
        return 2
    if rank != 0:
        return 0
    meta = read_metadata(path)
    print(f"{path}: {meta['codebook_size']} x {meta['feature_dim']} codebook ({meta['encoder']} {meta['layer']}, "
          f"{meta['method']}, {meta['num_features']} features) in {time.perf_counter() - started:.1f} s")
    return 0
