"""`vqtok`: the command-line tool. Each subcommand lives beside its code as `<package>/command.py`."""

from __future__ import annotations

import argparse
import os
import sys

from .core.allocator import keep_freed_memory

EXAMPLES = """examples:
  vqtok codebook build --encoder efficientnet-lite0 --data photos --size 100000 --out codebook.safetensors
  vqtok train --config configs/demo.yaml --out runs/demo
  torchrun --nproc_per_node 8 -m vqtok.cli train --config configs/imagenet-f16-lc.yaml --data /data/imagenet --out runs/lc
  vqtok eval runs/demo
  vqtok probe runs/demo --data fashion-mnist --features pooled
  vqtok encode runs/demo --data photos --out tokens/
  vqtok decode runs/demo tokens/ --out images/
  vqtok gen train --config configs/demo-gen.yaml --tokens tokens/fm-train --out runs/fm-gpt
  vqtok gen sample runs/fm-gpt --per-class 50 --cfg 2.0 --out samples.npz
  vqtok convert --from ibq imagenet256_262144.ckpt --out runs/ibq-262144
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
    from . import bench_command
    from .codebook import command as codebook_command
    from .convert import command as convert_command
    from .generate import command as gen_command
    from .metrics import command as metrics_command
    from .train import command as train_command

    # each module adds its subcommands, in the order `vqtok --help` lists them
    # train encode decode, eval, codebook, convert, bench
    for module in (train_command, metrics_command, gen_command, codebook_command, convert_command, bench_command):
        module.add_subcommand(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # large CPU tensors stop faulting their pages in at every call (core/allocator.py)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        # a user's mistake (a missing or foreign file, an existing run, a bad config value): vqtok's messages say
        # what was wrong and what to do, in one line. VQTOK_DEBUG=1 shows the traceback instead (an error of
        # these types raised by a bug inside vqtok would otherwise read like a user's mistake)
        if os.environ.get("VQTOK_DEBUG", "") not in ("", "0"):
            raise
        print(f"vqtok {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
