"""Code search: the nearest code (squared L2) and the maximum inner product, for every token.

Every quantizer looks codes up through these two functions, so a faster search changes no method.
This is the plain dense version; the chunked kernels replace the bodies (see the large-codebook kernels issue).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def nearest_code(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """z (N, D), codebook (K, D) -> (indices (N,) int64, squared distances (N,)) of argmin_k ||z_n - e_k||^2."""
    _check(z, codebook)
    # ||z||^2 - 2 z.e + ||e||^2, the same expansion the reference code uses.
    dist = z.pow(2).sum(1, keepdim=True) - 2.0 * (z @ codebook.T) + codebook.pow(2).sum(1)  # (N, K)
    best, index = dist.min(dim=1)
    return index, best


@torch.no_grad()
def max_inner_product(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """z (N, D), codebook (K, D) -> (indices (N,) int64, values (N,)) of argmax_k z_n . e_k."""
    _check(z, codebook)
    best, index = (z @ codebook.T).max(dim=1)  # (N, K) -> (N,)
    return index, best


def _check(z: Tensor, codebook: Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
