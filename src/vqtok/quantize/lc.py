"""lc: VQGAN-LC (Zhu et al., NeurIPS 2024, arXiv 2406.11837).

The codebook C (K, F) holds k-means centres of features from a pre-trained vision encoder (`vqtok codebook build`)
and stays FROZEN; only a projector P = Linear(F -> D) with bias is trained (weight ~ N(0, D^-0.5), as the released
code). The projected codebook P(C) is recomputed every forward, so every code moves whenever P does: that is why
99.9% of 100,000 codes stay in use. Lookup is squared L2 between z and P(C) (the paper's text says cosine; the code
is L2); straight-through; L_Q = 1.0 * ||sg(e) - z||^2 + 0.33 * ||e - sg(z)||^2, the second term training P.

Choice (`standardize=True`, the default): the features are centred and scaled to unit mean norm when the quantizer
is built. That affine map is absorbed exactly by the Linear projector (bias and weight), so the method and what it
can learn are unchanged; only the starting point moves. The released code projects raw CLIP features; with
other encoders the raw scale is arbitrary (efficientnet-lite0 features have norm ~50), and then every projected code
starts far from the encoder's outputs and almost none is used at initialisation. `standardize=False` reproduces the
released code.

Lookup: in training P(C) changes every step, so each forward searches it afresh; in evaluation it stays fixed from
batch to batch, so the search is given a key naming its current state and the kernel registry may reuse work
across calls (an exact k-d tree built once at low D, answering each token in about log K steps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.codebook_file import read_codebook_file
from ..kernels import nearest_code
from .base import Quantizer, register, straight_through, two_sided_loss


def standardized(features: Tensor) -> Tensor:
    """Features centred and scaled so the mean row norm is 1 (computed in float64 for 1,000,000 x 1,024 tables)."""
    centred = features.double() - features.double().mean(dim=0)
    scale = centred.norm(dim=1).mean().clamp_min(1e-12)
    return (centred / scale).float().contiguous()


@register("lc")
class LCQuantizer(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        codebook: Tensor | str | Path | None = None,
        codebook_dim: int | None = None,
        commitment_weight: float = 1.0,
        codebook_weight: float = 0.33,
        standardize: bool = True,
    ) -> None:
        """codebook: a (K, F) tensor or a .safetensors path; None builds an empty (K, codebook_dim) buffer that
        `load_state_dict` fills (how a saved tokenizer is rebuilt without the original file). standardize: centre the
        features and scale them to unit mean norm (see the module docstring)."""
        super().__init__(codebook_size, dim)
        features = self._initial_codebook(codebook, codebook_size, codebook_dim)  # (K, F)
        self.standardize = bool(standardize)
        if self.standardize and codebook is not None:
            features = standardized(features)
        self.commitment_weight = float(commitment_weight)
        self.codebook_weight = float(codebook_weight)
        self.register_buffer("codebook", features)  # frozen: a buffer, never a parameter
        self.projector = nn.Linear(features.shape[1], dim, bias=True)
        nn.init.normal_(self.projector.weight, std=dim**-0.5)
        # Only this quantizer holds this object, so no other codebook's key can equal this one's (see _state_key).
        self._key_owner = object()

    @staticmethod
    def _initial_codebook(codebook: Tensor | str | Path | None, K: int, codebook_dim: int | None) -> Tensor:
        if codebook is None:
            if codebook_dim is None:
                raise ValueError("lc needs `codebook=` (a (K, F) tensor or a .safetensors path from "
                                 "`vqtok codebook build`), or `codebook_dim=F` when the weights come from a state_dict")
            return torch.zeros(K, int(codebook_dim))
        if isinstance(codebook, (str, Path)):
            codebook, _ = read_codebook_file(codebook)
        if not isinstance(codebook, Tensor) or codebook.dim() != 2:
            raise ValueError(f"lc's codebook must be a 2-d (K, F) tensor, got {type(codebook).__name__} "
                             f"{tuple(getattr(codebook, 'shape', ()))}")
        if codebook.shape[0] != K:
            raise ValueError(f"the codebook holds {codebook.shape[0]} codes but codebook_size={K}; "
                             f"pass codebook_size={codebook.shape[0]} or build a codebook with --size {K}")
        if codebook_dim is not None and codebook.shape[1] != codebook_dim:
            raise ValueError(f"codebook_dim={codebook_dim} disagrees with the codebook's {codebook.shape[1]} features")
        if not torch.isfinite(codebook).all():
            raise ValueError("the codebook holds NaN or infinite values; rebuild it")
        return codebook.detach().float().contiguous().clone()

    def extra_config(self) -> dict[str, Any]:
        return {
            "codebook_dim": int(self.codebook.shape[1]),
            "commitment_weight": self.commitment_weight,
            "codebook_weight": self.codebook_weight,
            "standardize": self.standardize,
        }

    def codebook_vectors(self) -> Tensor:
        return F.linear(self.codebook, self.projector.weight.float(), self.projector.bias.float())  # (K, D) = P(C)

    def _state_key(self) -> tuple[object, ...]:
        """The frozen_key of P(C) for the kernel registry. It changes with most writes to the codebook or the
        projector (an optimiser step, load_state_dict and in-place edits bump a version counter; moving or
        re-assigning them changes a data pointer), but not with all (a fused Adam step, writes through `.data`):
        the k-d tree cache therefore also compares P(C) itself before it reuses a tree (kernels/kdtree.py). torch
        has no public accessor for the version counter, hence `_version`. The owner object keeps keys of different
        quantizers apart (their tensors can reuse freed memory, so pointers and counters alone could coincide)."""
        tensors = (self.codebook, self.projector.weight, self.projector.bias)
        return (self._key_owner, *((t.device, t.dtype, t.data_ptr(), t._version) for t in tensors))

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        projected = self.codebook_vectors()  # (K, D), recomputed every forward
        frozen_key = None if self.training else self._state_key()  # P(C) stays put between evaluation batches
        indices, _ = nearest_code(z.detach(), projected.detach(), frozen_key=frozen_key)  # (N,)
        codes = F.embedding(indices, projected)  # (N, D), gradient reaches the projector
        loss, terms = two_sided_loss(z, codes, self.commitment_weight, self.codebook_weight)
        return straight_through(z, codes), indices, loss, terms
