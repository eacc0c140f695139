"""`vqtok train`, `vqtok encode` and `vqtok decode`."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..core.io import write_json, write_npy
from ..core.rundir import RunDir
from ..data.tokens import AUGMENTATIONS, INDEX_FILE, read_index, token_dtype


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    _add_train(subparsers)
    _add_encode(subparsers)
    _add_decode(subparsers)


# -- train ------------------------------------------------------------------------------------------------------------
def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a tokenizer (single process, or data parallel under torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an image tokenizer with any of the five quantizers into a run directory.",
        epilog="""examples:
  vqtok train --config configs/demo.yaml --out runs/demo
  vqtok train --config configs/demo.yaml --set model.quantizer=vq --set model.quantizer_options={} --out runs/demo-vq
  vqtok train --out runs/demo --resume                      # continue a run from its last complete checkpoint
  torchrun --nproc_per_node 8 -m vqtok.cli train --config configs/imagenet-f16-ibq.yaml --data /data/imagenet \\
      --out runs/ibq""")
    p.add_argument("--config", type=Path,
                   help="YAML config (configs/*.yaml); without it, the defaults; with --resume, the run's own config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-4 --set data.batch_size=8 (repeatable)")
    p.add_argument("--data", help="shortcut for --set data.source=SOURCE (photos, fashion-mnist or a folder)")
    p.add_argument("--out", type=Path, required=True, help="run directory to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last complete checkpoint")
    p.add_argument("--until", type=int, metavar="STEP",
                   help="stop after this step with a checkpoint (continue later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import train

    overrides = list(args.overrides) + ([f"data.source={args.data}"] if args.data else [])
    if args.resume:
        run = RunDir(args.out)
        if not run.config.is_file():
            raise FileNotFoundError(f"--resume needs {run.config}; {args.out} is not a vqtok run directory")
        base = run.read_config()
        base = {k: v for k, v in base.items() if k not in ("data_description", "world_size")}
        config = load_config(args.config, overrides, base=None if args.config else base)
    else:
        config = load_config(args.config, overrides)  # no --config: the defaults, with the --set overrides
    summary = train(config, args.out, resume=args.resume, until=args.until, progress=not args.no_progress)
    metrics = summary.get("metrics")
    if metrics is not None:
        from ..metrics import format_table

        print(format_table(metrics))
        print(f"run directory: {args.out}")
    return 0


# -- encode -----------------------------------------------------------------------------------------------------------
def _add_encode(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "encode", help="turn images into token shards (.npy) with a trained tokenizer",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Encode a data source into token shards: tokens-XXXXX.npy (n, h, w) as int16 when the codebook "
                    "fits (K <= 32768) else int32, labels-XXXXX.npy (n,) int64, and index.json describing them.",
        epilog="examples:\n  vqtok encode runs/demo --data photos --out tokens/\n"
               "  vqtok encode runs/ibq --data /data/imagenet --split train --ema --out tokens/imagenet-train/")
    p.add_argument("run", type=Path, help="run directory (config.json + model.safetensors)")
    p.add_argument("--data", required=True, help="photos, fashion-mnist or a folder of images")
    p.add_argument("--split", default="val", help="train or val (default val: centre crops)")
    p.add_argument("--out", type=Path, required=True, help="folder for the shards and index.json")
    p.add_argument("--size", type=int, help="crop size (default: the run's training size)")
    p.add_argument("--length", type=int, help="number of crops for the photos source")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    p.add_argument("--ema", action="store_true", help="use the weight-EMA weights (ema.safetensors)")
    p.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none",
                   help="views per image for a generator's training set: flip (the image and its mirror) or ten-crop "
                        "(LlamaGen: a centre square of 1.1 x --size, its 4 corner and centre crops, each mirrored); "
                        "tokens are then (n, views, h, w) and view 0 is the plain image")
    p.set_defaults(func=run_encode)


def augmented_views(images: Tensor, augment: str, size: int) -> Tensor:
    """(B, 3, S, S) -> (B, A, 3, size, size): the views `vqtok encode --augment` encodes; view 0 is the plain image
    (for ten-crop, the centre crop)."""
    if augment == "none":
        return images[:, None]
    if augment == "flip":
        return torch.stack([images, images.flip(-1)], dim=1)
    big = images.shape[-1]
    corners = [((big - size) // 2, (big - size) // 2), (0, 0), (0, big - size), (big - size, 0),
               (big - size, big - size)]
    crops = [images[..., top : top + size, left : left + size] for top, left in corners]
    return torch.stack(crops + [c.flip(-1) for c in crops], dim=1)


def run_encode(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..data import build_dataset, describe_dataset
    from ..models import Tokenizer

    model = Tokenizer.from_pretrained(args.run, ema=args.ema).eval()
    size = args.size or model.config.image_size
    load_size = round(size * 1.1) if args.augment == "ten-crop" else size  # LlamaGen's crop_range 1.1
    dataset = build_dataset(args.data, args.split, size=load_size, length=args.length, train_crops=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(model.codebook_size)
    shards, tokens, labels = [], [], []

    def flush() -> None:
        if not tokens:
            return
        name = f"{len(shards):05d}"
        ids, lab = np.concatenate(tokens), np.concatenate(labels)
        write_npy(args.out / f"tokens-{name}.npy", ids)
        write_npy(args.out / f"labels-{name}.npy", lab)
        shards.append({"tokens": f"tokens-{name}.npy", "labels": f"labels-{name}.npy", "count": len(ids)})
        tokens.clear()
        labels.clear()

    pending = 0
    for images, label in tqdm(loader, desc="encode", unit="batch"):
        views = augmented_views(images, args.augment, size)  # (B, A, 3, size, size)
        ids = model.encode(views.flatten(0, 1)).unflatten(0, views.shape[:2])  # (B, A, h, w)
        ids = ids.cpu().numpy().astype(dtype)
        if args.augment == "none":
            ids = ids[:, 0]  # (B, h, w), as before augmentations existed
        tokens.append(ids)
        labels.append(np.asarray(label, dtype=np.int64))
        pending += len(ids)
        if pending >= args.shard_size:
            flush()
            pending = 0
    flush()
    index = {"run": str(args.run.resolve()), "codebook_size": model.codebook_size, "grid": list(model.grid),
             "image_size": size, "dtype": dtype.name, "ema": args.ema, "augment": args.augment, "count": sum(s["count"] for s in shards),
             "data": describe_dataset(dataset), "shards": shards}
    write_json(args.out / INDEX_FILE, index)
    views = AUGMENTATIONS[args.augment]
    print(f"wrote {index['count']} x {views} token maps of {model.grid[0]}x{model.grid[1]} ({dtype.name}) in {len(shards)} "
          f"shard(s) to {args.out}")
    return 0


# -- decode -----------------------------------------------------------------------------------------------------------
def _add_decode(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "decode", help="turn token shards back into PNG images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode the shards written by `vqtok encode` into PNGs named SHARD-INDEX.png.",
        epilog="example:\n  vqtok decode runs/demo tokens/ --out images/")
    p.add_argument("run", type=Path, help="run directory of the tokenizer that wrote the tokens")
    p.add_argument("tokens", type=Path, help="folder with index.json and the token shards")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="decode at most this many images")
    p.add_argument("--ema", action="store_true", help="use the weight-EMA weights (ema.safetensors)")
    p.set_defaults(func=run_decode)


def run_decode(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from ..models import Tokenizer

    index = read_index(args.tokens)
    model = Tokenizer.from_pretrained(args.run, ema=args.ema).eval()
    if index["codebook_size"] != model.codebook_size:
        raise ValueError(f"the tokens come from a codebook of {index['codebook_size']} codes, the tokenizer in "
                         f"{args.run} has {model.codebook_size}; decode with the run that encoded them")
    args.out.mkdir(parents=True, exist_ok=True)
    total = min(index["count"], args.limit) if args.limit else index["count"]
    written = 0
    with tqdm(total=total, desc="decode", unit="img") as bar:
        for shard_number, shard in enumerate(index["shards"]):
            ids = np.load(args.tokens / shard["tokens"], mmap_mode="r")
            if ids.ndim == 4:  # (n, views, h, w) from --augment: decode the plain view
                ids = ids[:, 0]
            for start in range(0, len(ids), args.batch_size):
                if written >= total:
                    break
                batch = torch.from_numpy(ids[start : start + min(args.batch_size, total - written)].astype(np.int64))
                images = model.decode(batch)  # (B, 3, H, W) in [0, 1]
                pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
                for i, array in enumerate(pixels):
                    Image.fromarray(array).save(args.out / f"{shard_number:05d}-{start + i:06d}.png")
                written += len(pixels)
                bar.update(len(pixels))
    print(f"wrote {written} PNGs to {args.out}")
    return 0
