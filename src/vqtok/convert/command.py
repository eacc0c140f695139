"""`vqtok convert --from NAME CHECKPOINT --out RUN_DIR`: a published tokenizer as a vqtok run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

EPILOG = """examples:
  vqtok convert --from ibq imagenet256_262144.ckpt --out runs/ibq-262144            # EMA weights (IBQ's eval)
  vqtok convert --from ibq imagenet256_16384.ckpt --weights raw --out runs/ibq-16384-raw
  vqtok convert --from taming last.ckpt --config model.yaml --out runs/taming-f16-16384
  vqtok convert --from vqgan-lc vqgan-lc-100K-f16-dim8.pth --out runs/lc-100k      # a file you downloaded
  vqtok convert --from llamagen vq_ds16_c2i.pt --out runs/llamagen-vq16
  vqtok eval runs/ibq-262144 --data /data/imagenet --size 256

The architecture is read from the tensors' shapes; --config (the source's model yaml: taming's model.yaml, IBQ's
LightningCLI yaml, VQGAN-LC's vq-f16.yaml, or a yaml of LlamaGen's ModelArgs fields) is checked against them.
Checkpoints are read weights-only: a file that needs arbitrary unpickling is refused, with how to re-save it.
VQGAN-LC's weights carry no licence: vqtok converts the file you supply and downloads nothing."""


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    from . import SOURCES

    p = subparsers.add_parser(
        "convert", help="turn a published tokenizer checkpoint (VQGAN-LC, IBQ, taming, LlamaGen) into a run directory",
        description="Convert a published tokenizer checkpoint into a vqtok run directory (config.json + "
                    "model.safetensors) with the same tokens and the same reconstructions.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", required=True, metavar="NAME", help=f"one of {', '.join(SOURCES)}")
    p.add_argument("checkpoint", type=Path, help="the published checkpoint (.ckpt, .pth, .pt or .safetensors)")
    p.add_argument("--out", type=Path, required=True, help="run directory to create")
    p.add_argument("--config", type=Path, help="the source's model yaml, checked against the checkpoint")
    p.add_argument("--weights", metavar="ema|raw",
                   help="IBQ / LlamaGen: the EMA copy (default where present) or the raw weights")
    p.add_argument("--codebook", type=Path,
                   help="VQGAN-LC: the codebook file (codebook-100K.pth) for a checkpoint without tok_embeddings")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from . import convert

    start = time.perf_counter()
    model = convert(args.source, args.checkpoint, args.out, config=args.config, weights=args.weights,
                    codebook=args.codebook)
    c = model.config
    print(f"converted {args.source} {args.checkpoint} -> {args.out} in {time.perf_counter() - start:.1f} s: "
          f"{c.quantizer}, {c.codebook_size} codes of dim {c.dim}, preset {c.preset}"
          + (f" {c.overrides}" if c.overrides else ""))
    return 0
