"""Generators trained on a tokenizer's output: ar (a class-conditional GPT over token ids) and its sampler."""

from .ar import GPT, PRESETS, GPTConfig, KVCache, count_parameters, get_preset
from .sample import balanced_labels, cfg_logits, cfg_scale_at, sample, top_k_top_p_filter

__all__ = [
    "GPT", "PRESETS", "GPTConfig", "KVCache", "count_parameters", "get_preset",
    "balanced_labels", "cfg_logits", "cfg_scale_at", "sample", "top_k_top_p_filter",
]
