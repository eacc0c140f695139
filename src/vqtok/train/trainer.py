"""The trainer: one code path for a single process and for torchrun data parallelism (NCCL on GPUs, gloo on CPU).

Each step: the tokenizer's loss (L1 + perceptual + the quantizer's weighted loss [+ GAN generator term]) and an Adam
step; then, once the GAN has started, a discriminator step on real and reconstructed images.

Data parallelism is done by averaging gradients with one flat all-reduce per optimiser step instead of wrapping the
modules in DistributedDataParallel: the GAN recipe runs the discriminator several times per step, takes
torch.autograd.grad at the decoder's last layer for the adaptive weight and holds quantizers whose codebooks are
buffers, all of which DDP's reducer fights; the arithmetic is the same (every rank applies the mean gradient to the
same weights). Quantizer statistics (ema) and code usage are all-reduced by the quantizer and CodeUsage themselves.

Resuming is exact: the checkpoint holds the optimisers, schedules, weight EMA, usage histograms, RNG states and the
position inside the epoch's shuffled order, so N steps + resume + N steps gives the weights of 2N steps.
"""

from __future__ import annotations

import copy
import math
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..core import distributed
from ..core.rundir import RunDir
from ..data import describe_dataset
from ..metrics.report import write_run_report
from ..models import (
    LeCAM,
    NLayerDiscriminator,
    Tokenizer,
    adaptive_generator_weight,
    build_perceptual_loss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
    vanilla_d_loss,
)
from ..quantize import CodeUsage
from .config import TrainConfig

D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non-saturating": non_saturating_g_loss}


def lr_lambda(config: TrainConfig):
    """The learning-rate multiplier at each step: linear warm-up, then constant, cosine or step decay."""
    o = config.optim

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "cosine":
            progress = (step - o.warmup_steps) / max(1, config.steps - o.warmup_steps)
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if o.schedule == "step":
            return o.gamma ** sum(step >= m for m in o.milestones)
        raise ValueError(f"unknown schedule {o.schedule!r}; choose constant, cosine or step")

    return factor


class WeightEMA:
    """An exponential moving average of the parameters (IBQ evaluates with decay 0.999); buffers are taken from the
    live model when the averaged weights are exported."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = {n: p.detach().clone().float() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            self.params[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    def state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        state = model.state_dict()
        return {k: (self.params[k].to(v.dtype) if k in self.params else v) for k, v in state.items()}

    def load(self, state: dict[str, Tensor]) -> None:
        for name in self.params:
            self.params[name].copy_(state[name].float())


@dataclass
class Position:
    """Where training is: optimiser steps done, the epoch, and the batches of that epoch already consumed."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.run = RunDir(run_dir)
        self.progress = progress
        self.device = distributed.init_from_env(config.device)
        set_precision(self.device, config.tf32)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        self._seed_everything(config.seed)
        self._prepare_codebook()
        self.model = Tokenizer(config.model).to(self.device)
        self._sync_initial_weights(self.model)
        self.g_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(self._param_groups(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                      weight_decay=config.optim.weight_decay)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lr_lambda(config))
        self.perceptual = self._build_perceptual()
        self.disc, self.opt_d, self.sched_d, self.lecam = self._build_gan()
        self.ema = WeightEMA(self.model, config.ema_decay) if config.ema_decay else None
        self.train_set = self._dataset("train")
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.world, rank=self.rank, shuffle=True,
                                          seed=config.seed, drop_last=True)
        self.batches_per_epoch = len(self.sampler) // config.data.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the training set gives {len(self.sampler)} images per process, fewer than one batch of "
                             f"{config.data.batch_size}; lower data.batch_size or raise data.train_length")
        self.usage_epoch = CodeUsage(self.model.codebook_size)  # this epoch so far, this rank
        self.usage_train = CodeUsage(self.model.codebook_size)  # the last complete epoch, all ranks
        self.usage_train_local = CodeUsage(self.model.codebook_size)  # the same epoch, this rank only
        self.position = Position()
        self._not_finite = torch.zeros((), dtype=torch.bool, device=self.device)
        if resume:
            self._resume()
        elif self.is_main:
            self._start_run_dir()
        distributed.barrier()

    # -- setup ----------------------------------------------------------------------------------------------------
    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _prepare_codebook(self) -> None:
        """lc without a codebook file: build it (rank 0, cached) with the codebook section's recipe."""
        model = self.config.model
        if model.quantizer != "lc" or model.quantizer_options.get("codebook"):
            return
        from ..codebook import build_codebook

        cb = self.config.codebook
        source = cb.source or self.config.data.source
        kwargs = dict(encoder=cb.encoder, source=source, size=model.codebook_size, method=cb.method, seed=cb.seed,
                      crops=cb.crops, cache_dir=cb.cache_dir, progress=self.progress and self.is_main)
        name = f"{cb.encoder}-{Path(source).name}-{cb.method}-{model.codebook_size}-seed{cb.seed}.safetensors"
        out = Path(cb.cache_dir) / name  # the builder reuses it when its recorded request matches
        if self.is_main:
            path = build_codebook(out=out, **kwargs)
        distributed.barrier()
        if not self.is_main:
            path = build_codebook(out=out, **{**kwargs, "progress": False})  # a cache hit: the file exists
        model.quantizer_options["codebook"] = str(path)

    def _sync_initial_weights(self, module: nn.Module) -> None:
        for tensor in list(module.parameters()) + list(module.buffers()):
            distributed.broadcast_(tensor.data)

    def _build_perceptual(self) -> nn.Module | None:
        loss = self.config.loss
        if loss.perceptual_weight <= 0:
            return None
        perceptual = build_perceptual_loss(loss.lpips_dir, encoder=loss.perceptual_encoder)
        return perceptual.to(self.device).eval()

    def _build_gan(self):
        loss = self.config.loss
        if loss.disc_weight <= 0:
            return None, None, None, None
        for name, table in (("disc_loss", D_LOSSES), ("gen_loss", G_LOSSES)):
            if getattr(loss, name) not in table:
                raise ValueError(f"loss.{name}={getattr(loss, name)!r}; choose one of {sorted(table)}")
        disc = NLayerDiscriminator(n_layers=loss.disc_layers).to(self.device)
        self._sync_initial_weights(disc)
        opt = torch.optim.Adam(disc.parameters(), lr=self.config.optim.lr, betas=tuple(self.config.optim.betas),
                               weight_decay=self.config.optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.config))
        lecam = LeCAM(decay=loss.lecam_decay).to(self.device) if loss.lecam_weight > 0 else None
        return disc, opt, sched, lecam

    def _dataset(self, split: str) -> Dataset:
        from ..data import VAL_SEED, build_dataset

        data = self.config.data
        if split == "train":
            return build_dataset(data.source, split, size=data.size, length=data.train_length, seed=self.config.seed)
        return build_dataset(data.source, split, size=data.size, length=data.val_length, seed=VAL_SEED)

    def _start_run_dir(self) -> None:
        if self.run.latest_checkpoint() is not None:
            raise FileExistsError(f"{self.run.path} already holds a run; continue it with --resume, or choose "
                                  "another --out")
        self.run.path.mkdir(parents=True, exist_ok=True)
        self.run.log.unlink(missing_ok=True)
        config = self.config.to_dict()
        config["data_description"] = describe_dataset(self.train_set)
        config["world_size"] = self.world
        self.run.write_config(config)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "position": vars(self.position).copy(),
            "opt_g": self.opt_g.state_dict(),
            "sched_g": self.sched_g.state_dict(),
            "disc": self.disc.state_dict() if self.disc else None,
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "sched_d": self.sched_d.state_dict() if self.sched_d else None,
            "lecam": self.lecam.state_dict() if self.lecam else None,
            "usage_epoch": self.usage_epoch.all_reduce().state_dict(),
            "usage_train": self.usage_train.state_dict(),
            "rng": capture_rng_state(),
            "config": self.config.to_dict(),
        }

    def save(self) -> None:
        self._raise_if_not_finite()  # a checkpoint never holds weights a non-finite loss has stepped
        state = self.trainer_state()  # collective (usage all-reduce): every rank builds it
        if self.is_main:
            ema = self.ema.state_dict(self.model) if self.ema else None
            self.run.save_checkpoint(self.position.step, self.model.state_dict(), ema, state,
                                     keep=self.config.keep_checkpoints)
        distributed.barrier()

    def _resume(self) -> None:
        checkpoint = self.run.latest_checkpoint()
        if checkpoint is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {self.run.checkpoints}; start a new run "
                                    "without --resume")
        model_state, ema_state, state = self.run.load_checkpoint(checkpoint, self.device)
        self.model.load_state_dict(model_state, strict=True)
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_g.load_state_dict(state["sched_g"])
        for name in ("disc", "opt_d", "sched_d", "lecam"):
            target = getattr(self, name)
            if (target is None) != (state[name] is None):
                raise ValueError(f"--resume: the checkpoint {'has' if state[name] is not None else 'has no'} {name} "
                                 "state but this config disagrees; resume with the run's own config")
            if target is not None:
                target.load_state_dict(state[name])
        if self.ema is not None:
            if ema_state is None:
                raise ValueError(f"--resume: {checkpoint} has no weight EMA but this config has ema_decay set; resume "
                                 "with the run's own config")
            self.ema.load(ema_state)
        self.position = Position(**state["position"])
        # The saved epoch histogram is the all-ranks total: rank 0 keeps it, the others restart from zero, so the
        # next all-reduce gives the same total as an uninterrupted run.
        if self.is_main:
            self.usage_epoch.load_state_dict(state["usage_epoch"])
        self.usage_train.load_state_dict(state["usage_train"])
        restore_rng_state(state["rng"])
        self._log({"event": "resume", "step": self.position.step, "checkpoint": checkpoint.name})

    # -- the loop -------------------------------------------------------------------------------------------------
    def epoch_batches(self) -> Iterator[list[int]]:
        """This epoch's index batches for this rank, from the current position (a resumed run skips what it saw)."""
        self.sampler.set_epoch(self.position.epoch)
        order = list(self.sampler)
        size = self.config.data.batch_size
        for b in range(self.position.batch_in_epoch, self.batches_per_epoch):
            yield order[b * size : (b + 1) * size]

    def epoch_loader(self) -> DataLoader:
        """The DataLoader of this epoch, from the current position.

        The dataset draws its random crops from the epoch, so it is told the epoch before the loader copies it into
        workers. The loader gets a generator of its own, seeded by (seed, epoch, rank): creating its iterator draws
        the workers' base seed from that generator instead of the global torch RNG, so a resumed run, which creates
        one more iterator mid-epoch than an uninterrupted one, still draws the same dropout masks afterwards."""
        self.train_set.set_epoch(self.position.epoch)
        entropy = np.random.SeedSequence([self.config.seed, self.position.epoch, self.rank]).generate_state(2)
        generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
        return DataLoader(self.train_set, batch_sampler=list(self.epoch_batches()),
                          num_workers=self.config.data.num_workers, generator=generator,
                          pin_memory=self.device.type == "cuda")  # pinned: the non_blocking copy overlaps

    def train(self, until: int | None = None) -> dict[str, Any]:
        """Train to config.steps (or stop after step `until`, checkpointed, to be resumed later)."""
        config = self.config
        stop = min(config.steps, until) if until is not None else config.steps
        bar = self._progress_bar(stop)
        interrupted = _InterruptFlag()
        last_log, images_since = time.perf_counter(), 0
        try:
            while self.position.step < stop and not interrupted:
                for images, _ in self.epoch_loader():
                    logs = self.train_step(images.to(self.device, non_blocking=True))  # tensors: no host sync
                    self.position.step += 1
                    self.position.batch_in_epoch += 1
                    if self.position.batch_in_epoch == self.batches_per_epoch:
                        self._end_epoch()
                    images_since += images.shape[0] * self.world
                    step = self.position.step
                    if step % config.log_every == 0 or step == stop:
                        self._raise_if_not_finite()  # the one read of the device per log interval
                        now = time.perf_counter()
                        row = {k: _item(v) for k, v in logs.items()}
                        row["images_per_s"] = images_since / max(now - last_log, 1e-9)
                        last_log, images_since = now, 0
                        self._log_train(row, bar)
                    if bar is not None:
                        bar.update(1)
                    if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                        self.evaluate(final=False)
                    if step % config.checkpoint_every == 0 or step == stop:
                        self.save()
                    if step >= stop or interrupted:
                        break
        finally:
            if bar is not None:
                bar.close()
            interrupted.restore()
        if interrupted:
            self.save()
            self._log({"event": "interrupted", "step": self.position.step})
            raise KeyboardInterrupt(f"stopped at step {self.position.step}; a checkpoint was written, continue "
                                    f"with --resume")
        summary = {"step": self.position.step, "rank_checksums": self.rank_checksums(),
                   "tokens_train": self.usage_train.tokens,
                   "tokens_train_per_rank": distributed.all_gather_object(self.usage_train_local.tokens)}
        if self.position.step >= config.steps:
            summary["metrics"] = self.evaluate(final=True)
        self._log({"event": "end", **{k: v for k, v in summary.items() if k != "metrics"}})
        return summary

    def _end_epoch(self) -> None:
        self.usage_train = self.usage_epoch.all_reduce()
        self.usage_train_local = self.usage_epoch
        self.usage_epoch = CodeUsage(self.model.codebook_size)
        self._log({"event": "epoch", "epoch": self.position.epoch, "step": self.position.step,
                   "utilization_train": self.usage_train.utilization(), "tokens_train": self.usage_train.tokens,
                   "perplexity_train": self.usage_train.perplexity()})
        self.position.epoch += 1
        self.position.batch_in_epoch = 0

    def autocast(self):
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def train_step(self, x: Tensor) -> dict[str, Tensor | float]:
        """One generator step and, once the GAN has started, one discriminator step. x: (B, 3, H, W) in [0, 1].
        Returns the step's losses as detached 0-dim tensors: reading them is left to the log interval, so a CUDA
        step never waits for the host."""
        cfg = self.config.loss
        gan = self.disc is not None and self.position.step >= cfg.disc_start
        self.model.train()
        with self.autocast():
            out = self.model(x)
            x_hat = out.x_hat.float()
            rec = cfg.l1_weight * (x_hat - x).abs().mean() + cfg.l2_weight * F.mse_loss(x_hat, x)
            logs = {"rec": rec.detach()}
            if self.perceptual is not None:
                perceptual = self.perceptual(x_hat, x).mean()
                rec = rec + cfg.perceptual_weight * perceptual
                logs["perceptual"] = perceptual.detach()
            loss = rec + out.quant_loss
            if gan:
                self.disc.requires_grad_(False)
                g_loss = G_LOSSES[cfg.gen_loss](self.disc(x_hat))
                weight = adaptive_generator_weight(rec, g_loss, self.model.last_layer) if cfg.adaptive_weight else 1.0
                loss = loss + cfg.disc_weight * weight * g_loss
                logs.update(g_loss=g_loss.detach(), g_weight=torch.as_tensor(weight))
        self._optimizer_step(self.opt_g, self.sched_g, self.g_params, loss)
        if gan:
            logs.update(self._discriminator_step(x, x_hat.detach()))
        if self.ema is not None:
            self.ema.update(self.model)
        self.usage_epoch.update(out.quant.indices)
        logs.update(loss=loss.detach(), quant_loss=out.quant_loss.detach(), lr=self.sched_g.get_last_lr()[0],
                    **{f"q_{k}": v.detach() for k, v in out.quant.terms.items()})
        return logs

    def _discriminator_step(self, x: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        cfg = self.config.loss
        self.disc.requires_grad_(True)
        with self.autocast():
            logits_real = self.disc(x).float()
            logits_fake = self.disc(x_hat).float()
            d_loss = D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
            logs = {"d_loss": d_loss.detach()}
            if self.lecam is not None:
                lecam = self.lecam(logits_real, logits_fake)
                d_loss = d_loss + cfg.lecam_weight * lecam
                logs["lecam"] = lecam.detach()
        self._optimizer_step(self.opt_d, self.sched_d, list(self.disc.parameters()), d_loss)
        return logs

    def _param_groups(self) -> list[dict]:
        """The tokenizer's trainable parameters: the quantizer's at lr * optim.quantizer_lr_scale, the rest at lr."""
        scale = float(self.config.optim.quantizer_lr_scale)
        if not scale > 0:
            raise ValueError(f"optim.quantizer_lr_scale must be positive, got {scale}")
        quantizer = {id(p) for p in self.model.quantizer.parameters()}
        groups = [{"params": [p for p in self.g_params if id(p) not in quantizer]},
                  {"params": [p for p in self.g_params if id(p) in quantizer], "lr": self.config.optim.lr * scale}]
        return [g for g in groups if g["params"]]

    def _optimizer_step(self, opt, sched, params: list[nn.Parameter], loss: Tensor) -> None:
        # Non-finite losses are flagged on the device and raised at the next log or checkpoint (at once on the CPU,
        # where reading a scalar costs nothing).
        self._not_finite |= ~torch.isfinite(loss.detach())
        if self.device.type == "cpu":
            self._raise_if_not_finite()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_mean_grads_(params)
        if self.config.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        opt.step()
        sched.step()

    def _raise_if_not_finite(self) -> None:
        if bool(self._not_finite):
            raise FloatingPointError(f"a loss was not finite at or before step {self.position.step}; lower optim.lr "
                                     "(small batches need a smaller one) or set optim.grad_clip, and resume from the "
                                     "last checkpoint with --resume")

    # -- evaluation and logs --------------------------------------------------------------------------------------
    def eval_model(self) -> Tokenizer:
        """The weights used for evaluation: the weight EMA when it is on (IBQ's protocol), else the live model."""
        if self.ema is None:
            return self.model
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema.state_dict(self.model))
        return model

    def evaluate(self, final: bool) -> dict[str, Any] | None:
        """Rank 0 evaluates on the validation set (the whole of it at the end, `eval_images` of it periodically)."""
        from ..metrics import evaluate

        metrics = None
        usage_train = self.usage_train if self.usage_train.tokens else self.usage_epoch.all_reduce()  # collective
        if self.is_main:
            val, model = self._dataset("val"), self.eval_model()
            metrics = evaluate(
                model, val, batch_size=self.config.data.batch_size, device=self.device,
                fid=self.config.fid and final, max_images=self.config.eval_images, usage_train=usage_train,
                out=self.run.metrics if final else None, progress=self.progress and final,
                fid_images=self.config.fid_images, recon_images=self.config.recon_images,
            )
            self._log({"event": "eval", "step": self.position.step, "final": final,
                       **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}})
            if final:
                write_run_report(self.run, model, val, metrics, usage_train)
        distributed.barrier()
        return metrics

    def rank_checksums(self) -> list[float]:
        """Each rank's sum of all weights in float64: equal on every rank when data parallelism is working."""
        total = sum(float(t.double().sum()) for t in self.model.state_dict().values() if t.is_floating_point())
        return distributed.all_gather_object(total)

    def _progress_bar(self, stop: int):
        if not (self.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=stop, initial=self.position.step, desc="train", unit="step", dynamic_ncols=True)

    def _log_train(self, logs: dict[str, float], bar) -> None:
        usage = self.usage_epoch  # this rank's histogram of the epoch so far (cheap: no collective per log)
        row = {"event": "train", "step": self.position.step, "epoch": self.position.epoch, **logs,
               "utilization_epoch": usage.utilization(), "tokens_epoch": usage.tokens}
        self._log(row)
        if bar is not None:
            bar.set_postfix(loss=f"{logs['loss']:.4f}", usage=f"{usage.utilization():.3f}",
                            img_s=f"{logs['images_per_s']:.1f}", refresh=False)

    def _log(self, row: dict[str, Any]) -> None:
        if self.is_main:
            self.run.append_log({"time": time.time(), **row})


def _item(value: Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def set_precision(device: torch.device, tf32: bool) -> None:
    """On CUDA, fp32 matmuls and convolutions in TF32 (tf32=True: matmul precision "high", cuDNN TF32) or exact
    fp32 ("highest"). Process-wide, as torch's settings are; the CPU is left alone. The quantizers' kernels read the
    same setting (torch.get_float32_matmul_precision) for their logits."""
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = bool(tf32)


def capture_rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python RNG states as tensors and plain numbers (so trainer.pt loads weights-only)."""
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
        "python": {"version": int(version), "state": torch.tensor(python_state, dtype=torch.int64),
                   "gauss": python_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """The inverse of capture_rng_state."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


class _InterruptFlag:
    """Turns SIGINT / SIGTERM into a flag the loop checks, so a killed job writes a checkpoint before it stops."""

    def __init__(self) -> None:
        self.raised = False
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second signal: stop now
            raise KeyboardInterrupt
        self.raised = True

    def __bool__(self) -> bool:
        return self.raised

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, until: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train (or continue, with resume=True) a tokenizer into run_dir; returns a summary (and the final metrics)."""
    trainer = Trainer(config, run_dir, resume=resume, progress=progress)
    return trainer.train(until=until)
