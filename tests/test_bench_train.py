"""`vqtok bench train`: Trainer.train_step timed at several codebook sizes, as a table and JSON."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from vqtok.cli import main

TINY = ["bench", "train", "--preset", "tiny", "--batch-size", "2", "--image-size", "32", "--threads", "1",
        "--no-progress"]


def test_bench_train_times_each_size_and_writes_the_ratio_of_medians(tmp_path, capsys) -> None:
    out = tmp_path / "sub" / "train.json"
    # lc (configs/demo.yaml's quantizer): each K gets its own random (K, 320) codebook file
    assert main(TINY + ["--sizes", "256,64", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["codebook_size"] for r in rows] == [64, 256]  # sorted: ratios are to the smallest
    for r in rows:
        assert len(r["step_ms_all"]) == 2 and all(ms > 0 for ms in r["step_ms_all"])
        assert r["step_ms_median"] == statistics.median(r["step_ms_all"])
        assert r["images_per_s"] == pytest.approx(2 / (r["step_ms_median"] / 1e3))
        assert r["ratio_to_smallest"] == pytest.approx(r["step_ms_median"] / rows[0]["step_ms_median"])
        assert r["held_mib"] is None and r["peak_mib"] == r["step_mib"]  # CPU: the step's peak resident set
    assert result["setup"]["quantizer"] == "lc" and result["bench"]["sizes"] == [64, 256]
    assert result["setup"]["tokens_per_step"] == 2 * 8 * 8  # 32 px through tiny's f4 grid (ch_mult [1, 1, 2])
    assert result["environment"]["threads"] == 1  # --threads 1 while timing
    table = capsys.readouterr().out
    assert "x smallest K" in table and "\n 64 " in table and "\n256 " in table and f"wrote {out}" in table


@pytest.mark.parametrize("argv, message", [
    (["--quantizer", "vqq"], "unknown quantizer 'vqq'; choose one of ema fc ibq lc vq"),
    (["--sizes", "1k"], "expected whole numbers, got 1k"),
    (["--sizes", "0", "64"], "--sizes needs codebook sizes of at least 1"),
    (["--config", "configs/nope.yaml"], "config file configs/nope.yaml not found"),
])
def test_bench_train_mistakes_end_with_one_line_and_status_2(argv, message, capsys) -> None:
    assert main(TINY + argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("vqtok bench train: error: ") and message in captured.err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_train_on_cuda_reports_allocated_memory(tmp_path) -> None:
    out = tmp_path / "cuda.json"
    assert main(TINY + ["--sizes", "64", "1024", "--repeats", "2", "--device", "cuda", "--bf16", "--json",
                        str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["device"].startswith("cuda") and result["setup"]["bf16"] is True
    for r in result["rows"]:
        assert r["step_ms_median"] > 0 and r["held_mib"] > 0 and r["step_mib"] > 0
        assert r["peak_mib"] == pytest.approx(r["held_mib"] + r["step_mib"])
