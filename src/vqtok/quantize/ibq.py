"""ibq: Index Backpropagation Quantization (Shi et al., ICCV 2025, arXiv 2412.02692; code: SEED-Voken).

logits l = z E^T (dot product, temperature 1), p = softmax(l), k* = argmax l, h = onehot(k*).
Index straight-through Ind = h - sg(p) + p and z_q = Ind E: the forward value is exactly e_k*, and through p EVERY
code receives gradient (dl_k = p_k (g_k - <p, g>), g_k = dL/dz_q . e_k). There is no z + sg(e - z) pass-through:
the encoder learns from the decoder only through the softmax.

Loss ("double quantization"), with z_q' = h E the hard path:
  code  (default, SEED-Voken): mse(z_q, z) + mse(sg(z_q'), z) + 0.25 mse(z_q', sg(z))
  paper (Eq. 10):              mse(z_q, z) + 0.25 mse(sg(z_q'), z) + mse(z_q', sg(z))   (SEED-Voken #50, #60)
plus the entropy penalty on q = softmax(l / 0.01): 0.05 * (mean_n H(q_n) - H(mean_n q_n)), where, as in the
reference, H(mean q) uses log(mean q + 1e-5) so unused codes keep a finite gradient.

In eval mode the softmax is skipped (the reference returns h E there too): z_q = e_k*, the loss holds the three
quantization terms (their values equal training's) and no entropy term.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Quantizer, mse, register
from .search import max_inner_product

CODEBOOK_ENTROPY_EPS = 1e-5  # SEED-Voken's compute_entropy_loss: log(avg_probs + 1e-5)


class IBQResult(NamedTuple):
    z_q: Tensor  # (N, D): value e_k*, gradient of Ind E
    indices: Tensor  # (N,) int64
    sample_entropy: Tensor  # scalar: mean_n H(softmax(l_n / T))
    codebook_entropy: Tensor  # scalar: H(mean_n softmax(l_n / T))
    hard: Tensor  # (N, D): z_q' = h E, value e_k*, gradient only to the rows k* of E (the codebook loss term)


def ibq_dense(z: Tensor, codebook: Tensor, temperature: float = 0.01) -> IBQResult:
    """The IBQ step written with dense N x K tensors, exactly as the reference; the autograd reference for kernels."""
    logits = z @ codebook.T  # (N, K)
    p = logits.softmax(dim=1)  # (N, K)
    indices = logits.argmax(dim=1)  # (N,)
    # Ind E with Ind = h - sg(p) + p, written so the forward value is exactly e_k*: h E + (p - sg(p)) E.
    hard = F.embedding(indices, codebook)  # (N, D)
    z_q = hard + (p - p.detach()) @ codebook  # (N, D)
    log_q = (logits / temperature).log_softmax(dim=1)  # (N, K)
    q = log_q.exp()
    sample_entropy = -(q * log_q).sum(dim=1).mean()
    avg_q = q.mean(dim=0)  # (K,)
    codebook_entropy = -(avg_q * (avg_q + CODEBOOK_ENTROPY_EPS).log()).sum()
    return IBQResult(z_q, indices, sample_entropy, codebook_entropy, hard)


@register("ibq")
class IBQuantizer(Quantizer):
    def __init__(
        self,
        codebook_size: int,
        dim: int,
        loss_convention: str = "code",
        reduced_weight: float = 0.25,
        entropy_weight: float = 0.05,
        entropy_temperature: float = 0.01,
        kernel: str = "auto",
    ) -> None:
        """loss_convention: where `reduced_weight` sits, on the codebook term ("code") or the commitment term
        ("paper"); entropy_weight 0 disables the entropy penalty. kernel: "chunked" (ibq_kernel.py, no (N, K)
        tensor), "dense" (ibq_dense) or "auto" (dense while N x K is small, chunked beyond)."""
        super().__init__(codebook_size, dim)
        if loss_convention not in ("code", "paper"):
            raise ValueError(f"loss_convention must be 'code' (SEED-Voken) or 'paper' (Eq. 10), got {loss_convention!r}")
        if entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be positive, got {entropy_temperature}")
        self.loss_convention = loss_convention
        self.reduced_weight = float(reduced_weight)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        if kernel not in ("auto", "chunked", "dense"):
            raise ValueError(f"kernel must be 'auto', 'chunked' (no (N, K) tensor) or 'dense', got {kernel!r}")
        self.kernel = kernel
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim))  # (K, D) ~ N(0, 1)

    def extra_config(self) -> dict[str, Any]:
        return {
            "loss_convention": self.loss_convention,
            "reduced_weight": self.reduced_weight,
            "entropy_weight": self.entropy_weight,
            "entropy_temperature": self.entropy_temperature,
            "kernel": self.kernel,
        }

    def codebook_vectors(self) -> Tensor:
        return self.codebook.float()

    def ibq_step(self, z: Tensor, codebook: Tensor) -> IBQResult:
        """The whole differentiable IBQ computation, behind one call so a fused kernel can stand in for it."""
        from .ibq_kernel import DENSE_MAX_ELEMENTS, ibq_chunked  # imported here: ibq_kernel imports this module

        small = z.shape[0] * codebook.shape[0] <= DENSE_MAX_ELEMENTS
        if self.kernel == "dense" or (self.kernel == "auto" and small):
            return ibq_dense(z, codebook, self.entropy_temperature)
        # Without the penalty the entropies are never read: skip the pass and the terms they need (they come back NaN).
        return ibq_chunked(z, codebook, self.entropy_temperature, entropy=self.entropy_weight > 0)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        codebook = self.codebook_vectors()  # (K, D)
        if self.training:
            # The step returns the hard path h E too: the fused kernel adds its gradient into the same dE rows,
            # where a separate F.embedding would allocate a second dense (K, D) gradient (1 GiB at K = 2^20, D = 256).
            result = self.ibq_step(z, codebook)
            indices, z_q, hard = result.indices, result.z_q, result.hard
        else:
            indices, _ = max_inner_product(z.detach(), codebook.detach())
            z_q = hard = F.embedding(indices, codebook)
            result = None
        quant, commitment, codebook_term = mse(z_q, z), mse(hard.detach(), z), mse(hard, z.detach())
        w_commit, w_codebook = (1.0, self.reduced_weight) if self.loss_convention == "code" else (self.reduced_weight, 1.0)
        loss = quant + w_commit * commitment + w_codebook * codebook_term
        terms = {"quant": quant.detach(), "commitment": commitment.detach(), "codebook": codebook_term.detach()}
        if result is not None and self.entropy_weight > 0:
            entropy = result.sample_entropy - result.codebook_entropy
            loss = loss + self.entropy_weight * entropy
            terms.update(sample_entropy=result.sample_entropy.detach(), codebook_entropy=result.codebook_entropy.detach())
        return z_q, indices, loss, terms
