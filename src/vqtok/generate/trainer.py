"""Training a class-conditional GPT on token shards, in the tokenizers' loop (train/loop.py): the same checkpoints,
exact resume, torchrun data parallelism, weight EMA, metrics.jsonl and progress bar.

The loss is the cross-entropy of the next token over K codes, computed by `vqtok.kernels.cross_entropy` from the
hidden states and the head's weights: chunked over the codes when (tokens x K) logits would not fit the budget, so a
100,000-code head never materialises its logits in training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..data.tokens import TokenShards
from ..kernels import cross_entropy
from ..train.loop import TrainLoop
from .ar import GPT, GPTConfig
from .config import GenTrainConfig


def gpt_config(config: GenTrainConfig, tokens: TokenShards) -> GPTConfig:
    """The GPT of a run: config.model's preset and fields, with K, the classes and the grid taken from the tokens."""
    fixed = {"vocab_size": tokens.codebook_size, "num_classes": max(1, tokens.num_classes), "grid": tokens.grid}
    given = GPTConfig.from_dict({**config.model, **{k: v for k, v in fixed.items() if k not in config.model}})
    clash = {k: config.model[k] for k in fixed if k in config.model and getattr(given, k) != fixed[k]}
    if clash:
        raise ValueError(f"model {clash} disagrees with the tokens in {tokens.folder} ({fixed}); leave them out of "
                         "the config: they are read from the tokens")
    return GPTConfig.from_dict({**config.model, **fixed})


class GeneratorTrainer(TrainLoop):
    config: GenTrainConfig
    model: GPT

    def build(self) -> None:
        config = self.config
        if not config.data.tokens:
            raise ValueError("data.tokens is not set: point it at a folder written by `vqtok encode --split train` "
                             "(--set data.tokens=PATH)")
        self.train_set = TokenShards(config.data.tokens, seed=config.seed)
        if config.tokenizer is None:
            config.tokenizer = self.train_set.index.get("run")
        if config.tokenizer_ema is None:
            config.tokenizer_ema = bool(self.train_set.index.get("ema", False))
        self.gpt_config = gpt_config(config, self.train_set)
        if config.evaluate:
            config.sample.for_model(self.gpt_config)  # a guidance scale this GPT cannot use: refused before training
        self.model = GPT(self.gpt_config).to(self.device)
        self.sync_initial_weights(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = config.optim
        self.opt = torch.optim.AdamW(self.model.param_groups(o.weight_decay), lr=o.lr, betas=tuple(o.betas))
        self.sched = self.schedule(self.opt)
        self.stateful.update(opt=self.opt, sched=self.sched)

    def run_config(self) -> dict[str, Any]:
        return {**super().run_config(), "gpt": self.gpt_config.to_dict(), "kind": "ar"}

    def train_step(self, ids: Tensor, labels: Tensor) -> dict[str, Tensor | float]:
        """ids (B, T), labels (B,): next-token cross-entropy over the K codes, one AdamW step."""
        self.model.train()
        with self.autocast():
            hidden = self.model(ids, labels)  # (B, T, dim)
            head = self.model.head
            loss = cross_entropy(hidden.flatten(0, 1), head.weight, head.bias, ids.flatten())
        self.optimizer_step(self.opt, self.sched, self.params, loss)
        if self.ema is not None:
            self.ema.update(self.model)
        return {"loss": loss.detach(), "lr": self.sched.get_last_lr()[0]}

    def evaluate(self, final: bool) -> dict[str, Any] | None:
        """At the end: rank 0 samples and scores (generate/evaluate.py), writing metrics.json and report.md."""
        if not (final and self.config.evaluate):
            return None
        from ..core import distributed
        from .evaluate import evaluate_generator

        metrics = None
        if self.is_main:
            metrics = evaluate_generator(self.run.path, model=self.eval_model(), device=self.device,
                                         progress=self.progress)
            self.log({"event": "eval", "step": self.position.step, "final": True,
                      **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}})
        distributed.barrier()
        return metrics
