"""`vqtok eval RUN_DIR [--data SOURCE]`: evaluate a trained tokenizer, print the table, write RUN_DIR/metrics.json."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..core.device import resolve_device
from ..core.rundir import RunDir
from ..quantize import CodeUsage

log = logging.getLogger("vqtok.metrics")

EPILOG = """examples:
  vqtok eval runs/demo                                  # the run's own validation data, as training evaluated it
  vqtok eval runs/demo --data fashion-mnist --max-images 2000
  vqtok eval runs/lc --data /data/imagenet --size 256 --device cuda --workers 8
  vqtok eval runs/demo --no-fid                         # skip rFID/rKID (the slow part on a CPU)

The data defaults to the run's config.json "data" (source, size, val_length), and the image counts to its
eval_images, fid_images and recon_images, so the numbers match the final evaluation of training. metrics.json holds
every number with its protocol (data, crop, resize, reference set, Inception weights' sha256)."""


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate a trained tokenizer: PSNR, SSIM, LPIPS, rFID, rKID, code usage",
        description="Reconstruct the evaluation set once with a trained tokenizer, print the metrics table and write "
                    "RUN_DIR/metrics.json.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="run directory (config.json + model.safetensors)")
    p.add_argument("--data", help="photos, fashion-mnist or a folder of images (default: the run's data source)")
    p.add_argument("--split", default="val", help="train or val (default val)")
    p.add_argument("--size", type=int, help="crop size in pixels (default: the run's data size)")
    p.add_argument("--max-images", type=int, help="evaluate the first N images (default: the run's eval_images)")
    p.add_argument("--all", action="store_true", help="evaluate every image of the split (ignore eval_images)")
    p.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                   help="model.safetensors or the weight EMA (default auto: ema.safetensors when present)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-fid", action="store_true", help="skip rFID and rKID")
    p.add_argument("--fid-images", type=int,
                   help="compute rFID/rKID on the first N evaluated images (default: the run's fid_images, else all)")
    p.add_argument("--recon-images", type=int,
                   help="reconstruct and score (PSNR, SSIM, LPIPS, rFID) only the first N evaluated images; code "
                        "usage still counts every one (default: the run's recon_images, else all)")
    p.add_argument("--lpips-weights", help="folder holding vgg16-397923af.pth and LPIPS's vgg.pth")
    p.add_argument("--out", type=Path, help="where to write the metrics (default RUN_DIR/metrics.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)
    add_probe_subcommand(subparsers)


PROBE_EPILOG = """examples:
  vqtok probe runs/demo --data fashion-mnist                  # pooled quantized features, full train/val splits
  vqtok probe runs/demo --data fashion-mnist --features pooled flat pixels   # and the raw-pixel reference
  vqtok probe runs/lc --data /data/imagenet --size 256 --train-limit 50000 --device cuda --ema

Features: pooled = the quantized features z_q (B, D, h, w) averaged over positions (VQGAN-LC's classification task),
flat = z_q flattened, pixels = raw pixels (no tokenizer). Each feature is standardised with the train statistics,
then multinomial logistic regression is fitted by full-batch L-BFGS. The result is added to RUN_DIR/probe.json under
its feature kind, with its protocol."""


def add_probe_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe", help="linear probe: top-1 of logistic regression on a tokenizer's quantized features",
        description="Fit a linear classifier on the train split's features and report top-1 on the val split.",
        epilog=PROBE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="run directory (config.json + model.safetensors)")
    p.add_argument("--data", help="fashion-mnist or a folder with class subfolders (default: the run's data source)")
    p.add_argument("--features", choices=("pooled", "flat", "pixels"), nargs="+", default=["pooled"],
                   help="one or more of pooled (default), flat and pixels (the reference); the images are "
                        "encoded once for all")
    p.add_argument("--ema", action="store_true", help="use ema.safetensors instead of model.safetensors")
    p.add_argument("--size", type=int, help="image size in pixels (default: the run's data size)")
    p.add_argument("--train-limit", type=int, help="use N evenly spaced train images (default all)")
    p.add_argument("--val-limit", type=int, help="use N evenly spaced val images (default all)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight of the fit (default 1e-4)")
    p.add_argument("--max-iter", type=int, default=500, help="L-BFGS iterations at most (default 500)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")
    p.add_argument("--out", type=Path, help="where to write the result (default RUN_DIR/probe.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_probe_command)


def run_probe_command(args: argparse.Namespace) -> int:
    from .probe import format_probe, run_probes

    try:
        results = run_probes(args.run_dir, args.data, tuple(args.features), ema=args.ema, size=args.size,
                           train_limit=args.train_limit, val_limit=args.val_limit, batch_size=args.batch_size,
                           device=resolve_device(args.device), weight_decay=args.weight_decay,
                           max_iter=args.max_iter, out=args.out, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"vqtok probe: error: {str(error).splitlines()[0] if str(error) else type(error).__name__}",
              file=sys.stderr)
        return 2
    for result in results.values():
        print(format_probe(result))
    print(f"wrote {args.out or args.run_dir / 'probe.json'}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, TypeError) as error:
        print(f"vqtok eval: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..data import VAL_SEED, build_dataset
    from ..models import Tokenizer
    from . import evaluate, format_table, write_metrics
    from .report import write_run_report

    run = RunDir(args.run_dir)
    config = run.read_config()
    data = config.get("data") or {}
    source = args.data or data.get("source") or "photos"
    same_source = args.data is None or args.data == data.get("source")
    size = args.size or data.get("size")
    length = data.get("val_length") if same_source and args.split != "train" else None
    dataset = build_dataset(source, args.split, size=size, length=length, seed=VAL_SEED, train_crops=False)
    max_images = None if args.all else (args.max_images or config.get("eval_images"))
    usage_train = training_usage(run)
    ema = args.weights == "ema" or (args.weights == "auto" and run.ema.is_file())
    model = Tokenizer.from_pretrained(run.path, ema=ema)
    metrics = evaluate(model, dataset, batch_size=args.batch_size, device=resolve_device(args.device),
                       num_workers=args.workers, fid=not args.no_fid, max_images=max_images,
                       usage_train=usage_train, progress=not args.no_progress,
                       lpips_weights=args.lpips_weights, fid_images=args.fid_images or config.get("fid_images"),
                       recon_images=args.recon_images or config.get("recon_images"))
    metrics["protocol"]["model"] = {"run_dir": str(run.path), "weights": run.EMA if ema else run.MODEL}
    out = write_metrics(metrics, args.out or run.metrics)
    if args.out is None:  # the run's own evaluation: refresh its report and pictures too
        write_run_report(run, model, dataset, metrics, usage_train)
    print(format_table(metrics))
    print(f"wrote {out}")
    return 0


def training_usage(run: RunDir) -> CodeUsage | None:
    """The training code histogram the trainer stored (the last complete epoch, else the epoch in progress), as the
    trainer's own final evaluation takes it; None when the run has none."""
    try:
        state = run.training_usage_state()
    except ValueError as error:  # e.g. a trainer.pt that cannot be loaded weights-only: evaluate without it
        log.warning("%s: utilization_train is null", error)
        return None
    if state is None:
        return None
    usage = CodeUsage(int(state["codebook_size"]))
    usage.load_state_dict(state)
    return usage
