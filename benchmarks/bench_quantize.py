"""The large-codebook kernel targets, measured in ONE run and checked one by one.

    .venv/bin/python benchmarks/bench_quantize.py [--json benchmarks/results/quantize_targets.json] [--repeats 3]

Rows (N = 4096 tokens, fp32, CPU): nearest-code search at K = 100,000 for D = 256 and D = 8 (vs faiss's exact
search and the dense cdist + argmin), the IBQ quantizer's forward+backward at K = 100,000 (vs the dense path:
time and peak memory), at K = 262,144 and 1,048,576 (peak memory, and time vs the bare matmul z @ E^T), and the
IBQ step alone at K = 1,048,576 (what the kernel itself needs, without the quantizer's own loss terms).
Every path of a row is interleaved and repeated; medians are compared. The whole grid: `vqtok bench quantize`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from vqtok.bench import BenchConfig, bench_row, environment, format_bench_table, warm_up

CELLS = [("search", 100_000, 256), ("search", 100_000, 8), ("ibq", 100_000, 256), ("ibq", 262_144, 256),
         ("ibq", 1_048_576, 256), ("ibq_step", 1_048_576, 256)]
GIB = 1024.0  # MiB


def targets(rows: list[dict]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target, from the rows of this run."""
    by = {(r["method"], r["codebook_size"], r["dim"]): r for r in rows}
    out = []

    def add(name: str, row_key: tuple, value_fn, test) -> None:
        row = by.get(row_key)
        value = value_fn(row) if row else None
        out.append((name, "-" if value is None else value[1], None if value is None else test(value[0])))

    ratio = lambda key: lambda r: (r["ratios"][key], f"{r['ratios'][key]}x") if r["ratios"][key] else None  # noqa: E731
    add("search K=100k D=256: at least as fast as faiss (faiss / chunked >= 1)", ("search", 100_000, 256),
        ratio("faiss_over_chunked"), lambda v: v >= 1)
    add("search K=100k D=8: >= 5x faster than dense cdist+argmin", ("search", 100_000, 8),
        ratio("cdist_over_chunked"), lambda v: v >= 5)
    add("search K=100k D=8: faster than faiss", ("search", 100_000, 8), ratio("faiss_over_chunked"), lambda v: v > 1)
    add("ibq K=100k fwd+bwd: >= 2x faster than dense", ("ibq", 100_000, 256),
        ratio("dense_over_chunked_forward_backward"), lambda v: v >= 2)
    add("ibq K=100k fwd+bwd: <= 1/10 of dense's peak memory", ("ibq", 100_000, 256),
        ratio("chunked_over_dense_peak"), lambda v: v <= 0.1)
    for K in (262_144, 1_048_576):
        for method in ("ibq", "ibq_step"):
            if (method, K, 256) not in by:
                continue
            add(f"{method} K={K:,} fwd+bwd: < 1.5 GiB extra memory", (method, K, 256),
                lambda r: (r["chunked"]["peak_mib"], f"{r['chunked']['peak_mib'] / GIB:.2f} GiB")
                if r["chunked"]["peak_mib"] else None, lambda v: v < 1.5 * GIB)
            add(f"{method} K={K:,} fwd+bwd: <= 8x the bare matmul", (method, K, 256),
                ratio("chunked_forward_backward_over_matmul"), lambda v: v <= 8)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="benchmarks/results/quantize_targets.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    # Every path gets --repeats timed samples (the warm-up counts only for calls over 30 s), whatever the row costs.
    config = BenchConfig(tokens=args.tokens, repeats=args.repeats, slow_seconds=30.0, row_seconds=float("inf"))
    warm_up()
    rows = []
    for method, K, D in tqdm(CELLS, desc="targets", unit="row"):
        row_config = BenchConfig(**{**config.__dict__, "repeats": 1 if method == "ibq_step" else args.repeats})
        rows.append(bench_row(method, K, D, row_config))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": config.__dict__, "environment": environment(),
                                               "rows": rows}, indent=1, default=str))
    print(format_bench_table(rows))
    print()
    results = targets(rows)
    for name, measured, met in results:
        print(f"{'MET ' if met else 'MISS' if met is not None else 'n/a '}  {name}: {measured}")
    payload = json.loads(Path(args.json).read_text())
    payload["targets"] = [{"target": n, "measured": m, "met": ok} for n, m, ok in results]
    Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
