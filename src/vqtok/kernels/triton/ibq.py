"""The IBQ step in Triton: `ibq_triton` returns what `ibq_chunked` (kernels/chunked_ibq.py) returns, with the same
values and gradients to fp32 rounding, and no (N, K) tensor.

Notation as in chunked_ibq.py: logits l = z E^T, m = max_k l, k* = argmax l (lowest index on ties), p = softmax(l),
q = softmax(l / T), a = (l - m) / T, G = dL/dz_q, g = G E^T; exponents are floored at EXP_FLOOR (chunked_ibq.py),
so each kernel computes the same clamped sums as the chunked path.

Forward:
- row pass (`_row_kernel`, grid cdiv(N, BLOCK_N) x S code splits): a program takes BLOCK_N tokens and scans its
  split's codes in tiles of BLOCK_K. Per tile, l = tl.dot(z, e^T) (BLOCK_N, BLOCK_K), then an online softmax like
  FlashAttention's: running max m and its index (within a tile the lowest index among equal values, across tiles
  only a strictly larger max wins, so the lowest index stays), p_sum = sum exp(l - m) and y = sum exp(l - m) e
  (a tl.dot of the tile's exp(l - m) with its codes), both rescaled by exp(old m - new m) when m grows; with the
  entropy penalty also q_sum = sum exp(a) and qa_sum = sum exp(a) a (rescaled by exp(shift), shift = (old m - new
  m) / T: qa_sum -> exp(shift) (qa_sum + shift q_sum)). Each split writes its state to (S, N) [(S, N, D) for y];
  `_merge` (torch) combines the splits the same way (ties across splits: the lowest index) into k*, m,
  lse = m + log p_sum, y = p E, log q_sum and H(q_n) = log q_sum - qa_sum / q_sum.
- column pass (entropy only; `_column_kernel`, grid cdiv(K, BLOCK_K)): a program takes BLOCK_K codes and loops over
  all tokens in tiles of BLOCK_N, recomputing the logits and q = exp((l - m) / T - log q_sum): sum_n q_nk (K,).
  torch then forms v = mean_n q, H(v) = -sum v log(v + eps) and c = dH / dv.
Backward, with <p, g> = G . y (N,) (FlashAttention's Delta = rowsum(dO * O)), alpha = dL/dS / (N T),
beta = dL/dC / (N T), and (only where the codebook entropy has a gradient) <q_n, c> from `_q_dot_c_kernel` (grid
cdiv(N, BLOCK_N) x S, per split partial sums (S, N) added in torch):
    dl = p (g - <p, g>) - alpha q (log q + H(q_n)) + beta q (c - <q_n, c>)      (`_logit_grad`, per tile)
- `_dz_kernel` (grid cdiv(N, BLOCK_N) x S): dz = sum_k dl_k e_k over the split's codes -> (S, N, D), summed in torch;
- `_de_kernel` (grid cdiv(K, BLOCK_K)): dE_k = sum_n dl_nk z_n over all tokens;
- the one-hot paths (z_q's h and the hard path h E): dE_k* += G + G' by index_add_ in torch.
Every sum has one owner program or is a fixed-order torch sum: no atomics, deterministic.

The logits are recomputed in four kernels and the backward's log q mixes them with the forward's m and q_sum (a logit
difference d becomes d / T in log q), so every kernel computes them with the one function `_logits` on the same
tiles: token blocks at multiples of BLOCK_N, code tiles at multiples of BLOCK_K (a split spans whole tiles), one
(BLOCK_N, BLOCK_K, warps, stages) config for all kernels of a step (the row pass's, stored for the backward).

Precision: inputs fp32 (bf16/fp16 are upcast first, float64 is refused: the chunked path computes it), every
statistic and accumulator fp32. tl.dot's input_precision follows torch.get_float32_matmul_precision(): "highest"
-> "ieee" (exact fp32 products, like cuBLAS without TF32), "high" and "medium" -> "tf32" (like
torch.backends.cuda.matmul.allow_tf32 = True); it is read at the forward and kept for the backward.
D is padded to a power of two >= 16 by masked loads (a whole token or code row is one tile: tuned for D <= 256);
ragged N and K are masked.

Configs: under TRITON_INTERPRET=1 (tests on the CPU; the interpreter is sequential numpy, fp32, and ignores
input_precision) one small fixed config; on a GPU @triton.autotune picks the row pass's config among a few
(BLOCK_N, BLOCK_K, warps, stages), keyed on D, power-of-two buckets of N and K, the entropy flag and the precision.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..chunked_ibq import EXP_FLOOR
from ..ibq import CODEBOOK_ENTROPY_EPS, IBQResult, entropy_grad_scales
from . import interpreting, split_count

INTERPRET = interpreting()  # read once: triton.jit below decides between the compiler and the interpreter now
NO_INDEX = 2**31 - 1  # the index an empty split reports; it loses every tie
_NO_INDEX = tl.constexpr(NO_INDEX)
_FLOOR = tl.constexpr(EXP_FLOOR[torch.float32])
INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 32}  # the one config under the interpreter (small tiles: fast tests)


def _configs() -> list[triton.Config]:
    sizes = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in sizes]


# -- the equations on one (token tile, code tile) ---------------------------------------------------------------------
@triton.jit
def _logits(z, e, PRECISION: tl.constexpr):
    """l = z e^T: (BLOCK_N, BLOCK_D) x (BLOCK_K, BLOCK_D) -> (BLOCK_N, BLOCK_K). Every kernel's logits come from
    here, so the backward's equal the forward's bit for bit."""
    return tl.dot(z, tl.trans(e), input_precision=PRECISION)


@triton.jit
def _log_q(l, m, log_q_sum, inv_t):
    """log q = (l - m) / T - log q_sum, floored at EXP_FLOOR (BLOCK_N, BLOCK_K)."""
    return tl.maximum((l - m[:, None]) * inv_t - log_q_sum[:, None], _FLOOR)


@triton.jit
def _logit_grad(z, grad, e, tile_ok, c, m, lse, log_q_sum, row_term, p_dot_g, alpha, beta, inv_t,
                ENTROPY: tl.constexpr, PRECISION: tl.constexpr):
    """dL/dl on a tile (BLOCK_N, BLOCK_K), 0 outside tile_ok:
        dl = p (g - <p, g>) + q (-alpha log q + beta c + row_term),  row_term = -alpha H(q_n) - beta <q_n, c>."""
    l = _logits(z, e, PRECISION)
    g = tl.dot(grad, tl.trans(e), input_precision=PRECISION)  # (BLOCK_N, BLOCK_K)
    p = tl.exp(tl.maximum(l - lse[:, None], _FLOOR))
    dl = p * (g - p_dot_g[:, None])
    if ENTROPY:
        log_q = _log_q(l, m, log_q_sum, inv_t)
        dl += tl.exp(log_q) * (beta * c[None, :] + row_term[:, None] - alpha * log_q)
    return tl.where(tile_ok, dl, 0.0)


@triton.jit
def _split_range(split, n_splits, K, BLOCK_K: tl.constexpr):
    """Codes [start, end) of a split: whole tiles of BLOCK_K (the last split ends at K; a split may be empty)."""
    per_split = tl.cdiv(tl.cdiv(K, n_splits), BLOCK_K) * BLOCK_K
    start = split * per_split
    return start, tl.minimum(start + per_split, K)


# -- forward ----------------------------------------------------------------------------------------------------------
@triton.jit
def _row_kernel(
    z_ptr, e_ptr, m_ptr, index_ptr, p_sum_ptr, q_sum_ptr, qa_sum_ptr, y_ptr,
    N, K, D, n_splits, inv_t,
    N_BUCKET, K_BUCKET,  # autotuning keys only
    ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token block, split): the online softmax state of its tokens over the split's codes -> m, index,
    p_sum, q_sum, qa_sum at [split, tokens] (S, N) and y at [split, tokens, :] (S, N, D)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    dim_ok = dims < D
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)  # (BLOCK_N, BLOCK_D)
    k_start, k_end = _split_range(split, n_splits, K, BLOCK_K)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    index = tl.full((BLOCK_N,), _NO_INDEX, tl.int32)
    p_sum = tl.zeros((BLOCK_N,), tl.float32)
    q_sum = tl.zeros((BLOCK_N,), tl.float32)
    qa_sum = tl.zeros((BLOCK_N,), tl.float32)
    y = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        code_ok = codes < k_end
        e = tl.load(e_ptr + codes.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=code_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
        l = tl.where(code_ok[None, :], _logits(z, e, PRECISION), float("-inf"))  # (BLOCK_N, BLOCK_K)
        tile_max = tl.max(l, axis=1)  # (BLOCK_N,)
        tile_index = tl.min(tl.where(l == tile_max[:, None], codes[None, :], _NO_INDEX), axis=1)  # lowest of equals
        index = tl.where(tile_max > m, tile_index, index)  # an equal later max keeps the earlier (lower) index
        new_m = tl.maximum(m, tile_max)
        scale = tl.exp(m - new_m)  # 0 on the first tile (m = -inf), where every sum is still 0
        p = tl.exp(l - new_m[:, None])  # (BLOCK_N, BLOCK_K), 0 where masked
        p_sum = p_sum * scale + tl.sum(p, axis=1)
        y = y * scale[:, None] + tl.dot(p, e, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
        if ENTROPY:
            shift = tl.maximum((m - new_m) * inv_t, _FLOOR)  # <= 0, finite (the first tile's sums are 0)
            q_scale = tl.exp(shift)
            a = tl.maximum((l - new_m[:, None]) * inv_t, _FLOOR)  # (BLOCK_N, BLOCK_K)
            q = tl.where(code_ok[None, :], tl.exp(a), 0.0)
            qa_sum = q_scale * (qa_sum + shift * q_sum) + tl.sum(q * a, axis=1)
            q_sum = q_scale * q_sum + tl.sum(q, axis=1)
        m = new_m
    out = split * N + rows  # (BLOCK_N,) offsets into (S, N)
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(index_ptr + out, index, mask=row_ok)
    tl.store(p_sum_ptr + out, p_sum, mask=row_ok)
    if ENTROPY:
        tl.store(q_sum_ptr + out, q_sum, mask=row_ok)
        tl.store(qa_sum_ptr + out, qa_sum, mask=row_ok)
    tl.store(y_ptr + out.to(tl.int64)[:, None] * D + dims[None, :], y, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _column_kernel(
    z_ptr, e_ptr, m_ptr, log_q_sum_ptr, q_col_ptr, N, K, D, inv_t,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (code block): sum_n q_nk for its BLOCK_K codes -> q_col[codes] (K,)."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    code_ok = codes < K
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    e = tl.load(e_ptr + codes.to(tl.int64)[:, None] * D + dims[None, :], mask=code_ok[:, None] & dim_ok[None, :],
                other=0.0)  # (BLOCK_K, BLOCK_D)
    q_col = tl.zeros((BLOCK_K,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_D)
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        log_q_sum = tl.load(log_q_sum_ptr + rows, mask=row_ok, other=0.0)
        q = tl.exp(_log_q(_logits(z, e, PRECISION), m, log_q_sum, inv_t))  # (BLOCK_N, BLOCK_K)
        q_col += tl.sum(tl.where(row_ok[:, None] & code_ok[None, :], q, 0.0), axis=0)
    tl.store(q_col_ptr + codes, q_col, mask=code_ok)


# -- backward ---------------------------------------------------------------------------------------------------------
@triton.jit
def _q_dot_c_kernel(
    z_ptr, e_ptr, c_ptr, m_ptr, log_q_sum_ptr, out_ptr, N, K, D, n_splits, inv_t,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token block, split): sum_k q_nk c_k over the split's codes -> out[split, tokens] (S, N)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    log_q_sum = tl.load(log_q_sum_ptr + rows, mask=row_ok, other=0.0)
    k_start, k_end = _split_range(split, n_splits, K, BLOCK_K)
    total = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < k_end
        e = tl.load(e_ptr + codes.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=code_ok[:, None] & dim_ok[None, :], other=0.0)
        c = tl.load(c_ptr + codes, mask=code_ok, other=0.0)  # (BLOCK_K,)
        q = tl.exp(_log_q(_logits(z, e, PRECISION), m, log_q_sum, inv_t))
        total += tl.sum(tl.where(code_ok[None, :], q * c[None, :], 0.0), axis=1)
    tl.store(out_ptr + split * N + rows, total, mask=row_ok)


@triton.jit
def _dz_kernel(
    z_ptr, grad_ptr, e_ptr, c_ptr, m_ptr, lse_ptr, log_q_sum_ptr, row_term_ptr, p_dot_g_ptr, alpha_ptr, beta_ptr,
    dz_ptr, N, K, D, n_splits, inv_t,
    ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token block, split): sum_k dl_nk e_k over the split's codes -> dz[split, tokens, :] (S, N, D)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    row_dim_ok = row_ok[:, None] & dim_ok[None, :]
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_dim_ok, other=0.0)
    grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_dim_ok, other=0.0)
    m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p_dot_g = tl.load(p_dot_g_ptr + rows, mask=row_ok, other=0.0)
    log_q_sum = m
    row_term = m
    alpha = 0.0
    beta = 0.0
    if ENTROPY:
        log_q_sum = tl.load(log_q_sum_ptr + rows, mask=row_ok, other=0.0)
        row_term = tl.load(row_term_ptr + rows, mask=row_ok, other=0.0)
        alpha = tl.load(alpha_ptr)
        beta = tl.load(beta_ptr)
    k_start, k_end = _split_range(split, n_splits, K, BLOCK_K)
    dz = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < k_end
        e = tl.load(e_ptr + codes.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=code_ok[:, None] & dim_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
        c = tl.zeros((BLOCK_K,), tl.float32)
        if ENTROPY:
            c = tl.load(c_ptr + codes, mask=code_ok, other=0.0)  # (BLOCK_K,)
        dl = _logit_grad(z, grad, e, row_ok[:, None] & code_ok[None, :], c, m, lse, log_q_sum, row_term, p_dot_g,
                         alpha, beta, inv_t, ENTROPY, PRECISION)  # (BLOCK_N, BLOCK_K)
        dz = tl.dot(dl, e, dz, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
    tl.store(dz_ptr + (split * N + rows).to(tl.int64)[:, None] * D + dims[None, :], dz, mask=row_dim_ok)


@triton.jit
def _de_kernel(
    z_ptr, grad_ptr, e_ptr, c_ptr, m_ptr, lse_ptr, log_q_sum_ptr, row_term_ptr, p_dot_g_ptr, alpha_ptr, beta_ptr,
    de_ptr, N, K, D, inv_t,
    ENTROPY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (code block): sum_n dl_nk z_n over all tokens -> dE[codes, :] (K, D)."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_ok = codes < K
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    e = tl.load(e_ptr + codes.to(tl.int64)[:, None] * D + dims[None, :], mask=code_ok[:, None] & dim_ok[None, :],
                other=0.0)  # (BLOCK_K, BLOCK_D)
    c = tl.zeros((BLOCK_K,), tl.float32)
    alpha = 0.0
    beta = 0.0
    if ENTROPY:
        c = tl.load(c_ptr + codes, mask=code_ok, other=0.0)  # (BLOCK_K,)
        alpha = tl.load(alpha_ptr)
        beta = tl.load(beta_ptr)
    de = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        row_dim_ok = row_ok[:, None] & dim_ok[None, :]
        z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_dim_ok, other=0.0)
        grad = tl.load(grad_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_dim_ok, other=0.0)
        m = tl.load(m_ptr + rows, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        p_dot_g = tl.load(p_dot_g_ptr + rows, mask=row_ok, other=0.0)
        log_q_sum = m
        row_term = m
        if ENTROPY:
            log_q_sum = tl.load(log_q_sum_ptr + rows, mask=row_ok, other=0.0)
            row_term = tl.load(row_term_ptr + rows, mask=row_ok, other=0.0)
        dl = _logit_grad(z, grad, e, row_ok[:, None] & code_ok[None, :], c, m, lse, log_q_sum, row_term, p_dot_g,
                         alpha, beta, inv_t, ENTROPY, PRECISION)  # (BLOCK_N, BLOCK_K)
        de = tl.dot(tl.trans(dl), z, de, input_precision=PRECISION)  # (BLOCK_K, BLOCK_D)
    tl.store(de_ptr + codes.to(tl.int64)[:, None] * D + dims[None, :], de, mask=code_ok[:, None] & dim_ok[None, :])


_row_tuned = _row_kernel if INTERPRET else triton.autotune(
    configs=_configs(), key=["D", "N_BUCKET", "K_BUCKET", "ENTROPY", "PRECISION"])(_row_kernel)


# -- host side --------------------------------------------------------------------------------------------------------
def input_precision() -> str:
    """tl.dot's input_precision for fp32 inputs, from torch.get_float32_matmul_precision() (see the docstring)."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _bucket(n: int) -> int:
    return max(int(n), 1).bit_length()  # power-of-two bucket for autotuning


class _Step:
    """What one step keeps between its kernels: shapes, the launch config (shared by every kernel) and the
    per-token statistics (N,) unless noted."""

    def __init__(self, z: Tensor, codebook: Tensor, temperature: float, splits: int, entropy: bool) -> None:
        self.N, self.D = z.shape
        self.K = codebook.shape[0]
        self.inv_t = 1.0 / temperature
        self.splits, self.entropy = splits, entropy
        self.block_d = max(16, triton.next_power_of_2(self.D))
        self.precision = input_precision()
        self.config: dict = dict(INTERPRET_CONFIG)  # BLOCK_N, BLOCK_K (+ num_warps, num_stages on a GPU)
        self.index = self.max_logit = self.lse = self.soft = self.log_q_sum = self.sample_entropy = None
        self.c: Tensor | None = None  # (K,) dH(mean q) / d(mean q)

    def launch(self, kernel, grid: tuple[int, ...] | None, *args, **meta) -> None:
        """kernel[grid](*args) with the step's config; grid None: (token blocks, splits)."""
        if grid is None:
            grid = (triton.cdiv(self.N, self.config["BLOCK_N"]), self.splits)
        kernel[grid](*args, PRECISION=self.precision, BLOCK_D=self.block_d, **meta, **self.config)

    def code_blocks(self) -> tuple[int]:
        return (triton.cdiv(self.K, self.config["BLOCK_K"]),)


def _forward(z: Tensor, codebook: Tensor, step: _Step) -> Tensor | None:
    """The row pass, its merge and (entropy) the column pass: fills step's statistics; returns H(mean q) or None."""
    N, K, D, S = step.N, step.K, step.D, step.splits
    f32 = dict(dtype=torch.float32, device=z.device)
    m = torch.empty(S, N, **f32)  # (S, N) per split
    index = torch.empty(S, N, dtype=torch.int32, device=z.device)
    p_sum, y = torch.empty(S, N, **f32), torch.empty(S, N, D, **f32)
    q_sum, qa_sum = (torch.empty(S, N, **f32), torch.empty(S, N, **f32)) if step.entropy else (m, m)
    args = (z, codebook, m, index, p_sum, q_sum, qa_sum, y, N, K, D, S, step.inv_t, _bucket(N), _bucket(K))
    if INTERPRET:
        step.launch(_row_tuned, None, *args, ENTROPY=step.entropy)
    else:
        _row_tuned[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), S)](
            *args, ENTROPY=step.entropy, PRECISION=step.precision, BLOCK_D=step.block_d)
        best = _row_tuned.best_config
        step.config = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
    _merge(step, m, index, p_sum, q_sum, qa_sum, y)
    if not step.entropy:
        return None
    q_col = torch.empty(K, **f32)  # (K,) sum_n q_nk
    step.launch(_column_kernel, step.code_blocks(), z, codebook, step.max_logit, step.log_q_sum, q_col, N, K, D,
                step.inv_t)
    avg = q_col / N  # (K,) v = mean_n q
    log_avg = (avg + CODEBOOK_ENTROPY_EPS).log()
    step.c = -(log_avg + avg / (avg + CODEBOOK_ENTROPY_EPS))
    return -(avg * log_avg).sum()


def _merge(step: _Step, m: Tensor, index: Tensor, p_sum: Tensor, q_sum: Tensor, qa_sum: Tensor, y: Tensor) -> None:
    """The splits' states (S, N) [y: (S, N, D)] -> the step's k*, m, lse, y = p E, log q_sum, H(q_n) (N,)."""
    max_logit = m.amax(dim=0)  # (N,)
    step.index = torch.where(m == max_logit, index, NO_INDEX).amin(dim=0).long()  # lowest index among the best
    scale = torch.exp(m - max_logit)  # (S, N); 0 for an empty split (m = -inf)
    p_total = (scale * p_sum).sum(dim=0)  # (N,)
    step.max_logit, step.lse = max_logit, max_logit + p_total.log()
    step.soft = (scale[:, :, None] * y).sum(dim=0) / p_total[:, None]  # (N, D)
    if step.entropy:
        shift = ((m - max_logit) * step.inv_t).clamp(min=EXP_FLOOR[torch.float32])  # (S, N), as in the kernel
        q_scale = shift.exp()
        q_total = (q_scale * q_sum).sum(dim=0)
        qa_total = (q_scale * (qa_sum + shift * q_sum)).sum(dim=0)
        step.log_q_sum = q_total.log()
        step.sample_entropy = step.log_q_sum - qa_total / q_total  # H(q_n) = log q_sum - qa_sum / q_sum


def _backward(z: Tensor, codebook: Tensor, step: _Step, grad_zq: Tensor, grad_hard: Tensor | None,
              alpha: Tensor | None, beta: Tensor | None, codebook_grad: bool, need_dz: bool, need_de: bool
              ) -> tuple[Tensor | None, Tensor | None]:
    """dz (N, D) and dE (K, D); alpha, beta: 0-d scales of the entropy terms (None: they carry no gradient);
    codebook_grad: whether the codebook entropy has an upstream gradient (else <q_n, c> is not needed)."""
    N, K, D, S = step.N, step.K, step.D, step.splits
    entropy = alpha is not None
    p_dot_g = (grad_zq * step.soft).sum(dim=1)  # (N,) <p, g> = G . (p E)
    if entropy:
        q_dot_c = torch.zeros(N, dtype=torch.float32, device=z.device)
        if codebook_grad:
            partial = torch.empty(S, N, dtype=torch.float32, device=z.device)  # (S, N)
            step.launch(_q_dot_c_kernel, None, z, codebook, step.c, step.max_logit, step.log_q_sum, partial, N, K, D,
                        S, step.inv_t)
            q_dot_c = partial.sum(dim=0)
        row_term = -alpha * step.sample_entropy - beta * q_dot_c  # (N,)
        c, log_q_sum, alpha, beta = step.c, step.log_q_sum, alpha.reshape(1), beta.reshape(1)
    else:  # unused pointers
        row_term = c = log_q_sum = alpha = beta = step.lse
    stats = (c, step.max_logit, step.lse, log_q_sum, row_term, p_dot_g, alpha, beta)
    dz = de = None
    if need_dz:
        partial = torch.empty(S, N, D, dtype=torch.float32, device=z.device)  # (S, N, D)
        step.launch(_dz_kernel, None, z, grad_zq, codebook, *stats, partial, N, K, D, S, step.inv_t, ENTROPY=entropy)
        dz = partial.sum(dim=0)  # (N, D)
    if need_de:
        de = torch.empty(K, D, dtype=torch.float32, device=z.device)
        step.launch(_de_kernel, step.code_blocks(), z, grad_zq, codebook, *stats, de, N, K, D, step.inv_t,
                    ENTROPY=entropy)
        de.index_add_(0, step.index, grad_zq if grad_hard is None else grad_zq + grad_hard)  # dE_k* += G (+ G')
    return dz, de


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on this device (CUDA), or nothing to do (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class _IBQTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, codebook: Tensor, temperature: float, splits: int, entropy: bool):
        out_dtype = torch.promote_types(z.dtype, codebook.dtype)
        with torch.no_grad(), torch.autocast(device_type=z.device.type, enabled=False):
            zc = z.detach().to(torch.float32).contiguous()
            ec = codebook.detach().to(torch.float32).contiguous()
            step = _Step(zc, ec, temperature, splits, entropy)
            with _on(z.device):
                codebook_entropy = _forward(zc, ec, step)
            z_q = F.embedding(step.index, ec).to(out_dtype)  # exactly e_k*
            hard = z_q.clone()  # h E: the same value, its own gradient (to E's rows k* only)
            nan = torch.full((), float("nan"), dtype=torch.float32, device=z.device)
            sample_entropy = step.sample_entropy.mean() if entropy else nan
            codebook_entropy = codebook_entropy if entropy else nan.clone()
        ctx.save_for_backward(zc, ec)
        ctx.step, ctx.temperature, ctx.entropy = step, temperature, entropy
        ctx.dtypes = (z.dtype, codebook.dtype)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(step.index)
        if not entropy:
            ctx.mark_non_differentiable(sample_entropy, codebook_entropy)
        return z_q, hard, step.index, sample_entropy, codebook_entropy

    @staticmethod
    def backward(ctx, grad_zq, grad_hard, _grad_indices, grad_sample, grad_codebook):
        zc, ec = ctx.saved_tensors
        need_dz, need_de = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dz or need_de):
            return None, None, None, None, None
        with torch.no_grad(), torch.autocast(device_type=zc.device.type, enabled=False):
            grad_zq = torch.zeros_like(zc) if grad_zq is None else grad_zq.to(torch.float32).contiguous()
            alpha, beta = entropy_grad_scales(ctx.entropy, grad_sample, grad_codebook, zc.shape[0], ctx.temperature, zc)
            grad_hard = None if grad_hard is None else grad_hard.to(torch.float32)
            with _on(zc.device):
                dz, de = _backward(zc, ec, ctx.step, grad_zq, grad_hard, alpha, beta, grad_codebook is not None,
                                   need_dz, need_de)
        z_dtype, e_dtype = ctx.dtypes
        dz = dz.to(z_dtype) if dz is not None else None
        de = de.to(e_dtype) if de is not None else None
        return dz, de, None, None, None


def ibq_triton(
    z: Tensor, codebook: Tensor, temperature: float = 0.01, *, entropy: bool = True, code_chunk: int | None = None
) -> IBQResult:
    """The IBQ step of `ibq_chunked` (same arguments, values and gradients) in Triton kernels.

    z (N, D), codebook (K, D): float32 (bf16/fp16 are computed in fp32; z_q comes back in their promoted dtype);
    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. entropy=False skips everything the entropy penalty needs
    and returns NaN for both entropies. code_chunk: codes per split of the (token block, split) grids (rounded up to
    whole tiles; default `split_count`); it changes no result beyond rounding of the merged sums, but each split
    keeps (N, D) partial sums of y and dz, so a small code_chunk with a large K costs memory."""
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.shape[0] == 0 or codebook.shape[0] == 0:
        raise ValueError(f"the IBQ step needs at least one token and one code, "
                         f"got N={z.shape[0]}, K={codebook.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if torch.float64 in (z.dtype, codebook.dtype):
        raise ValueError("the triton IBQ step runs in fp32: float64 inputs go to the chunked or dense backend")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on one device, got {z.device} and {codebook.device}")
    if z.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the triton IBQ step needs CUDA tensors (or TRITON_INTERPRET=1 set before vqtok's triton "
                         f"kernels are imported), got {z.device}")
    N, K = z.shape[0], codebook.shape[0]
    if code_chunk is not None:
        if int(code_chunk) < 1:
            raise ValueError(f"code_chunk must be a positive integer, got {code_chunk}")
        splits = triton.cdiv(K, int(code_chunk))
    else:
        splits = split_count(N, K, z.device)
    z_q, hard, indices, sample_entropy, codebook_entropy = _IBQTritonFunction.apply(
        z, codebook, float(temperature), splits, entropy)
    return IBQResult(z_q, indices, sample_entropy, codebook_entropy, hard)
