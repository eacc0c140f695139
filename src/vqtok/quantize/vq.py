"""vq: taming VQGAN's vector quantizer (van den Oord et al. 2017; Esser et al. 2021).

Trainable codebook initialised uniform(-1/K, 1/K); index k* = argmin_k ||z - e_k||^2; straight-through
z_q = z + sg(e_k* - z); loss = commitment_weight * ||sg(e) - z||^2 + codebook_weight * ||e - sg(z)||^2 with
VQGAN-LC's weights 1.0 and 0.33 (taming's "legacy" placement; see taming #57 for why neither is called beta here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import nearest_code
from .base import Quantizer, register, straight_through, two_sided_loss


@register("vq")
class VectorQuantizer(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.33,
    ) -> None:
        super().__init__(codebook_size, dim)
        self.commitment_weight = float(commitment_weight)
        self.codebook_weight = float(codebook_weight)
        bound = 1.0 / codebook_size
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-bound, bound))  # (K, D)

    def extra_config(self) -> dict[str, Any]:
        return {"commitment_weight": self.commitment_weight, "codebook_weight": self.codebook_weight}

    def codebook_vectors(self) -> Tensor:
        return self.codebook.float()

    def lookup_space(self, z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
        """The space the search runs in; fc overrides this to l2-normalise both sides."""
        return z, codebook

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        z, codebook = self.lookup_space(z, self.codebook_vectors())  # (N, D), (K, D)
        indices, _ = nearest_code(z.detach(), codebook.detach())  # (N,)
        codes = F.embedding(indices, codebook)  # (N, D), gradient flows to the codebook rows used
        loss, terms = two_sided_loss(z, codes, self.commitment_weight, self.codebook_weight)
        return straight_through(z, codes), indices, loss, terms
