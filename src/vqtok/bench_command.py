"""`vqtok bench quantize`: time the chunked quantizer kernels against the dense reference, faiss and a bare matmul."""

from __future__ import annotations

import argparse

from .bench import (
    CASES, CUDA_CELLS, CUDA_IBQ_TOKENS, CUDA_METHODS, CUDA_TOKENS, DIMS, EXTRA_CASES, LARGE_SIZES, QUICK, SIZES, BenchConfig,
    format_bench_table, format_cuda_table, run_cuda_search_bench, run_quantize_bench, write_results,
)

CUDA_MAX_DENSE_GIB = 64.0  # --device cuda: the dense and cdist columns where they need at most this much

EPILOG = """examples:
  vqtok bench quantize                                   # the default grid (each method at its own dims)
  vqtok bench quantize --methods search ibq --sizes 100000 262144 --dims 256 --json bench.json
  vqtok bench quantize --quick                           # a tiny grid in seconds (what the tests run)
  vqtok bench quantize --sizes 1024 16384 100000 262144 1048576 --dims 8 256   # the full grid (hours)
  python benchmarks/bench_quantize.py                    # the kernel targets, checked one by one
  vqtok bench quantize --device cuda --json cuda.json    # search and IBQ step on the GPU: triton vs chunked, matmul

Times are medians of up to --repeats runs after a warm-up, all paths of a row interleaved so a shared machine's
load hits them alike (a call slower than --slow-seconds keeps its warm-up as a sample; no new round starts after
--row-seconds). Memory is the peak resident set above the one before the call. Dense references run for
K <= 262,144 and only where their predicted memory is under --max-dense-gib (and 80% of the free memory).
vector-quantize-pytorch is compared when installed: pip install 'vqtok[bench]'."""


def _ints(values: list[str]) -> tuple[int, ...]:
    """Accept "1024 16384" as well as "1024,16384"."""
    try:
        return tuple(int(v.replace("_", "")) for value in values for v in value.split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {' '.join(values)}") from None


def _names(values: list[str]) -> tuple[str, ...]:
    return tuple(v for value in values for v in value.split(",") if v)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` (its `quantize` and `train` benchmarks) to the vqtok command line."""
    bench = subparsers.add_parser("bench", help="kernel and training-step benchmarks",
                                  description="Kernel and training-step benchmarks.")
    kinds = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    quantize = kinds.add_parser(
        "quantize", help="chunked code search and IBQ kernels vs the dense path, faiss and a bare matmul",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    quantize.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                          help=f"any of {' '.join(CASES + EXTRA_CASES)} (default: {' '.join(CASES)}; "
                               "'search' is nearest_code alone, 'ibq_step' the IBQ step without the quantizer, "
                               "'ce_head' a GPT output head's cross-entropy over K codes)")
    quantize.add_argument("--sizes", nargs="+", default=None, metavar="K",
                          help=f"codebook sizes (default: {' '.join(map(str, SIZES))}; the full grid adds "
                               f"{' '.join(map(str, LARGE_SIZES))}, chunked paths only, which takes much longer)")
    quantize.add_argument("--dims", nargs="+", default=None, metavar="D",
                          help=f"code dims for every method, e.g. {' '.join(map(str, DIMS))} "
                               "(default: each method's own: vq ema ibq 256, fc lc 8, search both)")
    quantize.add_argument("--tokens", type=int, default=None, help="tokens per batch, N (default: 4096)")
    quantize.add_argument("--repeats", type=int, default=None, help="timed runs per path, median taken (default: 3)")
    quantize.add_argument("--slow-seconds", type=float, default=None,
                          help="a call this slow keeps its warm-up run as a sample (default: 2)")
    quantize.add_argument("--row-seconds", type=float, default=None,
                          help="no new round of repeats once a row has run this long (default: 30)")
    quantize.add_argument("--max-dense-gib", type=float, default=None,
                          help="skip a dense reference whose predicted memory exceeds this (default: 12; "
                               f"{CUDA_MAX_DENSE_GIB:g} with --device cuda)")
    quantize.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                          help="cpu (default): the grid above; cuda: nearest_code on the GPU (N = "
                               f"{CUDA_TOKENS}, (K, D) in {' '.join(f'{K}x{D}' for K, D in CUDA_CELLS['search'])}) "
                               f"and the IBQ step forward + backward (N = {CUDA_IBQ_TOKENS}, (K, D) in "
                               f"{' '.join(f'{K}x{D}' for K, D in CUDA_CELLS['ibq_step'])}) unless --sizes/--dims "
                               "are given; columns triton (fp32 and TF32), chunked, dense, cdist+argmin (search), "
                               "bare matmul (fp32 and TF32)")
    quantize.add_argument("--faiss-everywhere", action="store_true",
                          help="time faiss's exact search on the quantizer rows too (default: 'search' rows only)")
    quantize.add_argument("--quick", action="store_true",
                          help=f"a tiny grid: sizes {QUICK['sizes']}, dims {QUICK['dims']}, {QUICK['tokens']} tokens")
    quantize.add_argument("--json", metavar="PATH", help="also write the rows, config and environment as JSON")
    quantize.add_argument("--no-progress", action="store_true", help="no progress bar")
    quantize.set_defaults(func=run_quantize_command)
    add_train_subcommand(kinds)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """--quick sets the grid's defaults; explicit options override them."""
    device = getattr(args, "device", "cpu")
    base: dict = dict(methods=CUDA_METHODS, tokens=CUDA_TOKENS, device="cuda") if device == "cuda" else {}
    if args.quick:
        base.update(QUICK)
    if args.methods:
        base["methods"] = _names(args.methods)
    if args.sizes:
        base["sizes"] = _ints(args.sizes)
    if args.dims:
        base["dims"] = _ints(args.dims)
    if args.tokens is not None:
        base["tokens"] = args.tokens
    for name in ("repeats", "slow_seconds", "row_seconds"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    max_dense_gib = args.max_dense_gib if args.max_dense_gib is not None else (
        CUDA_MAX_DENSE_GIB if device == "cuda" else 12.0)
    return BenchConfig(max_dense_gib=max_dense_gib, faiss_everywhere=args.faiss_everywhere, **base)


def run_quantize_command(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except (ValueError, argparse.ArgumentTypeError) as error:
        print(f"vqtok bench quantize: {error}")
        return 2
    if config.device == "cuda":
        try:
            rows = run_cuda_search_bench(config, progress=not args.no_progress)
        except RuntimeError as error:
            print(f"vqtok bench quantize: {error}")
            return 2
        print(format_cuda_table(rows))
    else:
        rows = run_quantize_bench(config, progress=not args.no_progress)
        print(format_bench_table(rows))
    if args.json:
        write_results(rows, args.json, config)
        print(f"wrote {args.json}")
    return 0


# -- `vqtok bench train` (src/vqtok/bench_train.py) ------------------------------------------------------------------
TRAIN_EPILOG = """examples:
  vqtok bench train                                      # configs/demo.yaml (lc) at K = 1,024 and 100,000 on the CPU
  vqtok bench train --sizes 1024 16384 100000 262144 --device cuda --json train-cuda.json
  vqtok bench train --config configs/imagenet-f16-ibq.yaml --quantizer ibq --sizes 16384,262144 --device cuda \\
      --batch-size 16 --image-size 256 --bf16 --gan
  vqtok bench train --preset tiny --quantizer vq --sizes 64 256 --batch-size 4 --image-size 32 --repeats 2

Each K gets its own Trainer (lc: a random (K, 320) codebook); the trainers alternate call by call on one batch of
training crops, and the median step time, images/s and the ratio to the smallest K are reported with memory (CUDA:
torch.cuda.max_memory_allocated; CPU: resident set). Options override the config after any --set."""


def add_train_subcommand(kinds: argparse._SubParsersAction) -> None:
    """`bench train`; options left out keep TrainBenchConfig's defaults (bench_train is imported only to run)."""
    train = kinds.add_parser(
        "train", help="Trainer.train_step time, images/s and memory of a config at several codebook sizes",
        description="Time one training step (vqtok.train.Trainer.train_step) of a config at each codebook size.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="training config (default configs/demo.yaml)")
    train.add_argument("--preset", help="model.preset (default: the config's)")
    train.add_argument("--quantizer", help="model.quantizer: vq, fc, ema, lc or ibq (default: the config's)")
    train.add_argument("--sizes", nargs="+", metavar="K",
                       help="codebook sizes (default 1024 100000; ratios are to the smallest)")
    train.add_argument("--batch-size", type=int, help="data.batch_size (default: the config's)")
    train.add_argument("--image-size", type=int, help="model.image_size and data.size, pixels (default: the config's)")
    train.add_argument("--device", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    train.add_argument("--repeats", type=int, help="timed steps per K after one warm-up, median taken (default 10)")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast for the networks (default: the config's)")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; on a busy shared CPU 1 "
                                                   "is steadier)")
    train.add_argument("--gan", action="store_true",
                       help="time the steps after loss.disc_start: the discriminator step too, where the config "
                            "has a GAN (default: the step the trainer runs first)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a config override, as for vqtok train (repeatable)")
    train.add_argument("--json", metavar="PATH", help="also write the rows, setup and environment as JSON")
    train.add_argument("--no-progress", action="store_true", help="no line per round")
    train.set_defaults(func=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    import sys

    from .bench_train import TrainBenchConfig, format_train_table, run_train_bench, write_train_results

    try:
        given = dict(config=args.config, preset=args.preset, quantizer=args.quantizer, batch_size=args.batch_size,
                     image_size=args.image_size, device=args.device, repeats=args.repeats, bf16=args.bf16,
                     threads=args.threads, sizes=_ints(args.sizes) if args.sizes else None)
        options = {k: v for k, v in given.items() if v is not None}
        options |= dict(gan=args.gan, overrides=tuple(args.overrides))
        result = run_train_bench(TrainBenchConfig(**options), progress=not args.no_progress)
    except (ValueError, FileNotFoundError, argparse.ArgumentTypeError) as error:
        print(f"vqtok bench train: error: {error}", file=sys.stderr)
        return 2
    print(format_train_table(result))
    if args.json:
        write_train_results(result, args.json)
        print(f"wrote {args.json}")
    return 0
