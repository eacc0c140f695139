"""`vqtok`: the command-line tool. Each subcommand lives beside its code as `<package>/command.py`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that provide `add_subcommand(subparsers)`, in the order `vqtok --help` lists them.
COMMAND_MODULES = [
    "vqtok.train.command",  # train, encode, decode
    "vqtok.metrics.command",  # eval
    "vqtok.codebook.command",  # codebook build
    "vqtok.bench_command",  # bench
]

EXAMPLES = """examples:
  vqtok codebook build --encoder efficientnet-lite0 --data photos --size 100000 --out codebook.safetensors
  vqtok train --config configs/demo.yaml --out runs/demo
  torchrun --nproc_per_node 8 -m vqtok.cli train --config configs/imagenet-f16-lc.yaml --data /data/imagenet --out runs/lc
  vqtok eval runs/demo
  vqtok encode runs/demo --data photos --out tokens/
  vqtok decode runs/demo tokens/ --out images/
  vqtok bench quantize --quick
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqtok",
        description="Train, evaluate and use image tokenizers with huge, fully used codebooks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
