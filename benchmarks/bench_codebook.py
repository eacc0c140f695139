"""End-to-end codebook build and held-out quality.

    python benchmarks/bench_codebook.py --size 100000 --threads 1 --out /tmp/bench   # photos, efficientnet-lite0

Prints the wall time of `build_codebook` for each method (the first includes feature extraction; later ones reuse
the cached features), then for each codebook and two held-out sets, the mean squared quantization error per
dimension and the fraction of codes that are the nearest centre of at least one held-out feature:
  val_photos:  crops of the validation photos (never seen by the build: different photographs);
  new_crops:   fresh crops (another seed) of the training photos (same distribution, unseen crops).
Two references bracket the error: "mean" (a single centre, the training mean) and "all_features" (every one of the
N training features as a code: what "random" tends to as K -> N).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vqtok.backbones import build_encoder
from vqtok.codebook import FeatureShards, assign, extract_features, read_codebook_file
from vqtok.codebook.build import build_codebook, cpu_threads
from vqtok.data import build_dataset


def held_out(encoder: str, split: str, seed: int, args: argparse.Namespace, folder: Path) -> np.ndarray:
    """(N, F) features of `args.val_crops` crops of the `split` photos cut with `seed`."""
    dataset = build_dataset("photos", split, size=args.crop_size, length=args.val_crops, seed=seed,
                            train_crops=True)
    shards = extract_features(build_encoder(encoder), dataset, grid=args.grid, batch_size=16, out_dir=folder,
                              progress=False)
    return shards.load()[0]


def quality(codebook: np.ndarray, features: np.ndarray) -> dict[str, float]:
    distances, nearest = assign(features, codebook)
    return {"mse": round(float(distances.mean() / features.shape[1]), 4),
            "codes_hit": round(float(len(np.unique(nearest)) / len(codebook)), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--methods", default="two-level,random")
    parser.add_argument("--crops", type=int, default=None)
    parser.add_argument("--crop-size", type=int, default=128)
    parser.add_argument("--val-crops", type=int, default=4096)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench_codebook_")))
    args = parser.parse_args()
    with cpu_threads(args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:
    builds, codebooks = {}, {}
    for method in args.methods.split(","):
        start = time.perf_counter()
        path = build_codebook(encoder=args.encoder, source="photos", size=args.size, method=method, grid=args.grid,
                              crops=args.crops, crop_size=args.crop_size, out=args.out / f"{method}.safetensors",
                              cache_dir=args.out / "cache")
        builds[method] = round(time.perf_counter() - start, 1)
        codebooks[method] = read_codebook_file(path)[0].numpy()
        print(method, "build seconds", builds[method], flush=True)
    train = FeatureShards(next((args.out / "cache").glob("features-*"))).load()[0]  # (N, F)
    codebooks |= {"mean": train.mean(0, keepdims=True), "all_features": train}
    sets = {"val_photos": held_out(args.encoder, "val", 1, args, args.out / "val"),
            "new_crops": held_out(args.encoder, "train", 12345, args, args.out / "new_crops")}
    table = {name: {s: quality(cb, x) for s, x in sets.items()} for name, cb in codebooks.items()}
    print(json.dumps({"size": args.size, "train_features": len(train), "held_out_features": len(sets["val_photos"]),
                      "build_seconds": builds, "quality": table}, indent=1))


if __name__ == "__main__":
    main()
