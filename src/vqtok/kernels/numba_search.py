"""Code search with a fused numba loop (CPU, fp32): the same results as kernels/search.py's chunked path.

For each block of FUSED_TOKENS tokens the loop runs over the codes, computes bias_k + z . (scale e_k) for the whole
block at once (vectorised across tokens) and keeps the running minimum in registers: no distance is ever written to
memory. At small D the dense and chunked paths are memory-bound (one distance written and read back per multiply-add
of work); here they cost nothing, so the loop wins up to a few tens of dims, where a blocked matmul takes over.
nearest code:       bias = ||e_k||^2, scale = -2  (argmin ||e_k||^2 - 2 z.e_k)
max inner product:  bias = 0,         scale = -1  (argmax z.e = argmin z.(-e), the same first-index tie rule)
Both scalings are exact in floating point. Ties resolve to the first index, like torch's argmin.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import Tensor

from .search import check_search_inputs, in_search_dtype, squared_norms

try:  # numba is a dependency, but the search must still work where it cannot be imported
    import numba
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None

FUSED_TOKENS = 128  # tokens per block of the fused loop: 8 AVX-512 registers of running best per code
_fused_lock = threading.Lock()  # numba's default threading layer must not be entered from two threads at once


@torch.no_grad()
def nearest_code_fused(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """z (N, D), codebook (K, D) on CPU, searched in fp32 -> (indices (N,) int64, squared distances (N,))."""
    check_search_inputs(z, codebook)
    z, codebook = in_search_dtype(z, codebook)
    code_sq, z_sq = squared_norms(codebook), squared_norms(z)  # (K,), (N,)
    index, best = _fused_argmin(z, codebook, -2.0, code_sq)
    return index, z_sq + best


@torch.no_grad()
def max_inner_product_fused(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """z (N, D), codebook (K, D) on CPU, searched in fp32 -> (indices (N,) int64, values (N,))."""
    check_search_inputs(z, codebook)
    z, codebook = in_search_dtype(z, codebook)
    index, best = _fused_argmin(z, codebook, -1.0, codebook.new_zeros(codebook.shape[0]))
    return index, -best


def _fused_argmin(z: Tensor, codebook: Tensor, scale: float, bias: Tensor) -> tuple[Tensor, Tensor]:
    """argmin_k bias_k + z . (scale e_k) per token with the numba loop; z (N, D), codebook (K, D), bias (K,) fp32
    CPU. scale is -2 or -1: exact in floating point."""
    if numba is None:
        raise RuntimeError("the fused search needs numba, which cannot be imported here")
    N, D = z.shape
    groups = -(-D // 8)
    blocks = -(-N // FUSED_TOKENS)
    # Tokens laid out (block, group of 8 dims, dim, token): one register holds one dim of 16 tokens.
    padded = z.new_zeros(blocks * FUSED_TOKENS, groups * 8)
    padded[:N, :D] = z
    zt = padded.view(blocks, FUSED_TOKENS, groups, 8).permute(0, 2, 3, 1).contiguous()  # (B, G, 8, T)
    scaled_codes = codebook.new_zeros(codebook.shape[0], groups * 8)  # zero dims add exactly 0
    scaled_codes[:, :D] = codebook
    scaled_codes.mul_(scale)
    index = torch.empty(blocks * FUSED_TOKENS, dtype=torch.int64)
    best = torch.empty(blocks * FUSED_TOKENS, dtype=torch.float32)
    kernel = _fused_argmin_one_group if groups == 1 else _fused_argmin_groups
    threads = torch.get_num_threads()
    with _fused_lock:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        kernel(zt.numpy(), scaled_codes.numpy(), bias.contiguous().numpy(), index.numpy(), best.numpy())
    # numba's OpenMP layer shares torch's libgomp, and starting its pool sets the process's OpenMP thread count to
    # NUMBA_NUM_THREADS: torch would then run with a different thread count from here on, and a different count sums
    # conv gradients in another order, so runs would stop repeating. Put torch's count back.
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return index[:N], best[:N]


if numba is not None:
    _T = FUSED_TOKENS  # a compile-time constant inside the kernels

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _fused_argmin_one_group(zt, weight, bias, out_index, out_best):  # pragma: no cover - compiled code
        """D <= 8: zt (B, 1, 8, T), weight (K, 8), bias (K,). The score of a code for T tokens stays in registers;
        only the running best is written, and only where it improves."""
        K = weight.shape[0]
        for b in numba.prange(zt.shape[0]):
            zg = zt[b, 0]
            z0, z1, z2, z3, z4, z5, z6, z7 = zg[0], zg[1], zg[2], zg[3], zg[4], zg[5], zg[6], zg[7]
            best = np.full(_T, np.inf, np.float32)
            arg = np.zeros(_T, np.int64)
            for k in range(K):
                e = weight[k]
                e0, e1, e2, e3, e4, e5, e6, e7 = e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]
                bk = bias[k]
                for t in range(_T):  # vectorised across tokens
                    s = bk + (z0[t] * e0 + z1[t] * e1 + z2[t] * e2 + z3[t] * e3
                              + z4[t] * e4 + z5[t] * e5 + z6[t] * e6 + z7[t] * e7)
                    if s < best[t]:  # strict: the first index wins ties, as torch's argmin
                        best[t] = s
                        arg[t] = k
            out_index[b * _T:(b + 1) * _T] = arg
            out_best[b * _T:(b + 1) * _T] = best

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _fused_argmin_groups(zt, weight, bias, out_index, out_best):  # pragma: no cover - compiled code
        """D > 8: zt (B, G, 8, T), weight (K, 8 G), bias (K,). Scores accumulate 8 dims at a time in a T-vector
        that stays in L1, then update the running best."""
        K, G = weight.shape[0], zt.shape[1]
        for b in numba.prange(zt.shape[0]):
            best = np.full(_T, np.inf, np.float32)
            arg = np.zeros(_T, np.int64)
            acc = np.empty(_T, np.float32)
            for k in range(K):
                e = weight[k]
                bk = bias[k]
                for t in range(_T):
                    acc[t] = bk
                for g in range(G):
                    zg = zt[b, g]
                    z0, z1, z2, z3, z4, z5, z6, z7 = zg[0], zg[1], zg[2], zg[3], zg[4], zg[5], zg[6], zg[7]
                    o = 8 * g
                    e0, e1, e2, e3 = e[o], e[o + 1], e[o + 2], e[o + 3]
                    e4, e5, e6, e7 = e[o + 4], e[o + 5], e[o + 6], e[o + 7]
                    for t in range(_T):
                        acc[t] += (z0[t] * e0 + z1[t] * e1 + z2[t] * e2 + z3[t] * e3
                                   + z4[t] * e4 + z5[t] * e5 + z6[t] * e6 + z7[t] * e7)
                for t in range(_T):
                    if acc[t] < best[t]:
                        best[t] = acc[t]
                        arg[t] = k
            out_index[b * _T:(b + 1) * _T] = arg
            out_best[b * _T:(b + 1) * _T] = best
