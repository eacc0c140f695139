"""`vqtok bench quantize` at tiny sizes: the rows, ratios, JSON and command line (never timings)."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch

from vqtok import bench, kernels
from vqtok.bench import BenchConfig, format_bench_table, measure, run_quantize_bench
from vqtok.bench_command import add_subcommand

TINY = dict(sizes=(300,), dims=(8,), tokens=32, repeats=1)


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_rows_hold_every_path_and_positive_ratios():
    rows = run_quantize_bench(BenchConfig(methods=("search", "vq", "ibq"), faiss_everywhere=True, **TINY),
                              progress=False)
    assert [(r["method"], r["codebook_size"], r["dim"], r["tokens"]) for r in rows] == [
        ("search", 300, 8, 32), ("vq", 300, 8, 32), ("ibq", 300, 8, 32)]
    for row in rows:
        for path in ("chunked", "dense", "faiss", "matmul"):
            assert positive(row[path]["forward_ms"]), (row["method"], path)
            assert row[path]["samples"] == 1 and row[path]["error"] is None
        ratios = row["ratios"]
        for key in ("dense_over_chunked_forward", "faiss_over_chunked", "chunked_forward_over_matmul"):
            assert positive(ratios[key]), (row["method"], key)
        if row["method"] != "search":
            assert positive(row["chunked"]["forward_backward_ms"]) and positive(row["dense"]["forward_backward_ms"])
            assert positive(ratios["dense_over_chunked_forward_backward"])
            assert positive(ratios["chunked_forward_backward_over_matmul"])
        else:
            assert positive(ratios["cdist_over_chunked"]) and row["chunked"]["forward_backward_ms"] is None
        assert row["matmul_blocks"] == 1 and row["seconds"] > 0
    assert any("vector-quantize-pytorch" in n for n in rows[1]["notes"]) or "vqp" in rows[1]


def test_search_rows_time_the_frozen_tree_where_it_applies():
    config = BenchConfig(methods=("search",), sizes=(4096,), dims=(8, 32), tokens=64, repeats=1)
    low, high = run_quantize_bench(config, progress=False)
    assert positive(low["tree"]["forward_ms"]) and positive(low["ratios"]["chunked_over_tree"])
    assert "tree" not in high and high["ratios"]["chunked_over_tree"] is None  # D = 32: no tree
    header, row_low, row_high = format_bench_table([low, high]).splitlines()[:3]
    end = header.index(" tree ") + len(" tree")  # cells are right-aligned under their header
    timed = bench._fmt(low["tree"]["forward_ms"])
    assert row_low[end - len(timed):end] == timed and row_high[end - 1:end] == "-"


def test_memory_is_measured_as_resident_high_water():
    import torch

    _, idle = measure(lambda: None, memory=True)
    _, big = measure(lambda: torch.ones(64 * 2**20 // 4).sum(), memory=True)  # a 64 MiB temporary
    if idle is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert idle < 8 and 60 < big < 200


def test_large_sizes_skip_the_dense_references_with_a_note(monkeypatch):
    monkeypatch.setattr(bench, "DENSE_MAX_CODES", 100)
    row = run_quantize_bench(BenchConfig(methods=("ibq",), **TINY), progress=False)[0]
    assert "dense" not in row and positive(row["chunked"]["forward_backward_ms"])
    assert row["ratios"]["dense_over_chunked_forward_backward"] is None
    assert any("chunked paths" in n for n in row["notes"])


def test_command_line_writes_json_and_prints_the_table(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="vqtok")
    add_subcommand(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "quantize", "--quick", "--methods", "search,fc", "--sizes", "256",
                              "--dims", "8", "--json", str(out), "--no-progress"])
    assert args.func(args) == 0
    payload = json.loads(out.read_text())
    assert payload["config"]["methods"] == ["search", "fc"] and payload["config"]["tokens"] == 64
    assert {"torch", "threads", "memory_method", "load_average"} <= payload["environment"].keys()
    assert [r["method"] for r in payload["rows"]] == ["search", "fc"]
    printed = capsys.readouterr().out
    assert "xdense f+b" in printed and re.search(r"^\s*fc\s+256\s+8\s", printed, re.M)
    assert format_bench_table(payload["rows"]).splitlines()[0] == printed.splitlines()[0]


def test_bad_options_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown method"):
        BenchConfig(methods=("vq", "rq"))
    parser = argparse.ArgumentParser(prog="vqtok")
    add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "quantize", "--sizes", "many"])
    assert args.func(args) == 2


def test_the_cuda_benchmark_parses_and_formats_without_a_gpu():
    parser = argparse.ArgumentParser(prog="vqtok")
    add_subcommand(parser.add_subparsers(dest="command"))
    from vqtok.bench_command import config_from_args

    config = config_from_args(parser.parse_args(["bench", "quantize", "--device", "cuda"]))
    assert config.device == "cuda" and config.tokens == 8192 and config.methods == ("search", "ibq_step")
    assert config.max_dense_gib == 64 and config.ibq_tokens == 4096
    assert bench.cuda_cells(config) == [(m, K, D) for m in ("search", "ibq_step") for K, D in bench.CUDA_CELLS[m]]
    assert (100_000, 8) in bench.CUDA_CELLS["search"] and (1_048_576, 256) in bench.CUDA_CELLS["search"]
    assert {(16_384, 256), (262_144, 256), (1_048_576, 256)} <= set(bench.CUDA_CELLS["ibq_step"])
    assert config_from_args(parser.parse_args(["bench", "quantize"])).device == "cpu"
    with pytest.raises(ValueError, match="on cuda only"):
        BenchConfig(methods=("vq",), device="cuda")
    args = parser.parse_args(["bench", "quantize", "--device", "cuda", "--methods", "ibq"])
    assert args.func(args) == 2
    row = {"method": "search", "codebook_size": 16384, "dim": 8, "tokens": 8192, "notes": ["x"],
           "triton": {"forward_ms": 1.0, "peak_mib": 0.5}, "chunked": {"forward_ms": 10.0, "peak_mib": 256.0},
           "ratios": {f"{name}_over_triton": None for name in bench.CUDA_PATHS[1:]}}
    row["ratios"]["chunked_over_triton"] = 10.0
    table = bench.format_cuda_table([row])
    assert "triton ms" in table.splitlines()[0] and "10.00" in table.splitlines()[1]


def test_the_cuda_ibq_rows_step_each_backend_forward_and_backward():
    """The closures the GPU benchmark times, run here on CPU tensors (Triton through the interpreter, set by
    tests/conftest.py): each takes one IBQ step forward + backward through the forced backend and frees its
    gradients; the forced backend is the one that ran."""
    torch.manual_seed(0)
    z, codebook = torch.randn(6, 8), torch.randn(40, 8)
    ran = []
    real = kernels.dispatch

    def recording(op, *args, **options):
        ran.append(kernels.choose(op, *args, **{k: v for k, v in options.items() if k != "backend"}))
        return real(op, *args, **options)

    names = ("triton", "triton_tf32", "chunked", "dense")
    paths = bench.ibq_step_paths(z, codebook, names)
    assert list(paths) == list(names)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.registry, "dispatch", recording)
        for name, call in paths.items():
            call()
    assert ran == ["triton", "triton", "chunked", "dense"]
