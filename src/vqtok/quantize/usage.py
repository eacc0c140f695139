"""CodeUsage: the exact histogram of code indices over every token seen (never a rolling window).

Utilization = codes hit at least once / K. A large K scores lower when there are few tokens per code, so every
summary carries the token count and the perplexity exp(H(counts / tokens)) beside it. Under data parallelism the
histograms are summed over ranks (all_reduce), never sampled.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.distributed import all_reduce_sum_, is_distributed


class CodeUsage:
    """`usage.update(indices)` per batch; `usage.all_reduce()` gives the histogram summed over ranks."""

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = int(codebook_size)
        self.counts = torch.zeros(self.codebook_size, dtype=torch.int64)  # (K,), on the device of the indices

    def update(self, indices: Tensor) -> "CodeUsage":
        """Count every index in `indices` (any shape, integer, in [0, K))."""
        if indices.is_floating_point() or indices.is_complex():
            raise TypeError(f"indices must be integers, got {indices.dtype}")
        flat = indices.detach().reshape(-1).long()
        if flat.numel() == 0:
            return self
        if self.counts.device != flat.device:
            self.counts = self.counts.to(flat.device)
        if flat.device.type == "cpu":
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= self.codebook_size:
                raise ValueError(f"indices must lie in [0, {self.codebook_size}), got values in [{low}, {high}]")
            self.counts += torch.bincount(flat, minlength=self.codebook_size)
        else:  # no host sync on an accelerator (bincount reads the max to size its output); a bad index asserts there
            self.counts.index_add_(0, flat, torch.ones_like(flat))
        return self

    def all_reduce(self) -> "CodeUsage":
        """A new CodeUsage holding the counts summed over all ranks (a copy when not distributed).
        Collective: every rank must call it. `self` is left as it was, so calling it twice never double-counts."""
        counts = self.counts.clone()
        if is_distributed():
            if dist.get_backend() == "nccl" and counts.device.type != "cuda":
                counts = counts.cuda()
            all_reduce_sum_(counts)
        total = CodeUsage(self.codebook_size)
        total.counts = counts.to(self.counts.device)
        return total

    @property
    def tokens(self) -> int:
        return int(self.counts.sum())

    def utilization(self) -> float:
        """Fraction of codes used at least once (0.0 before any token)."""
        return int((self.counts > 0).sum()) / self.codebook_size

    def perplexity(self) -> float:
        """exp of the entropy of the usage distribution: K when uniform, 1 when one code takes all (0.0 before any token)."""
        total = self.tokens
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0].double() / total
        return math.exp(float(-(p * p.log()).sum()))

    def dead_codes(self) -> Tensor:
        """Indices (int64) of the codes never used."""
        return torch.nonzero(self.counts == 0).reshape(-1).cpu()

    def summary(self) -> dict[str, float | int]:
        """The usage keys of metrics.json."""
        return {
            "utilization": self.utilization(),
            "perplexity": self.perplexity(),
            "tokens": self.tokens,
            "tokens_per_code": self.tokens / self.codebook_size,
            "codebook_size": self.codebook_size,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"codebook_size": self.codebook_size, "counts": self.counts.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["codebook_size"]) != self.codebook_size:
            raise ValueError(f"state holds a histogram of {state['codebook_size']} codes, this CodeUsage has "
                             f"{self.codebook_size}")
        self.counts = state["counts"].to(self.counts.device, torch.int64).clone()

    def __repr__(self) -> str:
        return (f"CodeUsage(codebook_size={self.codebook_size}, tokens={self.tokens}, "
                f"utilization={self.utilization():.4f}, perplexity={self.perplexity():.1f})")
