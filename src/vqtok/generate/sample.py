"""Sampling a class-conditional GPT (ar.py): KV cache, classifier-free guidance, temperature, top-k, top-p, seeded.

Per step t: logits (B, K) in fp32 -> CFG (cond + (s_t - 1)(cond - uncond), the conditional and the null-class rows
in one batch of 2B, as LlamaGen) -> / temperature -> top-k, then top-p -> softmax -> torch.multinomial with the
caller's generator. The same generator and arguments give the same ids, with or without the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .ar import GPT

CFG_SCHEDULES = ("constant", "linear")


def balanced_labels(num_classes: int, per_class: int = 50) -> Tensor:
    """(num_classes * per_class,) int64: 0 x per_class, 1 x per_class, ... (ADM / IBQ's 50 per class for gFID;
    LlamaGen's random labels make the class histogram, and so FID, noisier)."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError for a temperature below 0, a negative top_k or a top_p outside (0, 1]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 or None: off), got {top_p}")


def top_k_top_p_filter(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits (..., K) with -inf outside the top k (ties with the k-th value kept) and then outside the nucleus: the
    smallest set of highest-probability entries whose probability (after top-k) sums to >= top_p (the most likely
    entry is always kept). None, top_k 0 / >= K and top_p >= 1 leave the logits as they are. Not in place."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.float().softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the entries ranked above each
        remove_sorted = mass_before >= top_p  # the set is already big enough without this one
        remove_sorted[..., 0] = False  # the most likely entry stays, whatever top_p is
        remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits: uncond + scale (cond - uncond), written as cond + (scale - 1)(cond -
    uncond) so that scale 1 returns cond exactly."""
    return cond + (scale - 1.0) * (cond - uncond)


def cfg_scale_at(step: int, total: int, scale: float, schedule: str = "constant") -> float:
    """The guidance scale for token `step` of `total`. "constant": scale (LlamaGen, IBQ). "linear": a ramp from 1 at
    the first token to scale at the last, 1 + (scale - 1) * step / (total - 1) (MUSE / VAR-style: weak guidance
    while the layout is open, full guidance for the last tokens)."""
    if schedule == "constant":
        return scale
    if schedule == "linear":
        return scale if total <= 1 else 1.0 + (scale - 1.0) * step / (total - 1)
    raise ValueError(f"unknown cfg schedule {schedule!r}; choose one of {CFG_SCHEDULES}")


@torch.no_grad()
def sample(model: GPT, labels: Tensor, *, cfg_scale: float = 1.0, cfg_schedule: str = "constant",
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, use_cache: bool = True, batch_size: int | None = None,
           guide: bool | None = None) -> Tensor:
    """Token maps (N, h, w) int64 on the model's device for labels (N,) (a label may be the null class:
    unconditional). cfg_scale != 1 runs the null-class rows beside the conditional ones (guide=True forces that
    path at scale 1, where it gives the conditional path's ids). temperature 0 takes the argmax. generator: a
    torch.Generator on the model's device; None uses the global RNG. use_cache False recomputes the whole prefix
    at every step (the reference). batch_size: conditional rows per forward (None: all N at once)."""
    config = model.config
    check_sampling(temperature, top_k, top_p)
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg schedule {cfg_schedule!r}; choose one of {CFG_SCHEDULES}")
    guide = cfg_scale != 1.0 if guide is None else guide
    if guide and config.class_dropout == 0 and cfg_scale != 1.0:
        raise ValueError("this GPT was trained without label dropout (class_dropout 0), so it has no unconditional "
                         "model for classifier-free guidance: sample with cfg_scale 1")
    device = model.head.weight.device
    labels = labels.to(device=device, dtype=torch.long).reshape(-1)
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= config.num_classes:
        raise ValueError(f"labels must lie in 0 .. {config.num_classes} (the null class), got "
                         f"{int(labels.min())} .. {int(labels.max())}")
    was_training = model.training
    model.eval()
    try:
        step = batch_size or max(len(labels), 1)
        chunks = [_sample_batch(model, labels[i:i + step], cfg_scale, cfg_schedule, temperature, top_k, top_p,
                                generator, use_cache, guide) for i in range(0, len(labels), step)]
    finally:
        model.train(was_training)
    ids = torch.cat(chunks) if chunks else torch.zeros(0, config.seq_len, dtype=torch.long, device=device)
    return ids.view(-1, *config.grid)  # (N, h, w)


def _sample_batch(model: GPT, labels: Tensor, cfg_scale: float, cfg_schedule: str, temperature: float,
                  top_k: int | None, top_p: float | None, generator: torch.Generator | None, use_cache: bool,
                  guide: bool) -> Tensor:
    """(B,) labels -> (B, T) ids, one token per step."""
    B, T = len(labels), model.seq_len
    rows = torch.cat([labels, torch.full_like(labels, model.null_class)]) if guide else labels  # (B or 2B,)
    ids = torch.zeros(B, T, dtype=torch.long, device=labels.device)  # (B, T)
    cache = model.init_cache(len(rows)) if use_cache else None
    for t in range(T):
        if cache is not None:
            hidden = model.forward_step(rows if t == 0 else _rows(ids[:, t - 1], guide), t, cache)  # (rows, dim)
        else:
            hidden = model.trunk(rows, _rows(ids[:, :t], guide))[:, -1]  # (rows, dim)
        logits = model.logits(hidden).float()  # (rows, K)
        if guide:
            cond, uncond = logits.chunk(2)
            logits = cfg_logits(cond, uncond, cfg_scale_at(t, T, cfg_scale, cfg_schedule))  # (B, K)
        ids[:, t] = _draw(logits, temperature, top_k, top_p, generator)
    return ids


def _rows(x: Tensor, guide: bool) -> Tensor:
    """The same ids for the conditional and the unconditional half of the batch."""
    return torch.cat([x, x]) if guide else x


def _draw(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> Tensor:
    """logits (B, K) fp32 -> (B,) ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = top_k_top_p_filter(logits / temperature, top_k, top_p).softmax(dim=-1)  # (B, K) fp32
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
