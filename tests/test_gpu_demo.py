"""configs/demo-gpu.yaml (what `make demo` trains where torch sees a GPU): the CPU demo's method and recipe, with an
epoch and a validation set that count code usage at >= 100 tokens per code."""

from __future__ import annotations

from pathlib import Path

import pytest

from vqtok.train.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def configs():
    return load_config(CONFIGS / "demo-gpu.yaml"), load_config(CONFIGS / "demo.yaml")


def tokens_per_code(config, crops: int) -> float:
    side = config.model.autoencoder.latent_size(config.model.image_size)  # 64 px at f4: 16 x 16 tokens
    return crops * side * side / config.model.codebook_size


def test_gpu_demo_counts_usage_at_100_tokens_per_code_over_two_epochs(configs) -> None:
    gpu, _ = configs
    assert gpu.data.train_length >= 40_000 and tokens_per_code(gpu, gpu.data.train_length) >= 100
    assert gpu.eval_images is None and tokens_per_code(gpu, gpu.data.val_length) >= 100  # usage on every val crop
    epoch_steps = gpu.data.train_length // gpu.data.batch_size
    assert gpu.steps >= 2 * epoch_steps  # utilization_train counts a complete epoch after the first
    assert gpu.bf16 and gpu.data.num_workers >= 4


def test_gpu_demo_keeps_the_cpu_demos_method_and_recipe(configs) -> None:
    gpu, cpu = configs
    assert gpu.model == cpu.model and gpu.model.quantizer == "lc" and gpu.model.codebook_size == 100_000
    assert gpu.codebook == cpu.codebook and gpu.loss == cpu.loss and gpu.data.source == cpu.data.source
    assert (gpu.optim.schedule, gpu.optim.quantizer_lr_scale, gpu.optim.betas) == (
        cpu.optim.schedule, cpu.optim.quantizer_lr_scale, cpu.optim.betas)
    assert gpu.data.size == cpu.data.size and gpu.recon_images == cpu.recon_images and gpu.fid
    assert tokens_per_code(cpu, cpu.data.train_length) < 100  # the CPU demo's usage is counted on fewer tokens
