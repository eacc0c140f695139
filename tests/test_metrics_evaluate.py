"""vqtok.metrics.evaluate and `vqtok eval`: one pass computes every metric as the single-metric functions do."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vqtok import CodeUsage
from vqtok.data import build_dataset
from vqtok.backbones import file_sha256
from vqtok.metrics import evaluate, format_table, psnr, ssim
from vqtok.metrics import harness
from vqtok.metrics import lpips as lpips_module


class PoolTokenizer(nn.Module):
    """A stand-in tokenizer: 4x4 average-pooled gray level -> one of 16 codes; decode paints that gray back."""

    codebook_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("levels", torch.linspace(0, 1, 16))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        gray = F.avg_pool2d(x.mean(dim=1, keepdim=True), 4)[:, 0]  # (B, H/4, W/4)
        return (gray * 15).round().long()

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        gray = self.levels[ids][:, None].expand(-1, 3, -1, -1)  # (B, 3, h, w)
        return F.interpolate(gray, scale_factor=4, mode="nearest")


class MemoryTokenizer(PoolTokenizer):
    """Reconstructs perfectly (it remembers the last batch): rFID must then be 0."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x.clone()
        return super().encode(x)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.last


@pytest.fixture(autouse=True)
def no_lpips_weights(tmp_path, monkeypatch):
    monkeypatch.delenv("VQTOK_LPIPS_DIR", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(lpips_module, "_notified", [True])


def test_evaluate_equals_the_metrics_computed_directly():
    dataset = build_dataset("photos", "val", size=32, length=10)
    model = PoolTokenizer()
    metrics = evaluate(model, dataset, batch_size=4, fid=False, progress=False)
    x = torch.stack([dataset[i][0] for i in range(10)])
    ids = model.encode(x)
    x_hat = model.decode(ids)
    usage = CodeUsage(16).update(ids)
    assert metrics["images"] == 10 and metrics["tokens"] == 10 * 8 * 8 and metrics["codebook_size"] == 16
    assert metrics["psnr"] == pytest.approx(float(psnr(x, x_hat).mean()), rel=1e-9)
    assert metrics["ssim"] == pytest.approx(float(ssim(x, x_hat).mean()), rel=1e-9)
    assert metrics["utilization"] == usage.utilization() and metrics["perplexity"] == pytest.approx(usage.perplexity())
    assert metrics["tokens_per_code"] == pytest.approx(640 / 16)
    assert 10 < metrics["psnr"] < 30 and 0 < metrics["ssim"] < 1
    assert metrics["lpips"] is None and metrics["rfid"] is None and metrics["utilization_train"] is None
    assert metrics["protocol"]["data"] == dataset.describe()
    assert "not found" in metrics["protocol"]["lpips"]


def test_evaluate_caps_images_and_reports_training_usage(tmp_path):
    dataset = build_dataset("photos", "val", size=32, length=10)
    train_usage = CodeUsage(16).update(torch.tensor([0, 1, 2, 3, 3]))
    model = PoolTokenizer().train()
    out = tmp_path / "run" / "metrics.json"
    metrics = evaluate(model, dataset, batch_size=4, fid=False, progress=False, max_images=3, usage_train=train_usage,
                       out=out)
    assert metrics["images"] == 3 and metrics["tokens"] == 3 * 64
    assert metrics["utilization_train"] == 0.25 and metrics["tokens_train"] == 5
    assert model.training  # evaluation switched to eval mode and back
    assert json.loads(out.read_text()) == metrics
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_recon_images_scores_the_first_images_and_counts_codes_on_all():
    dataset = build_dataset("photos", "val", size=32, length=10)

    class CountingTokenizer(PoolTokenizer):
        decoded = 0

        def decode(self, ids: torch.Tensor) -> torch.Tensor:
            self.decoded += ids.shape[0]
            return super().decode(ids)

    model = CountingTokenizer()
    metrics = evaluate(model, dataset, batch_size=4, fid=False, progress=False, recon_images=6)
    assert model.decoded == 6  # a batch of 4, then 2 of the next; the last batch only encoded
    x = torch.stack([dataset[i][0] for i in range(10)])
    ids = model.encode(x)
    x_hat = model.decode(ids[:6])
    assert metrics["images"] == 10 and metrics["recon_images"] == 6 and metrics["tokens"] == 10 * 64
    assert metrics["utilization"] == CodeUsage(16).update(ids).utilization()
    assert metrics["psnr"] == pytest.approx(float(psnr(x[:6], x_hat).mean()), rel=1e-9)
    assert metrics["ssim"] == pytest.approx(float(ssim(x[:6], x_hat).mean()), rel=1e-9)
    assert "first 6 of the 10" in metrics["protocol"]["reconstruction"]
    with pytest.raises(ValueError, match="recon_images must be a positive"):
        evaluate(model, dataset, fid=False, progress=False, recon_images=0)


def test_evaluate_rejects_what_it_cannot_measure():
    dataset = build_dataset("photos", "val", size=32, length=2)

    class HalfSize(PoolTokenizer):
        def decode(self, ids: torch.Tensor) -> torch.Tensor:
            return super().decode(ids)[:, :, ::2, ::2]

    with pytest.raises(ValueError, match="multiple of the tokenizer's downsampling"):
        evaluate(HalfSize(), dataset, fid=False, progress=False)
    with pytest.raises(TypeError, match="lacks encode, decode"):
        evaluate(nn.Linear(2, 2), dataset, fid=False, progress=False)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(PoolTokenizer(), dataset, fid=False, progress=False, max_images=0)


def test_format_table_prints_each_metric_with_its_unit():
    metrics = {"images": 512, "psnr": 23.456, "ssim": 0.71234, "lpips": None, "rfid": 12.3456, "rkid": 0.0123,
               "rkid_std": 0.0011, "utilization": 0.998, "codebook_size": 100_000, "utilization_train": 0.95,
               "tokens_train": 1_048_576, "perplexity": 91234.5, "tokens": 131_072, "tokens_per_code": 1.31072,
               "protocol": {"data": {"source": "photos", "split": "val", "size": 64, "skipped": 2}}}
    lines = dict(line.split(None, 1) for line in format_table(metrics).splitlines())
    assert lines["psnr"] == "23.46 dB" and lines["ssim"] == "0.7123" and lines["rfid"] == "12.346"
    assert lines["lpips"].startswith("n/a") and lines["rkid"] == "0.01230 ± 0.00110"
    assert lines["utilization"] == "99.80 % of 100,000 codes"
    assert lines["utilization_train"] == "95.00 % of 100,000 codes (1,048,576 tokens)"
    assert lines["tokens"] == "131,072 (1.31 per code)"
    assert lines["data"] == "photos val 64 px, 2 unreadable files skipped"


@pytest.mark.slow
def test_evaluate_rfid_rkid_protocol_and_reference_cache(monkeypatch):
    dataset = build_dataset("photos", "val", size=32, length=6)
    seen = []
    forward = harness.InceptionFeatures.forward
    monkeypatch.setattr(harness.InceptionFeatures, "forward",
                        lambda self, x, batch_size=32: seen.append(len(x)) or forward(self, x, batch_size))
    monkeypatch.setattr(harness, "_REFERENCE_CACHE", {})
    perfect = evaluate(MemoryTokenizer(), dataset, batch_size=3, progress=False)
    assert sum(seen) == 12  # reconstructions and originals
    assert perfect["rfid"] == pytest.approx(0.0, abs=1e-6)
    pooled = evaluate(PoolTokenizer(), dataset, batch_size=3, progress=False)
    assert sum(seen) == 18  # the originals' features came from the cache
    assert pooled["rfid"] > 10.0 and pooled["rkid"] > perfect["rkid"]
    protocol = pooled["protocol"]
    assert protocol["feature_extractor"]["sha256"] == file_sha256(harness.InceptionFeatures().weights)
    assert protocol["rkid"]["subset_size"] == 3 and protocol["images"] == 6


# -- vqtok eval -----------------------------------------------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path):
    from vqtok.models import Tokenizer, TokenizerConfig

    run = tmp_path / "run"
    run.mkdir()
    config = {"data": {"source": "photos", "size": 32, "val_length": 6}, "seed": 0, "eval_images": 4}
    (run / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = Tokenizer(TokenizerConfig(preset="tiny", image_size=32, quantizer="vq", codebook_size=32, dim=8))
    model.save_pretrained(run)
    usage = CodeUsage(32).update(torch.arange(8))
    torch.save({"usage_train": usage.state_dict(), "usage_epoch": CodeUsage(32).state_dict()}, run / "trainer.pt")
    return run, model


def eval_command(argv: list[str]) -> int:
    from vqtok.metrics.command import add_subcommand

    parser = argparse.ArgumentParser(prog="vqtok")
    add_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    return args.func(args)


def test_eval_command_evaluates_the_run_on_its_own_data(run_dir, capsys):
    run, model = run_dir
    assert eval_command([str(run), "--no-fid", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    dataset = build_dataset("photos", "val", size=32, length=6)
    expected = evaluate(model, dataset, max_images=4, fid=False, progress=False)
    assert metrics["images"] == 4 and metrics["psnr"] == pytest.approx(expected["psnr"], rel=1e-6)
    assert metrics["tokens"] == expected["tokens"] and metrics["utilization_train"] == 8 / 32
    assert metrics["protocol"]["model"]["weights"] == "model.safetensors"
    assert metrics["protocol"]["data"]["count"] == 6 and metrics["protocol"]["data"]["size"] == 32
    printed = capsys.readouterr().out
    assert "psnr" in printed and f"{metrics['psnr']:.2f} dB" in printed and "wrote" in printed


def test_eval_command_data_override_and_errors(run_dir, tmp_path, capsys):
    run, _ = run_dir
    out = tmp_path / "other.json"
    assert eval_command([str(run), "--data", "photos", "--size", "16", "--all", "--no-fid", "--no-progress",
                         "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 6 and metrics["protocol"]["data"]["size"] == 16
    assert eval_command([str(tmp_path / "nothing"), "--no-fid"]) == 2
    assert "a vqtok run directory" in capsys.readouterr().err
