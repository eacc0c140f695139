"""`vqtok gen train`, `vqtok gen sample`, `vqtok gen eval`: generators on a trained tokenizer's tokens."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser(
        "gen", help="train, sample and evaluate a class-conditional generator on a tokenizer's tokens",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generators on vqtok tokens: a LlamaGen / IBQ / VQGAN-LC style GPT over the token ids.",
        epilog="""examples:
  vqtok encode runs/fm --data fashion-mnist --split train --augment flip --out tokens/fm-train
  vqtok gen train --config configs/demo-gen.yaml --set data.tokens=tokens/fm-train --out runs/fm-gpt
  vqtok gen sample runs/fm-gpt --per-class 50 --cfg 2.0 --out samples.npz
  vqtok gen eval runs/fm-gpt --cfg 2.0""")
    commands = gen.add_subparsers(dest="gen_command", metavar="GEN_COMMAND", required=True)
    _add_train(commands)
    _add_sample(commands)
    _add_eval(commands)


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train", help="train a generator (single process, or data parallel under torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a class-conditional GPT on token shards written by `vqtok encode --split train`. The run "
                    "directory is a vqtok run: checkpoints, --resume, metrics.jsonl; at the end the generator is "
                    "sampled and scored (metrics.json, report.md, samples.png).",
        epilog="""examples:
  vqtok gen train --config configs/demo-gen.yaml --set data.tokens=tokens/fm-train --out runs/fm-gpt
  vqtok gen train --out runs/fm-gpt --resume
  torchrun --nproc_per_node 8 -m vqtok.cli gen train --config configs/gen-imagenet-ibq-B.yaml --out runs/ibq-B""")
    p.add_argument("--config", type=Path, help="YAML config; without it the defaults; with --resume the run's own")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.preset=small --set optim.lr=1e-4 (repeatable)")
    p.add_argument("--tokens", help="shortcut for --set data.tokens=FOLDER")
    p.add_argument("--tokenizer", help="shortcut for --set tokenizer=RUN (default: the run that wrote the tokens)")
    p.add_argument("--out", type=Path, required=True, help="run directory to create (or continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--until", type=int, metavar="STEP", help="stop after this step with a checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..core.rundir import RunDir
    from ..train.config import load_config
    from .config import GenTrainConfig
    from .trainer import GeneratorTrainer

    overrides = list(args.overrides)
    overrides += [f"data.tokens={args.tokens}"] if args.tokens else []
    overrides += [f"tokenizer={args.tokenizer}"] if args.tokenizer else []
    base = None
    if args.resume and not args.config:
        run = RunDir(args.out)
        if not run.config.is_file():
            raise FileNotFoundError(f"--resume needs {run.config}; {args.out} is not a vqtok run directory")
        base = {k: v for k, v in run.read_config().items() if k not in ("gpt", "kind", "data_description",
                                                                          "world_size")}
    config = load_config(args.config, overrides, base=base, config_class=GenTrainConfig)
    trainer = GeneratorTrainer(config, args.out, resume=args.resume, progress=not args.no_progress)
    summary = trainer.train(until=args.until)
    if summary.get("metrics") is not None:
        from .evaluate import format_generation_table

        print(format_generation_table(summary["metrics"]))
        print(f"run directory: {args.out}")
    return 0


def _sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Options that override the run's `sample` section."""
    p.add_argument("--per-class", type=int, help="samples of each class (balanced labels; default: the run's, 50)")
    p.add_argument("--cfg", type=float, dest="cfg_scale",
                   help="classifier-free guidance scale (1: none; default: the run's sample.cfg_scale, itself 2.0 "
                   "for a GPT trained with label dropout, 1 without)")
    p.add_argument("--cfg-schedule", choices=("constant", "linear"))
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="sequences sampled at once")
    p.add_argument("--raw", action="store_true", help="the live weights, not the weight EMA")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true")


def _add_sample(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "sample", help="draw class-balanced samples: an ADM-format .npz and a PNG grid",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample a trained generator and decode through its tokenizer. Writes OUT (.npz: arr_0 uint8 "
                    "(N, H, W, 3), arr_1 labels; what ADM's evaluator reads) and OUT with .png (a grid, one row per "
                    "class).",
        epilog="""examples:
  vqtok gen sample runs/fm-gpt --out samples.npz
  vqtok gen sample runs/ibq-B --per-class 50 --cfg 2.25 --temperature 1.0 --out ibq-B-cfg2.25.npz""")
    p.add_argument("run", type=Path, help="generator run directory")
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (the grid goes beside it as .png)")
    _sampling_arguments(p)
    p.set_defaults(func=run_sample)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval", help="sample and score a generator: gFID, IS, precision/recall, class accuracy, reference points",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample N = per-class x classes images and score them against real held-out images with the "
                    "same N; writes metrics.json and report.md in the run directory.",
        epilog="""examples:
  vqtok gen eval runs/fm-gpt
  vqtok gen eval runs/fm-gpt --cfg 3.0 --per-class 100 --no-references""")
    p.add_argument("run", type=Path, help="generator run directory")
    p.add_argument("--no-references", action="store_true", help="skip floor_real, floor_recon, ceiling_unigram")
    p.add_argument("--no-cfg-baseline", action="store_true", help="skip the cfg 1 samples scored beside")
    _sampling_arguments(p)
    p.set_defaults(func=run_eval)


def _sample_overrides(args: argparse.Namespace) -> dict:
    names = ("per_class", "cfg_scale", "cfg_schedule", "temperature", "top_k", "top_p", "seed", "batch_size")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def run_sample(args: argparse.Namespace) -> int:
    from ..core.device import resolve_device
    from .evaluate import load_for_sampling, sample_images, write_samples

    if args.out.suffix != ".npz":
        raise ValueError(f"--out {args.out}: give a .npz path (the PNG grid is written beside it)")
    device = resolve_device(args.device)
    model, tokenizer, sampling, _ = load_for_sampling(args.run, _sample_overrides(args), ema=not args.raw,
                                                      device=device)
    images, labels = sample_images(model, tokenizer, sampling, device=device, progress=not args.no_progress)
    grid = write_samples(images, labels, args.out)
    print(f"wrote {len(labels)} samples to {args.out} and {grid}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..core.device import resolve_device
    from .evaluate import evaluate_generator, format_generation_table

    device = resolve_device(args.device)
    metrics = evaluate_generator(args.run, device=device, sample_overrides=_sample_overrides(args),
                                 ema=not args.raw, references=not args.no_references,
                                 no_cfg=not args.no_cfg_baseline, progress=not args.no_progress)
    print(format_generation_table(metrics))
    return 0
