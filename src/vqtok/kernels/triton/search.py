"""Code search in Triton: the nearest code (squared L2) and the maximum inner product, with no (N, K) tensor.

- `nearest_code_triton` must equal `nearest_code_chunked` (kernels/search.py): argmin_k ||e_k||^2 - 2 z_n . e_k,
  then ||z_n||^2 added to the best score, the norms computed by the same `squared_norms`, so the distance is the
  chunked path's to matmul rounding.
- `max_inner_product_triton` must equal `max_inner_product_chunked`: argmax_k z_n . e_k and its value.
Ties go to the lowest index, like torch's argmin/argmax.

Kernel: one program per (token block, code split), a 2-D grid of cdiv(N, BLOCK_N) x n_splits, so that N = 4096
alone still fills a GPU's SMs. A program scans its split's codes in tiles of BLOCK_K: the scores of its BLOCK_N
tokens against a tile are tl.dot products accumulated over D in slices of BLOCK_D (D padded to a power of two >= 16
by masked loads), plus the precomputed ||e||^2 for L2; it keeps a running (best value, best index) per token (within
a tile the lowest index among equal values; across tiles a strictly better value, or an equal one with a lower
index) and writes it to partial results (n_splits, N). `_merge` (torch) then takes per token the best value over the
splits, the lowest index on ties. Masks handle ragged N, K, D; an empty split writes +-inf and index 2^31 - 1,
which loses every tie.

Precision: fp32 inputs and fp32 accumulators. tl.dot's input_precision follows
torch.get_float32_matmul_precision(): "highest" -> "ieee" (exact fp32 products, like cuBLAS without TF32), "high"
and "medium" -> "tf32" (like torch.backends.cuda.matmul.allow_tf32 = True). bf16/fp16 inputs are upcast to fp32
first (`search_dtype`: codes picked from rounded distances would differ); float64 inputs are not searched here (the
registry leaves them to the chunked path), and `_search` refuses them.

Configs: under TRITON_INTERPRET=1 (tests on the CPU; the interpreter is sequential numpy and ignores
input_precision) one small fixed config; on a GPU @triton.autotune over a few (BLOCK_N, BLOCK_K, warps, stages),
keyed on D and power-of-two buckets of N and K.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..search import check_search_inputs, in_search_dtype, search_dtype, squared_norms
from . import interpreting, split_count

INTERPRET = interpreting()  # read once: triton.jit below decides between the compiler and the interpreter now
NO_INDEX = 2**31 - 1  # the index an empty split reports; it loses every tie
_NO_INDEX = tl.constexpr(NO_INDEX)  # the same, readable inside kernels
INTERPRET_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 32}  # the one config under the interpreter (small tiles: fast tests)
# How many programs to aim for per SM, and the fewest codes a split scans (fewer make the merge dominate).
ONE_SLICE_MAX_D = 64  # up to this D (padded to a power of two >= 16) a token tile is loaded once, in one slice
SLICE_D = 32  # beyond it D is consumed in slices of this many dims


def _configs() -> list[triton.Config]:
    sizes = [(64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (32, 128, 4, 4), (16, 128, 4, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in sizes]


@triton.jit
def _search_kernel(
    z_ptr, e_ptr, bias_ptr, out_value_ptr, out_index_ptr,
    N, K, D, n_splits, stride_z, stride_e,
    N_BUCKET, K_BUCKET,  # autotuning keys only
    LARGEST: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, D_BLOCKS: tl.constexpr,
):
    """Program (token block, split): the best over the split's codes of bias_k - 2 z.e_k (L2) or z.e_k (LARGEST)
    for each of its tokens -> out_value[split, tokens], out_index[split, tokens]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    per_split = tl.cdiv(tl.cdiv(K, n_splits), BLOCK_K) * BLOCK_K  # a whole number of tiles
    k_start = split * per_split
    k_end = tl.minimum(k_start + per_split, K)
    if LARGEST:
        fill = float("-inf")
    else:
        fill = float("inf")
    best = tl.full((BLOCK_N,), fill, tl.float32)
    best_index = tl.full((BLOCK_N,), _NO_INDEX, tl.int32)
    if D_BLOCKS == 1:  # the whole (padded) D in one slice: the token tile stays in registers
        z_all = tl.load(z_ptr + rows[:, None] * stride_z + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :],
                        other=0.0)  # (BLOCK_N, BLOCK_D)
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        code_ok = codes < k_end
        if D_BLOCKS == 1:
            e = tl.load(e_ptr + codes[:, None] * stride_e + dims[None, :],
                        mask=code_ok[:, None] & (dims < D)[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
            acc = tl.dot(z_all, tl.trans(e), input_precision=PRECISION)  # (BLOCK_N, BLOCK_K)
        else:  # D in slices of BLOCK_D, the inner (pipelined) loop
            acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + dims
                d_ok = d < D
                z = tl.load(z_ptr + rows[:, None] * stride_z + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                            other=0.0)  # (BLOCK_N, BLOCK_D)
                e = tl.load(e_ptr + codes[:, None] * stride_e + d[None, :],
                            mask=code_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
                acc = tl.dot(z, tl.trans(e), acc, input_precision=PRECISION)  # (BLOCK_N, BLOCK_K)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + codes, mask=code_ok, other=0.0)  # (BLOCK_K,)
            scores = bias[None, :] - 2.0 * acc
        else:
            scores = acc
        scores = tl.where(code_ok[None, :], scores, fill)
        if LARGEST:
            tile_best = tl.max(scores, axis=1)  # (BLOCK_N,)
        else:
            tile_best = tl.min(scores, axis=1)
        at_best = scores == tile_best[:, None]
        tile_index = tl.min(tl.where(at_best, codes[None, :], _NO_INDEX), axis=1)  # lowest index among equals
        if LARGEST:
            better = tile_best > best
        else:
            better = tile_best < best
        better = better | ((tile_best == best) & (tile_index < best_index))
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index, best_index)
    tl.store(out_value_ptr + split * N + rows, best, mask=row_ok)
    tl.store(out_index_ptr + split * N + rows, best_index, mask=row_ok)


_search_tuned = _search_kernel if INTERPRET else triton.autotune(
    configs=_configs(), key=["D", "N_BUCKET", "K_BUCKET", "LARGEST", "PRECISION"])(_search_kernel)


def input_precision() -> str:
    """tl.dot's input_precision for fp32 inputs, from torch.get_float32_matmul_precision() (see the docstring)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _merge(values: Tensor, indices: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    """Per token the best value over the splits, the lowest index on ties: (S, N), (S, N) int32 -> (N,) int64,
    (N,)."""
    best = values.amax(dim=0) if largest else values.amin(dim=0)  # (N,)
    index = torch.where(values == best, indices, NO_INDEX).amin(dim=0)  # (N,)
    return index.long(), best


def _bucket(n: int) -> int:
    return max(int(n), 1).bit_length()  # power-of-two bucket for autotuning


def _search(z: Tensor, codebook: Tensor, bias: Tensor | None, largest: bool,
            splits: int | None) -> tuple[Tensor, Tensor]:
    """Best over k of bias_k - 2 z.e_k (bias given) or z.e_k, per token: z (N, D), codebook (K, D), fp32 and
    contiguous -> (indices (N,) int64, values (N,) fp32)."""
    if z.dtype != torch.float32 or codebook.dtype != torch.float32:
        raise ValueError(f"the triton search runs in fp32, got {z.dtype} and {codebook.dtype}")
    N, D = z.shape
    K = codebook.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.int64, device=z.device), torch.zeros(0, dtype=z.dtype, device=z.device)
    n_splits = int(splits) if splits else split_count(N, K, z.device)
    if n_splits < 1:
        raise ValueError(f"splits must be a positive integer, got {splits}")
    block_d = max(16, triton.next_power_of_2(D))
    block_d = block_d if block_d <= ONE_SLICE_MAX_D else SLICE_D
    values = torch.empty(n_splits, N, dtype=torch.float32, device=z.device)  # (S, N)
    indices = torch.empty(n_splits, N, dtype=torch.int32, device=z.device)  # (S, N)
    args = (z, codebook, bias if bias is not None else codebook, values, indices, N, K, D, n_splits,
            z.stride(0), codebook.stride(0), _bucket(N), _bucket(K))
    meta = dict(LARGEST=largest, HAS_BIAS=bias is not None, PRECISION=input_precision(), BLOCK_D=block_d,
                D_BLOCKS=triton.cdiv(D, block_d))
    if INTERPRET:
        _search_tuned[(triton.cdiv(N, INTERPRET_BLOCKS["BLOCK_N"]), n_splits)](*args, **meta, **INTERPRET_BLOCKS)
    else:
        with torch.cuda.device(z.device):
            _search_tuned[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), n_splits)](*args, **meta)
    return _merge(values, indices, largest)


@torch.no_grad()
def nearest_code_triton(z: Tensor, codebook: Tensor, splits: int | None = None) -> tuple[Tensor, Tensor]:
    """`nearest_code_chunked` in one Triton kernel: z (N, D), codebook (K, D) -> (indices (N,) int64, squared
    distances (N,) fp32). splits: code splits of the grid (default: `split_count`)."""
    check_search_inputs(z, codebook)
    if search_dtype(z, codebook) != torch.float32:
        raise ValueError("the triton search does not take float64 inputs: use the chunked or dense backend")
    z, codebook = in_search_dtype(z, codebook)
    if z.shape[0] == 0:
        return _search(z, codebook, None, False, splits)
    code_sq, z_sq = squared_norms(codebook), squared_norms(z)  # (K,), (N,)
    index, best = _search(z, codebook, code_sq, False, splits)
    return index, z_sq + best


@torch.no_grad()
def max_inner_product_triton(z: Tensor, codebook: Tensor, splits: int | None = None) -> tuple[Tensor, Tensor]:
    """`max_inner_product_chunked` in one Triton kernel: z (N, D), codebook (K, D) -> (indices (N,) int64, values
    (N,) fp32). splits: code splits of the grid (default: `split_count`)."""
    check_search_inputs(z, codebook)
    if search_dtype(z, codebook) != torch.float32:
        raise ValueError("the triton search does not take float64 inputs: use the chunked or dense backend")
    z, codebook = in_search_dtype(z, codebook)
    return _search(z, codebook, None, True, splits)
