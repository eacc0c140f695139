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

The training step (softmax, index straight-through, entropies) is the kernel registry's "ibq_step" operation
(vqtok.kernels): a dense reference and a chunked autograd Function with the same values and gradients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..kernels import IBQResult
from .base import Quantizer, register


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
        ("paper"); entropy_weight 0 disables the entropy penalty. kernel: the backend of the training step, any
        name of `vqtok.kernels.backends("ibq_step")` ("chunked": no (N, K) tensor; "dense": the reference) or
        "auto" (the registry's choice: dense while N x K is small, chunked beyond). It is passed to the kernel
        registry as each call's backend preference, the same forcing as `with vqtok.kernels.use("ibq_step", name)`,
        which overrides it; saved configs carry it. Evaluation's lookup (a max inner product) does not use it."""
        super().__init__(codebook_size, dim)
        if loss_convention not in ("code", "paper"):
            raise ValueError(f"loss_convention must be 'code' (SEED-Voken) or 'paper' (Eq. 10), got {loss_convention!r}")
        if entropy_temperature <= 0:
            raise ValueError(f"entropy_temperature must be positive, got {entropy_temperature}")
        self.loss_convention = loss_convention
        self.reduced_weight = float(reduced_weight)
        self.entropy_weight = float(entropy_weight)
        self.entropy_temperature = float(entropy_temperature)
        try:
            kernels.check_backend("ibq_step", kernel)
        except ValueError as error:
            raise ValueError(f"ibq's kernel option: {error}") from None
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
        """The whole differentiable IBQ computation, through the kernel registry (backend: the kernel= option).
        Without the penalty the entropies are never read, so a backend may skip them (they can come back NaN)."""
        return kernels.ibq_step(z, codebook, temperature=self.entropy_temperature, entropy=self.entropy_weight > 0,
                                backend=self.kernel)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        codebook = self.codebook_vectors()  # (K, D)
        if self.training:
            # The step returns the hard path h E too: the chunked kernel adds its gradient into the same dE rows,
            # where a separate F.embedding would allocate a second dense (K, D) gradient (1 GiB at K = 2^20, D = 256).
            result = self.ibq_step(z, codebook)
            indices, z_q, hard = result.indices, result.z_q, result.hard
        else:
            indices, _ = kernels.max_inner_product(z.detach(), codebook.detach())
            z_q = hard = F.embedding(indices, codebook)
            result = None
        quant = F.mse_loss(z_q, z)
        commitment, codebook_term = F.mse_loss(hard.detach(), z), F.mse_loss(hard, z.detach())
        w_commit, w_codebook = (1.0, self.reduced_weight) if self.loss_convention == "code" else (self.reduced_weight, 1.0)
        loss = quant + w_commit * commitment + w_codebook * codebook_term
        terms = {"quant": quant.detach(), "commitment": commitment.detach(), "codebook": codebook_term.detach()}
        if result is not None and self.entropy_weight > 0:
            entropy = result.sample_entropy - result.codebook_entropy
            loss = loss + self.entropy_weight * entropy
            terms.update(sample_entropy=result.sample_entropy.detach(), codebook_entropy=result.codebook_entropy.detach())
        return z_q, indices, loss, terms
