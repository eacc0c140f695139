"""A generator run's configuration (`vqtok gen train --config`, saved as config.json) and loading a trained one."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..core.io import load_state_dict
from ..core.rundir import RunDir
from ..train.config import OptimConfig, build_config
from .ar import GPT, GPTConfig
from .sample import CFG_SCHEDULES, check_sampling


@dataclass
class GenDataConfig:
    tokens: str = ""  # a folder written by `vqtok encode --split train [--augment flip]` (required)
    batch_size: int = 64  # per process
    num_workers: int | None = None  # None: none on the CPU, on CUDA the process's CPUs - 1 (<= 8)


@dataclass
class SampleConfig:
    """How samples are drawn for `gen sample`, `gen eval` and the final evaluation (IBQ: constant CFG 2.0-2.85,
    temperature 1, no top-k / top-p; VQGAN-LC: no CFG, top-k)."""

    # logits = uncond + scale * (cond - uncond); 1: conditional only. None: 2.0 for a GPT trained with label
    # dropout, 1 for one trained without (VQGAN-LC's GPT has no unconditional model to guide with)
    cfg_scale: float | None = None
    cfg_schedule: str = "constant"  # "constant" | "linear" (from 1 at the first token to cfg_scale at the last)
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    per_class: int = 50  # balanced labels: this many samples of every class
    batch_size: int = 256
    seed: int = 0

    def check(self) -> "SampleConfig":
        """ValueError, naming the key, for settings sampling cannot use; else self."""
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"sample.cfg_schedule={self.cfg_schedule!r}; choose one of {CFG_SCHEDULES}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ValueError(f"sample.cfg_scale={self.cfg_scale}; use a scale >= 0 (1: no guidance) or null")
        if self.per_class < 1 or self.batch_size < 1:
            raise ValueError(f"sample.per_class={self.per_class}, sample.batch_size={self.batch_size}: both must be "
                             "at least 1")
        return self

    def for_model(self, config: GPTConfig) -> "SampleConfig":
        """These settings for a GPT: cfg_scale None becomes 2.0 with label dropout, 1 without; an explicit guidance
        scale for a GPT trained without label dropout is a ValueError (it has no unconditional model)."""
        if self.cfg_scale is None:
            return replace(self, cfg_scale=2.0 if config.class_dropout > 0 else 1.0)
        if self.cfg_scale != 1.0 and config.class_dropout == 0:
            raise ValueError(f"sample.cfg_scale={self.cfg_scale}, but this GPT is trained without label dropout "
                             "(model.class_dropout 0: no unconditional model to guide with); set sample.cfg_scale=1 "
                             "or model.class_dropout > 0")
        return self


@dataclass
class GenEvalConfig:
    data: str | None = None  # the real images gFID compares with (None: the source the tokens were encoded from)
    no_cfg: bool = True  # also sample at cfg 1 and report it beside (gfid_no_cfg, ...)
    references: bool = True  # floor_real, floor_recon and ceiling_unigram, with the same N as the samples
    classifier_cache: str = ".cache/classifiers"
    # Images per decode / Inception batch; None: 16 on the CPU, 100 on CUDA. The features do not depend on it; on
    # this 2-core CPU the FID Inception takes 58.7 ms/image at 16, 71.6 at 32 and 71.9 at 100 (200 images, three
    # alternating rounds, median): big batches of 299 px activations fall out of the cache.
    batch_size: int | None = None

    def batch_for(self, device: torch.device | str) -> int:
        return self.batch_size or (100 if torch.device(device).type == "cuda" else 16)


@dataclass
class GenTrainConfig:
    tokenizer: str | None = None  # the tokenizer's run directory (None: the run that wrote data.tokens)
    # Decode with the tokenizer's weight EMA (ema.safetensors)? None: as the tokens were encoded (`vqtok encode
    # --ema` records it in their index.json); set when training starts
    tokenizer_ema: bool | None = None
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})  # GPTConfig fields (generate/ar.py)
    data: GenDataConfig = field(default_factory=GenDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                                                   grad_clip=1.0))
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: GenEvalConfig = field(default_factory=GenEvalConfig)
    steps: int = 1000
    seed: int = 0
    bf16: bool = False  # bf16 autocast for the transformer (the loss's softmax statistics stay fp32)
    tf32: bool = True
    ema_decay: float | None = None
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0  # generators are evaluated at the end (sampling N images is the expensive part)
    evaluate: bool = True  # sample and score at the end of training
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenTrainConfig":
        config = build_config(cls, data, "")
        config.sample.check()
        if config.eval.batch_size is not None and config.eval.batch_size < 1:
            raise ValueError(f"eval.batch_size={config.eval.batch_size}; use a positive number of images or null")
        return config


def load_generator(run_dir: str | Path, ema: bool | None = None,
                   device: str | torch.device = "cpu") -> tuple[GPT, GenTrainConfig]:
    """A trained GPT and its run's config. ema None: the weight EMA when the run has one, else the live weights."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise FileNotFoundError(f"{run.config} not found; {run_dir} is not a vqtok generator run directory")
    saved = run.read_config()
    if "gpt" not in saved:
        raise ValueError(f"{run_dir} is not a generator run (its config.json has no `gpt` section); for a tokenizer "
                         "use vqtok eval / encode / decode")
    config = GenTrainConfig.from_dict({k: v for k, v in saved.items()
                                       if k not in ("gpt", "kind", "data_description", "world_size")})
    model = GPT(GPTConfig.from_dict(saved["gpt"]))
    use_ema = run.ema.is_file() if ema is None else ema
    model.load_state_dict(load_state_dict(run.weights(ema=use_ema)), strict=True)
    return model.to(device).eval(), config

