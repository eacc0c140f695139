"""fc: factorized codes (ViT-VQGAN, Yu et al. 2022; the VQGAN-FC baseline of VQGAN-LC).

The factorization itself is the tokenizer's quant_conv, which maps the encoder's z_channels down to a low
dimension (8 by default in the presets) before this quantizer; the codebook lives in that low dimension and is
trained as in `vq`. `l2_norm=True` normalises both z and the codes (argmin L2 = argmax cosine), as ViT-VQGAN and
LlamaGen do; VQGAN-LC's FC baseline does not normalise, so the default is off.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from .base import register
from .vq import VectorQuantizer


@register("fc")
class FactorizedQuantizer(VectorQuantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        l2_norm: bool = False,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.33,
    ) -> None:
        super().__init__(codebook_size, dim, commitment_weight=commitment_weight, codebook_weight=codebook_weight)
        self.l2_norm = bool(l2_norm)

    def extra_config(self) -> dict[str, Any]:
        return {**super().extra_config(), "l2_norm": self.l2_norm}

    def codebook_vectors(self) -> Tensor:
        codebook = self.codebook.float()
        return F.normalize(codebook, dim=1) if self.l2_norm else codebook

    def lookup_space(self, z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
        return (F.normalize(z, dim=1) if self.l2_norm else z), codebook
