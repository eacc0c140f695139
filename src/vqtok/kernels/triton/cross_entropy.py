"""The output head's cross-entropy in Triton: `cross_entropy_triton` returns what `cross_entropy_chunked`
(kernels/cross_entropy.py) returns, the same per-token loss and gradients to fp32 rounding, with no (N, K) tensor.

Notation as there: logits l = h W^T + b, lse = log sum_k exp(l), loss_n = lse_n - l_{n, t_n} (0 on ignored rows),
g = dL/dloss (0 on ignored rows), dl = g (softmax(l) - onehot(t)).
Forward, `_row_kernel` (grid cdiv(N, BLOCK_N) x S code splits): a program takes BLOCK_N tokens and scans its split's
codes in tiles of BLOCK_K: l = tl.dot(h, W^T) + b per tile, an online log-sum-exp (running max m and
s = sum exp(l - m), rescaled by exp(old m - new m) when m grows) and the target's logit where the target is in the
tile (-inf elsewhere). Each split writes (m, s, target logit) to (S, N); torch merges them: lse = M + log sum_s
s exp(m_s - M), target logit = the max over splits (an out-of-range target stays -inf: an infinite loss).
Backward, the tiles' logits recomputed with the one function `_logits`:
- `_dh_kernel` (grid cdiv(N, BLOCK_N) x S): dh = sum_k dl_k W_k over the split's codes -> (S, N, d), summed in torch;
- `_dw_kernel` (grid cdiv(K, BLOCK_K)): dW_k = sum_n dl_nk h_n and db_k = sum_n dl_nk over all tokens.
Every sum has one owner program or is a fixed-order torch sum: no atomics, deterministic. The structure is
triton/ibq.py's (its row pass and its dz / dE kernels) with the entropy terms left out and a target in their place.

Precision: inputs fp32 (bf16/fp16 are upcast first, float64 is refused: the chunked path computes it), statistics and
accumulators fp32; tl.dot's input_precision follows torch.get_float32_matmul_precision() (`input_precision`, as the
IBQ kernel), read at the forward and kept for the backward. d is padded to a power of two >= 16 by masked loads (a
whole token or code row is one tile: meant for d <= 256); ragged N and K are masked. Configs: under TRITON_INTERPRET=1
(tests on the CPU) the IBQ kernel's small fixed tiles; on a GPU the row kernel is autotuned over the IBQ kernel's
configs (keyed on d, power-of-two buckets of N and K, the bias flag and the precision) and the backward kernels reuse
the config it picked, as the IBQ kernel does. Tested here through the interpreter only: not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..cross_entropy import check_cross_entropy_inputs, compute_dtype
from . import interpreting, split_count
from .ibq import INTERPRET_CONFIG, _bucket, _configs, _on, input_precision

INTERPRET = interpreting()  # read once: triton.jit below decides between the compiler and the interpreter now


# -- the equations on one (token tile, code tile) ---------------------------------------------------------------------
@triton.jit
def _logits(h, w, b, PRECISION: tl.constexpr):
    """l = h w^T + b: (BLOCK_N, BLOCK_D) x (BLOCK_K, BLOCK_D) + (BLOCK_K,) -> (BLOCK_N, BLOCK_K). Every kernel's
    logits come from here, so the backward's equal the forward's."""
    return tl.dot(h, tl.trans(w), input_precision=PRECISION) + b[None, :]


@triton.jit
def _logit_grad(h, w, b, codes, targets, lse, g, tile_ok, PRECISION: tl.constexpr):
    """dl = g (p - onehot(t)) on a tile (BLOCK_N, BLOCK_K), 0 outside tile_ok."""
    p = tl.exp(_logits(h, w, b, PRECISION) - lse[:, None])
    onehot = (codes[None, :] == targets[:, None]).to(tl.float32)
    return tl.where(tile_ok, g[:, None] * (p - onehot), 0.0)


@triton.jit
def _split_range(split, n_splits, K, BLOCK_K: tl.constexpr):
    """Codes [start, end) of a split: whole tiles of BLOCK_K (the last split ends at K; a split may be empty)."""
    per_split = tl.cdiv(tl.cdiv(K, n_splits), BLOCK_K) * BLOCK_K
    start = split * per_split
    return start, tl.minimum(start + per_split, K)


@triton.jit
def _load_rows(ptr, rows, dims, row_ok, dim_ok, D):
    """The rows (BLOCK_N or BLOCK_K of them) of a (*, D) matrix, zero-padded to BLOCK_D columns."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                   other=0.0)


# -- forward ----------------------------------------------------------------------------------------------------------
@triton.jit
def _row_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, target_ptr, N, K, D, n_splits,
    N_BUCKET, K_BUCKET,  # autotuning keys only
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token block, split): m, s = sum exp(l - m) and the target logit of its tokens over the split's
    codes -> [split, tokens] of (S, N) each."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    h = _load_rows(h_ptr, rows, dims, row_ok, dim_ok, D)  # (BLOCK_N, BLOCK_D)
    targets = tl.load(t_ptr + rows, mask=row_ok, other=-1)  # (BLOCK_N,)
    k_start, k_end = _split_range(split, n_splits, K, BLOCK_K)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < k_end
        w = _load_rows(w_ptr, codes, dims, code_ok, dim_ok, D)  # (BLOCK_K, BLOCK_D)
        b = tl.zeros((BLOCK_K,), tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + codes, mask=code_ok, other=0.0)
        l = tl.where(code_ok[None, :], _logits(h, w, b, PRECISION), float("-inf"))  # (BLOCK_N, BLOCK_K)
        hit = tl.where(codes[None, :] == targets[:, None], l, float("-inf"))
        target_logit = tl.maximum(target_logit, tl.max(hit, axis=1))
        new_m = tl.maximum(m, tl.max(l, axis=1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(l - new_m[:, None]), axis=1)  # exp(-inf) = 0 on the first tile
        m = new_m
    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(target_ptr + out, target_logit, mask=row_ok)


# -- backward ---------------------------------------------------------------------------------------------------------
@triton.jit
def _dh_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dh_ptr, N, K, D, n_splits,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (token block, split): sum_k dl_nk W_k over the split's codes -> dh[split, tokens, :] (S, N, d)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    h = _load_rows(h_ptr, rows, dims, row_ok, dim_ok, D)
    targets = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    k_start, k_end = _split_range(split, n_splits, K, BLOCK_K)
    dh = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < k_end
        w = _load_rows(w_ptr, codes, dims, code_ok, dim_ok, D)
        b = tl.zeros((BLOCK_K,), tl.float32)
        if HAS_BIAS:
            b = tl.load(b_ptr + codes, mask=code_ok, other=0.0)
        dl = _logit_grad(h, w, b, codes, targets, lse, g, row_ok[:, None] & code_ok[None, :], PRECISION)
        dh = tl.dot(dl, w, dh, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
    tl.store(dh_ptr + (split * N + rows).to(tl.int64)[:, None] * D + dims[None, :], dh,
             mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _dw_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dw_ptr, db_ptr, N, K, D,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (code block): sum_n dl_nk h_n -> dW[codes, :] (K, d) and sum_n dl_nk -> db[codes] (K,)."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_ok = codes < K
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    w = _load_rows(w_ptr, codes, dims, code_ok, dim_ok, D)  # (BLOCK_K, BLOCK_D)
    b = tl.zeros((BLOCK_K,), tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + codes, mask=code_ok, other=0.0)
    dw = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    db = tl.zeros((BLOCK_K,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        h = _load_rows(h_ptr, rows, dims, row_ok, dim_ok, D)
        targets = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        dl = _logit_grad(h, w, b, codes, targets, lse, g, row_ok[:, None] & code_ok[None, :], PRECISION)
        dw = tl.dot(tl.trans(dl), h, dw, input_precision=PRECISION)  # (BLOCK_K, BLOCK_D)
        db += tl.sum(dl, axis=0)
    tl.store(dw_ptr + codes.to(tl.int64)[:, None] * D + dims[None, :], dw, mask=code_ok[:, None] & dim_ok[None, :])
    tl.store(db_ptr + codes, db, mask=code_ok)


_row_tuned = _row_kernel if INTERPRET else triton.autotune(
    configs=_configs(), key=["D", "N_BUCKET", "K_BUCKET", "HAS_BIAS", "PRECISION"])(_row_kernel)


# -- host side --------------------------------------------------------------------------------------------------------
class _Launch:
    """The shapes and the launch config every kernel of one call shares."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, splits: int | None) -> None:
        self.N, self.D = hidden.shape
        self.K = weight.shape[0]
        self.has_bias = bias is not None
        self.block_d = max(16, triton.next_power_of_2(self.D))
        self.precision = input_precision()
        self.config: dict = dict(INTERPRET_CONFIG)  # BLOCK_N, BLOCK_K (+ num_warps, num_stages: the tuned row pass's)
        self.splits = splits or split_count(self.N, self.K, hidden.device)

    def __call__(self, kernel, grid: tuple[int, ...] | None, *args) -> None:
        """kernel[grid](*args) with the shared config; grid None: (token blocks, splits)."""
        if grid is None:
            grid = (triton.cdiv(self.N, self.config["BLOCK_N"]), self.splits)
        kernel[grid](*args, HAS_BIAS=self.has_bias, PRECISION=self.precision, BLOCK_D=self.block_d, **self.config)


def _forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, launch: _Launch
             ) -> tuple[Tensor, Tensor]:
    """(lse (N,), target logit (N,), -inf for a target outside [0, K)) from the row kernel's splits."""
    N, S = launch.N, launch.splits
    m, s, target = (torch.empty(S, N, dtype=torch.float32, device=hidden.device) for _ in range(3))  # (S, N)
    args = (hidden, weight, bias if bias is not None else hidden, targets, m, s, target, N, launch.K, launch.D, S,
            _bucket(N), _bucket(launch.K))
    if INTERPRET:
        launch(_row_tuned, None, *args)
    else:
        _row_tuned[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), S)](
            *args, HAS_BIAS=launch.has_bias, PRECISION=launch.precision, BLOCK_D=launch.block_d)
        best = _row_tuned.best_config
        launch.config = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
    max_logit = m.amax(dim=0)  # (N,)
    lse = max_logit + (s * torch.exp(m - max_logit)).sum(dim=0).log()  # an empty split: m = -inf, s = 0
    return lse, target.amax(dim=0)


def _backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor, g: Tensor,
              launch: _Launch, needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    N, K, D, S = launch.N, launch.K, launch.D, launch.splits
    args = (hidden, weight, bias if bias is not None else hidden, targets, lse, g)
    dh = dw = db = None
    if needs[0]:
        partial = torch.empty(S, N, D, dtype=torch.float32, device=hidden.device)  # (S, N, d)
        launch(_dh_kernel, None, *args, partial, N, K, D, S)
        dh = partial.sum(dim=0)
    if needs[1] or needs[2]:
        dw = torch.empty(K, D, dtype=torch.float32, device=hidden.device)
        db = torch.empty(K, dtype=torch.float32, device=hidden.device)
        launch(_dw_kernel, (triton.cdiv(K, launch.config["BLOCK_K"]),), *args, dw, db, N, K, D)
    return dh, (dw if needs[1] else None), (db if needs[2] else None)


class _CrossEntropyTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                splits: int | None) -> Tensor:
        with torch.no_grad(), torch.autocast(device_type=hidden.device.type, enabled=False):
            hc = hidden.detach().to(torch.float32).contiguous()
            wc = weight.detach().to(torch.float32).contiguous()
            bc = None if bias is None else bias.detach().to(torch.float32).contiguous()
            tc = targets.long().contiguous()
            launch = _Launch(hc, wc, bc, splits)
            with _on(hidden.device):
                lse, target_logit = _forward(hc, wc, bc, tc, launch)
            valid = tc != ignore_index
            loss = torch.where(valid, lse - target_logit, 0.0)  # (N,)
        ctx.save_for_backward(hc, wc, bc, tc, valid, lse)
        ctx.launch = launch
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor | None):
        hc, wc, bc, tc, valid, lse = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bc is not None and ctx.needs_input_grad[2])
        if grad_loss is None or not any(needs):
            return None, None, None, None, None, None
        with torch.no_grad(), torch.autocast(device_type=hc.device.type, enabled=False):
            g = torch.where(valid, grad_loss.to(torch.float32), 0.0).contiguous()  # (N,)
            with _on(hc.device):
                dh, dw, db = _backward(hc, wc, bc, tc, lse, g, ctx.launch, needs)
        return dh, dw, db, None, None, None  # autograd casts each to its input's dtype


def cross_entropy_triton(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         ignore_index: int = -100, *, code_chunk: int | None = None) -> Tensor:
    """`cross_entropy_chunked`'s per-token loss (N,) and gradients in Triton kernels: CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1; fp32 (bf16/fp16 inputs computed in fp32, float64 refused). code_chunk: codes per split
    of the (token block, split) grids (rounded up to whole tiles; default `split_count`); each split keeps an
    (N, d) partial dh."""
    check_cross_entropy_inputs(hidden, weight, bias, targets, ignore_index)
    if compute_dtype(hidden, weight, bias) == torch.float64:
        raise ValueError("the triton cross-entropy runs in fp32: float64 inputs go to the chunked or dense backend")
    devices = {t.device for t in (hidden, weight, bias, targets) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, bias and targets must be on one device, got {sorted(map(str, devices))}")
    if hidden.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"the triton cross-entropy needs CUDA tensors (or TRITON_INTERPRET=1 set before vqtok's "
                         f"triton kernels are imported), got {hidden.device}")
    splits = None
    if code_chunk is not None:
        if int(code_chunk) < 1:
            raise ValueError(f"code_chunk must be a positive integer, got {code_chunk}")
        splits = triton.cdiv(weight.shape[0], int(code_chunk))
    return _CrossEntropyTritonFunction.apply(hidden, weight, bias, targets, int(ignore_index), splits)
