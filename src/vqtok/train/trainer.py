"""The tokenizer trainer: the shared loop (train/loop.py) with a tokenizer's step.

Each step: the tokenizer's loss (L1 + perceptual + the quantizer's weighted loss [+ GAN generator term]) and an Adam
step; then, once the GAN has started, a discriminator step on real and reconstructed images. Quantizer statistics
(ema) and code usage are all-reduced by the quantizer and CodeUsage themselves.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..core import distributed
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
from .loop import TrainLoop

D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}
G_LOSSES = {"hinge": hinge_g_loss, "non-saturating": non_saturating_g_loss}


class Trainer(TrainLoop):
    config: TrainConfig
    model: Tokenizer

    def build(self) -> None:
        config = self.config
        self._prepare_codebook()
        self.model = Tokenizer(config.model).to(self.device)
        self.sync_initial_weights(self.model)
        if config.compile:
            # in place: the module tree and state_dict names stay those of the uncompiled model
            self.model.encoder.compile()
            self.model.decoder.compile()
        self.g_params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = torch.optim.Adam(self._param_groups(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                      weight_decay=config.optim.weight_decay)
        self.sched_g = self.schedule(self.opt_g)
        self.perceptual = self._build_perceptual()
        self.disc, self.opt_d, self.sched_d, self.lecam = self._build_gan()
        self.stateful.update(opt_g=self.opt_g, sched_g=self.sched_g, disc=self.disc, opt_d=self.opt_d,
                             sched_d=self.sched_d, lecam=self.lecam)
        self.train_set = self._dataset("train")
        self.usage_epoch = CodeUsage(self.model.codebook_size)  # this epoch so far, this rank
        self.usage_train = CodeUsage(self.model.codebook_size)  # the last complete epoch, all ranks
        self.usage_train_local = CodeUsage(self.model.codebook_size)  # the same epoch, this rank only

    # -- setup ----------------------------------------------------------------------------------------------------
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
        self.sync_initial_weights(disc)
        opt = torch.optim.Adam(disc.parameters(), lr=self.config.optim.lr, betas=tuple(self.config.optim.betas),
                               weight_decay=self.config.optim.weight_decay)
        lecam = LeCAM(decay=loss.lecam_decay).to(self.device) if loss.lecam_weight > 0 else None
        return disc, opt, self.schedule(opt), lecam

    def _dataset(self, split: str) -> Dataset:
        from ..data import VAL_SEED, build_dataset

        data = self.config.data
        if split == "train":
            return build_dataset(data.source, split, size=data.size, length=data.train_length, seed=self.config.seed)
        return build_dataset(data.source, split, size=data.size, length=data.val_length, seed=VAL_SEED)

    # -- state beyond the optimisers --------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"usage_epoch": self.usage_epoch.all_reduce().state_dict(),  # collective
                "usage_train": self.usage_train.state_dict(), "usage_train_local": self.usage_train_local.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        # The saved epoch histogram is the all-ranks total: rank 0 keeps it, the others restart from zero, so the
        # next all-reduce gives the same total as an uninterrupted run.
        if self.is_main:
            self.usage_epoch.load_state_dict(state["usage_epoch"])
        self.usage_train.load_state_dict(state["usage_train"])
        if "usage_train_local" in state:  # checkpoints written before it was saved lack it
            self.usage_train_local.load_state_dict(state["usage_train_local"])

    def on_epoch_end(self) -> None:
        self.usage_train = self.usage_epoch.all_reduce()
        self.usage_train_local = self.usage_epoch
        self.usage_epoch = CodeUsage(self.model.codebook_size)
        self.log({"event": "epoch", "epoch": self.position.epoch, "step": self.position.step,
                  "utilization_train": self.usage_train.utilization(), "tokens_train": self.usage_train.tokens,
                  "perplexity_train": self.usage_train.perplexity()})

    def summary(self) -> dict[str, Any]:
        return {"tokens_train": self.usage_train.tokens,
                "tokens_train_per_rank": distributed.all_gather_object(self.usage_train_local.tokens)}

    def log_extras(self) -> dict[str, Any]:
        usage = self.usage_epoch  # this rank's histogram of the epoch so far (cheap: no collective per log)
        return {"utilization_epoch": usage.utilization(), "tokens_epoch": usage.tokens}

    # -- the step -------------------------------------------------------------------------------------------------
    def train_step(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor | float]:
        """One generator step and, once the GAN has started, one discriminator step. x: (B, 3, H, W) in [0, 1].
        Returns the step's losses as detached 0-dim tensors: reading them is left to the log interval, so a CUDA
        step never waits for the host."""
        cfg = self.config.loss
        gan = self.disc is not None and self.position.step >= cfg.disc_start
        self.model.train()
        with self.autocast():
            out = self.model(x)
            x_hat = out.x_hat.float()
            # on the [-1, 1] scale (LossConfig): |2a - 2b| = 2 |a - b|, written so to stay exact
            rec = cfg.l1_weight * 2.0 * (x_hat - x).abs().mean() + cfg.l2_weight * 4.0 * F.mse_loss(x_hat, x)
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
        self.optimizer_step(self.opt_g, self.sched_g, self.g_params, loss)
        if gan:
            logs.update(self._discriminator_step(x, x_hat.detach()))
        elif self.sched_d is not None:
            # D's schedule counts global steps, as G's does ("same lr for D"): a discriminator that starts at
            # disc_start gets the lr of that step, not a fresh warm-up and a cosine shifted by disc_start
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
                self.sched_d.step()
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
        self.optimizer_step(self.opt_d, self.sched_d, list(self.disc.parameters()), d_loss)
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

    # -- evaluation -------------------------------------------------------------------------------------------------
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
            self.log({"event": "eval", "step": self.position.step, "final": final,
                      **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}})
            if final:
                write_run_report(self.run, model, val, metrics, usage_train)
        distributed.barrier()
        return metrics


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, until: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train (or continue, with resume=True) a tokenizer into run_dir; returns a summary (and the final metrics)."""
    trainer = Trainer(config, run_dir, resume=resume, progress=progress)
    return trainer.train(until=until)
