"""A GPT output head's cross-entropy over K = 100,000 codes: the chunked path against the dense one, in ONE run.

    .venv/bin/python benchmarks/bench_ce_head.py [--tokens 8192] [--codes 100000] [--dim 256] [--repeats 3]
                                                 [--json benchmarks/results/ce_head.json]

What is timed: one `kernels.cross_entropy(hidden, weight, bias, targets)` (mean reduction) forward + backward to
hidden (N, d), weight (K, d) and bias (K,), fp32 on the CPU, with the backend forced to "dense" (F.cross_entropy on
the full (N, K) logits) or "chunked" (kernels/cross_entropy.py: code chunks, logits recomputed in the backward).
Each sample runs in a FRESH subprocess (the inputs built from a fixed seed, a small warm-up call of the same path to
load the libraries and start the worker threads, then the timed call), and the two paths alternate sample by
sample so that the machine's load hits both alike; medians are compared.

Peak extra memory: in the child, the resident set's high-water mark (VmHWM, reset through /proc/self/clear_refs after
malloc_trim) minus the resident set just before the timed call (vqtok.bench.measure, what `vqtok bench` reports). It
sees every allocation of the call, torch's included (tracemalloc sees none of torch's), and a fresh process per
sample keeps one path's freed-but-cached heap from hiding the other's. It includes the (K, d) weight gradient both
paths allocate (100 MB at K = 100,000, d = 256). Targets (issue 15): chunked peak <= 1/10 of dense, time <= 1.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from vqtok import kernels
from vqtok.bench import MEMORY_METHOD, _available_bytes, measure
from vqtok.core.io import write_json

PATHS = ("dense", "chunked")
DENSE_FACTOR = 4  # the dense path's predicted peak, in (N, K) fp32 matrices (logits, log-softmax, their gradients)
MEMORY_TARGET = 0.1  # chunked peak / dense peak
TIME_TARGET = 1.5  # chunked time / dense time


def inputs(tokens: int, codes: int, dim: int, seed: int = 0):
    """hidden (N, d) ~ N(0, 1), weight (K, d) ~ N(0, 1/d) (unit-variance logits), bias 0, targets uniform."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g)
    weight = torch.randn(codes, dim, generator=g) / dim**0.5
    return hidden, weight, torch.zeros(codes), torch.randint(0, codes, (tokens,), generator=g)


def step(backend: str, hidden, weight, bias, targets) -> dict[str, float]:
    leaves = [t.detach().requires_grad_() for t in (hidden, weight, bias)]
    loss = kernels.cross_entropy(*leaves, targets, backend=backend)
    loss.backward()
    return {"loss": float(loss), **{f"grad_norm_{name}": float(t.grad.norm())
                                    for name, t in zip(("hidden", "weight", "bias"), leaves)}}


def child(args: argparse.Namespace) -> None:
    """One sample: warm up on a small problem, then time (and measure the memory of) one full call."""
    step(args.child, *inputs(256, 2048, args.dim, seed=1))
    data = inputs(args.tokens, args.codes, args.dim)
    result: dict = {}
    seconds, peak_mib = measure(lambda: result.update(step(args.child, *data)), memory=True)
    print(json.dumps({"path": args.child, "ms": seconds * 1000, "peak_mib": peak_mib, **result}))


def sample(path: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--tokens", str(args.tokens), "--codes", str(args.codes),
           "--dim", str(args.dim)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{path} sample failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--codes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="samples per path, each in a fresh process")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0

    need = DENSE_FACTOR * args.tokens * args.codes * 4
    if need > 0.8 * _available_bytes():
        print(f"the dense path needs ~{need / 2**30:.1f} GiB, more than 80% of the free memory: not run")
        return 2
    load_before = list(os.getloadavg())
    samples: dict[str, list[dict]] = {path: [] for path in PATHS}
    started = time.perf_counter()
    for round_ in range(args.repeats):
        for path in PATHS if round_ % 2 == 0 else PATHS[::-1]:
            samples[path].append(sample(path, args))
            s = samples[path][-1]
            print(f"round {round_} {path:8s} {s['ms']:9.0f} ms  {s['peak_mib']:8.0f} MiB  loss {s['loss']:.6f}",
                  flush=True)
    median = {path: {"ms": round(statistics.median(s["ms"] for s in runs), 1),
                     "peak_mib": round(statistics.median(s["peak_mib"] for s in runs), 1)}
              for path, runs in samples.items()}
    time_ratio = median["chunked"]["ms"] / median["dense"]["ms"]
    memory_ratio = median["chunked"]["peak_mib"] / median["dense"]["peak_mib"]
    dense, chunked = samples["dense"][0], samples["chunked"][0]
    agreement = {key: abs(chunked[key] - dense[key]) / max(abs(dense[key]), 1e-30)
                 for key in ("loss", "grad_norm_hidden", "grad_norm_weight", "grad_norm_bias")}
    results = {
        "what": "kernels.cross_entropy forward + backward (mean loss; gradients to hidden, weight, bias), fp32, CPU",
        "tokens": args.tokens, "codes": args.codes, "dim": args.dim, "repeats": args.repeats,
        "median": median, "chunked_over_dense_time": round(time_ratio, 3),
        "chunked_over_dense_peak_memory": round(memory_ratio, 4),
        "targets": {"memory_ratio_at_most": MEMORY_TARGET, "time_ratio_at_most": TIME_TARGET,
                    "memory_met": memory_ratio <= MEMORY_TARGET, "time_met": time_ratio <= TIME_TARGET},
        "relative_difference_chunked_vs_dense": {k: float(f"{v:.2e}") for k, v in agreement.items()},
        "samples": samples, "seconds": round(time.perf_counter() - started, 1),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(),
                        "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
                        "memory_method": MEMORY_METHOD + ", in a fresh subprocess per sample",
                        "time": time.strftime("%Y-%m-%d %H:%M:%S")},
    }
    print(f"median: dense {median['dense']['ms']:.0f} ms / {median['dense']['peak_mib']:.0f} MiB, chunked "
          f"{median['chunked']['ms']:.0f} ms / {median['chunked']['peak_mib']:.0f} MiB: time x{time_ratio:.2f} "
          f"(target <= {TIME_TARGET}), memory x{memory_ratio:.4f} (target <= {MEMORY_TARGET})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.json), results, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
