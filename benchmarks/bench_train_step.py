"""Training step time of the demo recipe at K = 100,000 (lc) against K = 1,024, measured in ONE run.

    .venv/bin/python benchmarks/bench_train_step.py [--config configs/demo.yaml] [--repeats 12] [--json PATH]

Both trainers are built from the same config (`configs/demo.yaml`: the tiny preset, 64 px, batch 32) and differ only
in model.codebook_size; their lc codebooks are random (K, 320) features (the search's cost does not depend on what
the features are). Each timed call is one `Trainer.train_step` on the same batch of training crops: forward,
loss, backward, gradient all-reduce (a no-op in one process), Adam, usage counting. The two trainers alternate
call by call, so the machine's load hits both alike; medians are compared. Also timed: the code search alone at
the step's token count (`nearest_code` against the projected codebook), to show where the difference goes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from vqtok.kernels import nearest_code
from vqtok.train.config import load_config
from vqtok.train.trainer import Trainer

SIZES = (100_000, 1_024)
FEATURES = 320  # efficientnet-lite0's feature width, what the demo's codebook holds


def build_trainer(config_path: str, size: int, workdir: Path, overrides: list[str]) -> Trainer:
    codebook = workdir / f"codebook-{size}.safetensors"
    save_file({"codebook": torch.randn(size, FEATURES, generator=torch.Generator().manual_seed(size))}, str(codebook))
    config = load_config(config_path, [f"model.codebook_size={size}", f"model.quantizer_options.codebook={codebook}",
                                       "fid=false", *overrides])
    return Trainer(config, workdir / f"run-{size}", progress=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--repeats", type=int, default=12, help="timed steps per codebook size (median taken)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {size: build_trainer(args.config, size, Path(tmp), args.overrides) for size in SIZES}
        first = trainers[SIZES[0]]
        batch = torch.stack([first.train_set[i][0] for i in range(first.config.data.batch_size)])
        tokens = batch.shape[0] * first.model.grid[0] * first.model.grid[1]
        step_ms: dict[int, list[float]] = {size: [] for size in SIZES}
        search_ms: dict[int, list[float]] = {size: [] for size in SIZES}
        z = torch.randn(tokens, first.config.model.dim) * 0.3
        for round_ in range(args.repeats + 1):  # round 0 is the warm-up
            for size, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step(batch)
                elapsed = (time.perf_counter() - start) * 1e3
                with torch.no_grad():
                    codes = trainer.model.quantizer.codebook_vectors()
                    start = time.perf_counter()
                    nearest_code(z, codes)
                    searched = (time.perf_counter() - start) * 1e3
                if round_:
                    step_ms[size].append(elapsed)
                    search_ms[size].append(searched)
            print(f"round {round_}/{args.repeats}: " + "  ".join(
                f"K={size}: step {step_ms[size][-1] if round_ else elapsed:.0f} ms" for size in SIZES), flush=True)

    median = {size: statistics.median(step_ms[size]) for size in SIZES}
    search = {size: statistics.median(search_ms[size]) for size in SIZES}
    ratio = median[SIZES[0]] / median[SIZES[1]]
    result = {
        "config": args.config, "overrides": args.overrides, "tokens_per_step": tokens, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "step_ms_median": {str(k): round(v, 1) for k, v in median.items()},
        "search_ms_median": {str(k): round(v, 1) for k, v in search.items()},
        "step_ms_all": {str(k): [round(v, 1) for v in step_ms[k]] for k in SIZES},
        "ratio_100k_over_1024": round(ratio, 3), "target": "<= 1.2", "met": ratio <= 1.2,
    }
    print(f"tokens per step {tokens}; median step: " + ", ".join(f"K={k}: {v:.0f} ms" for k, v in median.items())
          + "; search alone: " + ", ".join(f"K={k}: {v:.1f} ms" for k, v in search.items()))
    print(f"step time K=100,000 / K=1,024 = {ratio:.3f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
