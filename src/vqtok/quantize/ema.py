"""ema: VQGAN-EMA, a codebook updated by exponential moving averages instead of gradients (van den Oord et al. 2017).

After each training forward: n_k <- d n_k + (1-d) count_k, m_k <- d m_k + (1-d) sum_{z assigned to k} z,
Laplace smoothing n_k' = (n_k + eps) / (sum n + K eps) * sum n, e_k = m_k / n_k' (d = 0.99, eps = 1e-5).
The loss is the commitment term only. Initialisation follows taming's EmbeddingEMA (codes ~ N(0, 1),
m = codes, n = 0).

Choices: updates happen only in training mode (the reference also updated during
evaluation, a bug); under torch.distributed the counts and sums are all-reduced before the update, so every rank
holds the same codebook. The update uses the codes chosen before it, so the returned z_q and loss belong to the
codebook the step started with. commitment_weight defaults to 1.0, the commitment weight of vq and lc, so that the
baselines differ only in how the codebook learns (taming's EMAVectorQuantizer configs use 0.25).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.distributed import all_reduce_sum_
from ..kernels import nearest_code
from .base import Quantizer, register, straight_through


@register("ema")
class EMAQuantizer(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 1.0,
    ) -> None:
        super().__init__(codebook_size, dim)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        codebook = torch.randn(codebook_size, dim)
        self.register_buffer("codebook", codebook)  # (K, D) e_k
        self.register_buffer("cluster_size", torch.zeros(codebook_size))  # (K,) n_k
        self.register_buffer("embed_sum", codebook.clone())  # (K, D) m_k

    def extra_config(self) -> dict[str, Any]:
        return {"decay": self.decay, "eps": self.eps, "commitment_weight": self.commitment_weight}

    def codebook_vectors(self) -> Tensor:
        return self.codebook.float()

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        indices, _ = nearest_code(z.detach(), self.codebook)  # (N,)
        codes = F.embedding(indices, self.codebook)  # (N, D), no gradient: a buffer
        commitment = F.mse_loss(codes, z)
        if self.training:
            self.ema_update(z.detach(), indices)
        return straight_through(z, codes), indices, self.commitment_weight * commitment, {
            "commitment": commitment.detach()
        }

    @torch.no_grad()
    def ema_update(self, z: Tensor, indices: Tensor) -> None:
        """One EMA step from this batch's assignments (all-reduced across ranks when distributed)."""
        K = self.codebook_size
        counts = torch.bincount(indices, minlength=K).to(self.cluster_size.dtype)  # (K,)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, z.to(self.embed_sum.dtype))  # (K, D)
        all_reduce_sum_(counts)
        all_reduce_sum_(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + K * self.eps) * total  # Laplace smoothing
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))
