"""The IBQ step (index backpropagation with the entropy penalty): its result type and its dense reference.

For tokens z (N, D) and a codebook E (K, D): logits l = z E^T, p = softmax(l), k* = argmax l, h = onehot(k*).
With the index straight-through Ind = h - sg(p) + p, z_q = Ind E has the forward value e_k* exactly, and through p
every code receives gradient. The entropy penalty uses q = softmax(l / T): the sample entropy mean_n H(q_n) and the
codebook entropy H(mean_n q_n), where, as in SEED-Voken's reference code, H(mean q) = -sum_k a_k log(a_k + 1e-5)
with a = mean_n q_n, so unused codes keep a finite gradient. The step also returns the hard path h E (value e_k*,
gradient only to the rows k* of E), which the quantizer's codebook loss term uses.

`ibq_dense` computes all of it with dense (N, K) tensors and torch's autograd: the reference every other IBQ
backend (kernels/chunked_ibq.py) must match in values and gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

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


def entropy_grad_scales(entropy: bool, grad_sample: Tensor | None, grad_codebook: Tensor | None, n_tokens: int,
                        temperature: float, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """(alpha, beta) for a backward pass: the upstream gradients of the mean sample entropy and of the codebook
    entropy, each times 1 / (N T), the factor every logit's entropy gradient carries; (None, None) when the entropies
    were not computed or get no gradient. Scalars of like's dtype and device."""
    if not entropy or (grad_sample is None and grad_codebook is None):
        return None, None
    scale = 1.0 / (n_tokens * temperature)
    zero = like.new_zeros(())
    alpha = (zero if grad_sample is None else grad_sample.to(like.dtype)) * scale
    beta = (zero if grad_codebook is None else grad_codebook.to(like.dtype)) * scale
    return alpha, beta
